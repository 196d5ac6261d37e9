"""Plotting helpers shared by the figure scripts: one colour map for arms, mean +- std bands,
atomic PNG saving."""
from lib.io import atomic_path

BASELINE, TELEPORT = "#1f77b4", "#d62728"
COLORS = {"baseline": BASELINE, "teleport": TELEPORT, "increase": TELEPORT, "decrease": "#2ca02c",
          "reset-only": "#9e9e9e", "random-teleport": "#bcbd22", "teleport-keep": "#e377c2",
          "teleport-transport": "#8c564b", "perturb-only": "#7f7f7f", "rescale": "#ff7f0e",
          "gl46": TELEPORT, "gl46-last": "#9467bd"}


def save_figure(fig, path, dpi=200):
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_mean_std(ax, x, runs, label=None, color=None, linestyle="-", shade=True, alpha=0.2, lw=1.5,
                  limit=1e6):
    """Mean over runs (axis 0 of `runs`: (R, T)) with a +-1 std band. Runs that diverge (a
    non-finite value or one above `limit`) are left out of the mean; their last finite point
    is marked with an x and the label says how many diverged."""
    import numpy as np

    from lib.report import diverged
    runs, x = np.asarray(runs, dtype=float), np.asarray(x, dtype=float)
    at = diverged(runs, limit)
    ok = np.array([d is None for d in at])
    for r, d in zip(runs, at):
        if d is not None and d > 1:
            ax.plot(x[d - 2], r[d - 2], "x", color=color, ms=6)
    if not ok.all():
        label = f"{label} ({len(ok) - ok.sum()} of {len(ok)} diverged)" if label else label
    if not ok.any():
        ax.plot([], [], linestyle, color=color, label=label, lw=lw)
        return
    mean, std = runs[ok].mean(0), runs[ok].std(0)
    ax.plot(x, mean, linestyle, color=color, label=label, lw=lw)
    if shade and ok.sum() > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=alpha, linewidth=0)
