"""The `spectrum --plot` figure, after Fig. 4 of "The Path Not Taken".

Top rows, for one layer and each of its module types: singular value curves (base vs each
fine-tune), then principal angle curves (left subspace solid, right dashed). Bottom rows, one
per fine-tune: layer x module heatmaps of NSS and of the max principal angle over the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ckptprobe.analysis.spectrum import SpectrumResult
from ckptprobe.errors import UsageError
from ckptprobe.io.names import MODULE_ORDER, parse_name
from ckptprobe.report.figures import legend, log_y, pyplot, save_figure
from ckptprobe.report.labels import label as short_label


def middle_layer(layers: list[int]) -> int:
    """The middle one of the (sorted, distinct) layer indices."""
    layers = sorted(set(layers))
    return layers[len(layers) // 2]


def _modules(matrices) -> list[str]:
    order = {m: i for i, m in enumerate(MODULE_ORDER)}
    return sorted({m.module for m in matrices}, key=lambda m: (order.get(m, len(order)), m))


def plot_spectrum(result: SpectrumResult, path: str | os.PathLike, layer: int | None = None) -> Path:
    """Draw the figure for `layer` (None: the middle layer) and save it atomically to `path`."""
    layered = [m for m in result.matrices if m.layer is not None]
    if not layered:
        raise UsageError("--plot needs matrices inside numbered layers, and none was analysed",
                         hint="check --include/--exclude")
    layers = sorted({m.layer for m in layered})
    layer = middle_layer(layers) if layer is None else layer
    chosen = [m for m in layered if m.layer == layer]
    if not chosen:
        raise UsageError(f"--layer {layer}: no analysed matrix in that layer (layers {layers[0]}..{layers[-1]})")
    plt = pyplot()
    modules = _modules(chosen)
    fts = result.finetuned
    ncols, nrows = max(len(modules), 2), 2 + len(fts)
    width, height = 3.2 * ncols, 2.8 * nrows
    # Fixed margins in inches, not a layout engine: fitting ~30 axes to their tick labels took
    # matplotlib's constrained layout about a third of the figure's 4-5 s.
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(nrows, ncols, left=0.75 / width, right=1 - 0.2 / width, bottom=0.55 / height,
                            top=1 - 0.35 / height, hspace=0.45, wspace=0.4)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, module in enumerate(modules):
        m = next(x for x in chosen if x.module == module)
        ax_s, ax_a = fig.add_subplot(grid[0, col]), fig.add_subplot(grid[1, col])
        if m.base_values is not None:
            ax_s.plot(np.arange(1, len(m.base_values) + 1), m.base_values, color="black", lw=1.5, label="base")
        for j, c in enumerate(m.comparisons):
            color = colors[j % len(colors)]
            if c.values is not None:
                ax_s.plot(np.arange(1, len(c.values) + 1), c.values, color=color, lw=1, ls="--",
                          label=short_label(c.finetuned))
            if c.angles_u:
                i = np.arange(1, len(c.angles_u) + 1)
                ax_a.plot(i, c.angles_u, color=color, lw=1, label=f"{short_label(c.finetuned)} U")
                ax_a.plot(i, c.angles_v, color=color, lw=1, ls="--", label=f"{short_label(c.finetuned)} V")
        log_y(ax_s)
        expert = m.expert if m.expert is not None else parse_name(m.name).expert  # a stack's index, or the name's
        which = f" (expert {expert})" if expert is not None else ""  # one matrix stands for its module type
        ax_s.set_title(f"layer {layer} {module}{which} {m.shape[0]}x{m.shape[1]}", fontsize=9)
        ax_s.set_xlabel("index i")
        ax_a.set_xlabel(f"i (top-{m.k} subspace)")
        if col == 0:
            ax_s.set_ylabel("singular value")
            ax_a.set_ylabel("principal angle (deg)")
            legend(ax_s, fontsize=7)
            legend(ax_a, fontsize=7)
    all_modules = _modules(layered)
    maps = {}  # (fine-tune index, metric) -> (layers, modules) array, NaN where missing
    for j in range(len(fts)):
        for metric in ("nss", "max_angle"):
            maps[j, metric] = np.full((len(layers), len(all_modules)), np.nan)
        for m in layered:
            c = m.comparisons[j]
            angles = [a for a in (c.max_angle_u, c.max_angle_v) if a is not None]
            cell = layers.index(m.layer), all_modules.index(m.module)
            maps[j, "nss"][cell] = np.nan if c.nss is None else c.nss
            maps[j, "max_angle"][cell] = max(angles) if angles else np.nan
    half = ncols // 2
    for j, ft in enumerate(fts):
        for metric, cols, label in (("nss", slice(0, half), "NSS"),
                                    ("max_angle", slice(half, ncols), "max angle (deg)")):
            ax = fig.add_subplot(grid[2 + j, cols])
            # one color scale per metric across fine-tunes, so that SFT and RL rows compare at a glance
            everything = np.stack([maps[i, metric] for i in range(len(fts))])
            finite = everything[np.isfinite(everything)]
            lo, hi = (finite.min(), finite.max()) if finite.size else (0, 1)
            im = ax.imshow(maps[j, metric], aspect="auto", cmap="viridis", interpolation="nearest", vmin=lo, vmax=hi)
            ax.set_xticks(range(len(all_modules)), all_modules, fontsize=8)
            step = max(1, len(layers) // 14)
            ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=8)
            ax.set_ylabel("layer")
            ax.set_title(f"{label}: {short_label(ft)} vs {short_label(result.base)}", fontsize=9)
            fig.colorbar(im, ax=ax)
    return save_figure(fig, path, fitted=True)
