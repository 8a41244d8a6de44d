"""mask_updates: frozen entries stay bitwise fixed under any optimizer; errors name the parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ckptprobe.errors import MaskFileError, TensorMismatchError, UsageError
from ckptprobe.io.maskfile import fingerprint, load_masks, write_masks
from ckptprobe.train import _frozen, mask_updates

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


class TinyLM(nn.Module):
    """Embedding, one MLP block, a norm, an lm_head: names as in Llama checkpoints."""

    def __init__(self, vocab=11, dim=8, tied=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.up_proj = nn.Linear(dim, 2 * dim)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids)  # (B, T, C)
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return self.lm_head(self.norm(h))  # (B, T, V)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bits of a float tensor, so equality is bitwise (-0.0 != 0.0, NaN == NaN)."""
    return t.detach().contiguous().view(_INT[t.dtype])


def step(model, opt, gen):
    ids = torch.randint(0, 11, (4, 6), generator=gen)
    logits = model(ids).float()
    nn.functional.cross_entropy(logits.reshape(-1, 11), ids.roll(1, dims=1).reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


def random_masks(model, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters()}


def train(model, opt, n=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        step(model, opt, gen)


OPTIMIZERS = {
    "adamw_wd": lambda ps: torch.optim.AdamW(ps, lr=5e-2, weight_decay=0.1),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=5e-2, weight_decay=0.1, foreach=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, weight_decay=0.1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_entries_bitwise_fixed(opt_name, dtype):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    masks = random_masks(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = OPTIMIZERS[opt_name](model.parameters())
    handle = mask_updates(model, masks, opt)
    train(model, opt)
    for n, p in model.named_parameters():
        frozen, keep = ~masks[n], masks[n]
        assert torch.equal(bits(p)[frozen], bits(start[n])[frozen]), n
        moved = (bits(p) != bits(start[n]))[keep].float().mean().item()
        assert moved > 0.8, f"{n}: only {moved:.0%} of trainable entries changed"
    handle.remove()


def test_adam_moments_stay_zero_outside_mask():
    torch.manual_seed(0)
    model = TinyLM()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mask_updates(model, masks, opt)
    train(model, opt, n=3)
    for n, p in model.named_parameters():
        state = opt.state[p]
        assert not state["exp_avg"][~masks[n]].any() and not state["exp_avg_sq"][~masks[n]].any(), n
        assert state["exp_avg_sq"][masks[n]].gt(0).float().mean() > 0.8, n


def test_trainable_entries_match_reference_loop():
    """The trained entries equal an independent masked AdamW loop written with torch.where."""
    torch.manual_seed(0)
    model, ref = TinyLM(), TinyLM()
    ref.load_state_dict(model.state_dict())
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    mask_updates(model, masks, opt)
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(6):
        step(model, opt, gen)
        ids = torch.randint(0, 11, (4, 6), generator=ref_gen)
        nn.functional.cross_entropy(ref(ids).reshape(-1, 11), ids.roll(1, dims=1).reshape(-1)).backward()
        for n, p in ref.named_parameters():
            p.grad = torch.where(masks[n], p.grad, torch.zeros_like(p.grad))
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(torch.where(masks[n], p, start[n]))
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(bits(p), bits(q)), n


def test_chunked_restore(monkeypatch):
    """Parameters split into many chunks (and a 0-d one) are restored exactly too."""
    monkeypatch.setattr(_frozen, "CHUNK", 8)
    torch.manual_seed(0)
    model = TinyLM()
    model.scale = nn.Parameter(torch.tensor(1.5))  # 0-d, always frozen below
    masks = random_masks(model, density=0.3)
    masks["scale"] = torch.tensor(False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mask_updates(model, masks, opt)
    train(model, opt, n=3)
    for n, p in model.named_parameters():
        assert torch.equal(bits(p)[~masks[n]], bits(start[n])[~masks[n]]), n


def test_remove_restores_normal_training():
    torch.manual_seed(0)
    model = TinyLM()
    masks = random_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = mask_updates(model, masks, opt)
    train(model, opt, n=2)
    handle.remove()
    assert handle.nbytes == 0
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, n=3)
    for n, p in model.named_parameters():
        moved = (bits(p) != bits(start[n]))[~masks[n]].float().mean().item()
        assert moved > 0.8, f"{n}: frozen entries still fixed after remove()"


def test_gradients_zeroed_as_accumulated():
    torch.manual_seed(0)
    model = TinyLM()
    masks = random_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mask_updates(model, masks, opt)
    ids = torch.randint(0, 11, (2, 5))
    for _ in range(2):  # gradient accumulation: hook runs after each accumulation
        model(ids).sum().backward()
    for n, p in model.named_parameters():
        assert not p.grad[~masks[n]].any(), n
        assert p.grad[masks[n]].ne(0).any(), n


def test_missing_policies():
    torch.manual_seed(0)
    model = TinyLM()
    masks = {n: m for n, m in random_masks(model).items() if n != "lm_head.weight"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(MaskFileError, match="lm_head.weight"):
        mask_updates(model, masks, opt)
    start = model.lm_head.weight.detach().clone()
    handle = mask_updates(model, masks, opt, missing="freeze")
    train(model, opt, n=3)
    assert torch.equal(bits(model.lm_head.weight), bits(start))
    assert handle.frozen["lm_head.weight"].where is None  # wholly frozen: no positions kept
    handle.remove()
    mask_updates(model, masks, opt, missing="train")
    train(model, opt, n=3)
    assert (bits(model.lm_head.weight) != bits(start)).float().mean() > 0.8
    with pytest.raises(UsageError):
        mask_updates(model, masks, opt, missing="ignore")


def test_refusals_name_the_parameter():
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    masks = random_masks(model)
    masks["up_proj.weight"] = masks["up_proj.weight"].T.contiguous()
    with pytest.raises(TensorMismatchError, match="up_proj.weight"):
        mask_updates(model, masks, opt)
    masks = random_masks(model) | {"layers.9.mlp.up_proj.weight": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(MaskFileError, match="match no parameter"):
        mask_updates(model, masks, opt)
    masks = random_masks(model) | {"norm.bias": torch.ones(8)}
    with pytest.raises(MaskFileError, match="norm.bias"):
        mask_updates(model, masks, opt)


def test_optimizer_over_other_tensors_refused():
    """bf16 weights stepped through fp32 master copies: the hooks cannot see the masters."""
    model = TinyLM().to(torch.bfloat16)
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    with pytest.raises(UsageError, match="master"):
        mask_updates(model, random_masks(model), torch.optim.AdamW(masters))
    partial = torch.optim.AdamW([model.up_proj.weight])
    with pytest.raises(UsageError, match="does not step"):
        mask_updates(model, random_masks(model), partial)


def test_frozen_parameter_outside_optimizer_is_fine():
    model = TinyLM()
    model.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    mask_updates(model, random_masks(model), opt)
    train(model, opt, n=1)


def test_tied_weights():
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    masks = random_masks(model)
    masks["lm_head.weight"] = masks["embed_tokens.weight"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    start = model.lm_head.weight.detach().clone()
    mask_updates(model, masks, opt).remove()
    only_head = {n: m for n, m in masks.items() if n != "embed_tokens.weight"}
    mask_updates(model, only_head, opt)  # one name of the tied pair is enough
    train(model, opt, n=3)
    frozen = ~masks["lm_head.weight"]
    assert torch.equal(bits(model.embed_tokens.weight)[frozen], bits(start)[frozen])
    masks["lm_head.weight"] = ~masks["lm_head.weight"]
    with pytest.raises(TensorMismatchError, match="tied"):
        mask_updates(model, masks, opt)


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def test_fingerprints_checked(tmp_path):
    """A BF16 base's fingerprint matches the same weights loaded as fp32; a changed weight is refused."""
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16).float()  # bf16 values, held in fp32
    masks = {n: m.numpy() for n, m in random_masks(model).items()}
    fps = {n: fingerprint(_bf16_bits(p), "BF16") for n, p in model.named_parameters()}
    write_masks(tmp_path / "safe.safetensors", masks, {"kind": "test"}, fps)
    loaded = load_masks(tmp_path / "safe.safetensors")
    assert loaded.fingerprints == fps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mask_updates(model, loaded, opt).remove()
    with torch.no_grad():
        model.down_proj.weight[0, 0] += 1.0
    with pytest.raises(TensorMismatchError, match="down_proj.weight"):
        mask_updates(model, loaded, opt)
    mask_updates(model, dict(loaded), opt)  # a plain dict carries no fingerprints: not checked


def test_memory_cost_per_parameter():
    """Held bytes: n/8 for the bit-packed positions (or 4 per frozen entry below 1/32 frozen), plus the
    frozen entries in the parameter's own dtype; nothing fp32, no bool mask."""
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16)
    masks = random_masks(model, density=0.3)
    gen = torch.Generator().manual_seed(5)
    masks["embed_tokens.weight"] = torch.rand(11, 8, generator=gen) > 0.02  # 2 of 88 frozen: indices
    masks["embed_tokens.weight"][0, :2] = False
    masks["norm.weight"] = torch.ones(8, dtype=torch.bool)  # fully trainable: costs nothing
    masks["norm.bias"] = torch.zeros(8, dtype=torch.bool)  # fully frozen: values only
    handle = mask_updates(model, masks, torch.optim.AdamW(model.parameters(), weight_decay=0.1))
    assert "norm.weight" not in handle.frozen
    expected = {"norm.bias": 8 * 2}
    for n, p in model.named_parameters():
        if n.startswith("norm."):
            continue
        frozen = int((~masks[n]).sum())
        indices = frozen * 4 * 8 < p.numel()
        assert handle.frozen[n].kind == ("indices" if indices else "bits"), n
        expected[n] = (frozen * 4 if indices else (p.numel() + 7) // 8) + frozen * 2
        assert handle.frozen[n].values.dtype == torch.bfloat16 and handle.frozen[n].values.numel() == frozen
    assert handle.frozen["embed_tokens.weight"].kind == "indices"
    assert {n: f.nbytes for n, f in handle.frozen.items()} == expected
    assert handle.nbytes == sum(expected.values())


def test_refusal_installs_nothing():
    """A call that raises leaves no hook behind: later training is unconstrained."""
    torch.manual_seed(0)
    model = TinyLM()
    masks = {n: m for n, m in random_masks(model).items() if n != "lm_head.weight"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MaskFileError):
        mask_updates(model, masks, opt)
    model(torch.randint(0, 11, (2, 5))).sum().backward()
    assert model.up_proj.weight.grad[~masks["up_proj.weight"]].ne(0).any()
