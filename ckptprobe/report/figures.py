"""Shared plumbing for figures: matplotlib without a display, atomic saves, block averaging.

matplotlib is imported lazily (it costs ~0.15 s), only by commands asked to plot.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ckptprobe.io.names import LAYER
from ckptprobe.io.writer import atomic_write


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matrix_label(name: str) -> str:
    """A matrix's name in a panel title: from its layer on, without `.weight` (`mlp.experts.3.down_proj`
    of `model.layers.1.mlp.experts.3.down_proj.weight`), so that two experts' matrices differ."""
    m = LAYER.search(name)
    return (name[m.end():] if m else name).removesuffix(".weight")


def log_y(ax) -> None:
    """A log y axis, where the lines drawn hold a positive value (a checkpoint equal to its base, an all-zero
    matrix: a log axis of nothing draws nothing and makes matplotlib warn)."""
    if any(np.any(np.asarray(line.get_ydata(), float) > 0) for line in ax.get_lines()):
        ax.set_yscale("log")


def legend(ax, **kwargs) -> None:
    """The axes' legend, where a line has a label (none drawn, say a fine-tune without angles: no legend)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def save_figure(fig, path: str | os.PathLike, dpi: int = 130, fitted: bool = False) -> Path:
    """Save `fig` atomically; the format follows the suffix (.png, .pdf, .svg). Closes the figure.

    A figure is cropped to what it draws ("tight", one more drawing pass) unless it is already
    fitted: it has a layout engine (constrained), or `fitted` says its margins were set by hand.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    tight = None if fitted or fig.get_layout_engine() else "tight"
    with atomic_write(path) as f:
        fig.savefig(f, format=fmt, dpi=dpi, bbox_inches=tight)
    pyplot().close(fig)
    return path


def block_average(m: np.ndarray, max_size: int = 256) -> np.ndarray:
    """Shrink a 2-D array to at most `max_size` per side by averaging blocks (for heatmaps of big matrices).

    (R, C) -> (ceil(R/b), ceil(C/b)) with one block size b for both axes so aspect is kept;
    partial edge blocks average what they hold, and NaN entries are left out of their block's mean.
    Summed a strip of b rows at a time: an embedding's mask costs no float64 copy of itself.
    """
    m = np.asarray(m)
    b = max(1, -(-max(m.shape) // max_size))
    if b == 1 or m.size == 0:
        return m.astype(np.float64)
    cols = np.arange(0, m.shape[1], b)
    total, count = [], []
    for r in range(0, m.shape[0], b):
        strip = m[r:r + b]
        valid = ~np.isnan(strip) if strip.dtype.kind in "fc" else np.ones(strip.shape, bool)
        total.append(np.add.reduceat(np.where(valid, strip, 0).sum(axis=0, dtype=np.float64), cols))
        count.append(np.add.reduceat(valid.sum(axis=0), cols))
    with np.errstate(invalid="ignore", divide="ignore"):  # a block of NaN only: NaN
        return np.array(total) / np.array(count)
