"""One optimizer step of MaskedAdamW against plain AdamW on the same tensor, with the bytes it holds.

    python benchmarks/bench_masked_step.py [--size 2048] [--repeats 20] [--device cpu]

For frozen fractions on both sides of the representation switch (bit-packed positions above
1/32 frozen, int32 indices below), times `opt.step()` (median of `repeats`, after 2 warm-up
steps, a fresh random gradient each time) and prints the ratio masked / plain and the memory
held per entry. Also checks that the frozen entries did not move.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ckptprobe.train import MaskedAdamW


def median_step(opt, p, repeats: int, sync) -> float:
    times = []
    for i in range(repeats + 2):
        p.grad = torch.randn_like(p)
        sync()
        t = time.perf_counter()
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    n = args.size
    print(f"{n} x {n} fp32 on {args.device}, median of {args.repeats} steps")
    for frozen in (0.5, 0.05, 0.02, 0.005):
        keep = torch.rand(n, n, generator=gen) >= frozen
        base = torch.randn(n, n, generator=gen)
        p0 = torch.nn.Parameter(base.clone().to(args.device))
        plain = median_step(torch.optim.AdamW([p0], lr=1e-3, weight_decay=0.1), p0, args.repeats, sync)
        p1 = torch.nn.Parameter(base.clone().to(args.device))
        opt = MaskedAdamW([("w", p1)], lr=1e-3, weight_decay=0.1, masks={"w": keep})
        masked = median_step(opt, p1, args.repeats, sync)
        assert torch.equal(p1.detach().cpu()[~keep], base[~keep]), "frozen entries moved"
        f = opt.masked_updates.frozen["w"]
        print(f"frozen {frozen:6.1%}: AdamW {plain * 1e3:7.1f} ms, masked {masked * 1e3:7.1f} ms, "
              f"ratio {masked / plain:4.2f}; holds {f.nbytes / (n * n):.3f} bytes/entry ({f.kind})")


if __name__ == "__main__":
    main()
