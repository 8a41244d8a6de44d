"""`ckptprobe masks export MASKFILE --to axolotl|spectrum|peft`: a coarse form of a mask, with its coverage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckptprobe.analysis.choices import Target
from ckptprobe.cli._options import ExportOpt


def export(
    file: Annotated[Path, typer.Argument(help="A mask file written by `ckptprobe masks`.", show_default=False,
                                         metavar="MASKFILE", dir_okay=False)],
    to: Annotated[Target, typer.Option(
        "--to", show_default=False,
        help="axolotl: unfrozen_parameters regexes with [start:end] row ranges. spectrum: Spectrum's YAML "
             "(whole tensors by module type). peft: target_modules and layers_to_transform (JSON); never an MoE's "
             "experts or routers, which PEFT cannot target by module name (axolotl and spectrum can).")],
    budget: Annotated[float, typer.Option(
        "--budget", metavar="X", help="At most this fraction of all parameters is unfrozen.")] = 0.25,
    output: ExportOpt = None,
) -> None:
    """Export a mask for trainers that only freeze whole tensors, row ranges or modules.

    Picks the coarse selection that keeps the most of the mask's trainable entries with at most
    `--budget` of all parameters unfrozen (densest units first), writes it to `-o` (or stdout), and
    reports on stderr what it keeps of the mask and how many entries it unfreezes that the mask freezes.

    Examples:

    `ckptprobe masks export safe.safetensors --to axolotl --budget 0.25 -o unfrozen.yaml`

    `ckptprobe masks export safe.safetensors --to peft --budget 0.5 -o lora_targets.json`
    """
    from ckptprobe.analysis.coarse import coarse_export
    from ckptprobe.cli._common import writable
    from ckptprobe.io.maskfile import read_masks
    from ckptprobe.io.writer import atomic_write
    from ckptprobe.report.output import err

    if output is not None:
        writable("-o", output)
    result = coarse_export(read_masks(file), to, budget)
    if output is None:
        print(result.text, end="")
    else:
        with atomic_write(output, "w") as f:
            f.write(result.text)
    c = result.coverage
    kept = "n/a" if c.kept_fraction is None else f"{c.kept_fraction:.1%}"
    err.print(f"{to.value}: {len(result.units)} unit(s), {c.unfrozen:,} of {c.params:,} entries unfrozen "
              f"({c.unfrozen / c.params:.1%}, budget {budget:.0%}); keeps {kept} of the mask's {c.trainable:,} "
              f"trainable entries; unfreezes {c.extra:,} entries the mask freezes"
              + (f"; wrote {output}" if output else ""), highlight=False)
