import numpy as np

from ckptprobe.analysis.sparsity import sparsity
from ckptprobe.io.sources import open_source


def test_counts_planted_changes(tiny_pair):
    for base, ft in ((tiny_pair.base, tiny_pair.ft), (tiny_pair.base_dir, tiny_pair.ft_dir)):
        r = sparsity(open_source(str(base)), open_source(str(ft)))
        expected = {n: int(m.sum()) for n, m in tiny_pair.changed.items()}
        assert {t.name: t.counts.changed for t in r.tensors} == expected
        assert r.total.changed == sum(expected.values())
        assert r.total.numel == sum(m.size for m in tiny_pair.changed.values())
