"""Statistics over many trained models: Pearson and partial correlation with two-sided p-values,
and the rows (models) they are taken over. Inputs are 1-D sequences; None counts as nan."""
import math

import numpy as np


def pearson(x, y, min_n=2):
    """Pearson r of x and y and its two-sided p-value (scipy.stats.pearsonr), as floats;
    (nan, nan) with fewer than min_n pairs."""
    from scipy.stats import pearsonr
    if len(x) < max(min_n, 2):
        return math.nan, math.nan
    r, p = pearsonr(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return float(r), float(p)


def partial_corr(x, y, z, min_n=4):
    """Partial correlation of x and y given z: Pearson r of the residuals of x and y after a
    least-squares fit on z (with intercept); two-sided p-value from Student's t with n - 3
    degrees of freedom. (nan, nan) with fewer than min_n points (at least 4: one degree of
    freedom)."""
    from scipy.stats import t as student
    x, y, z = (np.asarray(a, dtype=float) for a in (x, y, z))
    if len(x) < max(min_n, 4):
        return math.nan, math.nan
    A = np.stack([np.ones_like(z), z], 1)
    rx = x - A @ np.linalg.lstsq(A, x, rcond=None)[0]
    ry = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
    r = float(np.corrcoef(rx, ry)[0, 1])
    df = len(x) - 3
    t = r * math.sqrt(df / max(1 - r * r, 1e-300))
    return r, float(2 * student.sf(abs(t), df))


def finite_rows(columns, dropped=None):
    """(n,) bool: the rows whose value is finite in every column (each of length n) and that
    are not `dropped` ((n,) bool, e.g. the models that diverged)."""
    ok = np.isfinite(np.array(columns, dtype=float)).all(0)  # None becomes nan
    return ok if dropped is None else ok & ~np.asarray(dropped, dtype=bool)


def correlate(columns, y, z, keep=None, names=("y", "z"), min_n=4):
    """For each named column x of `columns` ({name: (n,)}), over the kept rows ((n,) bool; all
    rows by default): Pearson r and p of x with y and with z, and the partial r and p of x and y
    given z, as {name: {r_a, p_a, r_b, p_b, partial_r_a, partial_p_a}} for names (a, b); all nan
    when fewer than min_n rows are kept."""
    keep = np.ones(len(y), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    y, z = np.asarray(y, dtype=float)[keep], np.asarray(z, dtype=float)[keep]
    a, b, out = *names, {}
    for name, x in columns.items():
        x = np.asarray(x, dtype=float)[keep]
        (r, p), (rz, pz), (rp, pp) = pearson(x, y, min_n), pearson(x, z, min_n), partial_corr(x, y, z, min_n)
        out[name] = {f"r_{a}": r, f"p_{a}": p, f"r_{b}": rz, f"p_{b}": pz, f"partial_r_{a}": rp, f"partial_p_{a}": pp}
    return out


def draw_means(draw_fn, n_draws, resume=None, on_draw=None, progress=False, desc=None):
    """Means over draws j = 0, ..., n_draws - 1 (n_draws >= 1) of draw_fn(j) -> {name: (K,)
    tensor}, summed in float64 on the CPU (a nan in any draw stays). on_draw({"draw": j + 1,
    "sums": ...}) after draw j; resume=such a state goes on from its draw, to the same means as
    one pass when draw_fn(j) depends on j alone (e.g. reseeded per draw: common random numbers
    across the K entries). Returns {name: (K,) float64 tensor}."""
    from tqdm import tqdm
    j0, sums = (resume or {}).get("draw", 0), (resume or {}).get("sums")
    for j in tqdm(range(j0, n_draws), desc=desc, disable=not progress, leave=False, dynamic_ncols=True,
                  initial=j0, total=n_draws):
        values = {k: v.double().cpu() for k, v in draw_fn(j).items()}
        sums = values if sums is None else {k: sums[k] + v for k, v in values.items()}
        if on_draw is not None:
            on_draw({"draw": j + 1, "sums": sums})
    return {k: v / n_draws for k, v in sums.items()}
