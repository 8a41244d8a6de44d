"""Session fixtures: tiny seeded checkpoints written once as real safetensors files.

`tiny_pair` is a Llama-style model (2 layers, hidden 32, intermediate 64, vocab 48)
in bf16, as a base and a fine-tune in which a known set of entries moved by one bf16
ULP; each is saved both as one file and as a folder sharded over two files with a
`model.safetensors.index.json`.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from pathlib import Path

# One torch/BLAS thread in the tests and the processes they start, set before numpy and torch
# load: on a busy machine a second thread makes the LAPACK-heavy references 10-40x slower, and
# no result depends on it (tests/test_threads.py checks the thread policy itself).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from corpus import Corpus  # noqa: E402
from factory import bump, save, tiny_weights  # noqa: E402

from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float32_to_bf16_bits  # noqa: E402


@dataclass
class TinyPair:
    base: Path  # single file
    ft: Path
    base_dir: Path  # sharded folder
    ft_dir: Path
    changed: dict[str, np.ndarray]  # name -> bool mask of entries that differ


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> TinyPair:
    root = tmp_path_factory.mktemp("tiny")
    w = tiny_weights(0)
    rng = np.random.default_rng(1)
    changed = {n: rng.random(x.shape) < (0.3 if "mlp" in n else 0.1) for n, x in w.items()}
    base_bits = {n: float32_to_bf16_bits(x) for n, x in w.items()}
    ft_bits = {n: bump(b, changed[n]) for n, b in base_bits.items()}
    ft = {n: bf16_bits_to_float32(b) for n, b in ft_bits.items()}
    base = {n: bf16_bits_to_float32(b) for n, b in base_bits.items()}
    return TinyPair(save(root / "base.safetensors", base), save(root / "ft.safetensors", ft),
                    save(root / "base", base, shards=2), save(root / "ft", ft, shards=2), changed)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """Real layouts (see corpus.py), each built once per session when a test first asks for it."""
    return Corpus(tmp_path_factory.mktemp("corpus"))


def pytest_generate_tests(metafunc):
    """`engine` takes the paths a module names in ENGINES: by default the compiled loops and numpy;
    modules whose code reads files (sparsity, consensus, profile) add "reads"."""
    if "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", getattr(metafunc.module, "ENGINES", ("compiled", "numpy")), indirect=True)


@pytest.fixture
def engine(request, monkeypatch) -> str:
    """Run a test on each path of the bitwise comparison: "compiled", the compiled loops (`kernels`),
    reading local files themselves where they can; "reads", the compiled loops on data read in
    Python (as from the Hub); "numpy". Forked workers inherit the choice. `test_kernels.py` checks
    the loops are built wherever they can be."""
    from ckptprobe.analysis import kernels

    if request.param == "numpy":
        monkeypatch.setattr(kernels, "compiled", None)
    elif kernels.compiled is None:
        pytest.skip("ckptprobe was installed without its compiled loops (no C compiler)")
    elif request.param == "reads":
        loops = {k: v for k, v in vars(kernels.compiled).items() if not k.endswith("_files")}
        monkeypatch.setattr(kernels, "compiled", types.SimpleNamespace(**loops))
    return request.param
