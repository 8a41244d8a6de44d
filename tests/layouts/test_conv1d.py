"""GPT-2's Conv1D weights are stored (in, out); GPT-BigCode's and StarCoder2's weights of the same
names are torch.nn.Linear's (out, in). Real checkpoints of all three, saved by transformers: the
planner tells them apart from the shapes, so the output space (U) is the output space in each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from ckptprobe.analysis.plan import Want, plan_tensors
from ckptprobe.analysis.spectrum import spectrum
from ckptprobe.io.sources import open_source
from ckptprobe.report.consensus_plots import head_axis

TINY = dict(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=1)


def save_model(family: str, folder):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**TINY))
    elif family == "gpt_bigcode":
        model = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(**TINY, multi_query=True))
    else:
        model = tf.Starcoder2ForCausalLM(tf.Starcoder2Config(
            vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1))
    model.save_pretrained(folder)  # float32
    return folder / "model.safetensors"


@pytest.mark.parametrize("family", ["gpt2", "gpt_bigcode", "starcoder2"])
def test_the_output_space_of_c_weights(tmp_path, family):
    base = save_model(family, tmp_path / "base")
    tensors = load_file(base)
    name = next(n for n in tensors if n.endswith("mlp.c_fc.weight"))
    stored = tensors[name].astype(np.float64)
    conv1d = family == "gpt2"
    w = stored.T if conv1d else stored  # (out, in)
    assert w.shape == (128, 32)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((128, 128)))
    w1 = q @ w  # the output space turns, the input space stays
    tensors[name] = np.ascontiguousarray(w1.T if conv1d else w1, np.float32)
    (tmp_path / "ft").mkdir()
    save_file(tensors, str(tmp_path / "ft" / "model.safetensors"))

    plan = plan_tensors(open_source(str(base)), [open_source(str(tmp_path / "ft"))], Want.matrices, k=4)
    params = {p.name: p.param for p in plan.tensors}
    for n, p in params.items():
        assert p.transposed == (conv1d and n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))), n
    attn_out = next(n for n in params if n.endswith(("attn.c_proj.weight", "self_attn.o_proj.weight")))
    assert head_axis(params[attn_out].module, params[attn_out].transposed) == (0 if conv1d else 1)

    (m,) = spectrum(open_source(str(base)), [open_source(str(tmp_path / "ft"))], k=4, include=[name]).matrices
    (c,) = m.comparisons
    assert m.transposed == conv1d
    assert c.max_angle_v < 0.01 and c.max_angle_u > 5  # degrees
