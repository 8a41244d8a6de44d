"""The example family: GRPO's reward and advantages, the shipped files, and a bitwise rebuild of `base`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from ckptprobe import examples
from ckptprobe.errors import UsageError
from ckptprobe.examples import _train


def _tokens(text: str) -> list[int]:
    return [_train.VOCAB.index(c) for c in text]


def test_problems_have_the_right_reversed_answers():
    prompts, answers = _train.make_problems("+", 200, torch.Generator().manual_seed(0))
    sub_prompts, sub_answers = _train.make_problems("-", 200, torch.Generator().manual_seed(0))
    for p, a in zip(prompts.tolist() + sub_prompts.tolist(), answers.tolist() + sub_answers.tolist()):
        text = "".join(_train.VOCAB[t] for t in p)  # "47+85="
        x, op, y = int(text[:2]), text[2], int(text[3:5])
        result = x + y if op == "+" else x - y
        assert result >= 0
        assert _train.decode(a) == f"{result:03d}"[::-1] + "$"


@pytest.mark.parametrize("sampled, expected", [
    ("231$", 1.0),   # 47+85 = 132, written in reverse
    ("230$", -1.0),  # one wrong digit
    ("2310", -1.0),  # no end token
    ("23$1", -1.0),  # ended early: decode keeps "23$"
    ("2+1$", -1.0),  # a symbol where a digit belongs
    ("$231", -1.0),  # empty answer
    ("====", -1.0),
])
def test_reward_is_plus_one_only_for_the_exact_answer(sampled, expected):
    assert _train.reward(_train.decode(_tokens(sampled)), "231$") == expected


def test_decode_cuts_after_the_first_end_token():
    assert _train.decode(_tokens("23$1")) == "23$"
    assert _train.decode(_tokens("$$$$")) == "$"
    assert _train.decode(_tokens("2310")) == "2310"


def test_group_advantages_known_answer():
    # One right of four: mean -0.5, deviations (1.5, -0.5, -0.5, -0.5), unbiased std exactly 1.
    adv = _train.group_advantages(torch.tensor([[1.0, -1.0, -1.0, -1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]) / (1 + 1e-4))


def test_group_advantages_are_zero_mean_and_vanish_for_uniform_groups():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.where(torch.rand(64, 8, generator=gen) < 0.7, 1.0, -1.0)
    rewards[:3] = torch.tensor([[1.0] * 8, [-1.0] * 8, [0.25] * 8])  # groups with nothing to learn from
    adv = _train.group_advantages(rewards)
    assert adv.shape == (64, 8) and adv.dtype == torch.float32
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(64), atol=1e-5, rtol=0)
    assert torch.equal(adv[:3], torch.zeros(3, 8))
    mixed = rewards.std(dim=1) > 0
    assert (adv[mixed] != 0).all()


def test_names_match_the_recipe():
    assert examples.NAMES == _train.names()


@pytest.mark.parametrize("name", examples.NAMES)
def test_every_shipped_checkpoint_is_a_bf16_llama(name):
    folder = examples.path(name)
    config = json.loads((folder / "config.json").read_text())
    assert {**config, "torch_version": torch.__version__} == _train.config()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(_train.TinyLlama().state_dict())
        assert {"model.layers.1.mlp.gate_proj.weight", "lm_head.weight"} <= set(f.keys())
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [config["intermediate_size"],
                                                                               config["hidden_size"]]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UsageError, match="rl-1-step050"):
        examples.path("rl-4")
    with pytest.raises(UsageError):
        examples.rebuild("unused", stop_after="nope")


def test_importing_examples_does_not_import_torch():
    code = "import sys, ckptprobe.examples as e; e.path('base'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# A prefix of pretraining, hashed (sha256 of the fp32 weights, in name order) by a fresh process.
# Bitwise equality holds for one torch version on one kind of CPU: kernels differ across both
# (AVX2 and AVX-512 builds of the same matmul round differently), so a stored fingerprint only
# applies where both match. `python tests/examples/test_examples_train.py` prints this machine's entry.
PREFIX_STEPS = 4
FINGERPRINTS = {
    ("2.13.0+cpu", "AVX2"): "02d9537ee802bdb89df2f8c9167a51c463d11aa70ec0b9458844c2ae0a5d1854",
}
_FINGERPRINT = f"""
import hashlib, torch
from ckptprobe.examples import _train
torch.set_num_threads(_train.THREADS)
model = _train.pretrain(lambda line: None, steps={PREFIX_STEPS})
digest = hashlib.sha256()
for name, value in sorted(model.state_dict().items()):
    digest.update(name.encode() + value.numpy().tobytes())
print(torch.__version__, torch.backends.cpu.get_cpu_capability(), digest.hexdigest())
"""


def _fingerprint_in(process: subprocess.Popen) -> tuple[tuple[str, str], str]:
    out, err = process.communicate()
    assert process.returncode == 0, err
    version, capability, digest = out.split()
    return (version, capability), digest


def test_a_prefix_of_pretraining_is_bitwise_deterministic():
    # Two fresh processes, the second started with torch's global RNG already used, so a
    # recipe that leaned on global state (or on anything but its seeds) would differ.
    perturbed = "import torch; torch.manual_seed(987); torch.rand(13)\n" + _FINGERPRINT
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for code in (_FINGERPRINT, perturbed)]
    (machine, first), (_, second) = (_fingerprint_in(run) for run in runs)
    assert first == second
    assert machine[0] == torch.__version__
    if machine in FINGERPRINTS:  # else: no reference for this torch and CPU; determinism is still checked
        assert first == FINGERPRINTS[machine], f"pretraining on {machine} no longer trains the recorded weights"


def test_rebuild_writes_the_first_checkpoint_and_stops(tmp_path, monkeypatch):
    # The writing path of `rebuild`, without training: a stand-in family yields the shipped base.
    from safetensors.torch import load_file

    shipped = load_file(str(examples.path("base") / "model.safetensors"))
    monkeypatch.setattr(_train, "family", lambda progress: iter([("base", shipped), ("sft", shipped)]))
    threads = torch.get_num_threads()
    examples.rebuild(tmp_path, stop_after="base")
    assert torch.get_num_threads() == threads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "base" / file).read_bytes() == (examples.path("base") / file).read_bytes()



def test_rebuild_writes_the_scrambled_base_as_shipped(tmp_path, monkeypatch):
    # No training: the scrambled base is a function of the base alone, so its files rebuild bit for bit
    # on any machine, through the same code as `ckptprobe scramble`; the state `family` trains from is it.
    from safetensors.torch import load_file

    shipped = load_file(str(examples.path("base") / "model.safetensors"))
    scrambled = _train.scramble(shipped)
    monkeypatch.setattr(_train, "family", lambda progress: iter([("base", shipped), ("base-scrambled", scrambled)]))
    examples.rebuild(tmp_path, stop_after="base-scrambled")
    for file in ("model.safetensors", "config.json", "scramble.json"):
        rebuilt, shipped_file = tmp_path / "base-scrambled" / file, examples.path("base-scrambled") / file
        assert rebuilt.read_bytes() == shipped_file.read_bytes()
    on_disk = load_file(str(tmp_path / "base-scrambled" / "model.safetensors"))
    assert all(torch.equal(on_disk[k].view(torch.int16), v.view(torch.int16)) for k, v in scrambled.items())
    changed = {k for k in shipped if not torch.equal(shipped[k].view(torch.int16), scrambled[k].view(torch.int16))}
    assert changed == {f"model.layers.1.{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


if __name__ == "__main__":
    print(subprocess.run([sys.executable, "-c", _FINGERPRINT], capture_output=True, text=True, check=True).stdout)
