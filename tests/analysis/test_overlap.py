"""Update masks of two runs from two bases, compared in place, against brute force in numpy."""

from __future__ import annotations

import numpy as np
import pytest
from factory import bump, save, tiny_weights

from ckptprobe.analysis import overlap
from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from ckptprobe.analysis.overlap import mask_overlap
from ckptprobe.io.sources import open_source


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Two bases (the second a different model) and a run of each, with known masks M and M'."""
    root = tmp_path_factory.mktemp("overlap")
    rng = np.random.default_rng(3)
    bits = {n: float32_to_bf16_bits(x) for n, x in tiny_weights(0).items()}
    bits2 = {n: float32_to_bf16_bits(x) for n, x in tiny_weights(1).items()}
    m = {n: rng.random(b.shape) < (0.4 if "mlp" in n else 0.1) for n, b in bits.items()}
    # M' shares part of M (more in layer 0) and adds entries of its own.
    m2 = {n: (m[n] & (rng.random(b.shape) < (0.9 if ".0." in n else 0.2))) | (rng.random(b.shape) < 0.05)
          for n, b in bits.items()}
    f32 = lambda d: {n: bf16_bits_to_float32(b) for n, b in d.items()}  # noqa: E731
    run, run2 = ({n: bump(b, mask[n]) for n, b in d.items()} for d, mask in ((bits, m), (bits2, m2)))
    paths = [save(root / "a.safetensors", f32(bits)), save(root / "a_run.safetensors", f32(run)),
             save(root / "b", f32(bits2), shards=2), save(root / "b_run", f32(run2), shards=2)]
    return [open_source(str(p)) for p in paths], m, m2


def test_counts_and_chance_levels_match_brute_force(engine, four, monkeypatch):
    monkeypatch.setattr(overlap, "CHUNK", 1000)  # several chunks per tensor
    sources, m, m2 = four
    result = mask_overlap(*sources)
    assert [t.name for t in result.tensors] == list(m)
    for t in result.tensors:
        assert (t.numel, t.changed, t.changed_other, t.inter) == (
            m[t.name].size, m[t.name].sum(), m2[t.name].sum(), (m[t.name] & m2[t.name]).sum())
    layer0 = [n for n in m if ".layers.0." in n]
    g = result.by_layer()[0]
    M, M2 = (np.concatenate([d[n].ravel() for n in layer0]) for d in (m, m2))
    assert g.overlap == pytest.approx((M & M2).sum() / M.sum(), rel=1e-12)
    assert g.jaccard == pytest.approx((M & M2).sum() / (M | M2).sum(), rel=1e-12)
    # Chance levels pool each tensor's own densities (independent masks within a tensor).
    p = {n: m[n].mean() for n in layer0}
    q = {n: m2[n].mean() for n in layer0}
    e_inter = sum(m[n].size * p[n] * q[n] for n in layer0)
    assert g.chance == pytest.approx(e_inter / M.sum(), rel=1e-12)
    assert g.bernoulli == pytest.approx(e_inter / sum(m[n].size * (p[n] + q[n] - p[n] * q[n]) for n in layer0),
                                        rel=1e-12)
    # Layer 0 shares most of M, layer 1 little: the overlap follows.
    assert g.overlap > 0.85 and result.by_layer()[1].overlap < 0.4
    assert list(result.by_layer()) == [0, 1, None]
    assert result.to_dict()["layers"][0]["layer"] == 0


def test_a_run_against_itself_overlaps_fully_and_chance_is_its_density(four):
    (a, a_run, _, _), m, _ = four
    g = mask_overlap(a, a_run, a, a_run).total
    assert g.overlap == 1.0 and g.jaccard == 1.0
    changed = sum(x.sum() for x in m.values())
    assert g.chance == pytest.approx(sum(x.sum() ** 2 / x.size for x in m.values()) / changed)
