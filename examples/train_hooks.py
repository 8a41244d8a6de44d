"""Train a tiny language model with each of ckptprobe's training hooks and print what they did.

    python examples/train_hooks.py        # CPU, a few seconds

1. mask_updates: sparse training under a one-shot mask read from a mask file.
2. GradientGate: reuse each batch up to K times, stop when the lm_head gradient surges.
3. apply_pcr: combine a task (plasticity) and a KL-to-reference (stability) gradient.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import ckptprobe
from ckptprobe.io.maskfile import fingerprint, write_masks
from ckptprobe.train import GradientGate, apply_pcr, gradient_conflict, gradient_variance, mask_updates

VOCAB, DIM, LAYERS = 32, 16, 2


class TinyLM(nn.Module):
    """Llama-style parameter names; "attention" is a token-wise map, enough for name parsing."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "self_attn": nn.ModuleDict({"q_proj": nn.Linear(DIM, DIM, bias=False)}),
            "mlp": nn.ModuleDict({"up_proj": nn.Linear(DIM, 4 * DIM, bias=False),
                                  "down_proj": nn.Linear(4 * DIM, DIM, bias=False)}),
        }) for _ in range(LAYERS))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)  # (B, T, C)
        for layer in self.layers:
            h = h + torch.tanh(layer["self_attn"]["q_proj"](h))
            h = h + layer["mlp"]["down_proj"](F.gelu(layer["mlp"]["up_proj"](h)))
        return self.lm_head(h)  # (B, T, V)


def batch(gen, n=16):
    ids = torch.randint(0, VOCAB, (n, 8), generator=gen)
    return ids, (ids * 3 + 1) % VOCAB  # the task: a fixed token map


def task_loss(model, ids, target):
    return F.cross_entropy(model(ids).reshape(-1, VOCAB), target.reshape(-1))


def masked_training(model, gen, folder: Path):
    print("== 1. mask_updates: train 30% of the entries, keep the rest bitwise fixed")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: (torch.rand(p.shape, generator=gen) < 0.3).numpy() for n, p in model.named_parameters()}
    fps = {n: fingerprint(p.numpy(), "F32") for n, p in base.items()}
    write_masks(folder / "safe.safetensors", masks, {"kind": "random", "density": 0.3}, fps)

    masks = ckptprobe.load_masks(folder / "safe.safetensors")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    handle = mask_updates(model, masks, opt)
    ids, target = batch(gen)
    print(f"   loss before {task_loss(model, ids, target).item():.3f}")
    for _ in range(60):
        ids, target = batch(gen)
        task_loss(model, ids, target).backward()
        opt.step()
        opt.zero_grad()
    print(f"   loss after  {task_loss(model, ids, target).item():.3f}")
    inside = outside = moved_in = moved_out = 0
    for n, p in model.named_parameters():
        moved = p.detach().view(torch.int32) != base[n].view(torch.int32)
        inside, moved_in = inside + int(masks[n].sum()), moved_in + int(moved[masks[n]].sum())
        outside, moved_out = outside + int((~masks[n]).sum()), moved_out + int(moved[~masks[n]].sum())
    print(f"   entries changed: {moved_in}/{inside} inside the mask, {moved_out}/{outside} outside")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"   hooks hold {handle.nbytes} bytes = {handle.nbytes / n_params:.2f} bytes per entry "
          f"(1/8 for the packed positions + 70% frozen x 4 fp32 bytes; a bf16 model pays 1/8 + 0.7 x 2)")
    handle.remove()


def gated_reuse(model, gen, K=4):
    print(f"== 2. GradientGate: reuse each batch up to K={K} times")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    gate = GradientGate(model.lm_head.weight, window=8, tau=0.5, params=model.parameters())
    for _ in range(20):
        ids, target = batch(gen)
        for k in range(1, K + 1):
            task_loss(model, ids, target).backward()
            if not gate.allow(reuse_index=k):
                break
            opt.step()
            opt.zero_grad()
    taken = sum(h.allowed for h in gate.history)
    print(f"   {taken} updates taken, {len(gate.history) - taken} refused, from 20 batches "
          f"(at most {20 * K} with full reuse)")
    for h in gate.history:
        if not h.allowed:
            print(f"   refused at reuse {h.reuse_index}: {h.reason}")
            break


def pcr_training(model, gen, groups=4):
    print("== 3. apply_pcr: plasticity (task) vs stability (KL to the starting model)")
    ref = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):  # first move away from the reference on the task, so the two pull apart
        task_loss(model, *batch(gen)).backward()
        opt.step()
        opt.zero_grad()

    def kl_loss(ids):  # stability: stay close to the reference on generic text
        return 0.1 * F.kl_div(F.log_softmax(model(ids), -1), F.log_softmax(ref(ids), -1), log_target=True,
                              reduction="batchmean")  # 0.1: the KL coefficient beta

    for step in range(5):
        ids, target = batch(gen, n=4 * groups)
        per_group = {"pla": [], "sta": []}  # one gradient per group, as GRPO's prompt groups
        for sl in torch.arange(4 * groups).chunk(groups):
            for kind, loss in (("pla", task_loss(model, ids[sl], target[sl])), ("sta", kl_loss(ids[sl]))):
                grads = torch.autograd.grad(loss, list(model.parameters()))
                per_group[kind].append(dict(zip((n for n, _ in model.named_parameters()), grads, strict=True)))
        names = [n for n, _ in model.named_parameters()]
        stacked = {k: {n: torch.stack([g[n] for g in v]) for n in names} for k, v in per_group.items()}
        g_pla = {n: s.mean(0) for n, s in stacked["pla"].items()}
        g_sta = {n: s.mean(0) for n, s in stacked["sta"].items()}
        var_pla = {n: gradient_variance(s) for n, s in stacked["pla"].items()}
        var_sta = {n: gradient_variance(s) for n, s in stacked["sta"].items()}
        if step == 0:
            before = task_loss(model, ids, target).item(), kl_loss(ids).item()
            cos = gradient_conflict(g_pla, g_sta)
            print("   cosine(g_pla, g_sta) per layer: " + ", ".join(f"{k}: {v:+.2f}" for k, v in cos.items()))
            n = "layers.0.mlp.up_proj.weight"
            print(f"   {n}: var_pla {var_pla[n]:.2e}, var_sta {var_sta[n]:.2e}, "
                  f"alpha {var_pla[n] / (var_pla[n] + var_sta[n]):.2f}")
        apply_pcr(model, g_pla, g_sta, var_pla, var_sta)  # MLP weights projected, the rest summed
        opt.step()
        opt.zero_grad()
    print(f"   5 PCR steps: task loss {before[0]:.3f} -> {task_loss(model, ids, target).item():.3f}, "
          f"KL to start {before[1]:.3f} -> {kl_loss(ids).item():.3f}")


def main():
    logging.basicConfig(level=logging.WARNING)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        masked_training(TinyLM(), gen, Path(folder))
    gated_reuse(TinyLM(), gen)
    pcr_training(TinyLM(), gen)


if __name__ == "__main__":
    main()
