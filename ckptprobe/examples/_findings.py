"""The paper's findings, measured on the shipped example family with the public analyses.

One function, `findings()`, runs sparsity, consensus, principal/low overlap, spectrum and
drift on `base` vs `sft` and the RL runs, and returns the headline numbers with a
one-line reading of each. `ckptprobe demo`, the walkthrough notebook and the tests
use it.

The words of a reading follow its numbers, never the other way round: each reading picks
its verb from `THRESHOLDS` (a ratio or an angle against stated bounds), so a family that
does not show a finding says so. To add a reading, add its scale to `THRESHOLDS` (if it
needs one) and its sentence to `READINGS`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ckptprobe.errors import CheckpointNotFoundError

RL_RUNS = ("rl-1", "rl-2", "rl-3")
RL_SERIES = ("rl-1-step050", "rl-1-step100", "rl-1-step150", "rl-1")
SCRAMBLED = ("base-scrambled", "rl-1-scrambled")  # rl-1's recipe and seed from a scrambled base

# scale -> ((upper bound, word), ...): a value takes the word of the first row whose bound it is below.
THRESHOLDS = {
    # Jaccard of two runs' update masks / Jaccard of independent masks of the same densities.
    "agreement": ((1 / 1.5, "less"), (1.5, "chance"), (math.inf, "agree")),
    # share of the updates in a mask / the mask's density (what a random update would give).
    "overlap": ((0.5, "avoid"), (2.0, "chance"), (math.inf, "prefer")),
    # SFT's NSS / RL's NSS: RL "barely moves" the spectrum when SFT moves it 10x more.
    "spectrum": ((10.0, "moves"), (math.inf, "barely moves")),
    # largest principal angle between the base's and the fine-tune's top-k subspaces, degrees.
    "angle": ((5.0, "keeps"), (math.inf, "rotates")),
    # overlap of two runs' update masks at the same coordinates / its chance level.
    "coordinates": ((1.1, "at chance"), (1.5, "close to chance"), (2.0, "above chance"),
                    (math.inf, "far above chance")),
}


def verdict(scale: str, value: float) -> str:
    """The word `THRESHOLDS[scale]` gives `value` (NaN: "unknown")."""
    return next((word for bound, word in THRESHOLDS[scale] if value < bound), "unknown")


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return math.nan
    return a / b if b else (math.inf if a else 1.0)


def _read_sparsity(f: "Finding", detail: dict) -> str:
    return f"RL left {100 * f.rl:.0f}% of weights bitwise unchanged; SFT {100 * f.sft:.0f}%."


def _read_jaccard(f: "Finding", detail: dict) -> str:
    lift = _ratio(f.rl, f.baseline)
    head = {"agree": "Independent RL runs change the same weights",
            "chance": "Independent RL runs overlap as much as independent masks would",
            "less": "Independent RL runs change different weights",
            "unknown": "RL runs' agreement is unknown"}[verdict("agreement", lift)]
    return (f"{head}: Jaccard {f.rl:.2f} vs {f.baseline:.2f} for independent masks of the same density "
            f"({lift:.1f}x).")


def _read_overlap(f: "Finding", detail: dict) -> str:
    mask = detail["mask"]
    rl, sft = _ratio(f.rl, f.baseline), _ratio(f.sft, f.baseline)
    head = {"avoid": f"RL updates avoid the {mask} weights", "prefer": f"RL updates prefer the {mask} weights",
            "chance": f"RL updates land on the {mask} weights at chance rate",
            "unknown": f"RL updates' overlap with the {mask} weights is unknown"}[verdict("overlap", rl)]
    sft_word = {"avoid": "avoids them", "prefer": "prefers them", "chance": "at chance",
                "unknown": "unknown"}[verdict("overlap", sft)]
    return (f"{head}: {f.rl:.3f} of them fall there vs {f.baseline:.3f} by chance ({rl:.2f}x); "
            f"SFT {f.sft:.3f} ({sft:.2f}x, {sft_word}).")


def _read_nss(f: "Finding", detail: dict) -> str:
    ratio = _ratio(f.sft, f.rl)
    word = "does not move" if f.rl == 0 else verdict("spectrum", ratio)
    return f"RL {word} the spectrum: NSS {f.rl:.1e} vs SFT {f.sft:.1e} (SFT/RL {ratio:.0f}x)."


def _read_angle(f: "Finding", detail: dict) -> str:
    k = detail["rank"]
    return (f"RL {verdict('angle', f.rl)} the top-{k} singular subspaces: {f.rl:.2f} deg vs SFT {f.sft:.1f} deg "
            f"(SFT {verdict('angle', f.sft)} them).")


def _read_drift(f: "Finding", detail: dict) -> str:
    series, surges = detail["series"], detail["surges"]
    steady = all(b > a for a, b in zip(series, series[1:]))
    how = "drifts steadily away from base" if steady else "does not drift steadily (its distance to base does not grow at every checkpoint)"
    return (f"rl-1 {how} over its {len(series)} checkpoints ({', '.join(f'{v:.1e}' for v in series)}); "
            f"lm_head surges: {surges or 'none'}.")


def _read_scramble(f: "Finding", detail: dict) -> str:
    ratio, jratio = _ratio(f.rl, f.baseline), _ratio(detail["jaccard"], detail["bernoulli"])
    what = " (same function, other coordinates)" if detail["scrambled"] else ""
    return (f"Layer {detail['layer']}, {'scrambled' if detail['scrambled'] else 'untouched'}{what}: rl-1's recipe "
            f"and seed from the scrambled base update the same coordinates as rl-1 {verdict('coordinates', ratio)}: "
            f"overlap {f.rl:.2f} vs {f.baseline:.2f} by chance ({ratio:.2f}x), Jaccard {detail['jaccard']:.2f} vs "
            f"{detail['bernoulli']:.2f} ({jratio:.2f}x); rl-2 (another seed, unscrambled base) overlaps rl-1 "
            f"{detail['seed_overlap']:.2f} there.")


# finding key -> its sentence, from the finding's numbers and `detail` (what else the sentence needs).
READINGS: dict[str, Callable[["Finding", dict], str]] = {
    "sparsity": _read_sparsity, "jaccard": _read_jaccard, "overlap_principal": _read_overlap,
    "overlap_low": _read_overlap, "nss": _read_nss, "max_angle": _read_angle, "drift": _read_drift,
    "scramble_layer": _read_scramble,  # keys ending in a layer index share the reading of their stem
}


NO_SFT = {"jaccard", "drift", "scramble_layer"}  # findings about the RL runs only


def _finding(key: str, title: str, sft, rl, rl_runs: dict, baseline, **detail) -> "Finding":
    """A Finding read by `READINGS[key]`, or "not measured" when a number it needs is missing."""
    f = Finding(key, title, sft, rl, rl_runs, baseline, "", detail)
    stem = key.rstrip("0123456789")
    missing = rl is None or (sft is None and stem not in NO_SFT) or None in detail.get("series", ())
    reading = f"{title}: not measured (no tensor to measure it on)." if missing else READINGS[stem](f, detail)
    return Finding(key, title, sft, rl, rl_runs, baseline, reading, detail)


@dataclass(frozen=True)
class Finding:
    """One measured quantity for SFT and for the RL runs (mean over runs, and each run)."""

    key: str
    title: str
    sft: float | None
    rl: float | None
    rl_runs: dict
    baseline: float | None  # what chance (or "no change") gives, when there is such a number
    reading: str
    detail: dict = field(default_factory=dict)  # the other numbers the reading states (drift series, Jaccard, ...)

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "sft": self.sft, "rl": self.rl, "rl_runs": self.rl_runs,
                "baseline": self.baseline, "reading": self.reading, "detail": self.detail}


@dataclass(frozen=True)
class Findings:
    root: str
    rank: int
    alpha: float
    items: tuple[Finding, ...]
    results: dict = field(repr=False, default_factory=dict)  # the analyses' full results, for plots

    def __getitem__(self, key: str) -> Finding:
        return next(f for f in self.items if f.key == key)

    def to_dict(self) -> dict:
        return {"command": "demo", "examples": self.root, "rank": self.rank, "alpha": self.alpha,
                "findings": [f.to_dict() for f in self.items]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def findings(root: str | Path | None = None, rank: int = 8, alpha: float = 0.05,
             progress: Callable[[str], None] | None = None) -> Findings:
    """Measure the family in `root` (default: the shipped one); `rank`/`alpha` as in `ckptprobe principal`."""
    from ckptprobe.analysis.consensus import consensus
    from ckptprobe.analysis.drift import drift
    from ckptprobe.analysis.principal import principal_overlap
    from ckptprobe.analysis.sparsity import sparsity
    from ckptprobe.analysis.spectrum import spectrum
    from ckptprobe.examples import path
    from ckptprobe.io.sources import open_source

    def src(name):
        folder = Path(root) / name if root else path(name)
        if not folder.is_dir():
            raise CheckpointNotFoundError(f"{folder}: example checkpoint missing",
                                          hint="rebuild the family with `ckptprobe demo --rebuild DIR`")
        return open_source(str(folder))

    say = progress or (lambda line: None)
    base, sft, rl = src("base"), src("sft"), [src(n) for n in RL_RUNS]
    runs = {"sft": sft, **dict(zip(RL_RUNS, rl))}
    refs = {s.ref: n for n, s in runs.items()}
    items = []

    say("sparsity")
    sp = {n: sparsity(base, s).total.sparsity for n, s in runs.items()}
    items.append(_finding("sparsity", "update sparsity (bitwise-unchanged fraction)", sp["sft"],
                          _mean(sp[n] for n in RL_RUNS), {n: sp[n] for n in RL_RUNS}, None))

    say("consensus")
    cons = consensus(base, rl, layer=0)
    total = cons.total
    items.append(_finding("jaccard", "Jaccard between RL runs' update masks", None, total.jaccard_mean, {},
                          total.bernoulli_mean))

    say("principal")
    pr = principal_overlap(base, [sft, *rl], rank=rank, alpha=alpha)
    for mask, title in (("principal", f"overlap with principal weights (k={rank})"),
                        ("low", "overlap with low-magnitude weights")):
        per = {refs[ft]: pr.total[ft].overlap(mask) for ft in pr.finetuned}
        items.append(_finding(f"overlap_{mask}", title, per["sft"], _mean(per[n] for n in RL_RUNS),
                              {n: per[n] for n in RL_RUNS}, pr.total[pr.finetuned[0]].baseline(mask), mask=mask))

    say("spectrum")
    spec = spectrum(base, [sft, *rl], k=rank)
    rows = spec.rows()
    nss = {refs[ft]: _mean(r["nss"] for r in rows if r["finetuned"] == ft) for ft in spec.finetuned}
    angle = {refs[ft]: _mean(max(r["max_angle_u"], r["max_angle_v"]) for r in rows
                             if r["finetuned"] == ft and r["error"] is None) for ft in spec.finetuned}
    items.append(_finding("nss", "normalized spectrum shift (mean over matrices)", nss["sft"],
                          _mean(nss[n] for n in RL_RUNS), {n: nss[n] for n in RL_RUNS}, 0.0))
    items.append(_finding("max_angle", f"largest top-{rank} principal angle, degrees (mean over matrices)",
                          angle["sft"], _mean(angle[n] for n in RL_RUNS), {n: angle[n] for n in RL_RUNS}, 0.0,
                          rank=rank))

    say("drift")
    dr = drift(base, [src(n) for n in RL_SERIES])
    groups = dr.by("group")
    growth = [groups[g].rel_to_base.tolist() for g in ("attention", "mlp") if g in groups]
    series = [_mean(g[t] for g in growth) for t in range(len(RL_SERIES))]
    items.append(_finding("drift", "relative weight change of rl-1 from base (attention+mlp, last checkpoint)",
                          None, series[-1], {}, None, series=series, surges=len(dr.surges)))

    say("scramble")
    from ckptprobe.analysis.overlap import mask_overlap
    from ckptprobe.analysis.scramble import RECORD_FILE

    scr_base, scr_run = (src(n) for n in SCRAMBLED)
    scrambled = json.loads((Path(scr_base.ref) / RECORD_FILE).read_text())["layers"]
    ov = mask_overlap(base, rl[0], scr_base, scr_run)
    seeds = mask_overlap(base, rl[0], base, rl[1]).by_layer()  # what another seed gives, unscrambled
    for layer, g in ov.by_layer().items():
        if layer is None:
            continue
        state = "scrambled" if layer in scrambled else "untouched"
        items.append(_finding(
            f"scramble_layer{layer}", f"rl-1-scrambled vs rl-1: overlap of update masks, layer {layer} ({state})",
            None, g.overlap, {"rl-1-scrambled": g.overlap, "rl-2": seeds[layer].overlap}, g.chance,  # overlap with rl-1
            layer=layer, scrambled=layer in scrambled, jaccard=g.jaccard, bernoulli=g.bernoulli,
            seed_overlap=seeds[layer].overlap))
    return Findings(str(root or path("base").parent), rank, alpha, tuple(items),
                    {"consensus": cons, "principal": pr, "spectrum": spec, "drift": dr, "scramble": ov})
