"""Masked optimizers and mask placement: frozen entries bitwise fixed on whatever tensors are stepped."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from ckptprobe.errors import MaskFileError, TensorMismatchError, UsageError
from ckptprobe.io.maskfile import fingerprint, write_masks
from ckptprobe.train import MaskedAdamW, _frozen, mask_updates, masked
from ckptprobe.train._frozen import Frozen

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.dtype])


def bf16_fingerprint(t: torch.Tensor) -> str:
    return fingerprint(t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16), "BF16")


class Block(nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.up_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)  # (B, T, C)
        return self.lm_head(h + self.down_proj(torch.relu(self.up_proj(h))))  # (B, T, V)


def bf16_block(seed=0) -> Block:
    torch.manual_seed(seed)
    return Block().to(torch.bfloat16).float()  # bf16 values held in fp32, as a bf16 base loads for training


def mask_file(path, tensors: dict[str, torch.Tensor], density=0.5, seed=0, prefix=""):
    """A mask file for `tensors` (checkpoint names and values), random masks, BF16 base fingerprints."""
    gen = torch.Generator().manual_seed(seed)
    masks = {prefix + n: (torch.rand(t.shape, generator=gen) < density).numpy() for n, t in tensors.items()}
    write_masks(path, masks, {"kind": "test"}, {prefix + n: bf16_fingerprint(t) for n, t in tensors.items()})
    return {n: torch.from_numpy(m) for n, m in masks.items()}


def loss(model, gen):
    ids = torch.randint(0, 11, (4, 6), generator=gen)
    return nn.functional.cross_entropy(model(ids).float().reshape(-1, 11), ids.roll(1, 1).reshape(-1))


def train(model, opt, n=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss(model, gen).backward()
        opt.step()
        opt.zero_grad()


def check_frozen(model, start, masks, prefix=""):
    for n, p in model.named_parameters():
        keep = masks[prefix + n]
        assert torch.equal(bits(p)[~keep], bits(start[n])[~keep]), n
        assert (bits(p) != bits(start[n]))[keep].float().mean() > 0.8, n


@pytest.mark.parametrize("kind", ["bits", "indices", "all"])
def test_frozen_zero_and_restore_match_torch_where(kind, monkeypatch):
    monkeypatch.setattr(_frozen, "CHUNK", 8)  # many chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(13, 7, generator=gen)
    keep = None if kind == "all" else (torch.rand(13, 7, generator=gen) < (0.5 if kind == "bits" else 0.999))
    if kind == "indices":
        keep[3, 4] = keep[0, 0] = False
    f = Frozen("t", t, None if keep is None else keep.numpy())
    assert f.kind == kind
    frozen = torch.ones_like(t, dtype=torch.bool) if keep is None else ~keep
    moved = t + torch.randn(13, 7, generator=gen)
    expected = torch.where(frozen, t, moved)
    f.restore(moved)
    assert torch.equal(bits(moved), bits(expected))
    grad = torch.randn(13, 7, generator=gen)
    grad[frozen.nonzero()[0].tolist()] = float("nan")  # a NaN where frozen becomes 0
    expected = torch.where(frozen, torch.zeros(()), grad)
    f.zero(grad)
    assert torch.equal(bits(grad), bits(expected))


def test_named_unnamed_and_hooks_give_the_same_weights(tmp_path):
    """MaskedAdamW over named parameters, over bare parameters (matched by content), and
    mask_updates on a plain AdamW train to bitwise the same weights; frozen entries stay fixed."""
    base = bf16_block()
    masks = mask_file(tmp_path / "m.safetensors", dict(base.named_parameters()))
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    results = []
    for way in ("named", "unnamed", "hooks"):
        model = bf16_block()
        if way == "hooks":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            mask_updates(model, tmp_path / "m.safetensors", opt)
        else:
            params = model.named_parameters() if way == "named" else model.parameters()
            opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, masks=str(tmp_path / "m.safetensors"))
        train(model, opt)
        check_frozen(model, start, masks)
        results.append({n: bits(p) for n, p in model.named_parameters()})
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]) and torch.equal(results[0][n], results[2][n]), n


def test_verl_loader_lines(tmp_path):
    """What verl's build_optimizer does with optimizer_impl / optimizer / override_optimizer_config."""
    model = bf16_block()
    masks = mask_file(tmp_path / "safe.safetensors", dict(model.named_parameters()))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer_cls = getattr(importlib.import_module("ckptprobe.train"), "MaskedAdamW")
    args = {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.9, 0.999)}
    args.update({"masks": str(tmp_path / "safe.safetensors")})  # override_optimizer_config
    opt = optimizer_cls(model.parameters(), **args)
    assert isinstance(opt, torch.optim.AdamW)
    train(model, opt)
    check_frozen(model, start, masks)


def test_fp32_master_weights_of_a_bf16_model(tmp_path):
    """The optimizer steps fp32 masters; the bf16 model is refreshed from them each step."""
    model = bf16_block().to(torch.bfloat16)
    masks = mask_file(tmp_path / "m.safetensors", dict(model.named_parameters()))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    opt = MaskedAdamW(masters, lr=1e-2, weight_decay=0.1, masks=tmp_path / "m.safetensors")
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        loss(model, gen).backward()
        for p, m in zip(model.parameters(), masters, strict=True):
            m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters, strict=True):
                p.copy_(m)
    check_frozen(model, start, masks)


class MasterAdamW(torch.optim.Optimizer):
    """bf16 parameters with fp32 state: an fp32 master copy and moments kept inside the optimizer."""

    def __init__(self, params, lr=1e-2, weight_decay=0.1):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["master"], st["m"], st["v"] = p.float(), torch.zeros_like(p, dtype=torch.float32), \
                        torch.zeros_like(p, dtype=torch.float32)
                g = p.grad.float()
                st["m"].lerp_(g, 0.1)
                st["v"].lerp_(g * g, 0.001)
                st["master"].mul_(1 - group["lr"] * group["weight_decay"])
                st["master"].add_(st["m"] / (st["v"].sqrt() + 1e-8), alpha=-group["lr"])
                p.copy_(st["master"])


def test_bf16_parameters_with_fp32_optimizer_state(tmp_path):
    model = bf16_block().to(torch.bfloat16)
    masks = mask_file(tmp_path / "m.safetensors", dict(model.named_parameters()))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = masked(MasterAdamW)(model.named_parameters(), masks=tmp_path / "m.safetensors")
    assert type(opt).__name__ == "MaskedMasterAdamW" and isinstance(opt, MasterAdamW)
    train(model, opt)
    check_frozen(model, start, masks)
    # the optimizer's own master copy drifts where frozen (weight decay); the parameter does not
    assert not torch.equal(opt.state[model.lm_head.weight]["master"], start["lm_head.weight"])


def test_constant_prefix(tmp_path):
    """Checkpoint names `model.x` on a bare module named `x`, and the other way round."""
    model = bf16_block()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = mask_file(tmp_path / "m.safetensors", dict(model.named_parameters()), prefix="model.")
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=tmp_path / "m.safetensors")
    train(model, opt)
    check_frozen(model, start, masks, prefix="model.")
    wrapped = nn.Module()
    wrapped.model = bf16_block()
    masks = mask_file(tmp_path / "b.safetensors", dict(bf16_block().named_parameters()))
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    handle = mask_updates(wrapped, tmp_path / "b.safetensors", opt, check_base=False)
    assert set(handle.frozen) == {f"model.{n}" for n in masks}


class Experts(nn.Module):
    """transformers >= 5 MoE experts: one (E, 2I, H) gate_up_proj and one (E, H, I) down_proj."""

    def __init__(self, E=3, H=8, I=6):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, I))

    def forward(self, x):  # (B, H): every expert, summed
        gate, up = torch.einsum("bh,eih->bei", x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("bei,ehi->bh", nn.functional.silu(gate) * up, self.down_proj)


def test_fused_experts_by_content(tmp_path):
    torch.manual_seed(0)
    model = nn.Module()
    model.experts = Experts().to(torch.bfloat16).float()
    gu, down = model.experts.gate_up_proj.detach(), model.experts.down_proj.detach()
    I = gu.shape[1] // 2
    ckpt = {}  # checkpoint layout: per-expert matrices, gate and up stored apart
    for e in range(gu.shape[0]):
        ckpt[f"mlp.experts.{e}.gate_proj.weight"] = gu[e, :I]
        ckpt[f"mlp.experts.{e}.up_proj.weight"] = gu[e, I:]
        ckpt[f"mlp.experts.{e}.down_proj.weight"] = down[e]
    masks = mask_file(tmp_path / "m.safetensors", ckpt)
    expected = {  # transformers' MergeModulelist(dim=0) then Concatenate(dim=1), written out
        "experts.gate_up_proj": torch.stack([torch.cat([masks[f"mlp.experts.{e}.gate_proj.weight"],
                                                        masks[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(3)]),
        "experts.down_proj": torch.stack([masks[f"mlp.experts.{e}.down_proj.weight"] for e in range(3)]),
    }
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=tmp_path / "m.safetensors")
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        model.experts(torch.randn(4, 8, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    check_frozen(model, start, expected)


def test_identical_base_tensors_with_different_masks_are_ambiguous(tmp_path):
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4, 4))
    mask_file(tmp_path / "m.safetensors", {"x.a": model.a, "x.b": model.b})
    with pytest.raises(TensorMismatchError, match="bitwise-identical"):
        MaskedAdamW(model.parameters(), masks=tmp_path / "m.safetensors")
    mask_file(tmp_path / "same.safetensors", {"x.a": model.a, "x.b": model.b}, density=1.0)
    MaskedAdamW(model.parameters(), masks=tmp_path / "same.safetensors")  # equal masks: either way is right


def test_moved_parameters_are_refused_by_content(tmp_path):
    model = bf16_block()
    mask_file(tmp_path / "m.safetensors", dict(model.named_parameters()))
    with torch.no_grad():
        model.up_proj.weight[0, 0] += 1
    with pytest.raises(MaskFileError, match="up_proj.weight"):
        MaskedAdamW(model.parameters(), masks=tmp_path / "m.safetensors")
    with pytest.raises(TensorMismatchError, match="up_proj.weight"):
        MaskedAdamW(model.named_parameters(), masks=tmp_path / "m.safetensors")
    MaskedAdamW(model.named_parameters(), masks=tmp_path / "m.safetensors", check_base=False)
    with pytest.raises(MaskFileError, match="match no parameter"):  # unchecked: by name only, and there are none
        MaskedAdamW(model.parameters(), masks=tmp_path / "m.safetensors", check_base=False)


def test_swapped_parameters_refused_at_step(tmp_path):
    """DeepSpeed ZeRO replaces the optimizer's parameters by flat fp32 partitions: never silently wrong."""
    model = bf16_block()
    mask_file(tmp_path / "m.safetensors", dict(model.named_parameters()))
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=tmp_path / "m.safetensors")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.ones_like(flat)
    with pytest.raises(UsageError, match="DeepSpeed"):
        opt.step()


@pytest.mark.parametrize("way", ["optimizer", "hooks"])
def test_dtype_changed_after_masks_refused_before_the_step(tmp_path, way):
    """`model.to(bfloat16)` after the masks were applied keeps the parameter objects but swaps their data:
    the step is refused before it runs, naming the tensor, and no weight has moved."""
    model = bf16_block()
    mask_file(tmp_path / "m.safetensors", dict(model.named_parameters()))
    if way == "hooks":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        mask_updates(model, tmp_path / "m.safetensors", opt)
    else:
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=tmp_path / "m.safetensors")
    model.to(torch.bfloat16)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss(model, torch.Generator().manual_seed(0)).backward()
    with pytest.raises(UsageError, match=r"embed_tokens.weight is now torch.bfloat16 on cpu .*applied to torch.float32"):
        opt.step()
    assert all(torch.equal(bits(p), bits(start[n])) for n, p in model.named_parameters())


def test_bare_parameters_with_equal_base_tensors_each_keep_their_frozen_entries(tmp_path):
    """Bare parameters whose base tensors are bitwise equal (norms of ones) land on one mask name: each
    still has its own entry in `frozen`, and `nbytes` counts them all."""
    model = nn.Module()
    model.a, model.b, model.c = (nn.Parameter(torch.ones(4, 4)) for _ in range(3))
    mask_file(tmp_path / "m.safetensors", {"x.a": model.a, "x.b": model.b, "x.c": model.c}, density=0.0)
    handle = masked(torch.optim.SGD)(model.parameters(), lr=0.1, masks=tmp_path / "m.safetensors").masked_updates
    assert sorted(handle.frozen) == ["x.a", "x.a (param[1])", "x.a (param[2])"]
    assert handle.nbytes == 3 * 16 * 4  # each all frozen: its 16 float32 values


def _tiny(family: str):
    import transformers as t

    text = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    if family == "qwen3_moe":  # experts stored per expert, fused into 3-D parameters on loading
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**text, intermediate_size=32, moe_intermediate_size=8,
                                                      num_experts=4, num_experts_per_tok=2, head_dim=8))
    # Llava: stored as `language_model.model.layers...`, loaded as `model.language_model.layers...`
    return t.LlavaForConditionalGeneration(t.LlavaConfig(
        text_config=t.LlamaConfig(**text, intermediate_size=32),
        vision_config=t.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=8, patch_size=4),
        image_token_index=3))


@pytest.mark.parametrize("family", ["qwen3_moe", "llava"])
def test_resume_with_the_masks_in_model_coordinates(tmp_path, family):
    """Checkpoint names are not parameter names here, so a resumed run (trained entries moved, masks placed by
    name only) cannot use the checkpoint's mask file; the masks in the model's coordinates, saved at the start
    or computed again on the base model, resume it, and the frozen entries stay the base's through both runs."""
    import transformers
    from safetensors.torch import load_file

    from ckptprobe.train import model_masks

    torch.manual_seed(0)
    _tiny(family).save_pretrained(tmp_path / "base")
    stored = load_file(tmp_path / "base" / "model.safetensors")
    gen = torch.Generator().manual_seed(0)  # checkpoint names and shapes; vectors train (`--vectors train`)
    masks = {n: torch.rand(t.shape, generator=gen) < 0.5 if t.ndim > 1 else torch.ones(t.shape, dtype=torch.bool)
             for n, t in stored.items()}
    write_masks(tmp_path / "m.safetensors", {n: m.numpy() for n, m in masks.items()}, {"kind": "test"},
                {n: bf16_fingerprint(t) for n, t in stored.items()})
    cls = getattr(transformers, type(_tiny(family)).__name__)
    model = cls.from_pretrained(tmp_path / "base")
    in_model = model_masks(tmp_path / "m.safetensors", model)
    in_model.save(tmp_path / "model-masks.safetensors")
    assert set(in_model) == {n for n, _ in model.named_parameters()} and set(in_model) != set(masks)

    def run(model, masks, check_base, out):
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=masks, check_base=check_base)
        gen = torch.Generator().manual_seed(len(out))
        for _ in range(3):
            ids = torch.randint(4, 32, (2, 6), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(tmp_path / out)

    run(model, tmp_path / "m.safetensors", True, "step3")
    resumed = cls.from_pretrained(tmp_path / "step3")
    with pytest.raises(MaskFileError, match="match no parameter"):
        MaskedAdamW(resumed.named_parameters(), masks=tmp_path / "m.safetensors", check_base=False)
    again = model_masks(tmp_path / "m.safetensors", cls.from_pretrained(tmp_path / "base"))
    assert again.keys() == in_model.keys() and all(torch.equal(again[n], in_model[n]) for n in again)
    run(resumed, tmp_path / "model-masks.safetensors", False, "step6")
    final = load_file(tmp_path / "step6" / "model.safetensors")
    assert final.keys() == stored.keys()
    moved = 0
    for n, keep in masks.items():
        assert torch.equal(bits(final[n])[~keep], bits(stored[n])[~keep]), n
        moved += int((bits(final[n]) != bits(stored[n]))[keep].sum())
    assert moved > 0.5 * sum(int(k.sum()) for n, k in masks.items() if "vision" not in n)
