"""The built-in example family: tiny real checkpoints that show how RL and SFT updates differ.

A 2-layer Llama-style model (hidden 128) pretrained on 2-digit addition (`base`),
fine-tuned from it with SFT on subtraction (`sft`) and with GRPO on addition from
three seeds (`rl-1`, `rl-2`, `rl-3`; `rl-1` also every 50 steps on the way). All are
stored in bf16, with a Hugging Face Llama `config.json` beside each. See
`ckptprobe/examples/_train.py` for the recipe.

    from ckptprobe import examples
    weights = examples.path("rl-1") / "model.safetensors"

This module does not import torch (CLI commands that only need `path` stay fast);
`rebuild` imports it when called.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ckptprobe.errors import UsageError

__all__ = ["NAMES", "path", "rebuild"]

# In training order; `_train.names()` derives the same tuple from the recipe (a test checks).
NAMES = ("base", "sft", "rl-1-step050", "rl-1-step100", "rl-1-step150", "rl-1", "rl-2", "rl-3",
         "base-scrambled", "rl-1-scrambled")

_DATA = Path(__file__).parent / "data"


def _check(name: str) -> None:
    if name not in NAMES:
        raise UsageError(f"no example checkpoint named {name!r}; the examples are: {', '.join(NAMES)}")


def path(name: str) -> Path:
    """The folder of a shipped checkpoint (holding `model.safetensors` and `config.json`)."""
    _check(name)
    return _DATA / name


def rebuild(out_dir: str | os.PathLike, progress: Callable[[str], None] | None = None,
            stop_after: str | None = None) -> None:
    """Train the family again into `out_dir/<name>/{model.safetensors,config.json}` (a few minutes on CPU).

    With the same torch version on the same kind of CPU the files are bit-identical to
    the shipped ones. `stop_after` ends the run once that checkpoint is written, for a
    quicker check of a prefix of the family (e.g. `stop_after="base"`). `progress`
    receives one line of text now and then.
    """
    if stop_after is not None:
        _check(stop_after)
    import numpy  # noqa: F401  (first: a Ctrl-C landing in numpy's import is lost when torch imports it)
    import torch
    from safetensors.torch import save_file

    from ckptprobe.examples import _train

    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    # Thread count decides how CPU kernels split their sums, so it is fixed for bitwise-reproducible output.
    torch.set_num_threads(_train.THREADS)
    try:
        for name, state in _train.family(progress or (lambda line: None)):
            folder = out_dir / name
            if name == "base-scrambled":  # written as `ckptprobe scramble` writes it, with its record
                _write_scrambled(out_dir, folder)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                # One metadata key only: safetensors writes metadata from a hash map, whose order
                # (and so the file's bytes) would change from run to run with two.
                save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
                (folder / "config.json").write_text(json.dumps(_train.config(), indent=2) + "\n")
            if name == stop_after:
                break
    finally:
        torch.set_num_threads(threads)


def _write_scrambled(out_dir: Path, folder: Path) -> None:
    from ckptprobe.analysis.scramble import RECORD_FILE, scramble_checkpoint
    from ckptprobe.examples import _train

    for file in ("model.safetensors", "config.json", RECORD_FILE):  # a rebuild replaces its own earlier files
        if (folder / file).is_file() and not (folder / file).is_symlink():
            (folder / file).unlink()
    scramble_checkpoint(out_dir / "base", folder, _train.SCRAMBLE["seed"], _train.SCRAMBLE["layers"],
                        base_ref="base")
