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
