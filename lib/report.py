"""Console rows and Markdown tables for the scripts' summaries."""


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


def diverged(curves, limit=1e6):
    """Per run, the 1-based epoch at which its loss curve turned non-finite or exceeded `limit`
    (a diverged run), or None. curves: (R, E) losses, None/nan allowed."""
    import numpy as np
    c = np.asarray(curves, dtype=float)
    bad = ~np.isfinite(c) | (c > limit)
    return [int(np.argmax(b)) + 1 if b.any() else None for b in bad]


def finite_stats(values, keep=None):
    """Mean and std over the runs that did not diverge (keep: (R,) bool), and how many that is.
    Returns (mean, std, n); (nan, nan, 0) when no run is left."""
    import numpy as np
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v) if keep is None else np.asarray(keep, bool) & np.isfinite(v)
    if not keep.any():
        return float("nan"), float("nan"), 0
    return float(v[keep].mean()), float(v[keep].std()), int(keep.sum())


def diverged_epochs(curves, *last, limit=1e6):
    """diverged() on per-epoch loss curves ((R, E)) extended by values measured after the last
    epoch (each (R,), e.g. the final losses), which count as epoch E's: per run, 1..E or None."""
    import numpy as np
    curves = np.asarray(curves, dtype=float)
    at = diverged(np.column_stack([curves, *(np.asarray(v, dtype=float) for v in last)]), limit)
    return [None if e is None else min(e, curves.shape[1]) for e in at]


def save_table(stem, header, rows, title, note=""):
    """Write one table atomically as Markdown (stem.md: '# title', the table, then `note`) and as
    CSV (stem.csv, floats in 6 significant digits). Returns the Markdown text."""
    import csv
    import io

    from lib.io import save_text
    md = f"# {title}\n\n{markdown_table(header, rows)}\n\n{note}"
    save_text(f"{stem}.md", md)
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + [[f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows])
    save_text(f"{stem}.csv", buf.getvalue())
    return md


# --- per-arm summaries over runs that did not diverge (arms branched from shared seeds) ---------
def diverged_arms(curves, keys=("train_loss", "test_loss"), limit=1e6):
    """{arm: per run, the first 1-based epoch at which any of its loss curves `keys` turned
    non-finite or exceeded `limit` (diverged()), or None}, for curves {arm: {name: (R, E)}}."""
    at = {arm: zip(*(diverged(c[k], limit) for k in keys)) for arm, c in curves.items()}
    return {arm: [min([e for e in run if e is not None], default=None) for run in v] for arm, v in at.items()}


def paired_stats(values, baseline, at, at_baseline):
    """finite_stats (mean, std, n) of the paired differences values - baseline, both (R,) with run
    r of each from the same seed, over the runs where neither diverged (at, at_baseline: per run,
    the epoch it diverged at or None). None counts as nan."""
    import numpy as np
    keep = [a is None and b is None for a, b in zip(at, at_baseline)]
    return finite_stats(np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float), keep)


def cut_diverged(curves, at):
    """(R, E) curves as a float array with each diverged run's values set to nan from the epoch it
    diverged at on (at: per run, that 1-based epoch or None)."""
    import numpy as np
    c = np.array(curves, dtype=float)
    for r, e in enumerate(at):
        if e is not None:
            c[r, e - 1:] = np.nan
    return c


def diverged_note(at):
    """'arm run 1 at epoch 3, run 4 at epoch 7; other-arm run 2 at epoch 1' for the runs of
    {arm: per run, the epoch it diverged at or None} that diverged; '' when none did."""
    return "; ".join(f"{a} " + ", ".join(f"run {i + 1} at epoch {e}" for i, e in enumerate(v) if e is not None)
                     for a, v in at.items() if any(e is not None for e in v))


def cell(value, spec=".4g"):
    """A table cell: `value` formatted with `spec`, or '-' for None or a non-finite value (e.g. a
    mean over no runs), so a table never prints a number made of diverged runs."""
    import math
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def mean_std_cell(mean, std, spec=".4f", std_spec=None):
    """'mean ± std' as two cell()s, the std in `std_spec` (default: `spec` without its '+')."""
    return f"{cell(mean, spec)} ± {cell(std, std_spec or spec.replace('+', ''))}"


def record_mean(records, key, keep, minus=None):
    """Mean over the moments and the kept models (keep: (R,) bool) of r[key] (minus r[minus]) in
    lib.arms records (one per moment, each field one value per model), over the records that hold
    `key`; nan when none does or no model is kept."""
    import numpy as np
    v = [np.subtract(r[key], r[minus]) if minus else r[key] for r in records if key in r]
    return finite_stats(np.asarray(v, dtype=float).reshape(-1, len(keep))[:, keep].ravel())[0]


def move_drift(records, keep):
    """(loss drift, objective change) per move of a lib.arms arm, as record_mean()s over its
    records: loss_after - loss_before and objective_after - objective_before for a teleport
    (`random` included, which has no objective: nan), `drift` and nan for a perturbation; (0, nan)
    for an arm that never moves, (nan, nan) when no model is kept."""
    if records and "loss_after" in records[0]:
        return (record_mean(records, "loss_after", keep, "loss_before"),
                record_mean(records, "objective_after", keep, "objective_before"))
    if records and "drift" in records[0]:
        return record_mean(records, "drift", keep), float("nan")
    return 0.0 if any(keep) else float("nan"), float("nan")


def stats_cell(stats, n_runs, fmt="{:.4g}"):
    """A table cell for finite_stats' (mean, std, n): `fmt` filled with the mean and the std of the
    runs that did not diverge, '(n of n_runs runs)' added where some did, 'diverged' where none is left."""
    mean, std, n = stats
    if n == 0:
        return "diverged"
    return fmt.format(mean, std) + (f" ({n} of {n_runs} runs)" if n < n_runs else "")
