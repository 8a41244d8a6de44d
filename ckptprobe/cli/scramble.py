"""`ckptprobe scramble BASE -o OUT --seed S`: the same model in other coordinates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ckptprobe.errors import UsageError


MAX_LAYER = 100_000


def parse_layers(spec: str) -> list[int]:
    """'3-5' / '1' / '0,2,4-6' -> sorted layer indices; UsageError for anything else."""
    layers = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise UsageError(f"--layers {spec!r}: expected indices and ranges like 3-5 or 0,2,4-6")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise UsageError(f"--layers {spec!r}: range {part.strip()} runs backwards")
        if b >= MAX_LAYER:  # a model has a few hundred layers: this is a typo, and the set would fill memory
            raise UsageError(f"--layers {spec!r}: layer {b} is past any model's last layer")
        layers.update(range(a, b + 1))
    return sorted(layers)


def scramble(
    base: Annotated[str, typer.Argument(
        help="Base checkpoint: a local folder with config.json and safetensors (one file, or shards with an "
             "index).", show_default=False, metavar="BASE")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", show_default=False, metavar="OUT",
        help="New (or empty) folder for the scrambled checkpoint.")],
    seed: Annotated[int, typer.Option(help="Seed of the random rotations and permutations.", show_default=False,
                                      min=0, metavar="S")],
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Layers to scramble: 3-5, 1 or 0,2,4-6.", show_default="all", metavar="LAYERS")] = None,
    rotate_vo: Annotated[bool, typer.Option(
        "--rotate-vo", help="Rotate each value head by a random orthogonal matrix, and W_o's columns back.")] = False,
    permute_heads: Annotated[bool, typer.Option(
        "--permute-heads", help="Permute key-value heads with their query groups, and query heads within "
                                "each group.")] = False,
    permute_mlp: Annotated[bool, typer.Option("--permute-mlp", help="Permute the MLP's neurons.")] = False,
) -> None:
    """Write a checkpoint that computes the same function as BASE with its weights in other coordinates.

    The geometry intervention of "The Path Not Taken" (Sec. 4.3): in the chosen layers, each value head
    is rotated by a random orthogonal matrix (one per key-value head under grouped-query attention) with
    W_o's columns rotated back; heads are permuted (consistently in W_q, W_k, W_v and W_o); MLP neurons
    are permuted (gate/up rows with down columns). Without a kind option all three are applied.
    Permutations are exact; rotations are computed in float64 and rounded once to the stored dtype.

    OUT has BASE's shards, tensor names, dtypes, config.json and other files; what was applied (seed,
    layers, kinds) is recorded in each shard's metadata and in OUT/scramble.json. Supported: Llama,
    Mistral, Qwen2, Qwen3 and Phi-3 style models (fused qkv_proj and gate_up_proj included).

    Examples:

    `ckptprobe scramble ./Qwen2.5-1.5B -o ./scrambled --layers 20-25 --seed 0`

    `ckptprobe scramble ./base -o ./base-rot --rotate-vo --layers 1 --seed 7`
    """
    from ckptprobe.analysis.scramble import Kind, scramble_checkpoint
    from ckptprobe.report.output import err

    kinds = [k for k, on in ((Kind.rotate_vo, rotate_vo), (Kind.permute_heads, permute_heads),
                             (Kind.permute_mlp, permute_mlp)) if on] or None
    plan, changed = scramble_checkpoint(base, output, seed, parse_layers(layers) if layers else None, kinds,
                                        progress=lambda line: err.print(line, highlight=False))
    err.print(f"scrambled {len(changed)} tensors in layers {', '.join(map(str, plan.layers))} "
              f"({', '.join(k.value for k in plan.kinds)}, seed {seed}) into {output}/", highlight=False)
