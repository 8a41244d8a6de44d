"""The window runner: windows cover every element once, in order, on forked processes or threads,
and tensors without elements or without dimensions get an answer."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from ckptprobe.analysis import runner
from ckptprobe.analysis.consensus import consensus
from ckptprobe.analysis.drift import drift
from ckptprobe.analysis.plan import Want, plan_tensors
from ckptprobe.analysis.sparsity import sparsity
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors


class NoFork:
    """A source that may not be used from a forked child (as a Hub source): the runner takes threads."""

    forkable = False

    def __init__(self, source):
        self.source, self.ref = source, source.ref

    def keys(self):
        return self.source.keys()

    def info(self, name):
        return self.source.info(name)

    def read(self, *args, **kwargs):
        return self.source.read(*args, **kwargs)

    def get_array(self, name):
        return self.source.get_array(name)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """bf16 tensors of awkward sizes, 0-d and empty ones included, and a copy with known changes."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (37, 11), "b.weight": (1000,), "scalar": (), "empty.weight": (0, 5), "c.weight": (3, 4, 5)}
    base = {n: rng.integers(0, 0x3F00, s, dtype=np.uint16) for n, s in shapes.items()}
    ft = {n: np.where(rng.random(s) < 0.3, x + 1, x).astype(np.uint16) for (n, x), s in zip(base.items(), shapes.values())}
    write_safetensors(root / "base.safetensors", {n: ("BF16", x) for n, x in base.items()})
    write_safetensors(root / "ft.safetensors", {n: ("BF16", x) for n, x in ft.items()})
    return open_source(str(root / "base.safetensors")), open_source(str(root / "ft.safetensors")), base, ft


@pytest.mark.parametrize("busy", [0, 1, 64])
def test_default_workers_are_the_usable_cpus_whatever_the_load(monkeypatch, tmp_path, busy):
    from ckptprobe import _threads

    loadavg = tmp_path / "loadavg"  # this process counts itself as one runnable task
    loadavg.write_text(f"0.5 0.5 0.5 {busy + 1}/300 12345\n")
    real = _threads.Path
    monkeypatch.setattr(_threads, "Path", lambda p: loadavg if p == "/proc/loadavg" else real(p))
    assert runner.default_workers() == _threads.usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("workers, fork", [(1, True), (3, True), (3, False)])
def test_windows_cover_every_element_once_in_order(odd, workers, fork):
    a, b, base, _ = odd
    src = a if fork else NoFork(a)
    plan = plan_tensors(src, [b], Want.floating)
    threads = set()

    def work(p, start, stop):
        threads.add(threading.get_ident())
        return p.name, start, stop, int(np.asarray(p.base.read(p.name, start, stop), np.int64).sum())

    got = list(runner.run_windows(plan.tensors, work, lambda p: 7, workers))
    assert [p.name for p, _ in got] == list(base)  # one entry per plan, in order
    for p, windows in got:
        n = base[p.name].size
        assert [(s, e) for _, s, e, _ in windows] == ([(s, min(s + 7, n)) for s in range(0, n, 7)] or [(0, 0)])
        assert sum(w[3] for w in windows) == int(base[p.name].astype(np.int64).sum())
    if workers > 1 and not fork:
        assert threading.get_ident() not in threads  # the thread pool did the work
    if workers == 1:
        assert threads == {threading.get_ident()}


def test_forkable_is_a_property_of_every_source(odd):
    a, b, *_ = odd
    assert a.forkable and b.forkable
    plan = plan_tensors(a, [NoFork(b)], Want.floating)
    assert not runner.forkable(plan.tensors) and runner.forkable(plan_tensors(a, [b]).tensors)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fork", [True, False])
def test_analyses_agree_on_every_path(odd, workers, fork, monkeypatch):
    """sparsity, consensus and drift against brute-force numpy, 0-d and empty tensors included."""
    import ckptprobe.analysis.drift as drift_module
    import ckptprobe.analysis.mask_scan as scan_module
    import ckptprobe.analysis.sparsity as sparsity_module

    monkeypatch.setattr(sparsity_module, "WINDOW", 64)
    monkeypatch.setattr(drift_module, "WINDOW", 64)
    monkeypatch.setattr(scan_module, "BLOCK_BYTES", 256)
    a, b, base, ft = odd
    b = b if fork else NoFork(b)
    sp = sparsity(a, b, workers=workers)
    changed = {n: int(np.count_nonzero(base[n] != ft[n])) for n in base}
    assert {t.name: (t.counts.numel, t.counts.changed) for t in sp.tensors} == {
        n: (x.size, changed[n]) for n, x in base.items()}
    assert sp.total.changed == sum(changed.values())
    empty = next(t for t in sp.tensors if t.name == "empty.weight")
    assert empty.counts.numel == 0 and empty.counts.sparsity is None
    cons = consensus(a, [b, b], workers=workers)
    assert {t.name: (t.numel, t.changed.tolist(), t.inter[0, 1]) for t in cons.tensors} == {
        n: (x.size, [changed[n]] * 2, changed[n]) for n, x in base.items()}
    dr = drift(a, [b], workers=workers)
    for t in dr.tensors:
        w0 = (base[t.name].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        w1 = (ft[t.name].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if w0.size:
            assert t.rel_to_base[0] == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-12)
        else:
            assert t.base_norm == 0 and np.isnan(t.rel_to_base[0])


def test_ten_thousand_tiny_tensors(tmp_path):
    """Per-tensor overhead stays small (a MoE checkpoint holds tens of thousands of tensors): 10,000
    tensors of 8 entries are compared exactly in a few seconds of CPU (~0.1 ms each here; a cost growing
    with the number of tensors, per tensor, would take minutes)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x3F00, (10000, 8), dtype=np.uint16)
    names = [f"model.layers.{i // 10}.t{i % 10}.weight" for i in range(10000)]
    base = dict(zip(names, bits))
    ft = dict(zip(names, bits ^ (rng.random(bits.shape) < 0.5)))
    write_safetensors(tmp_path / "a.safetensors", {n: ("BF16", x) for n, x in base.items()})
    write_safetensors(tmp_path / "b.safetensors", {n: ("BF16", x) for n, x in ft.items()})
    a, b = open_source(str(tmp_path / "a.safetensors")), open_source(str(tmp_path / "b.safetensors"))
    start = time.process_time()
    r = sparsity(a, b)
    seconds = time.process_time() - start
    assert r.total.changed == sum(int(np.count_nonzero(base[n] != ft[n])) for n in base)
    assert len(r.tensors) == 10000
    assert seconds < 10, f"{seconds:.1f} s of CPU for 10,000 tiny tensors"


def test_scratch_buffers_are_per_slot_per_thread_and_reused(odd):
    a = runner.scratch(0, 100)
    b = runner.scratch(1, (3, 5), np.uint16)
    assert a.dtype == np.uint8 and a.shape == (100,) and b.dtype == np.uint16 and b.shape == (3, 5)
    assert not np.shares_memory(a, b)
    assert np.shares_memory(runner.scratch(0, (10, 2), np.float32), a)  # the same memory, seen anew
    grown = runner.scratch(0, 1 << 20)  # larger than the slot holds: a new buffer
    assert grown.size == 1 << 20 and np.shares_memory(runner.scratch(0, 8), grown)
    other = []
    t = threading.Thread(target=lambda: other.append(runner.scratch(0, 8)))
    t.start()
    t.join()
    assert not np.shares_memory(other[0], grown)  # each thread has its own
    base, ft, _, _ = odd
    sparsity(base, ft, workers=1)
    assert not np.shares_memory(runner.scratch(0, 8), grown)  # a run lets go of this thread's buffers
