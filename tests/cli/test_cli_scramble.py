"""`ckptprobe scramble` refuses what it cannot do exactly, in one line, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factory import HIDDEN, INTER, run_error, save, tiny_weights

from ckptprobe.analysis.scramble import RECORD_FILE
from ckptprobe.cli import main
from ckptprobe.io.writer import write_safetensors


# ---------------------------------------------------------------- refusals, one line each

@pytest.fixture()
def tiny_llama(tmp_path):
    """The factory's tiny Llama (3 layers of hidden 32, 4 heads of 8, intermediate 64) as a bf16 folder
    of two shards with an index, and its config.json."""
    folder = save(tmp_path / "base", {**tiny_weights(0), **_third_layer()}, shards=2)
    config = {"model_type": "llama", "hidden_size": HIDDEN, "num_attention_heads": 4, "num_key_value_heads": 4,
              "num_hidden_layers": 3, "intermediate_size": INTER}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _third_layer() -> dict:
    return {n.replace(".1.", ".2."): x for n, x in tiny_weights(5).items() if ".layers.1." in n}


def test_refusals(tiny_llama, tmp_path, capsys):
    base = str(tiny_llama)
    out = str(tmp_path / "out")
    run_error(capsys, ["scramble", base, "-o", base, "--seed", "0"], "output folder is the base", code=2,
              hint="new folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    run_error(capsys, ["scramble", base, "-o", str(tmp_path / "full"), "--seed", "0"], "not empty", code=2,
              hint="new folder")
    (tmp_path / "file").write_text("")
    run_error(capsys, ["scramble", base, "-o", str(tmp_path / "file"), "--seed", "0"], "not a folder", code=2)
    run_error(capsys, ["scramble", base, "-o", out, "--seed", "0", "--layers", "3"], "layer 3", "0..2", code=2)
    run_error(capsys, ["scramble", base, "-o", out, "--seed", "0", "--layers", "1-x"], "--layers", code=2)
    run_error(capsys, ["scramble", str(tmp_path / "nope"), "-o", out, "--seed", "0"], "config.json", "not found")
    shard = next(Path(base).glob("*.safetensors"))  # a file, not its folder
    run_error(capsys, ["scramble", str(shard), "-o", out, "--seed", "0"], f"{shard}: a file", code=2,
              hint=f"give its folder: {base}")
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    run_error(capsys, ["scramble", base, "-o", out, "--seed", "0"], "config.json", "gpt2", "llama")
    (tiny_llama / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    run_error(capsys, ["scramble", base, "-o", out, "--seed", "0"], "config.json", "key-value")
    (tiny_llama / "config.json").write_text(json.dumps(config))
    assert not (tmp_path / "out").exists()  # nothing written by a refusal


def test_writes_the_record_and_copies_other_files(tiny_llama, tmp_path, capsys):
    (tiny_llama / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    assert main(["scramble", str(tiny_llama), "-o", str(out), "--seed", "4", "--layers", "0,2", "--permute-mlp"]) == 0
    record = json.loads((out / RECORD_FILE).read_text())
    assert (record["layers"], record["kinds"], record["seed"]) == ([0, 2], ["permute-mlp"], 4)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in tiny_llama.iterdir()), RECORD_FILE])
    assert "scrambled 6 tensors in layers 0, 2 (permute-mlp, seed 4)" in capsys.readouterr().err


def test_other_copies_of_the_weights_are_left_out(tiny_llama, tmp_path, capsys):
    """Weights beside the model's (a pickle, Mistral's consolidated.safetensors) would keep the old values in
    the scrambled folder: never copied, and said so."""
    (tiny_llama / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
    (tiny_llama / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    write_safetensors(tiny_llama / "consolidated.safetensors", {"layers.0.w": ("F32", np.ones(4, np.float32))})
    out = tmp_path / "out"
    assert main(["scramble", str(tiny_llama), "-o", str(out), "--seed", "1"]) == 0
    kept = {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", RECORD_FILE}
    assert {p.name for p in out.iterdir()} == kept
    err = capsys.readouterr().err
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.safetensors"):
        assert f"left out {name}: weights the rewrite does not hold" in err


def _add_tensor(folder: Path, name: str, array: np.ndarray, dtype: str = "F32") -> None:
    from ckptprobe.io.writer import write_safetensors

    write_safetensors(folder / "extra.safetensors", {name: (dtype, array)})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "extra.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name, array, dtype, needle", [
    ("model.layers.1.self_attn.sinks", np.zeros(4, np.float32), "F32", "does not know how"),
    ("model.layers.1.self_attn.q_norm.weight", np.ones(HIDDEN, np.float32), "F32", "shared by every head"),
])
def test_unknown_tensors_in_a_scrambled_layer_are_refused(tiny_llama, tmp_path, capsys, name, array, dtype, needle):
    _add_tensor(tiny_llama, name, array, dtype)
    run_error(capsys, ["scramble", str(tiny_llama), "-o", str(tmp_path / "out"), "--seed", "0"], name, needle)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    # The same tensor in a layer left alone is copied as is.
    assert main(["scramble", str(tiny_llama), "-o", str(tmp_path / "ok"), "--seed", "0", "--layers", "0"]) == 0


def test_rotation_of_fp8_is_refused(tiny_llama, tmp_path, capsys):
    from ckptprobe.io.writer import write_safetensors

    folder = tmp_path / "fp8"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    write_safetensors(folder / "model.safetensors",
                      {"model.layers.1.self_attn.v_proj.weight": ("F8_E4M3", np.zeros((HIDDEN, HIDDEN), np.uint8))})
    run_error(capsys, ["scramble", str(folder), "-o", str(tmp_path / "out"), "--seed", "0", "--rotate-vo"],
              "v_proj", "F8_E4M3")
    # A permutation moves fp8 codes exactly.
    assert main(["scramble", str(folder), "-o", str(tmp_path / "ok"), "--seed", "0", "--permute-heads"]) == 0


def test_scrambling_a_scrambled_checkpoint_keeps_the_first_record(tiny_llama, tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert main(["scramble", str(tiny_llama), "-o", str(once), "--seed", "1", "--layers", "1"]) == 0
    assert main(["scramble", str(once), "-o", str(twice), "--seed", "2", "--layers", "2"]) == 0
    record = json.loads((twice / RECORD_FILE).read_text())
    assert (record["seed"], record["layers"], record["base_record"]["seed"]) == (2, [2], 1)
