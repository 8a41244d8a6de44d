"""Figures of cross-run consensus and of one run's update profiles over time.

- `plot_heatmaps`: the consensus ratio C of a layer's q/k/v/o and down projections,
  block-averaged (Fig. 2 of "The Path Not Taken"), head boundaries marked;
- `plot_jaccard`: the pairwise Jaccard matrix beside its independent-Bernoulli baseline (Fig. 8);
- `plot_ratios`: row and column ratios of C for each matrix of the layer (the stripes of Fig. 2);
- `plot_profile`: row and column ratios of one run's masks, one line per checkpoint (Fig. 14).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ckptprobe.analysis.consensus import GroupConsensus, TensorConsensus
from ckptprobe.analysis.profile import ProfileResult
from ckptprobe.report.figures import legend, matrix_label, pyplot, save_figure

HEATMAP_MODULES = ("q", "k", "v", "qkv", "o", "down")


def head_axis(module: str, transposed: bool) -> int | None:
    """Which axis of a stored matrix is split into attention heads: 0 for q/k/v (outputs), 1 for o (inputs).

    GPT-2's Conv1D weights are stored (in, out) (`transposed`), so the axes swap there. None for other modules.
    """
    axis = {"q": 0, "k": 0, "v": 0, "qkv": 0, "o": 1}.get(module)
    return None if axis is None else (1 - axis if transposed else axis)


def _boundaries(length: int, head_dim: int | None) -> np.ndarray:
    """Positions of the head boundaries inside an axis of `length` (none if it is not a whole number of heads)."""
    if not head_dim or length % head_dim or length // head_dim < 2:
        return np.zeros(0)
    return np.arange(head_dim, length, head_dim)


def plot_heatmaps(tensors: Sequence[TensorConsensus], n_runs: int, path: str | os.PathLike,
                  head_dim: int | None = None, title: str = "") -> None:
    """One panel per q/k/v/o/down matrix (all of the layer's matrices if none of those), sharing a colour scale."""
    chosen = [t for t in tensors if t.module in HEATMAP_MODULES] or list(tensors)
    chosen.sort(key=lambda t: HEATMAP_MODULES.index(t.module) if t.module in HEATMAP_MODULES else 99)
    # Fixed margins in inches, not a layout engine (constrained layout was half the figure's time):
    # the tick labels are numbers of at most 6 digits, the titles two lines, the colour bar at the right.
    width, height = 3.4 * len(chosen) + 1.6, 3.9
    fig, axes = pyplot().subplots(1, len(chosen), figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=0.75 / width, right=1 - 1.25 / width, bottom=0.5 / height, top=1 - 0.8 / height,
                        wspace=0.5 / 2.95)
    vmax = max(float(np.nanmax(t.heatmap)) for t in chosen) or 1.0
    for ax, t in zip(axes[0], chosen):
        rows, cols = t.shape
        im = ax.imshow(t.heatmap, cmap="magma", vmin=0, vmax=vmax, extent=(0, cols, rows, 0),
                       interpolation="nearest", aspect="auto")
        axis = head_axis(t.module, t.transposed)
        for pos in _boundaries(t.shape[axis], head_dim) if axis is not None else ():
            (ax.axhline if axis == 0 else ax.axvline)(pos, color="cyan", lw=0.9, alpha=0.9)
        ax.set_title(f"{matrix_label(t.name)} {rows}x{cols}\n(block {t.heat_block}x{t.heat_block})", fontsize=9)
        ax.set_xlabel("column")
    axes[0, 0].set_ylabel("row")
    bar = fig.add_axes((1 - 1.0 / width, 0.5 / height, 0.15 / width, 1 - 1.3 / height))
    fig.colorbar(im, cax=bar, label=f"consensus ratio C (fraction of {n_runs} runs)")
    fig.suptitle(title or "Consensus of the update masks", y=1 - 0.08 / height, va="top")
    save_figure(fig, path, fitted=True)


def plot_jaccard(total: GroupConsensus, labels: Sequence[str], path: str | os.PathLike) -> None:
    """Whole-model pairwise Jaccard beside the Bernoulli baseline, one colour scale; values written for R <= 12."""
    plt = pyplot()
    R = len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.5 * R, 2.6 + 0.25 * R), squeeze=False, layout="constrained")
    off = ~np.eye(R, dtype=bool)
    vals = np.concatenate([total.jaccard[off], total.bernoulli[off]])
    vmax = float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0
    for ax, m, what, mean in ((axes[0, 0], total.jaccard, "observed Jaccard", total.jaccard_mean),
                              (axes[0, 1], total.bernoulli, "independent-Bernoulli baseline", total.bernoulli_mean)):
        shown = np.where(off, m, np.nan)
        im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=vmax or 1.0)
        ax.set_title(f"{what}\nmean off-diagonal {mean:.3f}" if mean is not None else what, fontsize=9)
        ticks = range(R) if R <= 24 else range(0, R, max(1, R // 12))
        ax.set_xticks(list(ticks), [labels[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=7)
        if R <= 12:
            for i in range(R):
                for j in range(R):
                    if i != j and np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="k" if m[i, j] > 0.6 * (vmax or 1.0) else "w")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Jaccard")
    fig.suptitle("Pairwise overlap of the runs' update masks (whole model)")
    save_figure(fig, path)


def _ratio_panel(ax, x: np.ndarray, t, axis: int, head_dim: int | None, **line) -> None:
    """Ratios `x` along `axis` of matrix `t` (a TensorConsensus or TensorProfile), head boundaries dotted."""
    ax.plot(np.arange(len(x)), x, lw=0.8, **line)
    if head_axis(t.module, t.transposed) == axis:
        for pos in _boundaries(len(x), head_dim):
            ax.axvline(pos, color="0.6", lw=0.4, ls=":")


def _ratio_grid(rows: int, title: str):
    """(figure, (rows, 2) axes) for row/column ratio panels under `title`, 11 inches wide. Fixed
    margins in inches, not a layout engine: fitting 14 panels to their tick labels took
    constrained layout a third of the figure's 2.6 s."""
    height = 1.9 * rows + 0.9
    plt = pyplot()
    with plt.rc_context({"xtick.labelsize": 7, "ytick.labelsize": 7}):  # set at creation: no ticks made twice
        fig, axes = plt.subplots(rows, 2, figsize=(11, height), squeeze=False)
    fig.subplots_adjust(left=0.55 / 11, right=1 - 0.15 / 11, bottom=0.3 / height, top=1 - 0.75 / height,
                        hspace=0.45, wspace=0.12)
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    return fig, axes


def plot_ratios(tensors: Sequence[TensorConsensus], path: str | os.PathLike, head_dim: int | None = None,
                title: str = "") -> None:
    """Per matrix, the row ratios and column ratios of C; dashed: their mean (the mean density)."""
    fig, axes = _ratio_grid(len(tensors), title or "Row and column ratios of the consensus")
    for (ax_r, ax_c), t in zip(axes, tensors):
        for ax, x, axis, what in ((ax_r, t.row_ratio, 0, "row"), (ax_c, t.col_ratio, 1, "column")):
            _ratio_panel(ax, x, t, axis, head_dim, color="C0")
            ax.axhline(float(np.mean(x)), color="k", lw=0.6, ls="--")
            idx = t.row_stripe_index if axis == 0 else t.col_stripe_index
            ax.set_title(f"{matrix_label(t.name)}: {what} ratio" + (f" (stripe index {idx:.1f})" if idx else ""),
                         fontsize=8)
    save_figure(fig, path, fitted=True)


def plot_profile(result: ProfileResult, labels: Sequence[str], path: str | os.PathLike,
                 head_dim: int | None = None) -> None:
    """Per matrix of the layer, row and column ratios: one line per checkpoint, coloured by step order."""
    tensors = result.tensors
    smooth = f", moving average over {result.smooth}" if result.smooth > 1 else ""
    fig, axes = _ratio_grid(len(tensors), f"Update profiles of layer {result.layer} over checkpoints{smooth}")
    colors = pyplot().get_cmap("viridis")(np.linspace(0, 0.9, len(labels)))
    for (ax_r, ax_c), t in zip(axes, tensors):
        for ax, profiles, axis, what in ((ax_r, t.row, 0, "row"), (ax_c, t.col, 1, "column")):
            for s, x in enumerate(profiles):
                _ratio_panel(ax, x, t, axis, head_dim, color=colors[s], label=labels[s])
            corr = t.row_corr if axis == 0 else t.col_corr
            known = [c for c in corr if c is not None]
            ax.set_title(f"{matrix_label(t.name)}: {what} ratio" +
                         (f" (consecutive r {min(known):.2f}..{max(known):.2f})" if known else ""), fontsize=8)
    legend(axes[0, 1], fontsize=7, loc="upper right")
    save_figure(fig, path, fitted=True)
