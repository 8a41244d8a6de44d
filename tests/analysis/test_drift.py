import json

import numpy as np
import pytest
from factory import save, tiny_weights

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


def test_group_drift_matches_numpy(series):
    paths, states = series
    r = drift(open_source(str(paths[0])), [open_source(str(p)) for p in paths[1:]])
    mlp = [n for n in states[0] if ".mlp." in n]
    for t in range(1, 7):
        assert r.groups["mlp"]["rel_to_base"][t - 1] == pytest.approx(_pooled(states, mlp, t, 0), rel=1e-6)
        assert r.groups["mlp"]["rel_step"][t - 1] == pytest.approx(_pooled(states, mlp, t, t - 1), rel=1e-6)
    head = next(t for t in r.tensors if t.name == "lm_head.weight")
    assert head.rel_step[4] == pytest.approx(_pooled(states, ["lm_head.weight"], 5, 4), rel=1e-6)


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
    assert r.groups["head"]["rel_step"][4] > 3 * r.groups["head"]["rel_step"][3]  # the head did jump...
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
