"""Figure for `ckptprobe principal`: layer-wise overlap vs random baseline (Fig. 5 of "The Path Not
Taken"), and optionally one matrix's update masks beside its principal mask (Fig. 18 style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ckptprobe.report.figures import block_average, legend, pyplot, save_figure
from ckptprobe.report.labels import label as short_label

MAX_PANELS = 4  # update-mask panels drawn for --matrix (one per fine-tune)


def plot_principal(result, path: Path, matrix: str | None = None, masks: dict | None = None) -> Path:
    """`result`: a PrincipalResult. `masks`: {"principal": P, "low": L, ft ref: M, ...} bool (m, n) of `matrix`.

    Top row: per layer, the overlap of each fine-tune's updates with the principal and the low-magnitude
    mask (solid) and the random baseline (dashed). Bottom row (with masks): the principal mask and each
    update mask, block-averaged to at most 256 cells a side (a cell shows the fraction of True entries).
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fts = [k for k in masks if k not in ("principal", "low")][:MAX_PANELS] if masks else []
    width = 4.2 * max(2, 1 + len(fts))
    fig = plt.figure(figsize=(width, 7.8 if masks else 3.9), layout="constrained")
    top, bottom = fig.subfigures(2, 1) if masks else (fig, None)
    for ax, (mask, title) in zip(top.subplots(1, 2), (("principal", "principal weights"),
                                                     ("low", "low-magnitude weights"))):
        for ft in result.finetuned:
            layers = {k: c for k, c in result.by("layer", ft).items() if k is not None}
            ax.plot(list(layers), [_nan(c.overlap(mask)) for c in layers.values()], marker="o", label=short_label(ft))
        if result.finetuned and layers:
            ax.plot(list(layers), [_nan(c.baseline(mask)) for c in layers.values()], ls="--", color="gray",
                    label="random")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("|M & X| / |M|")
        ax.set_title(f"overlap with {title}")
        legend(ax, fontsize=8)
    if masks:
        panels = [("principal", f"principal mask (k={_rank(result, matrix)}, alpha={result.alpha:g})")] + \
            [(ft, f"update mask: {short_label(ft)}") for ft in fts]
        for ax, (key, title) in zip(bottom.subplots(1, len(panels), squeeze=False)[0], panels):
            im = ax.imshow(block_average(masks[key]), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                           interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("column")
            ax.set_ylabel("row")
        bottom.colorbar(im, ax=ax, fraction=0.046, label="fraction True per cell")
    fig.suptitle(f"Update overlap with masks of {short_label(result.base)}" + (f"; masks of {matrix}" if masks else ""))
    return save_figure(fig, path)


def _nan(x):
    return np.nan if x is None else x


def _rank(result, matrix: str | None):
    return next((m.rank for m in result.matrices if m.name == matrix), "auto")
