"""Every tensor name of every corpus layout, parsed, against an independent reading of each
family's naming scheme (a table of name patterns written from the published layouts)."""

from __future__ import annotations

import json
import re

import pytest
from corpus import LAYOUTS

from ckptprobe.io.names import is_scale, parse_name

# (pattern of the name after its layer prefix, module, group). Exactly one must match each name.
READING = [
    (r"(self_attn\.q_proj|attention\.self\.query)\.(weight|bias)", "q", "attention"),
    (r"(self_attn\.k_proj|attention\.self\.key)\.(weight|bias)", "k", "attention"),
    (r"(self_attn\.v_proj|attention\.self\.value)\.(weight|bias)", "v", "attention"),
    (r"(self_attn\.o_proj|attention\.output\.dense|attn\.c_proj)\.(weight|bias)", "o", "attention"),
    (r"(self_attn\.qkv_proj|attn\.c_attn)\.(weight|bias)", "qkv", "attention"),
    (r"self_attn\.q_a_proj\.weight", "q_a", "attention"),
    (r"self_attn\.q_b_proj\.weight", "q_b", "attention"),
    (r"self_attn\.kv_a_proj_with_mqa\.weight", "kv_a", "attention"),
    (r"self_attn\.kv_b_proj\.weight", "kv_b", "attention"),
    (r"mlp\.((experts\.\d+|shared_experts)\.)?gate_proj\.weight|block_sparse_moe\.experts\.\d+\.w1\.weight",
     "gate", "mlp"),
    (r"mlp\.((experts\.\d+|shared_experts)\.)?up_proj\.weight|block_sparse_moe\.experts\.\d+\.w3\.weight"
     r"|intermediate\.dense\.(weight|bias)|mlp\.c_fc\.(weight|bias)", "up", "mlp"),
    (r"mlp\.((experts\.\d+|shared_experts)\.)?down_proj\.weight|block_sparse_moe\.experts\.\d+\.w2\.weight"
     r"|output\.dense\.(weight|bias)|mlp\.c_proj\.(weight|bias)", "down", "mlp"),
    (r"mlp\.gate_up_proj\.weight|mlp\.experts\.gate_up_proj(_bias)?", "gate_up", "mlp"),
    (r"mlp\.experts\.down_proj(_bias)?", "down", "mlp"),
    (r"(mlp|block_sparse_moe)\.gate\.(weight|e_score_correction_bias)|mlp\.router\.(weight|bias)", "router", "mlp"),
    (r"self_attn\.sinks", "sinks", "other"),
    (r".*(layernorm|LayerNorm|norm|ln_\d|ln_f)\.(weight|bias)", "norm", "norm"),
    (r"(embed_tokens|embeddings\.word_embeddings|wte)\.weight", "embed", "embedding"),
    (r"(embeddings\.(position|token_type)_embeddings|wpe)\.weight", "pos_embed", "embedding"),
    (r"(lm_head|shared_head\.head)\.weight", "lm_head", "head"),
    (r".*\.weight_scale_inv", "scale", "scale"),
    (r"eh_proj\.weight", "eh_proj", "other"),
    (r"pooler\.dense\.(weight|bias)", "pooler", "other"),
    (r"embeddings\.position_ids", "position_ids", "other"),
    # the vision tower of a VL model
    (r"blocks\.\d+\.attn\.qkv\.(weight|bias)", "vision.qkv", "vision"),
    (r"blocks\.\d+\.attn\.proj\.(weight|bias)", "vision.o", "vision"),
    (r"blocks\.\d+\.mlp\.linear_fc1\.(weight|bias)", "vision.up", "vision"),
    (r"blocks\.\d+\.mlp\.linear_fc2\.(weight|bias)", "vision.down", "vision"),
    (r"blocks\.\d+\.norm\d\.(weight|bias)|(deepstack_merger_list\.\d+|merger)\.norm\.(weight|bias)",
     "vision.norm", "vision"),
    (r"(deepstack_merger_list\.\d+|merger)\.linear_fc\d\.(weight|bias)", "vision.projector", "vision"),
    (r"patch_embed\.proj\.(weight|bias)", "vision.patch_embed", "vision"),
    (r"pos_embed\.weight", "vision.pos_embed", "vision"),
]
LAYER_PREFIX = re.compile(r"^(?:model\.(?:language_model\.)?layers|transformer\.h|encoder\.layer)\.(\d+)\.")
TOP_PREFIX = re.compile(r"^(?:model\.visual\.|model\.language_model\.|model\.|transformer\.)")


def expected(name: str) -> tuple:
    m = LAYER_PREFIX.match(name)
    rest = name[m.end():] if m else TOP_PREFIX.sub("", name)
    hits = [(module, group) for pattern, module, group in READING if re.fullmatch(pattern, rest)]
    if is_scale(name):
        hits = [h for h in hits if h[0] == "scale"]
    elif len(hits) > 1:  # a norm pattern is a catch-all: specific patterns win
        hits = [h for h in hits if h[0] not in ("norm", "vision.norm")] or hits
    if name.startswith("model.visual."):
        hits = [h for h in hits if h[1] == "vision"]
    assert len(hits) == 1, (name, hits)
    expert = re.search(r"\.experts\.(\d+)\.", name)
    return (int(m[1]) if m else None, *hits[0], int(expert[1]) if expert else None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_corpus_names(corpus, layout):
    names = json.loads((corpus[layout].base / "model.safetensors.index.json").read_text())["weight_map"]
    modules = set()
    for name in names:
        p = parse_name(name)
        assert (p.layer, p.module, p.group, p.expert) == expected(name), name
        assert p.transposed == (layout == "gpt2" and re.search(r"\.c_(attn|proj|fc)\.weight$", name) is not None)
        # gpt-oss stores its experts fused, the others one matrix per expert
        assert p.stacked == (layout == "gpt_oss" and ".experts." in name)
        modules.add(p.module)
    assert {"q", "k", "v", "o"} <= modules or {"qkv", "o"} <= modules or {"q_a", "kv_a", "o"} <= modules
    layers = {parse_name(n).layer for n in names} - {None}
    assert layers == ({0, 1, 2, 3, 4, 5} if layout == "bert" else {0, 1, 2} if layout == "deepseek_v3_fp8" else {0, 1})


def test_fused_expert_stacks_and_other_prefixes():
    # transformers >= 5 (in memory), gpt-oss and Llama 4 checkpoints hold experts fused: (E, out, in)
    for name, module in [("model.layers.3.mlp.experts.gate_up_proj", "gate_up"),
                         ("model.layers.3.mlp.experts.down_proj", "down"),
                         ("model.layers.3.mlp.experts.gate_up_proj_bias", "gate_up"),
                         ("language_model.model.layers.3.feed_forward.experts.gate_up_proj", "gate_up")]:
        p = parse_name(name)
        assert (p.layer, p.module, p.group, p.expert, p.stacked) == (3, module, "mlp", None, True), name
    assert parse_name("language_model.model.layers.3.feed_forward.router.weight").module == "router"
    # Llava / Gemma 3: the tower is `vision_tower`, the connector `multi_modal_projector`
    p = parse_name("model.vision_tower.vision_model.encoder.layers.4.self_attn.q_proj.weight")
    assert (p.layer, p.module, p.group) == (None, "vision.q", "vision")
    assert parse_name("model.multi_modal_projector.linear_1.weight").module == "vision.projector"
    assert parse_name("language_model.model.layers.7.mlp.down_proj.weight").layer == 7
    # GPT-NeoX / Falcon
    assert [parse_name(f"gpt_neox.layers.1.{s}.weight").module for s in
            ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")] \
        == ["qkv", "o", "up", "down"]
    # quantization scales are never weights
    for name in ("model.layers.0.mlp.up_proj.weight_scale_inv", "model.layers.0.mlp.up_proj.weight_scale",
                 "model.layers.0.mlp.up_proj.input_scale"):
        assert is_scale(name) and parse_name(name).group == "scale" and parse_name(name).layer == 0
    assert not is_scale("model.layers.0.mlp.up_proj.weight")
