"""One grouping rule: semantic module order, layers ascending (None last), fixed group order, in every result."""

from __future__ import annotations

import numpy as np
from factory import tiny_weights

from ckptprobe.analysis.consensus import consensus
from ckptprobe.analysis.drift import drift
from ckptprobe.analysis.grouping import GROUP_ORDER, grouped, order
from ckptprobe.analysis.masks import MaskSpec, Vectors, build_masks
from ckptprobe.analysis.principal import principal_overlap
from ckptprobe.analysis.sparsity import sparsity
from ckptprobe.analysis.spectrum import spectrum
from ckptprobe.io.names import parse_name
from ckptprobe.io.sources import open_source


def test_order_by_hand():
    modules = ["down", "lm_head", "zeta", "q", "norm", "alpha", "o", "embed", "up", "k", "v", "gate"]
    assert sorted(modules, key=lambda m: order("module", m)) == [
        "embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head", "alpha", "zeta"]
    assert sorted([None, 10, 2, 0], key=lambda x: order("layer", x)) == [0, 2, 10, None]
    assert sorted(["other", "head", "mlp", "norm", "embedding", "attention"], key=lambda g: order("group", g)) == \
        list(GROUP_ORDER)
    items = [("b", 1), ("a", 2), ("b", 3)]
    assert grouped(items, "layer", key=lambda t: t[1] % 2 or None) == {1: [("b", 1), ("b", 3)], None: [("a", 2)]}


def test_every_result_rows_in_one_order(tiny_pair):
    a, b = open_source(str(tiny_pair.base)), open_source(str(tiny_pair.ft))
    w = tiny_weights(0)
    expected = {by: sorted({getattr(parse_name(n), by) for n in w},
                           key=lambda v: order(by, v)) for by in ("module", "layer", "group")}
    sp = sparsity(a, b)
    cons = consensus(a, [b, b])
    for by in ("module", "layer", "group"):
        assert [r[by] for r in sp.rows(by)] == expected[by]
        assert [r[by] for r in cons.rows(by)] == expected[by]
        assert sum(r["changed"] for r in sp.rows(by)) == sum(int(m.sum()) for m in tiny_pair.changed.values())
    assert [r["name"] for r in sp.rows()] == list(w)
    matrices = {by: [v for v in expected[by] if v != "norm"] for by in ("module", "layer")}
    pr = principal_overlap(a, [b])
    sv = spectrum(a, [b], k=2)
    masks = build_masks(a, MaskSpec("safe"), vectors=Vectors.train)
    for by in ("module", "layer"):
        assert [r[by] for r in pr.rows(by)] == matrices[by]
        assert [r[by] for r in masks.rows(by)] == expected[by]
    dr = drift(a, [b, b])
    assert [r["group"] for r in masks.rows("group")] == expected["group"]
    assert sum(r["numel"] for r in masks.rows("group")) == sum(x.size for x in w.values())
    for by in ("module", "layer", "group"):
        assert [r[by] for r in sv.rows(by)] == [v for v in expected[by] if v != "norm"]
        assert [r[by] for r in dr.rows(by)] == [v for v in expected[by] for _ in range(2)]  # per checkpoint


def test_results_holding_arrays_compare_without_raising(tiny_pair):
    a, b = open_source(str(tiny_pair.base)), open_source(str(tiny_pair.ft))
    r1, r2 = consensus(a, [b, b]), consensus(a, [b, b])
    assert r1 == r1 and r1 != r2  # identity of the per-tensor results; no "truth value of an array" error
    assert np.array_equal(r1.tensors[0].inter, r2.tensors[0].inter)
