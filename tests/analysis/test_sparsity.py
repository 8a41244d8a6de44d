"""`analysis.sparsity`: exact planted counts, per module/layer/group sums, mixed dtypes,
skipped tensors and name filters."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from factory import bump, save, tiny_weights
from safetensors import safe_open

import ckptprobe.analysis.sparsity as sparsity_module
from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.analysis.sparsity import Counts, sparsity
from ckptprobe.analysis.update import CompareMode
from ckptprobe.errors import InvalidCheckpointError, NoMatchingTensorsError, UsageError
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors

ENGINES = ("compiled", "reads", "numpy")  # this code reads files: the compiled loops do, or Python does

# An independent reading of the tiny model's (Llama) names.
MODULE = {"embed_tokens": "embed", "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
          "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "input_layernorm": "norm",
          "post_attention_layernorm": "norm", "norm": "norm", "lm_head": "lm_head"}
GROUP = {"embed": "embedding", "q": "attention", "k": "attention", "v": "attention", "o": "attention",
         "gate": "mlp", "up": "mlp", "down": "mlp", "norm": "norm", "lm_head": "head"}


def expected_keys(name: str) -> dict:
    m = re.search(r"\.layers\.(\d+)\.", name)
    module = MODULE[name.split(".")[-2]]
    return {"layer": int(m[1]) if m else None, "module": module, "group": GROUP[module]}


def sums(changed: dict[str, np.ndarray], key: str) -> dict:
    out: dict = {}
    for name, mask in changed.items():
        k = expected_keys(name)[key]
        numel, n = out.get(k, (0, 0))
        out[k] = (numel + mask.size, n + int(mask.sum()))
    return out


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_planted_counts(engine, tiny_pair, layout):
    base, ft = (tiny_pair.base, tiny_pair.ft) if layout == "file" else (tiny_pair.base_dir, tiny_pair.ft_dir)
    r = sparsity(open_source(str(base)), open_source(str(ft)))
    assert r.mode == "auto" and r.skipped == ()
    assert [t.name for t in r.tensors] == list(open_source(str(base)).keys())
    for t in r.tensors:
        mask = tiny_pair.changed[t.name]
        assert (t.counts.numel, t.counts.changed, t.counts.nonfinite) == (mask.size, int(mask.sum()), 0), t.name
        assert t.counts.sparsity == pytest.approx(1 - mask.mean())
        assert (t.layer, t.module, t.group) == tuple(expected_keys(t.name).values())
        assert (t.shape, t.dtype, t.ft_dtype, t.mode) == (mask.shape, "BF16", "BF16", "bitwise")
    for key in ("module", "layer", "group"):
        got = {k: (c.numel, c.changed) for k, c in r.by(key).items()}
        assert got == sums(tiny_pair.changed, key), key
    assert list(r.by("layer")) == [0, 1, None]  # ascending, None last
    assert list(r.by("module"))[:2] == ["embed", "q"]
    numel = sum(m.size for m in tiny_pair.changed.values())
    changed = sum(int(m.sum()) for m in tiny_pair.changed.values())
    assert (r.total.numel, r.total.changed) == (numel, changed)
    assert r.total.sparsity == pytest.approx(1 - changed / numel)
    assert 0.7 < r.total.sparsity < 0.9  # 10% / 30% of entries were bumped


@pytest.mark.parametrize("eta", [1e-3, 0.1])
def test_eta_on_bf16_counts_the_planted_changes(engine, tiny_pair, eta):
    """eta 1e-3 < 2^-8 is the bitwise rule on bf16 (one compiled pass); 0.1 is not, and lets one-ULP
    changes of every weight through: each count against the rule on the float64 values."""
    base, ft = open_source(str(tiny_pair.base)), open_source(str(tiny_pair.ft))
    r = sparsity(base, ft, CompareMode.eta, eta=eta)
    for t in r.tensors:
        a = bf16_bits_to_float32(base.get_array(t.name)).astype(np.float64)
        b = bf16_bits_to_float32(ft.get_array(t.name)).astype(np.float64)
        want = int(np.count_nonzero(np.abs(b - a) > eta * np.maximum(np.abs(a), np.abs(b))))
        assert (t.counts.changed, t.mode) == (want, "eta"), t.name
    planted = sum(int(m.sum()) for m in tiny_pair.changed.values())
    assert r.total.changed == (planted if eta < 2 ** -8 else 0)


def test_windows_and_workers_do_not_change_counts(engine, tiny_pair, monkeypatch):
    a, b = open_source(str(tiny_pair.base)), open_source(str(tiny_pair.ft))
    reference = sparsity(a, b).to_dict()
    monkeypatch.setattr(sparsity_module, "WINDOW", 37)  # many windows per tensor, ragged last ones
    progress = []
    for workers in (1, 2, 3):
        assert sparsity(a, b, workers=workers, progress=progress.append).to_dict() == reference
    numel = sum(m.size for m in tiny_pair.changed.values())
    assert sum(progress) == 3 * 2 * 2 * numel  # bytes of both sides (bf16), three runs


def test_identical_and_all_changed(tiny_pair, tmp_path):
    a = open_source(str(tiny_pair.base))
    same = sparsity(a, a)
    assert same.total.changed == 0 and same.total.sparsity == 1.0
    bits = {n: float32_to_bf16_bits(x) for n, x in tiny_weights(0).items()}
    save(tmp_path / "all.safetensors", {n: bf16_bits_to_float32(bump(b, np.ones(b.shape, bool))) for n, b in bits.items()})
    every = sparsity(a, open_source(str(tmp_path / "all.safetensors")))
    assert every.total.changed == every.total.numel and every.total.sparsity == 0.0


def test_float32_base_vs_bf16_finetune(engine, tiny_pair, tmp_path):
    """Default mode for mismatched dtypes is bf16: fp32 noise below half a bf16 ULP is not a change."""
    base_bits = {n: float32_to_bf16_bits(x) for n, x in tiny_weights(0).items()}
    rng = np.random.default_rng(5)

    def noisy_base(path, limit):
        """fp32 weights = the bf16 base plus noise in the low 16 bits below `limit`, away from zero."""
        return save(path, {name: ((bits.astype(np.uint32) << 16) | rng.integers(1, limit, bits.shape, dtype=np.uint32)
                                  ).view(np.float32) for name, bits in base_bits.items()}, dtype="F32")

    planted = {n: int(m.sum()) for n, m in tiny_pair.changed.items()}
    ft_src = open_source(str(tiny_pair.ft))
    # noise up to half a bf16 ULP rounds away: only the planted one-ULP changes remain
    base_src = open_source(str(noisy_base(tmp_path / "base32.safetensors", 0x8000)))
    r = sparsity(base_src, ft_src)
    assert {t.mode for t in r.tensors} == {"bf16"} and r.mode == "auto"
    assert {(t.dtype, t.ft_dtype) for t in r.tensors} == {("F32", "BF16")}
    assert {t.name: t.counts.changed for t in r.tensors} == planted
    # ...but half a ULP can be 2^-8 relative, above eta = 1e-3: the eta rule sees more changes
    assert sparsity(base_src, ft_src, mode=CompareMode.eta).total.changed > r.total.changed
    # noise below 1/32 ULP (< 2^-12 relative) passes the eta rule too
    small = open_source(str(noisy_base(tmp_path / "small32.safetensors", 0x800)))
    r_eta = sparsity(small, ft_src, mode=CompareMode.eta)
    assert {t.name: t.counts.changed for t in r_eta.tensors} == planted and r_eta.mode == "eta"
    # the fp32 noise is real: compared with the bf16-exact fp32 base, every entry differs bitwise
    exact = save(tmp_path / "exact32.safetensors", {n: bf16_bits_to_float32(b) for n, b in base_bits.items()},
                 dtype="F32")
    r32 = sparsity(open_source(str(exact)), base_src)
    assert r32.total.changed == r32.total.numel
    # explicit bitwise across dtypes is refused, naming the tensor
    with pytest.raises(UsageError, match=r"model.embed_tokens.weight.*F32.*BF16"):
        sparsity(base_src, ft_src, mode=CompareMode.bitwise)


def test_skipped_tensors(tiny_pair, tmp_path):
    w = {n: bf16_bits_to_float32(float32_to_bf16_bits(x)) for n, x in tiny_weights(0).items()}
    ft = dict(w)
    ft["model.embed_tokens.weight"] = np.vstack([w["model.embed_tokens.weight"], np.ones((2, 32), np.float32)])
    del ft["model.layers.1.mlp.up_proj.weight"]
    ft["model.extra.weight"] = np.ones(3, np.float32)
    ft["model.layers.0.self_attn.q_proj.weight"] = bf16_bits_to_float32(
        bump(float32_to_bf16_bits(w["model.layers.0.self_attn.q_proj.weight"]), np.eye(32, dtype=bool)))
    save(tmp_path / "ft.safetensors", ft)
    a, b = open_source(str(tiny_pair.base)), open_source(str(tmp_path / "ft.safetensors"))
    r = sparsity(a, b)
    reasons = {s.name: s.reason for s in r.skipped}
    assert list(reasons) == ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.extra.weight"]
    assert reasons["model.embed_tokens.weight"] == f"shape (48, 32) in base vs (50, 32) in {b.ref}"
    assert reasons["model.layers.1.mlp.up_proj.weight"] == f"only in base (missing in {b.ref})"
    assert reasons["model.extra.weight"] == f"only in {b.ref} (missing in base)"
    assert len(r.tensors) == len(w) - 2
    assert r.total.changed == 32  # the diagonal of one q_proj; everything else compared is equal
    assert r.to_dict()["skipped"][0] == {"name": "model.embed_tokens.weight", "category": "shape",
                                         "reason": reasons["model.embed_tokens.weight"]}


def test_include_exclude(tiny_pair):
    a, b = open_source(str(tiny_pair.base)), open_source(str(tiny_pair.ft))
    r = sparsity(a, b, include=["*.layers.0.*"])
    expected = {n: m for n, m in tiny_pair.changed.items() if ".layers.0." in n}
    assert {t.name for t in r.tensors} == set(expected) and len(expected) == 9
    assert r.total.changed == sum(int(m.sum()) for m in expected.values())
    r = sparsity(a, b, include=["*.layers.0.*", "lm_head.*"], exclude=["*norm*", "*.q_proj.*"])
    assert {t.name for t in r.tensors} == {n for n in tiny_pair.changed if (".layers.0." in n or n.startswith("lm_head"))
                                           and "norm" not in n and "q_proj" not in n}
    # braces as bash expands them, in --include and --exclude alike
    r = sparsity(a, b, include=["*.layers.{0,1}.*"], exclude=["*.{q,k}_proj.*"])
    assert {t.name for t in r.tensors} == {n for n in tiny_pair.changed if ".layers." in n
                                           and "q_proj" not in n and "k_proj" not in n}
    with pytest.raises(NoMatchingTensorsError, match=r"--include 'nothing\*' matches no tensor of .*base"):
        sparsity(a, b, include=["nothing*"])
    with pytest.raises(NoMatchingTensorsError, match=r"--include '\*.layers.\{7,9\}.\*' matches no tensor"):
        sparsity(a, b, include=["*.layers.{7,9}.*"])
    with pytest.raises(NoMatchingTensorsError, match="leave no tensor"):
        sparsity(a, b, include=["*.layers.0.*"], exclude=["*.layers.*"])
    assert Counts(0, 0).sparsity is None


def test_filters_apply_to_skipped(tiny_pair, tmp_path):
    w = {n: bf16_bits_to_float32(float32_to_bf16_bits(x)) for n, x in tiny_weights(0).items()}
    del w["lm_head.weight"]
    save(tmp_path / "ft.safetensors", w)
    a, b = open_source(str(tiny_pair.base)), open_source(str(tmp_path / "ft.safetensors"))
    assert [s.name for s in sparsity(a, b).skipped] == ["lm_head.weight"]
    assert sparsity(a, b, exclude=["lm_head*"]).skipped == ()


def test_nonfinite_and_empty_tensors(engine, tmp_path):
    x = np.array([1.0, np.nan, np.inf, 0.0, 2.0], np.float32)
    y = np.array([1.0, 1.0, np.inf, -0.0, 3.0], np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"w": ("F32", x), "e": ("F32", np.zeros((0, 3), np.float32)),
                                                   "n": ("F32", np.full(2, np.nan, np.float32))})
    write_safetensors(tmp_path / "b.safetensors", {"w": ("F32", y), "e": ("F32", np.zeros((0, 3), np.float32)),
                                                   "n": ("F32", np.full(2, np.nan, np.float32))})
    r = sparsity(open_source(str(tmp_path / "a.safetensors")), open_source(str(tmp_path / "b.safetensors")))
    t = {t.name: t.counts for t in r.tensors}
    assert t["w"] == Counts(5, 1, 2) and t["w"].sparsity == pytest.approx(2 / 3)
    assert t["e"] == Counts(0, 0, 0) and t["e"].sparsity is None
    assert t["n"] == Counts(2, 0, 2) and t["n"].sparsity is None
    assert r.total == Counts(7, 1, 4)
    assert r.to_dict()["total"] == {"numel": 7, "changed": 1, "nonfinite": 4, "sparsity": pytest.approx(2 / 3)}


def test_tensors_at_odd_offsets_of_different_files(engine, tmp_path, monkeypatch):
    # Each file holds its bf16 tensor after an odd number of bytes (a U8 tensor of another size),
    # so the two sides sit at different, odd offsets; reads of a few KiB cut it anywhere.
    rng = np.random.default_rng(8)
    x = float32_to_bf16_bits(rng.standard_normal(30_001).astype(np.float32))
    y = np.where(rng.random(x.size) < 0.2, x + 1, x).astype(np.uint16)
    y[[5, 6, 7]] = [0x7F80, 0x7FC1, 0x8000]  # inf, NaN, and -0 against a nonzero base
    for name, pad, bits in (("a", 13, x), ("b", 6, y)):
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, {"pad": ("U8", np.zeros(pad, np.uint8)), "w": ("BF16", bits)})
        with safe_open(path, "np") as f:
            assert f.get_slice("w").get_shape() == [x.size]
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert json.loads(raw[8:8 + n])["w"]["data_offsets"][0] == pad  # odd: 8 + n is a multiple of 8
    monkeypatch.setattr(sparsity_module, "READ", 4098)
    monkeypatch.setattr(sparsity_module, "LOOP_READ", 4098)
    r = sparsity(open_source(str(tmp_path / "a.safetensors")), open_source(str(tmp_path / "b.safetensors")),
                 include=["w"])
    fa, fb = bf16_bits_to_float32(x), bf16_bits_to_float32(y)
    nonfinite = ~(np.isfinite(fa) & np.isfinite(fb))
    assert r.tensors[0].counts == Counts(x.size, int(((fa != fb) & ~nonfinite).sum()), int(nonfinite.sum()))


def test_worker_processes_count_what_one_process_counts(engine, tiny_pair, monkeypatch):
    import ckptprobe.analysis.sparsity as sp

    monkeypatch.setattr(sp, "WINDOW", 1000)  # many windows per tensor, split over the workers
    one = sp.sparsity(open_source(str(tiny_pair.base_dir)), open_source(str(tiny_pair.ft_dir)), workers=1)
    two = sp.sparsity(open_source(str(tiny_pair.base_dir)), open_source(str(tiny_pair.ft_dir)), workers=2)
    assert one.to_dict() == two.to_dict()
    assert two.total.changed == sum(int(m.sum()) for m in tiny_pair.changed.values())


def test_a_file_cut_short_after_it_was_opened(engine, tmp_path):
    """A checkpoint file that shrinks after its header was read: sparsity and consensus stop with
    one error naming the file and the tensor, on every path."""
    from ckptprobe.analysis.consensus import consensus

    rng = np.random.default_rng(9)
    x = float32_to_bf16_bits(rng.standard_normal((300, 1000)).astype(np.float32))
    paths = []
    for name in ("a", "b", "c"):
        paths.append(tmp_path / f"{name}.safetensors")
        write_safetensors(paths[-1], {"w": ("BF16", np.where(rng.random(x.shape) < 0.2, x + 1, x).astype(np.uint16))})
    a, b, c = (open_source(str(p)) for p in paths)
    os.truncate(paths[1], paths[1].stat().st_size - 1000)
    with pytest.raises(InvalidCheckpointError, match=r"b\.safetensors: tensor 'w': file shrank while being read"):
        sparsity(a, b)
    with pytest.raises(InvalidCheckpointError, match=r"b\.safetensors: tensor 'w': file shrank while being read"):
        consensus(a, [c, b])
