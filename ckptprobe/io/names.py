"""Parsing parameter names into layer index, module type and group.

Covers the naming of Llama, Mistral, Qwen2/Qwen3, Gemma, Phi-3 (fused `qkv_proj`,
`gate_up_proj`), GPT-2 (Conv1D), GPT-BigCode/StarCoder2, GPT-NeoX/Falcon, BERT, ModernBERT,
StableLM, InternLM2, T5/BART/Whisper, Meta's consolidated layout, the MoE families (Qwen-MoE,
Mixtral, DBRX, GraniteMoE, DeepSeek-V3; per-expert `experts.N.` names and fused 3-D stacks
such as `experts.gate_up_proj`), DeepSeek-V3's MLA attention and FP8 block scales, and
vision-language models (Qwen2/3-VL, Llava, Gemma 3), with or without a `model.`/
`transformer.`/`bert.`/`language_model.` prefix. Module types are the short names used in every table:
q k v o qkv q_a q_b kv_a kv_b gate up down gate_up router embed pos_embed lm_head norm
scale; anything else keeps its last name component.

Vision (and audio) towers are their own group: their modules are prefixed (`vision.qkv`)
and their block indices are not layers, so that per-layer and per-module tables describe
the language model and the tower shows up as one more row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")  # the first match: the layer
_EXPERT = re.compile(r"\.experts\.(\d+)\.")

# Last meaningful name component (before .weight/.bias) -> module type.
_MODULES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "query": "q", "key": "k", "value": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "W_pack": "qkv", "qkv": "qkv", "query_key_value": "qkv",
    "q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",  # DeepSeek MLA
    "Wqkv": "qkv", "wqkv": "qkv",  # ModernBERT, DBRX; InternLM2
    "wq": "q", "wk": "k", "wv": "v",  # Meta's and Mistral's consolidated layout (`attention.wo` is o)
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
    "v1": "up",  # DBRX experts: w1 gate, v1 up, w2 down
    "wi_0": "gate", "wi_1": "up", "wi": "up", "wo": "down",  # T5 DenseReluDense
    "Wi": "gate_up",  # ModernBERT's GLU input projection
    "input_linear": "gate_up", "output_linear": "down",  # GraniteMoE's fused expert stacks
    "shared_expert_gate": "router",  # Qwen2-MoE: the shared expert's gate
    "tok_embeddings": "embed", "token_embedding": "embed", "shared": "embed",  # ModernBERT; CLIP; T5/BART
    "embed_positions": "pos_embed", "position_embedding": "pos_embed",
    "c_fc": "up", "fc1": "up", "fc2": "down", "linear_fc1": "up", "linear_fc2": "down",
    "dense_h_to_4h": "up", "dense_4h_to_h": "down", "gate_up_proj": "gate_up",
    "gate_up_proj_bias": "gate_up", "down_proj_bias": "down",  # fused expert stacks' biases (gpt-oss)
    "router": "router", "e_score_correction_bias": "router",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "embed_in": "embed",
    "wpe": "pos_embed", "position_embeddings": "pos_embed", "token_type_embeddings": "pos_embed",
    "relative_attention_bias": "pos_embed",  # T5's learned relative-position buckets
    "pos_embed": "pos_embed", "patch_embed": "patch_embed", "patch_embedding": "patch_embed",
    "lm_head": "lm_head", "embed_out": "lm_head",
}
_GROUPS = {
    "q": "attention", "k": "attention", "v": "attention", "o": "attention", "qkv": "attention",
    "q_a": "attention", "q_b": "attention", "kv_a": "attention", "kv_b": "attention",
    "gate": "mlp", "up": "mlp", "down": "mlp", "gate_up": "mlp", "router": "mlp",
    "embed": "embedding", "pos_embed": "embedding", "lm_head": "head", "norm": "norm", "scale": "scale",
}
MODULE_ORDER = ["embed", "pos_embed", "q", "k", "v", "qkv", "q_a", "q_b", "kv_a", "kv_b", "o", "router", "gate",
                "up", "gate_up", "down", "norm", "lm_head", "scale"]
# GraniteMoE names its fused expert stacks (E, out, in) without an `experts.` component.
_FUSED_STACKS = ("input_linear", "output_linear")
# Parents of an attention block's output projection (`self_attn.out_proj`, `attn.proj`, ...).
_ATTENTION = ("attn", "self_attn", "attention", "encoder_attn", "cross_attn", "self_attention")
# A name component that starts a non-language tower -> its group.
TOWERS = {
    "visual": "vision", "vision_tower": "vision", "vision_model": "vision", "vision_encoder": "vision",
    "vision_embed_tokens": "vision", "image_encoder": "vision", "multi_modal_projector": "vision",
    "mm_projector": "vision", "audio_tower": "audio", "audio_model": "audio", "audio_encoder": "audio",
}
# Connectors from a tower into the language model's embedding space.
_PROJECTORS = ("merger", "deepstack_merger_list", "multi_modal_projector", "mm_projector")
# Quantization side tensors: per-block or per-channel scales stored next to a weight.
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale")


@dataclass(frozen=True)
class ParamName:
    """What a parameter's name says about it.

    `transposed` is True for GPT-2's Conv1D weights, stored as (in, out) rather than
    torch.nn.Linear's (out, in): rows of the stored matrix are input features there
    (`conv1d_layout` tells whether a checkpoint's `c_attn`/`c_proj`/`c_fc` weights are those).
    `expert` is the index in a per-expert name (`experts.3.up_proj.weight`); `stacked` is
    True for a fused expert stack (`experts.gate_up_proj`, shape (E, out, in) or
    (E, in, out)), whose first axis indexes the experts.
    """

    name: str
    layer: int | None
    module: str
    group: str  # attention | mlp | embedding | head | norm | scale | vision | audio | other
    expert: int | None = None
    transposed: bool = False
    stacked: bool = False

    def to_dict(self) -> dict:
        return {"layer": self.layer, "module": self.module, "group": self.group, "expert": self.expert,
                "transposed": self.transposed}


def is_scale(name: str) -> bool:
    """Whether `name` is a quantization scale (`...weight_scale_inv`, `...weight_scale`, `...input_scale`), not a weight."""
    return name.endswith(SCALE_SUFFIXES)


def is_bias(name: str) -> bool:
    """Whether `name` is a bias (`...bias`, `...proj_bias`): vectors, or a stack of one vector per
    expert (gpt-oss `experts.gate_up_proj_bias`, shape (E, 2I)), never a matrix."""
    last = name.rsplit(".", 1)[-1]
    return last == "bias" or last.endswith("_bias")


def _module(stem: list[str]) -> str:
    last = stem[-1]
    parent = stem[-2] if len(stem) >= 2 else ""
    if "norm" in last.lower() or last in ("ln_1", "ln_2", "ln_f", "ln_attn", "ln_mlp", "ln_q"):
        return "norm"
    if last == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
        return "o" if "attn" in parent else "down"
    if last == "dense":
        if parent in ("attention", "self_attention", "attn"):  # GPT-NeoX, Falcon
            return "o"
        if parent == "output" and len(stem) >= 3 and stem[-3] == "attention":  # BERT
            return "o"
        return {"output": "down", "intermediate": "up"}.get(parent, parent)
    if last in ("proj", "out_proj", "Wo", "wo") and parent in _ATTENTION:  # ViT attn.proj; BART/CLIP out_proj
        return "o"
    if stem == ["output"]:  # Meta's and Mistral's consolidated layout: the LM head
        return "lm_head"
    if last == "Wo" and parent == "mlp":  # ModernBERT
        return "down"
    if parent == "norms" and len(stem) >= 3 and "norm" in stem[-3]:  # StableLM's per-head q/k norms: norms.3
        return "norm"
    if last == "embeddings" and parent == "backbone":  # Mamba
        return "embed"
    if last == "layer" and parent == "router":  # GraniteMoE, DBRX: router.layer
        return "router"
    if last == "gate" and parent in ("mlp", "block_sparse_moe", "moe", "feed_forward"):
        return "router"  # MoE router: mlp.gate.weight is (num_experts, hidden)
    if last == "head" and parent == "shared_head":  # DeepSeek-V3's multi-token-prediction head
        return "lm_head"
    if last == "decoder" and parent == "predictions":  # BERT's masked-LM head: cls.predictions.decoder
        return "lm_head"
    if parent == "gate" and last == "e_score_correction_bias":
        return "router"
    if last == "proj" and parent in _MODULES:  # patch_embed.proj
        return _MODULES[parent]
    if any(p in _PROJECTORS for p in stem):
        return "projector"
    return _MODULES.get(last, last)


def conv1d_layout(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a checkpoint's `c_attn`/`c_proj`/`c_fc` weights are GPT-2's Conv1D ones, stored (in, out).

    GPT-2 stores them so; GPT-BigCode (the same names) and StarCoder2 (`mlp.c_fc`, `mlp.c_proj`)
    store torch.nn.Linear's (out, in). `c_attn` and `c_fc` widen their input (3 or 4 times, or
    hidden + 2 KV heads), so they are stored wider than tall exactly when stored (in, out). With
    no such weight to tell, GPT-2's layout is assumed.
    """
    for name, shape in shapes.items():
        if name.endswith((".c_attn.weight", ".c_fc.weight")) and len(shape) == 2 and shape[0] != shape[1]:
            return shape[0] < shape[1]
    return True


def parse_name(name: str, conv1d: bool = True) -> ParamName:
    """What `name` says; `conv1d`: whether the checkpoint's `c_*` weights are (in, out) (`conv1d_layout`)."""
    parts = name.split(".")
    scale = is_scale(name)
    if scale:  # `x.weight_scale_inv` is read as the name of its weight, then marked
        parts[-1] = "weight"
    stem = parts[:-1] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts
    module = _module(stem)
    tower = next((TOWERS[p] for p in stem if p in TOWERS), None)
    layer_m, expert_m = LAYER.search(name), _EXPERT.search(name)
    layer = int(layer_m[1]) if layer_m and tower is None else None
    expert = int(expert_m[1]) if expert_m else None
    stacked = expert is None and len(stem) >= 2 and (stem[-2] == "experts" or stem[-1] in _FUSED_STACKS)
    transposed = conv1d and stem[-1] in ("c_attn", "c_proj", "c_fc") and parts[-1] == "weight" and not scale
    if scale:
        return ParamName(name, layer, "scale", "scale", expert, False, stacked)
    if tower is not None:
        return ParamName(name, None, f"{tower}.{module}", tower, expert, transposed, stacked)
    return ParamName(name, layer, module, _GROUPS.get(module, "other"), expert, transposed, stacked)
