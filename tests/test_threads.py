"""The thread policy: counts applied to torch and BLAS, the default, and libraries loaded later."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from ckptprobe import _threads
from ckptprobe.errors import UsageError


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    for var in _threads._VARS:  # monkeypatch restores (or removes again) what configure writes
        monkeypatch.delenv(var, raising=False)
    torch_threads = torch.get_num_threads()
    with threadpool_limits(None):  # restores every library's count on exit
        yield
    torch.set_num_threads(torch_threads)


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_configure_sets_torch_blas_and_the_environment():
    assert np.linalg.norm(np.ones(4)) == 2.0  # numpy's BLAS is loaded
    assert _threads.configure(1) == 1
    assert torch.get_num_threads() == 1 and _blas_threads() == {1}
    assert all(os.environ[var] == "1" for var in _threads._VARS)
    assert _threads.configure(2) == 2
    assert torch.get_num_threads() == 2 and _blas_threads() == {2}


@pytest.mark.parametrize("threads, workers, each", [(8, 2, 4), (3, 2, 1), (1, 4, 1), (5, 1, 5)])
def test_workers_share_the_count(threads, workers, each):
    assert _threads.configure(threads, workers=workers) == each
    assert torch.get_num_threads() == each


@pytest.mark.parametrize("bad", [0, -2])
def test_a_count_below_one_is_a_usage_error(bad):
    with pytest.raises(UsageError, match=f"got {bad}"):
        _threads.configure(bad)


def test_default_leaves_out_busy_cpus(monkeypatch):
    cpus = os.cpu_count()
    monkeypatch.setattr(_threads, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(_threads, "_busy_cpus", lambda: 0)
    assert _threads.default() == min(cpus, _threads.CAP)
    monkeypatch.setattr(_threads, "_busy_cpus", lambda: cpus - 1)
    assert _threads.default() == 1
    monkeypatch.setattr(_threads, "_busy_cpus", lambda: 10 * cpus)  # a very busy machine: still one
    assert _threads.default() == 1
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 64)
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(_threads, "_busy_cpus", lambda: 1)
    assert _threads.default() == _threads.CAP


def test_default_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads.default() == 3
    assert _threads.configure(None, workers=2) == 1


def test_usable_cpus_is_within_the_affinity_mask():
    assert 1 <= _threads.usable_cpus() <= len(os.sched_getaffinity(0))


def test_libraries_loaded_after_configure_start_with_the_count():
    threads = os.cpu_count()  # not the tests' 1 (conftest); libraries cap counts at the CPUs
    code = (f"from ckptprobe import _threads; _threads.configure({threads})\n"
            "import torch, numpy; from threadpoolctl import threadpool_info\n"
            "print(torch.get_num_threads(), *{i['num_threads'] for i in threadpool_info()})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(threads)] * 2


@pytest.mark.parametrize("command, runs", [("sparsity", 1), ("consensus", 2), ("drift", 2), ("profile", 2)])
def test_window_commands_start_numpy_on_one_blas_thread(tmp_path, command, runs):
    """Their work runs in worker processes and uses no BLAS: the thread policy is applied before numpy
    loads (an OpenBLAS thread started at import spins for ~0.1 s of CPU beside the workers) and leaves
    BLAS one thread per worker."""
    from tests.factory import save, tiny_weights

    paths = [str(save(tmp_path / f"{i}.safetensors", tiny_weights(i))) for i in range(runs + 1)]
    code = ("import os, sys\n"
            "for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'): os.environ.pop(var, None)\n"
            "from ckptprobe import _threads\n"
            "seen, configure = [], _threads.configure\n"
            "_threads.configure = lambda *a, **k: seen.append('numpy' in sys.modules) or configure(*a, **k)\n"
            "from ckptprobe.cli import main\n"
            f"code = main([{command!r}, *{paths!r}, '--format', 'json'])\n"
            "from threadpoolctl import threadpool_info\n"
            "print(code, seen, sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    exit_code, numpy_before, blas = out.splitlines()[-1].split(" ", 2)
    assert (exit_code, numpy_before) == ("0", "[False]")
    assert blas in ("[]", "[1]")  # `sparsity` loads no numpy in the main process at all
