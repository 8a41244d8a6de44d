"""`consensus`: every statistic against brute-force numpy on the planted boolean masks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from factory import tiny_weights
from typer.testing import CliRunner

import ckptprobe.analysis.mask_scan as cons
from ckptprobe.analysis import kernels
from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.analysis.consensus import consensus
from ckptprobe.analysis.consensus_stats import bernoulli_jaccard, poisson_binomial, stripe_index
from ckptprobe.analysis.update import CompareMode, update_mask
from ckptprobe.cli import main
from ckptprobe.cli._app import app
from ckptprobe.cli._common import head_dim_of
from ckptprobe.errors import UsageError
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors
from ckptprobe.report.figures import block_average

ENGINES = ("compiled", "reads", "numpy")  # this code reads files: the compiled loops do, or Python does

R = 4


def write_runs(folder: Path, base_bits: dict, masks: list[dict]) -> tuple[Path, list[Path]]:
    """A bf16 base and one run per mask dict, each entry of a mask moved one ULP."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "base.safetensors", {n: ("BF16", b) for n, b in base_bits.items()})
    runs = []
    for r, m in enumerate(masks):
        runs.append(folder / f"run{r}.safetensors")
        write_safetensors(runs[-1], {n: ("BF16", np.where(m[n], b + 1, b).astype(np.uint16)) if n in m else ("BF16", b)
                                     for n, b in base_bits.items()})
    return folder / "base.safetensors", runs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Tiny base + R runs with densities varying by run and tensor."""
    base_bits = {n: float32_to_bf16_bits(x) for n, x in tiny_weights(0).items()}
    rng = np.random.default_rng(7)
    masks = [{n: rng.random(b.shape) < rng.uniform(0.05, 0.7) for n, b in base_bits.items()} for _ in range(R)]
    base, runs = write_runs(tmp_path_factory.mktemp("cons"), base_bits, masks)
    return base, runs, masks


def sources(base, runs):
    return open_source(str(base)), [open_source(str(r)) for r in runs]


def brute_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def check_against_masks(result, masks, heat_size):
    for t in result.tensors:
        ms = [m[t.name] for m in masks]
        for i, j in itertools.product(range(R), repeat=2):
            assert t.jaccard[i, j] == pytest.approx(brute_jaccard(ms[i], ms[j]), abs=1e-12)
        p = np.array([m.mean() for m in ms])
        assert np.allclose(t.density, p)
        off = ~np.eye(R, dtype=bool)
        assert np.allclose(t.bernoulli[off], (np.outer(p, p) / (p[:, None] + p[None, :] - np.outer(p, p)))[off])
        counts = sum(m.astype(np.int64) for m in ms)
        assert t.hist.tolist() == np.bincount(counts.ravel(), minlength=R + 1).tolist()
        if counts.ndim == 2:
            c = counts / R
            rho, kappa = c.mean(axis=1), c.mean(axis=0)
            null = np.sum(p * (1 - p)) / R ** 2
            assert t.row_stripe_index == pytest.approx(np.var(rho, ddof=1) / (null / c.shape[1]), rel=1e-9)
            assert t.col_stripe_index == pytest.approx(np.var(kappa, ddof=1) / (null / c.shape[0]), rel=1e-9)
            if t.layer == 1:
                assert np.allclose(t.row_ratio, rho) and np.allclose(t.col_ratio, kappa)
                assert np.allclose(t.heatmap, block_average(c, heat_size))
            else:
                assert t.row_ratio is None and t.heatmap is None
    # Whole model: pooled counts are the Jaccard of the concatenated masks.
    total = result.total
    flat = [np.concatenate([m[n].ravel() for n in masks[0]]) for m in masks]
    for i, j in itertools.combinations(range(R), 2):
        assert total.jaccard[i, j] == pytest.approx(brute_jaccard(flat[i], flat[j]), abs=1e-12)
        e_i = sum(m.size * masks[i][n].mean() * masks[j][n].mean() for n, m in masks[0].items())
        e_u = sum(m.size * (masks[i][n].mean() + masks[j][n].mean() - masks[i][n].mean() * masks[j][n].mean())
                  for n, m in masks[0].items())
        assert total.bernoulli[i, j] == pytest.approx(e_i / e_u, rel=1e-12)
    assert total.hist.tolist() == np.bincount(sum(f.astype(int) for f in flat), minlength=R + 1).tolist()


def test_matches_brute_force_in_small_blocks_and_chunks(engine, family, monkeypatch):
    base, runs, masks = family
    # Blocks of a few rows, chunks that do not divide them: every edge of the streaming is crossed.
    monkeypatch.setattr(cons, "BLOCK_BYTES", 1500)
    monkeypatch.setattr(cons, "CHUNK", 40)
    monkeypatch.setattr(cons, "LOOP_CHUNK", 40)
    monkeypatch.setattr(cons, "HEAT_SIZE", 10)  # cells of 7x7 on a 64x32 matrix, partial at the edges
    result = consensus(*sources(base, runs), layer=1, workers=2)
    assert len(result.tensors) == len(masks[0]) and not result.skipped
    check_against_masks(result, masks, 10)


def test_matches_brute_force_with_default_blocks(engine, family):
    base, runs, masks = family
    result = consensus(*sources(base, runs), layer=1)
    check_against_masks(result, masks, cons.HEAT_SIZE)
    d = result.to_dict()
    assert d["runs"] == [str(r) for r in runs]
    assert np.array(d["jaccard"]).shape == (R, R) and np.array(d["bernoulli"]).shape == (R, R)
    t = d["tensors"][1]
    assert {"name", "density", "jaccard_mean", "bernoulli_mean", "row_stripe_index", "col_stripe_index",
            "consensus_hist", "expected_hist"} <= set(t)
    assert len(t["density"]) == R and sum(t["consensus_hist"]) == t["numel"]
    assert [p["name"] for p in d["profiles"]] == [n for n in masks[0] if ".layers.1." in n and masks[0][n].ndim == 2]


def test_poisson_binomial_is_exact():
    p = [0.1, 0.45, 0.7, 0.9]
    brute = np.zeros(len(p) + 1)
    for bits in itertools.product([0, 1], repeat=len(p)):
        brute[sum(bits)] += np.prod([pi if b else 1 - pi for pi, b in zip(p, bits)])
    assert np.allclose(poisson_binomial(p), brute, atol=1e-15)
    from scipy.stats import binom

    assert np.allclose(poisson_binomial([0.3] * 6), binom.pmf(np.arange(7), 6, 0.3))
    assert poisson_binomial([]).tolist() == [1.0]


def test_bernoulli_baseline_matches_simulation():
    rng = np.random.default_rng(0)
    p, q = 0.3, 0.08
    a, b = rng.random(2_000_000) < p, rng.random(2_000_000) < q
    assert bernoulli_jaccard(np.array([p, q]))[0, 1] == pytest.approx(brute_jaccard(a, b), rel=0.01)
    assert bernoulli_jaccard(np.array([0.0, 0.0]))[0, 1] != bernoulli_jaccard(np.array([0.0, 0.0]))[0, 1]  # NaN


def stripe_runs(tmp: Path, rows: int, cols: int, row_p: np.ndarray, seed: int):
    """Runs of one (rows, cols) matrix whose entries change with probability row_p[i] * scale_r."""
    rng = np.random.default_rng(seed)
    name = "model.layers.0.mlp.down_proj.weight"
    base = {name: float32_to_bf16_bits(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02)}
    scales = [0.6, 1.0, 1.3]
    masks = [{name: rng.random((rows, cols)) < np.clip(row_p[:, None] * s, 0, 1)} for s in scales]
    return write_runs(tmp, base, masks)


def test_stripe_index_planted_rows_and_iid(tmp_path):
    rows, cols = 200, 300
    striped = np.where(np.arange(rows) % 10 < 2, 0.35, 0.2)  # two rows in ten favoured by all runs
    t = consensus(*sources(*stripe_runs(tmp_path / "s", rows, cols, striped, 1))).tensors[0]
    assert t.row_stripe_index > 15
    assert 0.7 < t.col_stripe_index < 1.4
    # A strong stripe pulls the other axis below 1 (the null assumes one density per run for the
    # whole matrix; rows of very different densities make column means vary less): documented.
    strong = np.where(np.arange(rows) % 10 < 2, 0.6, 0.05)
    t = consensus(*sources(*stripe_runs(tmp_path / "strong", rows, cols, strong, 1))).tensors[0]
    assert t.row_stripe_index > 200 and 0.4 < t.col_stripe_index < 0.8
    # iid entries, densities differing by run: both indexes ~1 (sd of one estimate ~ sqrt(2/n) ~ 0.1).
    indexes = []
    for seed in range(4):
        t = consensus(*sources(*stripe_runs(tmp_path / f"i{seed}", rows, cols, np.full(rows, 0.2), seed))).tensors[0]
        indexes += [t.row_stripe_index, t.col_stripe_index]
    assert all(0.6 < x < 1.5 for x in indexes)
    assert np.mean(indexes) == pytest.approx(1.0, abs=0.12)


def test_stripe_index_edge_cases():
    assert stripe_index(np.array([0.5, 0.5]), np.array([0.0, 1.0]), 10) is None  # no variance possible
    assert stripe_index(np.array([0.5]), np.array([0.5]), 10) is None
    assert stripe_index(np.array([0.0, 1.0]), np.array([0.5]), 1) == pytest.approx(0.5 / 0.25)


def test_two_runs(family):
    base, runs, masks = family
    result = consensus(*sources(base, runs[:2]))
    for t in result.tensors:
        a, b = masks[0][t.name], masks[1][t.name]
        inter = int((a & b).sum())
        assert t.hist.tolist() == [int((~a & ~b).sum()), int(a.sum() + b.sum() - 2 * inter), inter]
        assert t.jaccard[0, 1] == pytest.approx(brute_jaccard(a, b))


def test_fewer_than_two_runs_is_a_usage_error(family, capsys):
    base, runs, _ = family
    with pytest.raises(UsageError, match="at least two runs"):
        consensus(*sources(base, runs[:1]))
    assert main(["consensus", str(base), str(runs[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: consensus needs at least two runs, got 1")


def test_missing_layer_is_a_one_line_error(family, capsys):
    base, runs, _ = family
    with pytest.raises(UsageError, match=r"layer 7 does not exist; valid layers: 0\.\.1"):
        consensus(*sources(base, runs), layer=7)
    assert main(["consensus", str(base), *map(str, runs[:2]), "--layer", "7"]) == 2
    assert capsys.readouterr().err.splitlines()[0].endswith("--layer 7: no selected tensor of "
                                                         f"{base} is in that layer (layers 0..1)")


def test_mismatched_runs_are_left_out_per_tensor(family, tmp_path, capsys):
    base, runs, masks = family
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    bad = tmp_path / "bad.safetensors"  # run 2 without q, with k of another shape, and one extra tensor
    src = open_source(str(runs[2]))
    tensors = {n: ("BF16", src.get_array(n)) for n in src.keys() if n != q}
    tensors[k] = ("BF16", np.zeros((3, 5), np.uint16))
    tensors["extra.weight"] = ("BF16", np.zeros(4, np.uint16))
    write_safetensors(bad, tensors)
    paths = [runs[0], runs[1], bad, runs[3]]
    result = consensus(*sources(base, paths))
    reasons = {s.name: s.reason for s in result.skipped}
    assert len(result.skipped) == 3
    assert reasons[q] == f"missing in run 2 ({bad}); run left out of this tensor"
    assert reasons[k] == f"shape (32, 32) in base vs (3, 5) in run 2 ({bad}); run left out of this tensor"
    assert reasons["extra.weight"] == f"only in run 2 ({bad}) (missing in base)"
    by_name = {t.name: t for t in result.tensors}
    for name in (q, k):
        t = by_name[name]
        assert t.runs == (0, 1, 3) and np.isnan(t.density[2]) and np.isnan(t.jaccard[0, 2])
        assert t.jaccard[0, 3] == pytest.approx(brute_jaccard(masks[0][name], masks[3][name]))
        counts = sum(masks[r][name].astype(int) for r in (0, 1, 3))
        assert t.hist.tolist() == np.bincount(counts.ravel(), minlength=4).tolist()
    assert len(by_name["model.norm.weight"].runs) == R
    # Pooled: runs 0 and 2 share every tensor but q and k.
    names = [n for n in masks[0] if n not in (q, k)]
    a = np.concatenate([masks[0][n].ravel() for n in names])
    b = np.concatenate([masks[2][n].ravel() for n in names])
    assert result.total.jaccard[0, 2] == pytest.approx(brute_jaccard(a, b))
    assert main(["consensus", str(base), *map(str, paths), "--format", "json"]) == 0
    out = capsys.readouterr()
    assert out.err == "skipped 3 tensors: 2 in one checkpoint only, 1 shape differs; --verbose lists them\n"
    assert len(json.loads(out.out)["skipped"]) == 3
    assert main(["consensus", str(base), *map(str, paths), "--format", "json", "--verbose"]) == 0
    assert "skipped model.layers.0.self_attn.q_proj.weight: missing in run 2" in capsys.readouterr().err


def test_update_rule_special_values_and_other_dtypes(engine, tmp_path):
    """The fast bitwise path and the exact rule agree on +-0, inf, NaN (bf16, f16) and in eta mode (f32)."""
    rng = np.random.default_rng(3)
    n = 3000
    special16 = {"BF16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x3F80],  # +-0, +-inf, NaN, 1.0
                 "F16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x3C00]}
    for dtype, specials in special16.items():
        base = rng.integers(0x3000, 0x3F00, n).astype(np.uint16)
        base[:100] = rng.choice(specials, 100)  # specials in the base (first chunk only)
        ys = []
        for r in range(3):
            y = base.copy()
            y[rng.random(n) < 0.3] += 1
            pos = rng.choice(n, 40, replace=False)
            y[pos] = rng.choice(specials, 40)  # specials in the runs, anywhere
            ys.append(y)
        view = np.float16 if dtype == "F16" else np.uint16
        folder = tmp_path / dtype
        folder.mkdir()
        write_safetensors(folder / "base.safetensors", {"w": (dtype, base.reshape(60, 50).view(view))})
        for r, y in enumerate(ys):
            write_safetensors(folder / f"r{r}.safetensors", {"w": (dtype, y.reshape(60, 50).view(view))})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cons, "CHUNK", 1000)
            mp.setattr(cons, "LOOP_CHUNK", 1000)
            runs = [folder / f"r{r}.safetensors" for r in range(3)]
            t = consensus(*sources(folder / "base.safetensors", runs)).tensors[0]
        ref = [update_mask(base.view(view), y.view(view), dtype, dtype, CompareMode.bitwise) for y in ys]
        assert t.changed.tolist() == [int(c.sum()) for c, _ in ref]
        assert t.nonfinite.tolist() == [int(f.sum()) for _, f in ref]
        assert t.inter[0, 1] == int((ref[0][0] & ref[1][0]).sum())
    # f32 in eta mode goes through update_mask chunk by chunk.
    base = rng.standard_normal((40, 30)).astype(np.float32)
    ys = [base * (1 + rng.uniform(-2e-3, 2e-3, base.shape)).astype(np.float32) for _ in range(2)]
    write_safetensors(tmp_path / "b32.safetensors", {"w": ("F32", base)})
    for r, y in enumerate(ys):
        write_safetensors(tmp_path / f"r32_{r}.safetensors", {"w": ("F32", y)})
    t = consensus(*sources(tmp_path / "b32.safetensors", [tmp_path / f"r32_{r}.safetensors" for r in range(2)]),
                  mode=CompareMode.eta, eta=1e-3).tensors[0]
    ref = [update_mask(base, y, "F32", "F32", CompareMode.eta, 1e-3)[0] for y in ys]
    assert t.changed.tolist() == [int(m.sum()) for m in ref]
    assert t.jaccard[0, 1] == pytest.approx(brute_jaccard(*ref))


def test_cli_outputs_and_plots(family, tmp_path):
    base, runs, masks = family
    runner = CliRunner()
    args = ["consensus", str(base), *map(str, runs)]
    res = runner.invoke(app, args + ["--format", "json", "--layer", "1"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["layer"] == 1 and len(d["labels"]) == R and d["labels"][0] == "run0"
    assert d["jaccard"][0][1] == pytest.approx(brute_jaccard(
        *[np.concatenate([m[n].ravel() for n in masks[0]]) for m in masks[:2]]))
    res = runner.invoke(app, args + ["--format", "csv", "--by", "layer"])
    assert res.exit_code == 0
    header, *lines = res.stdout.strip().splitlines()
    assert header.startswith("layer,tensors,numel,density,density_mean,jaccard_mean") and len(lines) == 3
    for by in ("tensor", "module", "layer"):
        res = runner.invoke(app, args + ["--by", by])
        assert res.exit_code == 0 and "Pairwise Jaccard" in res.stdout
    plots = tmp_path / "plots"
    res = runner.invoke(app, args + ["--plot", str(plots / "c.png"), "--head-dim", "8", "-o", str(tmp_path / "t.txt")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in plots.iterdir()) == ["c-heatmaps.png", "c-jaccard.png", "c-ratios.png"]
    assert all(p.stat().st_size > 10_000 for p in plots.iterdir())
    assert "Consensus of 4 runs" in (tmp_path / "t.txt").read_text()


def test_head_dim_from_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert head_dim_of(str(tmp_path / "model.safetensors")) is None
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128, "num_attention_heads": 4}))
    assert head_dim_of(str(tmp_path)) == 32
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128, "num_attention_heads": 4, "head_dim": 16}))
    assert head_dim_of(str(tmp_path / "model.safetensors")) == 16
    (tmp_path / "config.json").write_text("{not json")
    assert head_dim_of(str(tmp_path)) is None


def test_many_runs_histogram_by_bincount(tmp_path):
    """R >= 24 takes the bincount branch of the histogram; counts still match brute force."""
    rng = np.random.default_rng(5)
    name = "model.layers.0.mlp.up_proj.weight"
    base = {name: float32_to_bf16_bits(rng.standard_normal((24, 40)).astype(np.float32))}
    masks = [{name: rng.random((24, 40)) < rng.uniform(0.1, 0.9)} for _ in range(30)]
    t = consensus(*sources(*write_runs(tmp_path, base, masks))).tensors[0]
    counts = sum(m[name].astype(int) for m in masks)
    assert t.hist.tolist() == np.bincount(counts.ravel(), minlength=31).tolist()
    assert t.expected_hist.sum() == pytest.approx(24 * 40)
    assert t.jaccard[3, 17] == pytest.approx(brute_jaccard(masks[3][name], masks[17][name]))


def test_example_family(tmp_path):
    """The shipped GRPO runs, end to end through the CLI (skipped until the example family is built)."""
    from ckptprobe import examples

    if not (examples.path("base") / "model.safetensors").exists():
        pytest.skip("example family not built")
    folders = [str(examples.path(n)) for n in ("base", "rl-1", "rl-2", "rl-3")]
    assert head_dim_of(folders[0]) is not None
    res = CliRunner().invoke(app, ["consensus", *folders, "--format", "json", "--plot", str(tmp_path / "c.pdf")])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["labels"] == ["rl-1", "rl-2", "rl-3"] and 0 < d["jaccard_mean"] <= 1
    assert len(list(tmp_path.iterdir())) == 3


def test_a_base_with_exact_zeros_stays_on_the_fast_path(engine, tmp_path, monkeypatch):
    """Exact zeros in the base (one in 64 entries) cost nothing: no chunk is compared value by value,
    not even the one holding a +0/-0 pair (bitwise different, the same weight), which is found among
    the base's zeros."""
    rng = np.random.default_rng(5)
    base = rng.integers(0x3000, 0x3F00, (64, 64), dtype=np.uint16)
    base.reshape(-1)[::64] = 0
    runs = [np.where(rng.random(base.shape) < 0.3, base + 1, base).astype(np.uint16) for _ in range(3)]
    assert base[63, 0] == 0
    runs[2][63, 0] = 0x8000  # -0 against the base's +0: unchanged
    base[62, 0] = 0x8000  # a -0 in the base
    runs[0][62, 0], runs[1][62, 0], runs[2][62, 0] = 0, 0x8000, 0x8001  # +0 (unchanged), itself, a change
    name = "model.layers.0.mlp.up_proj.weight"
    paths = []
    for i, bits in enumerate([base, *runs]):
        write_safetensors(tmp_path / f"{i}.safetensors", {name: ("BF16", bits)})
        paths.append(str(tmp_path / f"{i}.safetensors"))
    calls = []
    real = cons.update_mask
    monkeypatch.setattr(cons, "CHUNK", 1024)
    monkeypatch.setattr(cons, "update_mask", lambda *a, **k: calls.append(a[0].size) or real(*a, **k))
    r = consensus(open_source(paths[0]), [open_source(p) for p in paths[1:]])
    vals = [bf16_bits_to_float32(b) for b in (base, *runs)]
    masks = [v != vals[0] for v in vals[1:]]
    t = r.tensors[0]
    assert t.changed.tolist() == [int(m.sum()) for m in masks]
    assert t.inter[0, 1] == int((masks[0] & masks[1]).sum()) and t.inter[1, 2] == int((masks[1] & masks[2]).sum())
    assert t.hist.tolist() == np.bincount(sum(m.astype(int) for m in masks).ravel(), minlength=4).tolist()
    assert calls == []


def _pool_by_loop(tensors, R):
    """The pooled sums of `pool`, tensor after tensor, as a plain loop (the reference for its stacked sums)."""
    inter, union, e_inter, e_union = (np.zeros((R, R)) for _ in range(4))
    changed, numel, hist, expected = np.zeros(R), np.zeros(R), np.zeros(R + 1, np.int64), np.zeros(R + 1)
    for t in tensors:
        v = t.valid
        both = np.outer(v, v)
        n = t.changed.astype(np.float64)
        p = np.where(v, n / max(t.numel, 1), 0.0)
        pq = np.outer(p, p)
        inter += np.where(both, t.inter, 0)
        union += np.where(both, n[:, None] + n[None, :] - t.inter, 0)
        e_inter += np.where(both, t.numel * pq, 0)
        e_union += np.where(both, t.numel * (p[:, None] + p[None, :] - pq), 0)
        changed += np.where(v, n, 0)
        numel += np.where(v, t.numel, 0)
        if len(t.runs) == R:
            hist += t.hist
            expected += t.expected_hist
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union, e_inter / e_union, changed / numel, hist, expected


@pytest.mark.parametrize("batch", [1, 3, 1024])
def test_pooling_equals_a_loop_bit_for_bit(family, tmp_path, monkeypatch, batch):
    """Stacked sums in batches give the loop's float64 sums exactly, with a run left out of some tensors."""
    import ckptprobe.analysis.consensus_results as results

    base, runs, _ = family
    src = open_source(str(runs[2]))
    partial = tmp_path / "partial.safetensors"
    write_safetensors(partial, {n: ("BF16", src.get_array(n)) for i, n in enumerate(src.keys()) if i % 3})
    result = consensus(*sources(base, [runs[0], runs[1], partial, runs[3]]))
    monkeypatch.setattr(results, "POOL_BATCH", batch)
    for key, g in [("all", result.total), *result.by("layer").items(), *result.by("module").items()]:
        ts = result.tensors if key == "all" else [t for t in result.tensors if key in (t.layer, t.module)]
        jac, bern, density, hist, expected = _pool_by_loop(ts, R)
        off = ~np.eye(R, dtype=bool)
        assert np.array_equal(g.jaccard[off], jac[off], equal_nan=True)
        assert np.array_equal(g.bernoulli[off], bern[off], equal_nan=True)
        assert np.array_equal(g.density, density, equal_nan=True)
        assert np.array_equal(g.hist, hist) and np.array_equal(g.expected_hist, expected)
        assert g.tensors == len(ts)


def test_stacked_statistics_equal_each_tensor_on_its_own_runs():
    """`tensor_stats` on a stack where some tensors lack some runs gives, bit for bit, what each tensor's
    own runs give alone: a run left out takes probability 0 in the Poisson-binomial programme."""
    from ckptprobe.analysis.consensus_results import TensorConsensus, summaries, tensor_stats
    from ckptprobe.analysis.consensus_stats import jaccard_matrix

    rng = np.random.default_rng(11)
    R, tensors = 5, []
    for i, runs in enumerate([(0, 1, 2, 3, 4), (1, 3), (0, 2, 4), (4,), (0, 1, 2, 3, 4), ()]):
        numel = int(rng.integers(1, 10_000))
        changed, inter = np.zeros(R, np.int64), np.zeros((R, R), np.int64)
        changed[list(runs)] = rng.integers(0, numel + 1, len(runs))
        for a, b in itertools.combinations(runs, 2):
            inter[a, b] = inter[b, a] = rng.integers(0, min(changed[a], changed[b]) + 1)
        inter[runs, runs] = changed[list(runs)]
        if i == 4:
            changed[:] = inter[:] = 0  # no run changed anything: empty unions, NaN Jaccard
        tensors.append(TensorConsensus(f"t{i}", None, "up", "mlp", (numel,), runs, numel, changed,
                                       np.zeros(R, np.int64), inter, np.zeros(len(runs) + 1, np.int64)))
    st = tensor_stats(tensors, R)
    stacked = summaries(tensors, R, matrices=True)
    for i, t in enumerate(tensors):
        own = list(t.runs)
        p = t.changed[own] / t.numel
        assert st.valid[i].tolist() == [r in t.runs for r in range(R)]
        assert st.density[i, own].tolist() == p.tolist() and np.isnan(np.delete(st.density[i], own)).all()
        assert (st.expected[i, :len(own) + 1] == t.numel * poisson_binomial(p)).all()
        assert (st.expected[i, len(own) + 1:] == 0).all()
        np.testing.assert_array_equal(st.jaccard[i][np.ix_(own, own)],
                                      jaccard_matrix(t.inter[np.ix_(own, own)], t.changed[own]))
        np.testing.assert_array_equal(st.bernoulli[i][np.ix_(own, own)], bernoulli_jaccard(p))
        outside = np.ones((R, R), bool)
        outside[np.ix_(own, own)] = False
        assert np.isnan(st.jaccard[i][outside]).all() and np.isnan(st.bernoulli[i][outside]).all()
        assert json.dumps(t.to_dict()) == json.dumps(stacked[i])  # alone or in a stack (NaN as NaN)


def test_median_is_numpys():
    from ckptprobe.analysis.consensus_stats import median

    rng = np.random.default_rng(12)
    for n in range(1, 12):
        x = rng.standard_normal(n).tolist()
        assert median(x + [None]) == float(np.median(x))
    assert median([None]) is None and median([]) is None


def test_float32_runs_and_bases(engine, tmp_path):
    """float32 runs against a bf16 base (bf16 mode: rounded to bf16) and against a float32 base
    (bitwise), with +-0, inf and NaN about: the counts of `update_mask`'s masks, on every path."""
    rng = np.random.default_rng(17)
    bits = rng.integers(0x3000, 0x3F00, (40, 130), dtype=np.uint16)
    specials = np.array([0, 0x80000000, 0x7F800000, 0x7FC00000, 0xFF800000, 0x3F808000], np.uint32)
    runs = []
    for r in range(3):
        wide = bits.astype(np.uint32) << 16
        wide = np.where(rng.random(bits.shape) < 0.3, wide + 0x10000, wide)  # one bf16 ULP up
        wide = wide | np.where(rng.random(bits.shape) < 0.2, rng.integers(1, 0xFFFF, bits.shape), 0).astype(np.uint32)
        wide.reshape(-1)[rng.choice(wide.size, 30, replace=False)] = rng.choice(specials, 30)
        runs.append(wide.view(np.float32))
    base32 = (bits.astype(np.uint32) << 16).view(np.float32)
    base32.reshape(-1)[:6] = specials.view(np.float32)
    name = "model.layers.0.mlp.up_proj.weight"
    paths = {"bf16": tmp_path / "b16.safetensors", "f32": tmp_path / "b32.safetensors"}
    write_safetensors(paths["bf16"], {name: ("BF16", bits)})
    write_safetensors(paths["f32"], {name: ("F32", base32)})
    for r, w in enumerate(runs):
        write_safetensors(tmp_path / f"r{r}.safetensors", {name: ("F32", w)})
    sources_ = [open_source(str(tmp_path / f"r{r}.safetensors")) for r in range(3)]
    for kind, base, dtype, mode in (("bf16", bits, "BF16", CompareMode.bf16), ("f32", base32, "F32",
                                                                                CompareMode.bitwise)):
        t = consensus(open_source(str(paths[kind])), sources_).tensors[0]
        with pytest.MonkeyPatch.context() as mp:  # the reference: update_mask's numpy passes
            mp.setattr(kernels, "compiled", None)
            ref = [update_mask(base.reshape(-1), w.reshape(-1), dtype, "F32", mode) for w in runs]
        assert t.changed.tolist() == [int(c.sum()) for c, _ in ref], kind
        assert t.nonfinite.tolist() == [int(f.sum()) for _, f in ref], kind
        assert t.inter[0, 2] == int((ref[0][0] & ref[2][0]).sum()), kind
        assert t.hist.tolist() == np.bincount(sum(c.astype(int) for c, _ in ref), minlength=4).tolist(), kind



def test_an_empty_matrix_of_many_rows_gets_no_profile(tmp_path):
    """A (2^40, 0) tensor is a valid empty tensor: counted (no entries), with no row profile of 2^40 rows
    (8 TiB of counts) and nothing else allocated per row."""
    rng = np.random.default_rng(0)
    x = rng.integers(0x3C00, 0x3C10, (4, 4)).astype(np.uint16)
    paths = []
    for i in range(3):
        y = x if i == 0 else np.where(rng.random(x.shape) < 0.5, x + 1, x).astype(np.uint16)
        tensors = {"model.layers.0.mlp.up_proj.weight": ("BF16", np.zeros((1 << 40, 0), np.uint16)),
                   "model.layers.0.mlp.gate_proj.weight": ("BF16", np.zeros((0, 1 << 40), np.uint16)),
                   "model.layers.0.mlp.down_proj.weight": ("BF16", y)}
        write_safetensors(tmp_path / f"{i}.safetensors", tensors)
        paths.append(str(tmp_path / f"{i}.safetensors"))
    base, *runs = [open_source(p) for p in paths]
    result = consensus(base, runs, layer=0)
    by_name = {t.name: t for t in result.tensors}
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        t = by_name[name]
        assert t.numel == 0 and list(t.changed) == [0, 0] and t.row_ratio is None and t.col_ratio is None
    down = by_name["model.layers.0.mlp.down_proj.weight"]
    masks = [np.frombuffer(open_source(p).read(down.name), np.uint16).reshape(4, 4) != x for p in paths[1:]]
    assert list(down.changed) == [int(m.sum()) for m in masks]
    np.testing.assert_allclose(down.row_ratio, sum(m.sum(axis=1) for m in masks) / (2 * 4))
