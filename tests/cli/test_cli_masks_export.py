"""`ckptprobe masks export`: writes the coarse form, reports coverage on stderr, one-line errors."""

from __future__ import annotations

import numpy as np
import yaml

from factory import run_error

from ckptprobe.cli import main
from ckptprobe.io.maskfile import write_masks


def test_export_writes_file_and_reports(tmp_path, capsys):
    masks = {"model.layers.0.mlp.up_proj.weight": np.ones((4, 4), bool),
             "model.layers.0.mlp.down_proj.weight": np.zeros((4, 4), bool)}
    write_masks(tmp_path / "m.safetensors", masks, {"kind": "test"}, {})
    out = tmp_path / "unfrozen.yaml"
    assert main(["masks", "export", str(tmp_path / "m.safetensors"), "--to", "spectrum", "--budget", "0.5",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert yaml.safe_load(out.read_text()) == {"unfrozen_parameters": ["^model.layers.0.mlp.up_proj.weight$"]}
    assert "keeps 100.0% of the mask's 16 trainable entries; unfreezes 0 entries" in captured.err
    assert main(["masks", "export", str(tmp_path / "m.safetensors"), "--to", "peft", "--budget", "0.5"]) == 0
    assert '"target_modules": [\n    "up_proj"' in capsys.readouterr().out


def test_export_errors(tmp_path, capsys):
    run_error(capsys, ["masks", "export", str(tmp_path / "none.safetensors"), "--to", "axolotl"], "no such mask file")
    write_masks(tmp_path / "m.safetensors", {"a.weight": np.ones((2, 2), bool)}, {"kind": "test"}, {})
    run_error(capsys, ["masks", "export", str(tmp_path / "m.safetensors"), "--to", "axolotl", "--budget", "2"],
              "--budget 2", code=2)
    run_error(capsys, ["masks", "export", str(tmp_path / "m.safetensors"), "--to", "spectrum", "--budget", "0.1"],
              "nothing trainable fits in --budget 0.1", code=2, hint="raise --budget")
