import json

from ckptprobe.io.config import local_config


def test_config_beside_a_file_or_in_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "head_dim": 16}))
    assert local_config(tmp_path) == {"model_type": "llama", "head_dim": 16}
    assert local_config(str(tmp_path / "model.safetensors")) == {"model_type": "llama", "head_dim": 16}


def test_no_usable_config_is_none(tmp_path):
    assert local_config(tmp_path) is None  # missing
    assert local_config("org/name@main") is None  # a Hub reference
    (tmp_path / "config.json").write_text("[1, 2]")
    assert local_config(tmp_path) is None  # not an object
    (tmp_path / "config.json").write_text("{not json")
    assert local_config(tmp_path) is None
