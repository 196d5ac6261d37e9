"""Statistics over many trained models: Pearson, partial and Kendall correlation with two-sided
p-values, percentile-bootstrap confidence intervals over models, and the rows (models) they are
taken over. Inputs are 1-D sequences; None counts as nan."""
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


def correlate(columns, y, z, keep=None, names=("y", "z"), min_n=4, ci=None):
    """For each named column x of `columns` ({name: (n,)}), over the kept rows ((n,) bool; all
    rows by default): Pearson r and p of x with y and with z, and the partial r and p of x and y
    given z, as {name: {r_a, p_a, r_b, p_b, partial_r_a, partial_p_a}} for names (a, b); all nan
    when fewer than min_n rows are kept. With ci = {"n": ..., "level": ..., "seed": ...}
    (bootstrap_ci's arguments; {} for its defaults) also Kendall's tau_a, p_tau_a with y and the
    bootstrap intervals ci_r_a, ci_partial_r_a, ci_tau_a as [low, high]."""
    keep = np.ones(len(y), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    y, z = np.asarray(y, dtype=float)[keep], np.asarray(z, dtype=float)[keep]
    a, b, out = *names, {}
    for name, x in columns.items():
        x = np.asarray(x, dtype=float)[keep]
        (r, p), (rz, pz), (rp, pp) = pearson(x, y, min_n), pearson(x, z, min_n), partial_corr(x, y, z, min_n)
        out[name] = {f"r_{a}": r, f"p_{a}": p, f"r_{b}": rz, f"p_{b}": pz, f"partial_r_{a}": rp, f"partial_p_{a}": pp}
        if ci is not None:
            tau, ptau = kendall(x, y, min_n)
            out[name].update({f"tau_{a}": tau, f"p_tau_{a}": ptau,
                              f"ci_r_{a}": list(bootstrap_ci(x, y, "pearson", min_n=min_n, **ci)),
                              f"ci_partial_r_{a}": list(bootstrap_ci(x, y, "pearson", z=z, min_n=min_n, **ci)),
                              f"ci_tau_{a}": list(bootstrap_ci(x, y, "kendall", min_n=min_n, **ci))})
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


def kendall(x, y, min_n=2):
    """Kendall's tau-b of x and y and its two-sided p-value (scipy.stats.kendalltau), as floats;
    (nan, nan) with fewer than min_n pairs. Rank-based: 1 for any strictly increasing relation."""
    from scipy.stats import kendalltau
    if len(x) < max(min_n, 2):
        return math.nan, math.nan
    tau, p = kendalltau(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return float(tau), float(p)


def _rows_corr(a, b):
    """Pearson r of each row pair of a, b: (n, N) -> (n,); nan for a constant row."""
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def _resampled_stat(stat, x, y, z, idx):
    """The statistic on every resample idx: (n, N) indices -> (n,) values."""
    if stat == "pearson" and z is None:
        return _rows_corr(x[idx], y[idx])
    if stat == "pearson":  # partial r from the three pairwise r (equal to the residual form)
        xs, ys, zs = x[idx], y[idx], z[idx]
        rxy, rxz, ryz = _rows_corr(xs, ys), _rows_corr(xs, zs), _rows_corr(ys, zs)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    if stat == "kendall":
        if z is not None:
            raise ValueError("bootstrap_ci: no partial Kendall tau; use stat='pearson' with z")
        return np.array([kendall(x[i], y[i])[0] for i in idx])
    if callable(stat):
        return np.array([stat(x[i], y[i]) if z is None else stat(x[i], y[i], z[i]) for i in idx], dtype=float)
    raise ValueError(f"unknown statistic {stat!r}; known: pearson, kendall, or a callable")


def bootstrap_ci(x, y, stat="pearson", n=2000, level=0.95, seed=0, z=None, min_n=4):
    """Percentile bootstrap confidence interval (Efron and Tibshirani 1993, ch. 13) of a
    statistic of paired samples, resampling the rows (models) with replacement: `stat` is
    'pearson' (Pearson r; with z: the partial r of x and y given z), 'kendall' (tau-b) or a
    callable stat(x, y) (stat(x, y, z) with z) -> float. Rows with a non-finite value in any
    array are left out first (as finite_rows). Returns (low, high) floats; (nan, nan) with fewer
    than min_n finite rows. Resamples on which the statistic is undefined (e.g. a constant
    column) are skipped. Deterministic given seed."""
    cols = [np.asarray(a, dtype=float) for a in ((x, y) if z is None else (x, y, z))]
    ok = finite_rows(cols)
    x, y, z = (c[ok] for c in cols) if z is not None else (*(c[ok] for c in cols), None)
    if ok.sum() < max(min_n, 2):
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(x), (n, len(x)))
    vals = _resampled_stat(stat, x, y, z, idx)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return math.nan, math.nan
    lo, hi = np.percentile(vals, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
