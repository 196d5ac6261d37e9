"""Results and figures: JSON with config and environment, atomic writes, shared plot style,
aligned console rows."""
import contextlib
import json
import math
import os
import platform
import tempfile

BASELINE, TELEPORT = "#1f77b4", "#d62728"
COLORS = {"baseline": BASELINE, "teleport": TELEPORT, "increase": TELEPORT, "decrease": "#2ca02c",
          "reset-only": "#9e9e9e", "random-teleport": "#bcbd22", "teleport-keep": "#e377c2",
          "teleport-transport": "#8c564b", "perturb-only": "#7f7f7f", "rescale": "#ff7f0e",
          "gl46": TELEPORT, "gl46-last": "#9467bd"}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file gets ordinary permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def environment():
    import numpy
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist"):
        return _clean(x.tolist())
    return x


def save_json(path, obj):
    """Write obj (with tensors/arrays as lists, nan as null) to path atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(_clean(obj), fh, indent=1)
    return path


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def save_tensors(path, tensors):
    """Save a dict of plain tensors atomically; load back with load_tensors (weights_only)."""
    import torch
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    return path


def load_tensors(path, device="cpu"):
    import torch
    return torch.load(path, map_location=device, weights_only=True)


def save_figure(fig, path, dpi=200):
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_mean_std(ax, x, runs, label=None, color=None, linestyle="-", shade=True, alpha=0.2):
    """Mean over runs (axis 0 of `runs`: (R, T)) with a +-1 std band."""
    import numpy as np
    runs = np.asarray(runs, dtype=float)
    mean, std = runs.mean(0), runs.std(0)
    ax.plot(x, mean, linestyle, color=color, label=label)
    if shade and len(runs) > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=alpha, linewidth=0)


def format_row(row, widths=None):
    """One aligned console line from a dict: 'name value' pairs, floats in 4 significant digits."""
    cells = []
    for k, v in row.items():
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        cells.append(f"{k} {text:>{(widths or {}).get(k, 9)}}")
    return "  ".join(cells)


def markdown_table(header, rows):
    """A Markdown table from a header list and row lists (floats in 4 significant digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


EXPERIMENTS = ("optimization", "generalization", "correlation", "quadratic", "curvature", "rescaling")


def experiment_dirs(experiment, root="."):
    """figures/<experiment>/ and results/<experiment>/ under root, created if missing."""
    dirs = tuple(os.path.join(root, kind, experiment) for kind in ("figures", "results"))
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    return dirs
