"""Parsing parameter names into layer index, module type and group.

Covers the naming of Llama, Qwen2/Qwen3, Qwen3-MoE and Mixtral experts, Mistral,
GPT-2 and BERT (with or without a `model.`/`transformer.`/`bert.` prefix). Module
types are the short names used in every table: q k v o qkv gate up down router
embed pos_embed lm_head norm; anything else keeps its last name component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")

# Last meaningful name component (before .weight/.bias) -> module type.
_MODULES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "query": "q", "key": "k", "value": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "W_pack": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
    "c_fc": "up", "fc1": "up", "fc2": "down", "gate_up_proj": "gate_up",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed",
    "wpe": "pos_embed", "position_embeddings": "pos_embed", "token_type_embeddings": "pos_embed",
    "lm_head": "lm_head", "embed_out": "lm_head",
}
_GROUPS = {
    "q": "attention", "k": "attention", "v": "attention", "o": "attention", "qkv": "attention",
    "gate": "mlp", "up": "mlp", "down": "mlp", "gate_up": "mlp", "router": "mlp",
    "embed": "embedding", "pos_embed": "embedding", "lm_head": "head", "norm": "norm",
}
MODULE_ORDER = ["embed", "pos_embed", "q", "k", "v", "qkv", "o", "router", "gate", "up", "gate_up", "down",
                "norm", "lm_head"]


@dataclass(frozen=True)
class ParamName:
    """What a parameter's name says about it.

    `transposed` is True for GPT-2's Conv1D weights, stored as (in, out) rather than
    torch.nn.Linear's (out, in): rows of the stored matrix are input features there.
    """

    name: str
    layer: int | None
    module: str
    group: str  # attention | mlp | embedding | head | norm | other
    expert: int | None = None
    transposed: bool = False

    def to_dict(self) -> dict:
        return {"layer": self.layer, "module": self.module, "group": self.group, "expert": self.expert,
                "transposed": self.transposed}


def parse_name(name: str) -> ParamName:
    layer_m, expert_m = _LAYER.search(name), _EXPERT.search(name)
    parts = name.split(".")
    stem = parts[:-1] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts
    last = stem[-1]
    gpt2 = last in ("c_attn", "c_proj", "c_fc") and parts[-1] == "weight"
    if "norm" in last.lower() or last in ("ln_1", "ln_2", "ln_f", "ln_attn", "ln_mlp"):
        module = "norm"
    elif last == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
        module = "o" if "attn" in stem[-2] else "down"
    elif last == "dense" and len(stem) >= 2:  # BERT
        module = {"output": "down", "intermediate": "up"}.get(stem[-2], stem[-2])
        if stem[-2] == "output" and len(stem) >= 3 and stem[-3] == "attention":
            module = "o"
    elif last == "gate" and len(stem) >= 2 and stem[-2] in ("mlp", "block_sparse_moe", "moe"):
        module = "router"  # MoE router: mlp.gate.weight is (num_experts, hidden)
    else:
        module = _MODULES.get(last, last)
    return ParamName(name, int(layer_m[1]) if layer_m else None, module, _GROUPS.get(module, "other"),
                     int(expert_m[1]) if expert_m else None, gpt2)
