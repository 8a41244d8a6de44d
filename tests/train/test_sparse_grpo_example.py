"""examples/sparse_grpo_trl.py: TRL's GRPOTrainer under MaskCallback changes nothing outside the `safe` mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ckptprobe import examples
from ckptprobe.cli import main
from ckptprobe.io.maskfile import read_masks
from ckptprobe.io.sources import open_source

ROOT = Path(__file__).parents[2]


def test_sparse_grpo_example(tmp_path, capsys):
    base = examples.path("base")
    mask = tmp_path / "safe.safetensors"
    assert main(["masks", str(base), "--kind", "safe", "--vectors", "freeze", "-o", str(mask)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "sparse_grpo_trl.py"), str(mask),
                          str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "outside the mask: 0" in run.stdout

    masks = read_masks(mask)
    before, after = open_source(str(base)), open_source(str(tmp_path / "out"))
    inside = 0
    for name in masks.keys():
        keep = masks.mask(name)
        a, b = before.get_array(name), after.get_array(name)  # the stored bits (uint16 for bf16)
        assert after.info(name).dtype == "BF16", name
        assert np.array_equal(a[~keep], b[~keep]), name
        inside += int((a != b)[keep].sum())
    assert inside > 0.5 * sum(masks.count(n) for n in masks.keys())

    capsys.readouterr()
    assert main(["sparsity", str(base), str(tmp_path / "out"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["changed"] == inside  # every change the tool sees lies inside the mask
    for row in report["tensors"]:
        if row["name"].endswith("norm.weight"):  # --vectors freeze: the norms stayed exactly
            assert row["changed"] == 0, row
