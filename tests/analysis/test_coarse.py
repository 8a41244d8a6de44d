"""Coarse exports (axolotl, Spectrum, PEFT): what each selects, checked by re-reading it the way the
trainer does (axolotl's regex and range rules written out, PEFT's own LoraConfig on a real model)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from ckptprobe.analysis.coarse import Target, coarse_export
from ckptprobe.errors import UsageError
from ckptprobe.io.maskfile import read_masks, write_masks


def axolotl_unfrozen(patterns: list[str], shapes: dict) -> dict[str, np.ndarray]:
    """Entries axolotl unfreezes: a pattern (dots literal, matched from the start) with an optional
    [start:end] row range after it; without a range the whole tensor."""
    out = {n: np.zeros(s, bool) for n, s in shapes.items()}
    for p in patterns:
        m = re.fullmatch(r"(.*?)(?:\[(\d*):(\d*)\])?", p)
        regex = re.compile(m.group(1).replace(".", "\\."))
        for n in shapes:
            if regex.match(n):
                if m.group(2) is None:
                    out[n][...] = True
                else:
                    out[n][int(m.group(2) or 0):int(m.group(3)) if m.group(3) else None] = True
    return out


def check_coverage(result, mf, unfrozen):
    kept = sum(int((mf.mask(n) & unfrozen[n]).sum()) for n in unfrozen)
    total = sum(u.size for u in unfrozen.values())
    c = result.coverage
    assert c.unfrozen == sum(int(u.sum()) for u in unfrozen.values())
    assert c.kept == kept and c.extra == c.unfrozen - kept
    assert c.params == total and c.trainable == sum(mf.count(n) for n in unfrozen)
    assert c.unfrozen <= c.budget * total


@pytest.fixture
def rows_file(tmp_path):
    """Three 8x8 matrices: all trainable, none trainable, rows 2-4 and 6 trainable; a 1-D norm, trainable."""
    part = np.zeros((8, 8), bool)
    part[2:5], part[6] = True, True
    masks = {"layers.0.mlp.up_proj.weight": np.ones((8, 8), bool), "layers.0.mlp.down_proj.weight": np.zeros((8, 8), bool),
             "layers.1.mlp.up_proj.weight": part, "layers.1.input_layernorm.weight": np.ones(8, bool)}
    write_masks(tmp_path / "m.safetensors", masks, {"kind": "test"}, {n: f"BF16:{i}" for i, n in enumerate(masks)})
    return read_masks(tmp_path / "m.safetensors")


def test_axolotl_row_ranges_known_answer(rows_file, monkeypatch):
    import ckptprobe.analysis.coarse as coarse

    monkeypatch.setattr(coarse, "ROW_BLOCKS", 8)  # one row per block
    monkeypatch.setattr(coarse, "MIN_BLOCK", 1)
    total = 3 * 64 + 8
    result = coarse_export(rows_file, Target.axolotl, budget=(64 + 8 + 32) / total)
    patterns = yaml.safe_load(result.text)["unfrozen_parameters"]
    # densest first: the norm and the all-trainable matrix (density 1), then the four trainable rows
    assert patterns == ["^layers.0.mlp.up_proj.weight$", "^layers.1.mlp.up_proj.weight$[2:5]",
                        "^layers.1.mlp.up_proj.weight$[6:7]", "^layers.1.input_layernorm.weight$"]
    unfrozen = axolotl_unfrozen(patterns, {n: rows_file.shape(n) for n in rows_file.keys()})
    check_coverage(result, rows_file, unfrozen)
    assert result.coverage.kept_fraction == 1.0 and result.coverage.extra == 0


def test_axolotl_keeps_small_matrices_whole(tmp_path):
    """No block holds fewer than MIN_BLOCK entries or 1/ROW_BLOCKS of the budget (4,239 here): a MoE's small
    experts (32 x 64) are a line each, while a big matrix is still cut into ROW_BLOCKS row ranges (2048 x 2048:
    32 rows a block). A tiny budget still gets row ranges (test_tensors_without_entries)."""
    import ckptprobe.analysis.coarse as coarse

    rng = np.random.default_rng(0)
    masks = {f"layers.0.mlp.experts.{e}.down_proj.weight": rng.random((32, 64)) < (0.9 if e % 2 else 0.01)
             for e in range(8)}
    big = np.zeros((2048, 2048), bool)
    big[:100] = True  # blocks 0-2 whole, block 3 (rows 96-127) holds 4 trainable rows
    masks["layers.0.self_attn.o_proj.weight"] = big
    write_masks(tmp_path / "m.safetensors", masks, {"kind": "test"}, {n: f"BF16:{i}" for i, n in enumerate(masks)})
    mf = read_masks(tmp_path / "m.safetensors")
    assert 32 * 64 < coarse.MIN_BLOCK == 2048 * 2048 // coarse.ROW_BLOCKS
    total = 8 * 32 * 64 + 2048 * 2048
    fits = 4 * 32 * 2048 + 4 * 32 * 64  # the four blocks and the four dense experts; not one more expert
    result = coarse_export(mf, Target.axolotl, budget=(fits + 1000) / total)
    patterns = yaml.safe_load(result.text)["unfrozen_parameters"]
    assert patterns == [*(f"^layers.0.mlp.experts.{e}.down_proj.weight$" for e in (1, 3, 5, 7)),
                        "^layers.0.self_attn.o_proj.weight$[0:128]"]
    assert len(result.units) == 8  # four experts and four blocks, not 32 one-row units an expert
    check_coverage(result, mf, axolotl_unfrozen(patterns, {n: mf.shape(n) for n in mf.keys()}))


def test_spectrum_whole_tensors(rows_file):
    result = coarse_export(rows_file, Target.spectrum, budget=0.7)  # 136 of 200 entries fit, 200 do not
    doc = yaml.safe_load(result.text)
    assert doc["unfrozen_parameters"] == ["^layers.0.mlp.up_proj.weight$", "^layers.1.mlp.up_proj.weight$",
                                          "^layers.1.input_layernorm.weight$"]
    assert "# up layers" in result.text  # grouped by module type in comments, as Spectrum writes
    check_coverage(result, rows_file, axolotl_unfrozen(doc["unfrozen_parameters"],
                                                       {n: rows_file.shape(n) for n in rows_file.keys()}))
    assert result.coverage.extra == 64 - 32


def test_budget_is_respected_and_checked(rows_file):
    for target in Target:
        for budget in (0.35, 0.6, 1.0):
            c = coarse_export(rows_file, target, budget).coverage
            assert c.unfrozen <= budget * c.params
        with pytest.raises(UsageError, match="nothing trainable fits"):  # never an empty (= freeze nothing) list
            coarse_export(rows_file, target, 0.01)
    with pytest.raises(UsageError, match="budget"):
        coarse_export(rows_file, Target.axolotl, 0)


# peft 0.x calls transformers' deprecated alias; a warning of theirs, not of ours
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_selection_read_by_peft(tmp_path):
    """The exported target_modules / layers_to_transform, given to PEFT's LoraConfig on the real model,
    adapt exactly the matrices the coverage counts."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    rng = np.random.default_rng(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    density = {n: (0.9 if ".mlp." in n and ".layers.1." in n else 0.2) for n in shapes}  # a dense cell block
    masks = {n: rng.random(s) < density[n] for n, s in shapes.items()}
    write_masks(tmp_path / "m.safetensors", masks, {"kind": "test"}, {n: "F32:x" for n in masks})
    mf = read_masks(tmp_path / "m.safetensors")
    result = coarse_export(mf, Target.peft, budget=0.2)
    chosen = json.loads(result.text)
    assert chosen["layers_to_transform"] == [1] and set(chosen["target_modules"]) <= {"gate_proj", "up_proj", "down_proj"}
    peft_model = get_peft_model(model, LoraConfig(r=2, **chosen))
    adapted = {n.replace("base_model.model.", "").replace(".base_layer", "")
               for n, _ in peft_model.named_parameters() if ".base_layer." in n}
    unfrozen = {n: np.full(s, n in adapted) for n, s in shapes.items()}
    check_coverage(result, mf, unfrozen)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_selection_keeps_out_a_vision_tower(tmp_path):
    """Llava: the vision tower's layers hold modules of the text layers' names (`layers.0.self_attn.v_proj`),
    so a target_modules list with layers_to_transform would adapt them too. The export is then a regular
    expression, and PEFT adapts exactly the text modules the coverage counts. The checkpoint names
    (`language_model.model.layers...`) and the module names (`model.language_model.layers...`) differ."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2),
        vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=8, patch_size=4),
        image_token_index=3)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "llava")
    from safetensors.numpy import load_file

    shapes = {n: x.shape for n, x in load_file(tmp_path / "llava" / "model.safetensors").items()}
    assert "language_model.model.layers.0.self_attn.v_proj.weight" in shapes  # checkpoint names
    rng = np.random.default_rng(1)
    dense = re.compile(r"language_model\.model\.layers\.0\.self_attn\.[qv]_proj\.weight")
    masks = {n: rng.random(s) < (0.9 if dense.fullmatch(n) else 0.05) for n, s in shapes.items()}
    write_masks(tmp_path / "m.safetensors", masks, {"kind": "test"}, {n: "F32:x" for n in masks})
    mf = read_masks(tmp_path / "m.safetensors")
    result = coarse_export(mf, Target.peft, budget=0.05)
    chosen = json.loads(result.text)
    assert set(chosen) == {"target_modules"} and isinstance(chosen["target_modules"], str)
    cells = {tuple(u.split("@")) for u in result.units}
    assert ("v_proj", "0") in cells
    peft_model = get_peft_model(model, LoraConfig(r=2, **chosen))
    adapted = {n for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A")}
    assert adapted and not any("vision_tower" in n for n in adapted)
    leaf_layer = {(n.split(".")[-1], n.split(".layers.")[1].split(".")[0]) for n in adapted}
    assert leaf_layer == cells and len(adapted) == len(cells)
    text = re.compile(r"language_model\.model\.layers\.(\d+)\..*\.(\w+)\.weight")
    unfrozen = {n: np.full(s, bool((m := text.fullmatch(n)) and (m[2], m[1]) in cells)) for n, s in shapes.items()}
    check_coverage(result, mf, unfrozen)


def _tiny_moe(family):
    """A tiny transformers MoE model (hidden 16, 2 layers, 4 experts) of `family`."""
    import transformers as t

    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                num_experts_per_tok=2)
    if family == "qwen3_moe":  # layer 0 dense: an nn.Linear `mlp.down_proj` beside layer 1's expert `down_proj`s
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**text, intermediate_size=32, moe_intermediate_size=8,
                                                      num_experts=4, head_dim=8, mlp_only_layers=[0]))
    if family == "qwen2_moe":  # a shared expert (nn.Linear `gate_proj`/`up_proj`/`down_proj`) and its gate
        return t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**text, intermediate_size=32, moe_intermediate_size=8,
                                                      shared_expert_intermediate_size=16, num_experts=4))
    if family == "deepseek_v3":  # layer 0 dense; layer 1 has a shared expert (nn.Linear `shared_experts.gate_proj`)
        return t.DeepseekV3ForCausalLM(t.DeepseekV3Config(
            **text, intermediate_size=32, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8))
    if family == "mixtral":
        return t.MixtralForCausalLM(t.MixtralConfig(**text, intermediate_size=8, num_local_experts=4))
    if family == "gpt_oss":  # experts stored fused (`mlp.experts.gate_up_proj`), router `mlp.router.weight`
        return t.GptOssForCausalLM(t.GptOssConfig(**text, intermediate_size=8, num_local_experts=4, head_dim=8))
    # Qwen3-Omni's thinker: Qwen3-MoE text layers `model.layers.N` beside an audio tower `audio_tower.layers.N`
    # of the same module names (`self_attn.q_proj`), and a vision tower
    return t.Qwen3OmniMoeThinkerForConditionalGeneration(t.Qwen3OmniMoeThinkerConfig(
        text_config=dict(**text, intermediate_size=32, moe_intermediate_size=8, num_experts=4, head_dim=8),
        audio_config=dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
                          output_dim=16, downsample_hidden_size=8),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=4)))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss", "qwen3_omni_moe"])
def test_peft_selection_on_moe_models(tmp_path, family):
    """MoE, with the experts, the routers and every other MLP matrix dense in the mask: PEFT accepts the export
    on the transformers 5 model and adapts exactly the matrices the coverage counts. Routers there are modules
    of their own and experts fused stacks; on the families PEFT converts (Qwen3-MoE, DeepSeek-V3, Mixtral,
    Qwen3-Omni) it turns expert names into every MoE layer's stacks, and a regular expression into bare names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    model = _tiny_moe(family)
    model.save_pretrained(tmp_path / "moe")
    tensors = load_file(tmp_path / "moe" / "model.safetensors")
    rng = np.random.default_rng(2)
    attention = re.compile(r"model\.layers\.1\.self_attn\.q_(b_)?proj\.weight")  # the text layers' q in layer 1
    masks = {n: rng.random(x.shape) < (0.9 if re.search(r"\.(mlp|block_sparse_moe)\.", n) and "visual" not in n
                                       else 0.5 if attention.fullmatch(n) else 0.05) for n, x in tensors.items()}
    write_masks(tmp_path / "m.safetensors", masks, {"kind": "test"}, {n: "F32:x" for n in masks})
    mf = read_masks(tmp_path / "m.safetensors")
    result = coarse_export(mf, Target.peft, budget=0.3)
    chosen = json.loads(result.text)
    peft_model = get_peft_model(model, LoraConfig(r=2, **chosen))
    # the checkpoint tensor each adapted matrix was saved as (module and checkpoint names differ in Qwen3-Omni)
    saved = {x.tobytes(): n for n, x in tensors.items()}
    adapted = [mod.get_base_layer() for _, mod in peft_model.named_modules() if hasattr(mod, "lora_A")]
    assert adapted and all(isinstance(m, torch.nn.Linear) for m in adapted)  # not a router, not an expert stack
    adapted = {saved[m.weight.detach().numpy().tobytes()] for m in adapted}
    check_coverage(result, mf, {n: np.full(x.shape, n in adapted) for n, x in tensors.items()})
