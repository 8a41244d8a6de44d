"""`principal`: overlap of update masks with principal / low-magnitude masks, against brute force."""

import json
import shutil

import numpy as np
import pytest
from factory import bump, save

from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.analysis.mask_select import LowThreshold, default_rank, keep_count
from ckptprobe.analysis.principal import OverlapCounts, principal_overlap
from ckptprobe.cli import main
from ckptprobe.errors import UsageError
from ckptprobe.io.sources import open_source


def ref_top(values, count, largest=True):
    flat = values.reshape(-1).astype(np.float64)
    order = np.lexsort((np.arange(flat.size), -flat if largest else flat))
    out = np.zeros(flat.size, bool)
    out[order[:count]] = True
    return out.reshape(values.shape)


def ref_masks(w, k, alpha, threshold="alpha"):
    """Principal (numpy full SVD in float64, argsort) and low-magnitude masks of one matrix."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    recon = (u[:, :k] * s[:k]) @ vt[:k]
    P = ref_top(np.abs(recon), keep_count(alpha, w.size))
    a = np.abs(w.astype(np.float64))
    L = a < a.mean() if threshold == "mean" else ref_top(a, keep_count(alpha, w.size), largest=False)
    return P, L


def base_weights(path):
    src = open_source(str(path))
    return {n: bf16_bits_to_float32(src.get_array(n)) for n in src.keys()}


@pytest.mark.parametrize("threshold", ["alpha", "mean"])
def test_counts_match_brute_force(tiny_pair, threshold):
    w = base_weights(tiny_pair.base)
    for base, ft in ((tiny_pair.base, tiny_pair.ft), (tiny_pair.base_dir, tiny_pair.ft_dir)):
        r = principal_overlap(open_source(str(base)), [open_source(str(ft))], alpha=0.1,
                              low_threshold=LowThreshold(threshold))
        measured = {m.name: m for m in r.matrices}
        assert set(measured) == {n for n, x in w.items() if x.ndim == 2}
        assert {s.name for s in r.skipped} == {n for n, x in w.items() if x.ndim != 2}
        for name, m in measured.items():
            k = default_rank(w[name].shape)
            P, L = ref_masks(w[name], k, 0.1, threshold)
            M = tiny_pair.changed[name]
            assert m.rank == k and m.alpha == 0.1
            assert m.counts == OverlapCounts(M.size, int(M.sum()), int(P.sum()), int(L.sum()), int((P & ~L).sum()),
                                             int((M & P).sum()), int((M & L).sum()), int((M & P & ~L).sum())), name
        total = r.total[r.finetuned[0]]
        assert total.numel == sum(m.counts.numel for m in r.matrices)
        assert total.overlap("principal") == sum(m.counts.updated_principal for m in r.matrices) / total.updated


def test_known_answers_two_finetunes(tmp_path):
    """One fine-tune changes exactly the principal entries, the other exactly the low, non-principal ones."""
    rng = np.random.default_rng(4)
    w = {f"model.layers.{i}.mlp.up_proj.weight": bf16_bits_to_float32(float32_to_bf16_bits(
        (rng.standard_normal((64, 32)) * 0.02).astype(np.float32))) for i in range(2)}
    w["model.norm.weight"] = np.ones(32, np.float32)
    bits = {n: float32_to_bf16_bits(x) for n, x in w.items()}
    masks = {n: ref_masks(x, 4, 0.05) for n, x in w.items() if x.ndim == 2}
    on_p = {n: bf16_bits_to_float32(bump(b, masks[n][0]) if n in masks else b) for n, b in bits.items()}
    on_l = {n: bf16_bits_to_float32(bump(b, masks[n][1] & ~masks[n][0]) if n in masks else b) for n, b in bits.items()}
    save(tmp_path / "base.safetensors", w)
    save(tmp_path / "p.safetensors", on_p)
    save(tmp_path / "l.safetensors", on_l)
    r = principal_overlap(open_source(str(tmp_path / "base.safetensors")),
                          [open_source(str(tmp_path / f)) for f in ("p.safetensors", "l.safetensors")], rank=4)
    p_ref, l_ref = r.finetuned
    tp, tl = r.total[p_ref], r.total[l_ref]
    n_p = sum(m[0].sum() for m in masks.values())
    assert tp.updated == n_p and tp.overlap("principal") == 1.0 and tp.baseline("principal") == n_p / 4096
    assert tp.ratio("principal") == pytest.approx(4096 / n_p)
    assert tl.overlap("principal") == 0.0 and tl.overlap("low") == 1.0 and tl.ratio("principal") == 0.0
    assert tl.overlap("principal_not_low") == 0.0
    assert [k for k in r.by("layer", p_ref)] == [0, 1]
    row = next(m for m in r.to_dict()["matrices"] if m["finetuned"] == l_ref)
    for key in ("name", "update_density", "overlap_principal", "overlap_low", "overlap_principal_not_low",
                "baseline_principal", "baseline_low", "rank", "alpha"):
        assert key in row
    assert row["rank"] == 4 and row["overlap_low"] == 1.0


def test_nothing_updated_gives_none(tiny_pair):
    r = principal_overlap(open_source(str(tiny_pair.base)), [open_source(str(tiny_pair.base))],
                          include=["*.q_proj.*"])
    t = r.total[r.finetuned[0]]
    assert t.updated == 0 and t.overlap("principal") is None and t.ratio("low") is None
    assert t.baseline("principal") == keep_count(0.05, 1024) / 1024


def test_bad_input(tiny_pair):
    base, ft = open_source(str(tiny_pair.base)), open_source(str(tiny_pair.ft))
    r = principal_overlap(base, [ft], rank=33)  # larger than every matrix: each is skipped, saying why
    matrices = [n for n in base.keys() if len(base.info(n).shape) == 2]
    assert r.matrices == () and matrices
    assert sorted(s.name for s in r.skipped if s.category.value == "small") == sorted(matrices)
    assert all(s.reason.endswith("< k=33") for s in r.skipped if s.category.value == "small")
    with pytest.raises(UsageError, match="outside"):
        principal_overlap(base, [ft], alpha=-0.1)


def test_cli_json_csv_plot(tiny_pair, tmp_path, capsys):
    base, ft = str(tiny_pair.base), str(tiny_pair.ft)
    twin = str(tmp_path / "twin.safetensors")
    shutil.copy(ft, twin)  # the same weights under another name
    assert main(["principal", base, ft, twin, "-f", "json", "-k", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "principal" and data["finetuned"] == [ft, twin] and data["rank"] == 2
    assert len(data["matrices"]) == 2 * 16
    first, second = data["total"]
    assert first["finetuned"] == ft and second["finetuned"] == twin
    assert first["updated"] == sum(m["updated"] for m in data["matrices"] if m["finetuned"] == ft)
    assert {**first, "finetuned": twin} == second
    assert {g["layer"] for g in data["groups"]["layer"]} == {0, 1, None}
    assert main(["principal", base, ft, "-f", "csv", "--by", "layer"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("finetuned,layer,numel,updated") and len(lines) == 4
    plot = tmp_path / "fig.png"
    assert main(["principal", base, ft, "--plot", str(plot), "--matrix", "model.layers.1.mlp.up_proj.weight"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr()
    assert "Overlap of" in out.out and "skipped 5 tensors: 5 1-D (norms, biases)" in out.err


@pytest.mark.parametrize("args, match", [
    (["--matrix", "model.layers.1.mlp.up_proj.weight"], "only chooses what --plot draws"),
    (["--plot", "{tmp}/f.png", "--matrix", "nope"], "no such tensor"),
    (["--plot", "{tmp}/f.png", "--matrix", "model.norm.weight"], "not a 2-D float matrix"),
    (["-k", "0"], "--rank: must be >= 1, got 0"),
    (["--alpha", "2"], "--alpha: must be a fraction in (0, 1], got 2"),
    (["--alpha", "1.0000001"], "--alpha: must be a fraction in (0, 1], got 1.0000001"),
    (["{ft}"], "is given twice"),
])
def test_cli_errors_exit_2(tiny_pair, tmp_path, capsys, args, match):
    args = [a.format(tmp=tmp_path, ft=tiny_pair.ft) for a in args]
    assert main(["principal", str(tiny_pair.base), str(tiny_pair.ft), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and match in err


def test_an_all_zero_base_matrix_is_skipped(tmp_path):
    # Gemma 3's multimodal input projection starts at zero: every weight ties, so no entry is principal
    # or low-magnitude; the matrix is left out with its reason, the others are measured as usual.
    rng = np.random.default_rng(6)
    base = {"model.layers.0.mlp.up_proj.weight": (rng.standard_normal((64, 32)) * 0.02).astype(np.float32),
            "model.layers.0.mlp.down_proj.weight": np.zeros((32, 64), np.float32)}
    ft = {n: x + np.float32(0.01) for n, x in base.items()}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "ft.safetensors", ft)
    r = principal_overlap(open_source(str(tmp_path / "base.safetensors")),
                          [open_source(str(tmp_path / "ft.safetensors"))], rank=4)
    assert [m.name for m in r.matrices] == ["model.layers.0.mlp.up_proj.weight"]
    (s,) = r.skipped
    assert (s.name, s.category.value, s.reason) == ("model.layers.0.mlp.down_proj.weight", "zero",
                                                    "the base matrix is all zeros")
