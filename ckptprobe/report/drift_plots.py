"""Figure for `ckptprobe drift`: per-group drift from the base and per step, surges marked."""

from __future__ import annotations

from pathlib import Path

from ckptprobe.report.figures import legend, log_y, pyplot, save_figure
from ckptprobe.report.labels import label, labels


def plot_drift(result, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = range(1, len(result.checkpoints) + 1)
    for ax, kind, title in zip(axes, ("rel_to_base", "rel_step"), ("||W_t - W_0|| / ||W_0||", "||W_t - W_t-1|| / ||W_t-1||")):
        for group, norms in result.by("group").items():
            ax.plot(x, getattr(norms, kind), marker="o", label=group)  # NaN (a zero reference): a gap
        log_y(ax)
        ax.set_xlabel("checkpoint")
        ax.set_title(title)
    for s in result.surges:
        axes[1].axvline(s.index + 1, color="red", ls="--", lw=1)
        axes[1].text(s.index + 1, 0.98, f" lm_head surge z={s.z:.1f}", transform=axes[1].get_xaxis_transform(),
                     color="red", fontsize=8, va="top")
    legend(axes[0], fontsize=8)
    names = labels(result.checkpoints)
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
    fig.suptitle(f"Drift from {label(result.base)}")
    return save_figure(fig, path)
