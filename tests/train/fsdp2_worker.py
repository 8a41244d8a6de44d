"""Masked AdamW under FSDP2 on CPU: `python fsdp2_worker.py MASKFILE OUT_DIR` trains with 2 gloo processes.

Run by tests/train/test_fsdp2.py (not a test itself), which also imports its model and batches for the
single-process reference. Each rank writes what it holds; rank 0 writes the full trained weights of a
run with named parameters and of one whose masks were matched by content.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import fully_shard

from ckptprobe.train import MaskedAdamW

STEPS = 4
VOCAB, DIM = 11, 6  # odd row counts: the two shards of each matrix differ in size


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.up_proj = nn.Linear(DIM, 3 * DIM - 1)
        self.down_proj = nn.Linear(3 * DIM - 1, DIM, bias=False)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)  # (B, T, C)
        return self.lm_head(h + self.down_proj(torch.relu(self.up_proj(h))))  # (B, T, V)


def make_model() -> Block:
    """bf16 base values held in fp32 (the masters FSDP2 shards), seeded."""
    torch.manual_seed(0)
    return Block().to(torch.bfloat16).float()


def batches(model):
    """STEPS loss closures; every rank sees the same batch, so the averaged gradient equals one process's."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (4, 5), generator=gen)
        yield lambda ids=ids: nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), ids.roll(1, 1).reshape(-1))


def run(rank: int, world: int, port: int, mask_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for way in ("named", "content"):
            model = make_model()
            for module in (model.embed_tokens, model.up_proj, model.down_proj, model.lm_head):
                fully_shard(module)
            fully_shard(model)
            params = model.named_parameters() if way == "named" else model.parameters()
            opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, masks=mask_path)
            for loss in batches(model):
                loss().backward()
                opt.step()
                opt.zero_grad()
            held = {n: f.numel for n, f in opt.masked_updates.frozen.items()}
            local = {n: p.to_local().numel() for n, p in model.named_parameters()}
            with open(os.path.join(out, f"{way}-rank{rank}.json"), "w") as f:
                json.dump({"held": held, "local": local, "steps": STEPS}, f)
            full = {n: p.full_tensor().detach().contiguous() for n, p in model.named_parameters()}
            if rank == 0:
                save_file(full, os.path.join(out, f"{way}.safetensors"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port, sys.argv[1], sys.argv[2]), nprocs=2)
