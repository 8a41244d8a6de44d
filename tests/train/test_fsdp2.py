"""FSDP2 (fully_shard, 2 gloo processes on CPU): each rank keeps only its shard of each mask, and the
trained weights equal a single-process masked run bit for bit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ckptprobe.io.maskfile import fingerprint, write_masks
from ckptprobe.train import MaskedAdamW

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("fsdp2_worker", HERE / "fsdp2_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
batches, make_model = worker.batches, worker.make_model


def test_fsdp2_matches_single_process(tmp_path):
    base = make_model()
    gen = torch.Generator().manual_seed(7)
    masks = {n: (torch.rand(p.shape, generator=gen) < 0.6).numpy() for n, p in base.named_parameters()}
    masks["lm_head.weight"][:] = np.random.default_rng(0).random(masks["lm_head.weight"].shape) < 0.99  # indices
    fps = {n: fingerprint(p.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), "BF16")
           for n, p in base.named_parameters()}
    write_masks(tmp_path / "m.safetensors", masks, {"kind": "test"}, fps)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(HERE / "fsdp2_worker.py"), str(tmp_path / "m.safetensors"),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a kernel's split over threads changes its rounding
    model = make_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=tmp_path / "m.safetensors")
    for loss in batches(model):
        loss().backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    for way in ("named", "content"):
        sharded = load_file(tmp_path / f"{way}.safetensors")
        for n, p in model.named_parameters():
            diff = sharded[n] != p.detach()
            assert not diff.any(), (way, n, int(diff.sum()), int(diff[torch.from_numpy(~masks[n])].sum()))
            frozen = torch.from_numpy(~masks[n])
            assert torch.equal(sharded[n][frozen].view(torch.int32), start[n][frozen].view(torch.int32)), (way, n)
            assert (sharded[n] != start[n])[~frozen].float().mean() > 0.8, (way, n)
        ranks = [json.loads((tmp_path / f"{way}-rank{r}.json").read_text()) for r in range(2)]
        for n, p in model.named_parameters():  # each rank holds its shard's frozen entries, not the whole mask
            for r in ranks:
                if n in r["held"]:  # absent: nothing frozen in this rank's shard
                    assert r["held"][n] == r["local"][n] < p.numel(), (way, n)
            assert sum(n in r["held"] for r in ranks) >= 1, (way, n)
