"""The paper's findings, measured on the shipped example family with the public analyses.

One function, `findings()`, runs sparsity, consensus, principal/low overlap, spectrum and
drift on `base` vs `sft` and the RL runs, and returns the headline numbers with a
one-line reading of each. `ckptprobe demo`, the walkthrough notebook and the tests
use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ckptprobe.errors import CheckpointNotFoundError

RL_RUNS = ("rl-1", "rl-2", "rl-3")
RL_SERIES = ("rl-1-step050", "rl-1-step100", "rl-1-step150", "rl-1")
SCRAMBLED = ("base-scrambled", "rl-1-scrambled")  # rl-1's recipe and seed from a scrambled base


def _versus_chance(ratio: float) -> str:
    """Words for an observed/chance ratio: the reading follows the number."""
    return ("at chance" if ratio < 1.1 else "close to chance" if ratio < 1.5 else "above chance" if ratio < 2
            else "far above chance")


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

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "sft": self.sft, "rl": self.rl, "rl_runs": self.rl_runs,
                "baseline": self.baseline, "reading": self.reading}


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
    items.append(Finding(
        "sparsity", "update sparsity (bitwise-unchanged fraction)", sp["sft"], _mean(sp[n] for n in RL_RUNS),
        {n: sp[n] for n in RL_RUNS}, None,
        f"RL left {100 * _mean(sp[n] for n in RL_RUNS):.0f}% of weights bitwise unchanged; SFT {100 * sp['sft']:.0f}%."))

    say("consensus")
    cons = consensus(base, rl, layer=0)
    total = cons.total
    items.append(Finding(
        "jaccard", "Jaccard between RL runs' update masks", None, total.jaccard_mean, {}, total.bernoulli_mean,
        f"Independent RL runs change the same weights: Jaccard {total.jaccard_mean:.2f} vs "
        f"{total.bernoulli_mean:.2f} for independent masks of the same density ({total.lift:.1f}x)."))

    say("principal")
    pr = principal_overlap(base, [sft, *rl], rank=rank, alpha=alpha)
    for mask, title, word in (("principal", f"overlap with principal weights (k={rank})", "avoid"),
                              ("low", "overlap with low-magnitude weights", "prefer")):
        per = {refs[ft]: pr.total(ft).overlap(mask) for ft in pr.finetuned}
        base_rate = pr.total(pr.finetuned[0]).baseline(mask)
        rl_mean = _mean(per[n] for n in RL_RUNS)
        items.append(Finding(
            f"overlap_{mask}", title, per["sft"], rl_mean, {n: per[n] for n in RL_RUNS}, base_rate,
            f"RL updates {word} the {mask} weights: {rl_mean:.3f} of them fall there vs {base_rate:.3f} by chance "
            f"({rl_mean / base_rate:.2f}x); SFT {per['sft']:.3f} ({per['sft'] / base_rate:.2f}x)."))

    say("spectrum")
    spec = spectrum(base, [sft, *rl], k=rank)
    rows = spec.rows()
    nss = {refs[ft]: _mean(r["nss"] for r in rows if r["finetuned"] == ft) for ft in spec.finetuned}
    angle = {refs[ft]: _mean(max(r["max_angle_u"], r["max_angle_v"]) for r in rows
                             if r["finetuned"] == ft and r["error"] is None) for ft in spec.finetuned}
    rl_nss, rl_angle = _mean(nss[n] for n in RL_RUNS), _mean(angle[n] for n in RL_RUNS)
    items.append(Finding(
        "nss", "normalized spectrum shift (mean over matrices)", nss["sft"], rl_nss,
        {n: nss[n] for n in RL_RUNS}, 0.0,
        f"RL barely moves the spectrum: NSS {rl_nss:.1e} vs SFT {nss['sft']:.1e} ({nss['sft'] / rl_nss:.0f}x)."))
    items.append(Finding(
        "max_angle", f"largest top-{rank} principal angle, degrees (mean over matrices)", angle["sft"], rl_angle,
        {n: angle[n] for n in RL_RUNS}, 0.0,
        f"RL keeps the top-{rank} singular subspaces: {rl_angle:.2f} deg vs SFT {angle['sft']:.1f} deg."))

    say("drift")
    dr = drift(base, [src(n) for n in RL_SERIES])
    growth = [dr.groups[g]["rel_to_base"] for g in ("attention", "mlp") if g in dr.groups]
    items.append(Finding(
        "drift", "relative weight change of rl-1 from base (attention+mlp, last checkpoint)", None,
        _mean(g[-1] for g in growth), {}, None,
        f"rl-1 drifts steadily over its {len(RL_SERIES)} checkpoints "
        f"({', '.join(f'{_mean(g[t] for g in growth):.1e}' for t in range(len(RL_SERIES)))}); "
        f"lm_head surges: {len(dr.surges) or 'none'}."))

    say("scramble")
    import json

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
        items.append(Finding(
            f"scramble_layer{layer}", f"rl-1-scrambled vs rl-1: overlap of update masks, layer {layer} ({state})",
            None, g.overlap, {"rl-1-scrambled": g.overlap, "jaccard": g.jaccard, "bernoulli": g.bernoulli,
                              "rl-2": seeds[layer].overlap},
            g.chance,
            f"Layer {layer}, {state}{' (same function, other coordinates)' if state == 'scrambled' else ''}: "
            f"rl-1's recipe and seed from the scrambled base update the same coordinates as rl-1 "
            f"{_versus_chance(g.overlap / g.chance)}: "
            f"overlap {g.overlap:.2f} vs {g.chance:.2f} by chance ({g.overlap / g.chance:.2f}x), "
            f"Jaccard {g.jaccard:.2f} vs {g.bernoulli:.2f} ({g.jaccard / g.bernoulli:.2f}x); "
            f"rl-2 (another seed, unscrambled base) overlaps rl-1 {seeds[layer].overlap:.2f} there."))
    return Findings(str(root or path("base").parent), rank, alpha, tuple(items),
                    {"consensus": cons, "principal": pr, "spectrum": spec, "drift": dr, "scramble": ov})
