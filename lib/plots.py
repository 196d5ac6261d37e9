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


def scatter_panels(panels, color=None, color_label=None, title=None, title_size=None, size=(5.4, 4.4)):
    """A row of scatter plots, one per panel (x, y, xlabel, ylabel, legend): points coloured by
    `color` (one value per point, the same in every panel) on one colour bar labelled
    color_label (left out when there are no points), `legend` a one-entry legend text in the
    first corner (upper left, upper right, lower right, lower left) where it covers no marker,
    `title` over every panel. Ticks below 1e-2 or from 1e4 are written scaled (0.00175 as 1.75,
    the axis label ending in "(x10^-3)"), so long labels do not run into each other. Returns the
    figure (save it with save_figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), squeeze=False,
                             layout="constrained")
    for ax, (x, y, xlabel, ylabel, legend) in zip(axes[0], panels):
        points = ax.scatter(x, y, c=color, cmap="viridis", s=14)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.ticklabel_format(style="sci", scilimits=(-2, 4), useMathText=True)
        ax.legend(handles=[Line2D([], [], ls="", marker="o", color="0.5", label=legend)], loc="best", fontsize=8)
        if title is not None:
            ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    if color is not None and len(color):
        fig.colorbar(points, ax=axes[0].tolist(), label=color_label)
    fig.canvas.draw()  # the tick offsets are known once drawn
    for axis in [a for ax in axes[0] for a in (ax.xaxis, ax.yaxis)]:
        if offset := axis.get_major_formatter().get_offset():
            axis.offsetText.set_visible(False)
            axis.set_label_text(f"{axis.get_label_text()} ({offset})")
    fig.canvas.draw()  # the final layout: the legend goes to the first corner that covers no marker
    for ax in axes[0]:  # (matplotlib's "best" only avoids the markers' centres; it is the fallback)
        xy, legend = ax.transData.transform(ax.collections[0].get_offsets()), ax.get_legend()
        for loc in ("upper left", "upper right", "lower right", "lower left", "best"):
            legend.set_loc(loc)
            if not legend.get_window_extent(fig.canvas.get_renderer()).padded(4).count_contains(xy):
                break
    return fig


def branch_panels(curves, at, arms, branch, keys=(("test_loss", "-"), ("train_loss", "--")), ylabel="loss",
                  baseline="baseline"):
    """Two panels for arms that branch from the same runs at epoch `branch` (x: 1-based epochs).
    Left: each arm's mean +- std over runs (plot_mean_std) of every curve in `keys` ((name,
    linestyle)), the baseline from epoch 1, the other arms from the branch on. Right: the same
    minus the baseline's run of the same seed (paired), from the branch on: the arms' effect.
    curves: {arm: {name: (R, E)}}; at: {arm: per run, the epoch it diverged at or None}: a
    diverged run is left out from then on (x: its last point; the legend counts it). arms:
    [(arm, label, colour, marker)], drawn in this order (arms not in `curves` skipped), listed in
    the legend in reverse; a marker draws the arm's lines with it and lighter bands. Returns
    (fig, axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lib.report import cut_diverged
    base = {k: cut_diverged(curves[baseline][k], at[baseline]) for k, _ in keys}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    handles, epochs = [], base[keys[0][0]].shape[1]
    x, after = np.arange(1, epochs + 1), slice(max(branch - 1, 0), None)
    for arm, label, colour, marker in arms:
        if arm not in curves:
            continue
        c, sel = {k: cut_diverged(curves[arm][k], at[arm]) for k, _ in keys}, slice(None) if arm == baseline else after
        for key, ls in keys:
            kw = dict(color=colour, linestyle=ls + marker, alpha=0.07 if marker else 0.15)
            with matplotlib.rc_context({"lines.markersize": 4}):
                plot_mean_std(axes[0], x[sel], c[key][:, sel], **kw)
                plot_mean_std(axes[1], x[after], (c[key] - base[key])[:, after], **kw)
        n = sum(e is not None for e in at[arm])
        label += f" ({n} of {len(at[arm])} diverged)" if n else ""
        handles.insert(0, plt.Line2D([], [], color=colour, marker=marker or None, label=label))
    handles += [plt.Line2D([], [], color="k", ls=ls, label=k.replace("_", " ")) for k, ls in keys]
    for ax, x0 in zip(axes, (1, branch)):
        ax.axvline(branch, color="k", lw=0.6, ls=":")
        ax.set_xlim(x0 - 0.04 * (epochs - x0) - 0.5, epochs + 0.04 * (epochs - x0) + 0.5)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_xlabel("epoch")
    axes[0].set_ylabel(ylabel)
    axes[1].set_ylabel(f"{ylabel} minus {baseline}, same seed")
    axes[1].legend(handles=handles, fontsize=8)
    return fig, axes


def loss_panels(curves, x, panels, styles=None, title=None, xlabel="epoch", ylabel="loss", integer_x=True,
                size=(5, 3.8)):
    """A row of log-scale panels sharing the y-axis, one per (key, panel title) in `panels`, each
    with one line per arm of curves ({arm: {key: (R, T) runs}}) against x[arm] ((T,)): the mean
    over the runs that did not diverge (plot_mean_std marks the others). Arms in `styles` ({arm:
    (linestyle, marker)}, e.g. controls) are drawn on top without a band, the others with a +-1 std
    band. The y-axis spans the finite values drawn; with none, the panels say every run diverged.
    Returns the figure (save it with save_figure)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import LogFormatter, MaxNLocator
    styles = styles or {}
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (key, name) in zip(axes, panels):
        for arm, c in curves.items():
            plot_mean_std(ax, x[arm], c[key], label=arm, color=COLORS.get(arm), shade=arm not in styles,
                          lw=1.3 if arm in styles else 1.5)
            if arm in styles:  # its mean line, drawn last
                ls, marker = styles[arm]
                ax.lines[-1].set(linestyle=ls, marker=marker, markevery=max(1, len(x[arm]) // 8), ms=4, zorder=3,
                                 markerfacecolor="none")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())  # 2.2, not 2.2 x 10^0
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=integer_x))
    drawn = [ln.get_ydata() for ax in axes for ln in ax.lines] + [
        p.vertices[:, 1] for ax in axes for c in ax.collections for p in c.get_paths()]
    y = np.concatenate([np.asarray(v, float).ravel() for v in drawn])
    y = y[np.isfinite(y) & (y > 0)]
    if y.size:
        pad = (y.max() / y.min()) ** 0.05
        axes[0].set_ylim(y.min() / pad, y.max() * pad)
    else:  # nothing finite drawn: the axes span the x values all the same
        axes[0].set_ylim(0.1, 10)
        xs = np.concatenate([np.asarray(x[arm], float).ravel() for arm in curves])
        for ax in axes:
            ax.set_xlim(xs.min(), xs.max())
            ax.text(0.5, 0.5, "every run diverged", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    return fig
