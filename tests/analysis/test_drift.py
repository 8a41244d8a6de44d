import csv
import io
import json
import math
import warnings

import numpy as np
import pytest
from factory import save, tiny_weights

from ckptprobe.analysis.bf16 import float32_to_bf16_bits
from ckptprobe.analysis.drift import drift, surges
from ckptprobe.cli import main
from ckptprobe.errors import UsageError
from ckptprobe.io.sources import open_source


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Base + 6 fp32 checkpoints: every weight takes small random steps; lm_head jumps at step 5."""
    root = tmp_path_factory.mktemp("drift")
    rng = np.random.default_rng(7)
    w = tiny_weights(3)
    paths, states = [save(root / "base.safetensors", w, "F32")], [w]
    for t in range(1, 7):
        cur = {n: x + rng.standard_normal(x.shape).astype(np.float32) * 1e-3 for n, x in states[-1].items()}
        if t == 5:
            cur["lm_head.weight"] = cur["lm_head.weight"] + 0.05
        states.append(cur)
        paths.append(save(root / f"step{t}.safetensors", cur, "F32"))
    return paths, states


def _pooled(states, names, t, ref):
    num = sum(float(np.sum((states[t][n].astype(np.float64) - states[ref][n]) ** 2)) for n in names)
    den = sum(float(np.sum(states[ref][n].astype(np.float64) ** 2)) for n in names)
    return np.sqrt(num / den)


def test_group_drift_matches_numpy(series, engine):
    paths, states = series
    r = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]])
    mlp = [n for n in states[0] if ".mlp." in n]
    pooled = r.by("group")["mlp"]
    for t in range(1, 7):
        assert pooled.rel_to_base[t - 1] == pytest.approx(_pooled(states, mlp, t, 0), rel=1e-6)
        assert pooled.rel_step[t - 1] == pytest.approx(_pooled(states, mlp, t, t - 1), rel=1e-6)
    head = next(t for t in r.tensors if t.name == "lm_head.weight")
    assert head.rel_step[4] == pytest.approx(_pooled(states, ["lm_head.weight"], 5, 4), rel=1e-6)


def test_chunks_and_windows_do_not_change_the_norms(series, monkeypatch, engine):
    """Windows of 1,000 elements summed 37 at a time (ragged ends everywhere), on two workers: the
    pooled drift of the numpy reference."""
    import ckptprobe.analysis.drift as drift_module

    paths, states = series
    monkeypatch.setattr(drift_module, "WINDOW", 1000)
    monkeypatch.setattr(drift_module, "CHUNK", 37)
    monkeypatch.setattr(drift_module, "LOOP_CHUNK", 37)  # the compiled loop's
    pooled = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]], workers=2).by("group")
    for group in ("attention", "mlp"):
        names = [n for n in states[0] if f".{'self_attn' if group == 'attention' else 'mlp'}." in n]
        for t in range(1, 7):
            assert pooled[group].rel_to_base[t - 1] == pytest.approx(_pooled(states, names, t, 0), rel=1e-9)
            assert pooled[group].rel_step[t - 1] == pytest.approx(_pooled(states, names, t, t - 1), rel=1e-9)


def test_mixed_dtypes_and_shards_match_numpy(tmp_path, engine):
    """A bf16 base, then fp16, sharded float32 and bf16 checkpoints: every tensor's norms are numpy's
    float64 sums over the values each file stores."""
    rng = np.random.default_rng(11)
    states = [tiny_weights(5)]
    for _ in range(3):
        states.append({n: x + rng.standard_normal(x.shape).astype(np.float32) * 1e-3 for n, x in states[-1].items()})
    dtypes = ["BF16", "F16", "F32", "BF16"]
    paths = [save(tmp_path / f"c{t}.safetensors", s, d) if d != "F32" else save(tmp_path / f"c{t}", s, d, shards=2)
             for t, (s, d) in enumerate(zip(states, dtypes))]

    def stored(x, dtype):
        if dtype == "BF16":
            return (float32_to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return x.astype(np.float16 if dtype == "F16" else np.float32).astype(np.float64)

    vals = [{n: stored(x, d) for n, x in s.items()} for s, d in zip(states, dtypes)]
    r = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]])
    assert len(r.tensors) == len(states[0])
    for t in r.tensors:
        v = [x[t.name] for x in vals]
        np.testing.assert_allclose(t.norms.sq, [np.sum(x ** 2) for x in v], rtol=1e-12)
        np.testing.assert_allclose(t.norms.to_base, [np.sum((x - v[0]) ** 2) for x in v[1:]], rtol=1e-12)
        np.testing.assert_allclose(t.norms.step, [np.sum((v[i] - v[i - 1]) ** 2) for i in range(1, 4)], rtol=1e-12)


def test_lm_head_surge_found_once(series):
    paths, _ = series
    r = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]])
    assert r.head == "lm_head.weight"
    assert [s.index for s in r.surges] == [4]  # the 5th checkpoint
    assert r.surges[0].checkpoint == str(paths[5])


def test_a_longer_step_for_every_weight_is_no_surge(tmp_path):
    """Checkpoints saved at uneven intervals: step 5 moves every weight 4x as far, the head included."""
    rng = np.random.default_rng(11)
    states = [tiny_weights(4)]
    paths = [save(tmp_path / "base.safetensors", states[0], "F32")]
    for t in range(1, 7):
        scale = 4e-3 if t == 5 else 1e-3
        states.append({n: x + rng.standard_normal(x.shape).astype(np.float32) * scale for n, x in states[-1].items()})
        paths.append(save(tmp_path / f"step{t}.safetensors", states[-1], "F32"))
    r = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]])
    head = r.by("group")["head"]
    assert head.rel_step[4] > 3 * head.rel_step[3]  # the head did jump...
    assert r.surges == ()  # ...but no more than the body


def test_surge_rule_by_hand():
    r = [1.0, 1.1, 0.9, 1.0, 5.0, 1.0]
    hist = np.array(r[:4])
    z4 = (5.0 - hist.mean()) / hist.std()
    found = surges(r, list("abcdef"), z_threshold=3.0)
    assert [(s.index, s.checkpoint) for s in found] == [(4, "e")]
    assert found[0].z == pytest.approx(z4)
    assert surges(r, list("abcdef"), z_threshold=z4 + 1) == []
    assert surges(r[:3], list("abc"), z_threshold=0.0) == []  # no step has 3 earlier ones


def test_needs_a_checkpoint(series):
    with pytest.raises(UsageError):
        drift(open_source(str(series[0][0])), [])


def test_cli_json_and_plot(series, tmp_path, capsys):
    paths, _ = series
    out, fig = tmp_path / "drift.json", tmp_path / "drift.png"
    assert main(["drift", *map(str, paths), "-f", "json", "-o", str(out), "--plot", str(fig)]) == 0
    data = json.loads(out.read_text())
    assert data["command"] == "drift" and len(data["checkpoints"]) == 6
    assert [s["index"] for s in data["surges"]] == [4]
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["drift", *map(str, paths)]) == 0
    assert "lm_head surges" in capsys.readouterr().out
    # Without the head (and the embedding it may be tied to) there is nothing to watch, and the run says so
    assert main(["drift", *map(str, paths), "--exclude", "lm_head.*", "--exclude", "*embed_tokens*"]) == 0
    out = capsys.readouterr()
    assert "lm_head surges" not in out.out and "no surge check" in out.err


@pytest.mark.parametrize("by", ["module", "layer", "group"])
def test_group_rows_match_brute_force(series, by, engine):
    """Every group row against norms computed from the raw arrays of the group's tensors (membership from
    the tensor rows), checkpoints innermost, groups in the order of `grouping.order`."""
    from ckptprobe.analysis.grouping import order

    paths, states = series
    r = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]])
    states = [{n: x.astype(np.float64) for n, x in s.items()} for s in states]  # differences in float64
    members = {}
    for t in r.tensors:
        members.setdefault(getattr(t, by), []).append(t.name)
    rows = r.rows(by)
    assert [row[by] for row in rows[::6]] == sorted(members, key=lambda k: order(by, k))
    assert [row["checkpoint"] for row in rows[:6]] == list(r.checkpoints)

    def norm(names, f):
        return math.sqrt(sum(float(np.sum(f(n) ** 2)) for n in names))

    for i, row in enumerate(rows):
        names, t = members[row[by]], i % 6 + 1
        assert row["numel"] == sum(states[0][n].size for n in names)
        assert row["base_norm"] == pytest.approx(norm(names, lambda n: states[0][n]), rel=1e-9)
        assert row["norm"] == pytest.approx(norm(names, lambda n: states[t][n]), rel=1e-9)
        assert row["to_base"] == pytest.approx(norm(names, lambda n: states[t][n] - states[0][n]), rel=1e-9)
        assert row["step"] == pytest.approx(norm(names, lambda n: states[t][n] - states[t - 1][n]), rel=1e-9)
        assert row["rel_to_base"] == pytest.approx(_pooled(states, names, t, 0), rel=1e-9)
        assert row["rel_step"] == pytest.approx(_pooled(states, names, t, t - 1), rel=1e-9)
    total = r.total.rows(r.checkpoints)
    assert [x["to_base"] for x in total] == pytest.approx(
        [norm(states[0], lambda n: states[t][n] - states[0][n]) for t in range(1, 7)], rel=1e-9)


def _hand_series(root):
    """Known answers. mlp of layer 0, float32, base and two checkpoints:
    up_proj.weight [[3,0],[0,4]] (norm 5) -> [[3,0],[4,4]] -> same;  up_proj.bias zero -> [0,3,4,0] -> [0,3,4,1];
    down_proj.bias zero throughout;  gate_proj.bias one subnormal (1e-40) -> [1, 0] -> same."""
    f = np.float32
    w = {"model.layers.0.mlp.up_proj.weight": [np.array([[3, 0], [0, 4]], f), np.array([[3, 0], [4, 4]], f)],
         "model.layers.0.mlp.up_proj.bias": [np.zeros(4, f), np.array([0, 3, 4, 0], f), np.array([0, 3, 4, 1], f)],
         "model.layers.0.mlp.down_proj.bias": [np.zeros(3, f)],
         "model.layers.0.mlp.gate_proj.bias": [np.array([1e-40, 0], f), np.array([1, 0], f)]}
    states = [{n: v[min(t, len(v) - 1)] for n, v in w.items()} for t in range(3)]
    return [save(root / f"s{t}.safetensors", s, "F32") for t, s in enumerate(states)]


def test_zero_references_are_undefined_by_hand(tmp_path, engine):
    paths = _hand_series(tmp_path)
    r = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]])
    t = {x.name.split(".")[-2] + "." + x.name.split(".")[-1]: x for x in r.tensors}
    nan = float("nan")
    assert t["up_proj.weight"].rel_to_base == (0.8, 0.8) and t["up_proj.weight"].rel_step == (0.8, 0.0)
    assert t["up_proj.bias"].rel_to_base == pytest.approx((nan, nan), nan_ok=True)  # from zero: undefined
    assert t["up_proj.bias"].rel_step == pytest.approx((nan, 0.2), nan_ok=True)  # then ||(0,0,0,1)|| / 5
    assert np.sqrt(t["up_proj.bias"].norms.to_base).tolist() == pytest.approx([5, math.sqrt(26)])
    assert t["down_proj.bias"].rel_to_base == pytest.approx((nan, nan), nan_ok=True)  # stays zero: 0/0
    assert t["down_proj.bias"].rel_step == pytest.approx((nan, nan), nan_ok=True)
    assert t["gate_proj.bias"].rel_to_base == pytest.approx((nan, nan), nan_ok=True)  # not 1e40
    assert t["gate_proj.bias"].rel_step == pytest.approx((nan, 0.0), nan_ok=True)
    # the group is one vector: zero tensors add their change and do not make it undefined
    mlp = r.by("group")["mlp"]
    assert mlp.rel_to_base.tolist() == pytest.approx([math.sqrt(16 + 25 + 1) / 5, math.sqrt(16 + 26 + 1) / 5])
    assert mlp.rel_step.tolist() == pytest.approx([math.sqrt(16 + 25 + 1) / 5, 1 / math.sqrt(41 + 25 + 1)])
    assert [row["module"] for row in r.rows("module")[::2]] == ["gate", "up", "down"]  # the order of grouping
    by_module = {row["module"]: row for row in r.rows("module") if row["checkpoint"] == r.checkpoints[0]}
    assert by_module["up"]["rel_to_base"] == pytest.approx(math.sqrt(16 + 25) / 5)
    assert math.isnan(by_module["down"]["rel_to_base"]) and math.isnan(by_module["gate"]["rel_to_base"])
    assert by_module["gate"]["to_base"] == pytest.approx(1.0)


@pytest.mark.parametrize("value, undefined", [(1e-5, True), (1e-4, False)])
def test_zero_means_below_the_dtypes_smallest_normal(tmp_path, value, undefined, engine):
    """fp16's smallest normal is 2^-14 = 6.1e-5: a bias of 1e-5 (subnormal) is zero at fp16's resolution."""
    a = save(tmp_path / "a.safetensors", {"model.norm.weight": np.full(8, value, np.float32)}, "F16")
    b = save(tmp_path / "b.safetensors", {"model.norm.weight": np.full(8, 2 * value, np.float32)}, "F16")
    rel = drift(open_source(str(a)), [open_source(str(b))]).tensors[0].rel_to_base[0]
    assert math.isnan(rel) if undefined else rel == pytest.approx(1.0, rel=1e-3)


def test_cli_undefined_is_null_blank_and_dash(tmp_path, capsys):
    paths = list(map(str, _hand_series(tmp_path)))
    assert main(["drift", *paths, "-f", "json", "--by", "tensor"]) == 0
    data = json.loads(capsys.readouterr().out)
    bias = next(t for t in data["tensors"] if t["name"].endswith("up_proj.bias"))
    assert bias["rel_to_base"] == [None, None] and bias["rel_step"] == [None, pytest.approx(0.2)]
    assert [r["module"] for r in data["groups"]["module"][::2]] == ["gate", "up", "down"]
    assert main(["drift", *paths, "-f", "csv", "--by", "module"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["module"], r["rel_to_base"]) for r in rows][-2:] == [("down", ""), ("down", "")]
    assert float(rows[2]["rel_to_base"]) == pytest.approx(math.sqrt(16 + 25) / 5)  # up, first checkpoint
    assert main(["drift", *paths, "--by", "module"]) == 0
    text = capsys.readouterr().out
    assert "by module" in text and "undefined" in text
    down = next(line for line in text.splitlines() if " down " in line)
    assert down.count(" - ") == 2


@pytest.mark.parametrize("dtype", ["F32", "F64"])  # F64: numpy's loop whatever the engine
def test_nonfinite_entries_are_named_not_called_zero(tmp_path, capsys, engine, dtype, monkeypatch):
    """A checkpoint holding NaN/inf: the tensor is named in a warning and in JSON, and the legend of "-"
    does not claim the reference is zero (it is not); no numpy warning on the way (inf - inf is NaN)."""
    monkeypatch.setattr(warnings, "filters", [("error", None, Warning, None, 0), *warnings.filters])
    w = np.array([[3, 0], [0, 4]], np.float64)
    q = np.array([[3, 0], [0, np.inf]], np.float64)
    a = save(tmp_path / "a.safetensors", {"model.layers.0.mlp.up_proj.weight": w,
                                          "model.layers.0.self_attn.q_proj.weight": q}, dtype)
    b = save(tmp_path / "b.safetensors", {"model.layers.0.mlp.up_proj.weight": w + 1,
                                          "model.layers.0.self_attn.q_proj.weight": np.where(q == 0, np.nan, q)},
             dtype)
    r = drift(open_source(str(a)), [open_source(str(b))])
    assert r.nonfinite == ("model.layers.0.self_attn.q_proj.weight",)
    assert r.by("group")["mlp"].rel_to_base.tolist() == pytest.approx([2 / 5])
    assert main(["drift", str(a), str(b)]) == 0
    out, err = capsys.readouterr()
    assert "1 tensor(s) hold NaN/inf" in err and "self_attn.q_proj.weight" in err
    assert "NaN/inf entries (see the warning) or the reference is zero" in out
    assert main(["drift", str(a), str(b), "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["nonfinite"] == ["model.layers.0.self_attn.q_proj.weight"]
