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
