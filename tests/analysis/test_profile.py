"""`profile`: one run's checkpoints against brute-force numpy on the planted masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factory import tiny_weights
from typer.testing import CliRunner

from ckptprobe.analysis.bf16 import float32_to_bf16_bits
from ckptprobe.analysis import profile as profile_mod
from ckptprobe.analysis.profile import correlation, moving_average, profile
from ckptprobe.cli import main
from ckptprobe.cli._app import app
from ckptprobe.errors import UsageError
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors

ENGINES = ("compiled", "reads", "numpy")  # this code reads files: the compiled loops do, or Python does

STEPS = (0.05, 0.15, 0.3)  # density scale at each checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Base + 3 checkpoints whose masks grow (nested) and favour the same rows throughout."""
    root = tmp_path_factory.mktemp("profile")
    base = {n: float32_to_bf16_bits(x) for n, x in tiny_weights(0).items()}
    rng = np.random.default_rng(11)
    u = {n: rng.random(b.shape) for n, b in base.items()}
    pref = {n: rng.uniform(0.3, 2.0, b.shape[0]) for n, b in base.items()}  # per row
    write_safetensors(root / "base.safetensors", {n: ("BF16", b) for n, b in base.items()})
    masks, paths = [], []
    for s, scale in enumerate(STEPS):
        m = {n: u[n] < np.clip(scale * (pref[n][:, None] if b.ndim == 2 else pref[n]), 0, 1) for n, b in base.items()}
        masks.append(m)
        paths.append(root / f"ckpt-{(s + 1) * 100}.safetensors")
        write_safetensors(paths[-1], {n: ("BF16", np.where(m[n], b + 1, b).astype(np.uint16)) for n, b in base.items()})
    return root / "base.safetensors", paths, masks


def smooth_ref(x: np.ndarray, k: int) -> np.ndarray:
    """Centred window of k entries (for even k one more on the left), mean of the entries inside the array."""
    out = np.empty(len(x))
    for i in range(len(x)):
        lo, hi = i - k // 2, i - k // 2 + k
        out[i] = x[max(lo, 0):min(hi, len(x))].mean()
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5, 40])
def test_moving_average(k):
    x = np.random.default_rng(k).random(17)
    assert np.allclose(moving_average(x, k), smooth_ref(x, min(k, len(x))))


def test_correlation():
    a = np.array([1.0, 2.0, 4.0, 3.0])
    assert correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert correlation(a, np.ones(4)) is None
    assert correlation(a, np.array([1.0, np.nan, 2.0, 3.0])) is None


def test_profile_matches_brute_force(engine, run):
    base, paths, masks = run
    res = profile(open_source(str(base)), [open_source(str(p)) for p in paths], layer=1, smooth=3)
    assert res.changed == tuple(sum(int(m.sum()) for m in step.values()) for step in masks)
    assert res.numel == (sum(m.size for m in masks[0].values()),) * 3
    layer1 = [n for n, m in masks[0].items() if ".layers.1." in n and m.ndim == 2]
    assert [t.name for t in res.tensors] == layer1
    for t in res.tensors:
        ms = [step[t.name] for step in masks]
        assert np.allclose(t.density, [m.mean() for m in ms])
        rows = [smooth_ref(m.mean(axis=1), 3) for m in ms]
        cols = [smooth_ref(m.mean(axis=0), 3) for m in ms]
        assert np.allclose(t.row, rows) and np.allclose(t.col, cols)
        assert t.row_corr == pytest.approx([np.corrcoef(rows[s], rows[s + 1])[0, 1] for s in range(2)])
        assert t.col_corr == pytest.approx([np.corrcoef(cols[s], cols[s + 1])[0, 1] for s in range(2)])
        for s, m in enumerate(ms):
            p = m.mean()
            assert t.row_stripe_index[s] == pytest.approx(np.var(m.mean(axis=1), ddof=1) / (p * (1 - p) / m.shape[1]))
            assert t.col_stripe_index[s] == pytest.approx(np.var(m.mean(axis=0), ddof=1) / (p * (1 - p) / m.shape[0]))
        assert min(t.row_corr) > 0.5  # the planted row preference persists while density grows
        assert max(t.row_stripe_index) > 3


def test_missing_tensor_in_one_checkpoint(run, tmp_path):
    base, paths, masks = run
    q = "model.layers.1.self_attn.q_proj.weight"
    src = open_source(str(paths[1]))
    write_safetensors(tmp_path / "partial.safetensors", {n: ("BF16", src.get_array(n)) for n in src.keys() if n != q})
    res = profile(open_source(str(base)), [open_source(str(p)) for p in (paths[0], tmp_path / "partial.safetensors",
                                                                      paths[2])], layer=1)
    t = {t.name: t for t in res.tensors}[q]
    assert np.isnan(t.density[1]) and np.isnan(t.row[1]).all() and t.row_corr == (None, None)
    assert not np.isnan(t.density[[0, 2]]).any()
    assert any(s.name == q for s in res.skipped)


def test_an_expert_stack_counts_in_the_densities_and_is_listed_as_skipped(tmp_path):
    # A fused MoE layer (Llama 4, gpt-oss): its (E, out, in) stack has no row or column profile here, so
    # it is named among the skipped, while its changes count in the whole-model density.
    rng = np.random.default_rng(3)
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    base = {"model.layers.0.self_attn.q_proj.weight": rng.integers(0x3C00, 0x3E00, (16, 16), dtype=np.uint16),
            stack: rng.integers(0x3C00, 0x3E00, (4, 16, 16), dtype=np.uint16)}
    write_safetensors(tmp_path / "base.safetensors", {n: ("BF16", b) for n, b in base.items()})
    changed = []
    for s in range(2):
        masks = {n: rng.random(b.shape) < 0.2 for n, b in base.items()}
        changed.append(sum(int(m.sum()) for m in masks.values()))
        write_safetensors(tmp_path / f"c{s}.safetensors",
                          {n: ("BF16", np.where(masks[n], b + 1, b).astype(np.uint16)) for n, b in base.items()})
    res = profile(open_source(str(tmp_path / "base.safetensors")),
                  [open_source(str(tmp_path / f"c{s}.safetensors")) for s in range(2)], layer=0)
    assert res.changed == tuple(changed) and res.numel == (16 * 16 * 5,) * 2
    assert [t.name for t in res.tensors] == ["model.layers.0.self_attn.q_proj.weight"]
    assert [(k.name, k.category.value) for k in res.skipped] == [(stack, "not-matrix")]


def test_bad_arguments(run, capsys):
    base, paths, _ = run
    with pytest.raises(UsageError, match=r"layer 5 does not exist; valid layers: 0\.\.1"):
        profile(open_source(str(base)), [open_source(str(paths[0]))], layer=5)
    with pytest.raises(UsageError, match="smooth"):
        profile(open_source(str(base)), [open_source(str(paths[0]))], layer=1, smooth=0)
    assert main(["profile", str(base), str(paths[0]), "--layer", "5"]) == 2
    assert capsys.readouterr().err.strip() == f"Error: --layer 5: no selected tensor of {base} is in that layer " \
                                              "(layers 0..1)"
    assert main(["profile", str(base), str(paths[0]), "--smooth", "0"]) == 2


def test_cli(run, tmp_path):
    base, paths, masks = run
    runner = CliRunner()
    out = tmp_path / "profile.png"
    res = runner.invoke(app, ["profile", str(base), *map(str, paths), "--plot", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["layer"] == 1 and d["labels"] == ["ckpt-100", "ckpt-200", "ckpt-300"]  # default: the middle layer
    assert d["density"] == pytest.approx([sum(int(m.sum()) for m in step.values()) / d["numel"][0] for step in masks])
    assert len(d["tensors"][0]["row_ratio"]) == 3
    assert out.stat().st_size > 10_000
    res = runner.invoke(app, ["profile", str(base), *map(str, paths), "--layer", "0"])
    assert res.exit_code == 0 and "Profiles of layer 0" in res.stdout


def test_pooled_correlation():
    rng = np.random.default_rng(3)
    a1, b1, a2, b2 = rng.random(7), rng.random(7), rng.random(5) + 10, rng.random(5) + 10
    assert profile_mod.pooled_correlation([(a1, b1)]) == pytest.approx(np.corrcoef(a1, b1)[0, 1])
    # pooled = Pearson of the concatenated, per-pair centred profiles; the level of pair 2 (+10) plays no part
    ref = np.corrcoef(np.r_[a1 - a1.mean(), a2 - a2.mean()], np.r_[b1 - b1.mean(), b2 - b2.mean()])[0, 1]
    assert profile_mod.pooled_correlation([(a1, b1), (a2, b2), (a1, np.full(7, np.nan))]) == pytest.approx(ref)
    assert np.corrcoef(np.r_[a1, a2], np.r_[b1, b2])[0, 1] > 0.95 > ref  # what pooling the levels would say
    assert profile_mod.pooled_correlation([(a1, np.ones(7))]) is None
    assert profile_mod.pooled_correlation([]) is None


@pytest.mark.parametrize("by", ["module", "layer", "group"])
def test_group_rows_match_brute_force(run, by):
    """Group rows against the planted masks: counts summed over the group's matrices, correlations pooled
    within matrices, stripe indexes the median of the per-matrix ones."""
    from ckptprobe.analysis.grouping import order

    base, paths, masks = run
    res = profile(open_source(str(base)), [open_source(str(p)) for p in paths], layer=1, smooth=3)
    members = {}
    for t in res.tensors:
        members.setdefault(getattr(t, by), []).append(t)
    rows = res.rows(by)
    assert [r[by] for r in rows[::3]] == sorted(members, key=lambda k: order(by, k))
    for i, r in enumerate(rows):
        ts, s = members[r[by]], i % 3
        assert r["checkpoint"] == str(paths[s]) and r["tensors"] == len(ts)
        assert r["changed"] == sum(int(masks[s][t.name].sum()) for t in ts)
        assert r["numel"] == sum(masks[s][t.name].size for t in ts)
        assert r["density"] == pytest.approx(r["changed"] / r["numel"])
        if s == 0:
            assert r["row_corr"] is None and r["col_corr"] is None
        for axis, key in ((1, "row"), (0, "col")):
            prof = [[smooth_ref(masks[q][t.name].mean(axis=axis), 3) for q in (s - 1, s)] for t in ts]
            if s:
                a = np.concatenate([p[0] - p[0].mean() for p in prof])
                b = np.concatenate([p[1] - p[1].mean() for p in prof])
                assert r[f"{key}_corr"] == pytest.approx(np.corrcoef(a, b)[0, 1])
            assert r[f"{key}_stripe_index"] == pytest.approx(np.median([getattr(t, f"{key}_stripe_index")[s]
                                                                       for t in ts]))
    one = res.rows("tensor")
    assert len(one) == 3 * len(res.tensors) and one[4]["row_corr"] == res.tensors[1].row_corr[0]
    if by == "module":  # one matrix per module in a layer: the pooled row is that matrix's
        assert [r["row_corr"] for r in rows] == pytest.approx([r["row_corr"] for r in one], nan_ok=True)


def test_cli_by_group_csv(run):
    base, paths, _ = run
    res = CliRunner().invoke(app, ["profile", str(base), *map(str, paths), "--by", "group", "-f", "csv"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split(",")[:3] == ["group", "checkpoint", "tensors"]
    assert [line.split(",")[0] for line in lines[1:]] == ["attention"] * 3 + ["mlp"] * 3
    res = CliRunner().invoke(app, ["profile", str(base), *map(str, paths), "--by", "layer"])
    assert res.exit_code == 0 and "Profiles of layer 1, by layer" in res.stdout


def test_table_names_each_matrix(tmp_path, capsys, monkeypatch):
    """Two experts' matrices in one layer share a module type: the table tells them apart by name."""
    rng = np.random.default_rng(5)
    names = [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(2)]
    base = {n: float32_to_bf16_bits(rng.standard_normal((8, 16), np.float32)) for n in names}
    paths = [tmp_path / "base.safetensors"]
    write_safetensors(paths[0], {n: ("BF16", b) for n, b in base.items()})
    for step in (1, 2):
        paths.append(tmp_path / f"step{step}.safetensors")
        write_safetensors(paths[-1], {n: ("BF16", np.where(rng.random(b.shape) < 0.2 * step, b + 1, b).astype(np.uint16))
                                      for n, b in base.items()})
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["profile", *map(str, paths), "--layer", "0"]) == 0
    table = capsys.readouterr().out.split("Profiles of layer 0")[1]
    assert [sum(line.startswith(f"│ {n} ") for line in table.splitlines()) for n in names] == [2, 2]
    # and so do the plot's panels
    import ckptprobe.report.consensus_plots as plots

    titles = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: (
        titles.extend(ax.get_title() for ax in fig.axes), save(fig, path, **kw))[1])
    assert main(["profile", *map(str, paths), "--layer", "0", "--plot", str(tmp_path / "p.png")]) == 0
    for e in range(2):
        assert [t.split(" (")[0] for t in titles if f"experts.{e}." in t] == \
            [f"mlp.experts.{e}.up_proj: row ratio", f"mlp.experts.{e}.up_proj: column ratio"], titles
