"""lib.stats against known answers: Pearson r and p from scipy and by hand, the partial
correlation against its closed form and a hand-computed p-value, the rows kept, the per-column
summary; too few rows give nan, not an error."""
import math

import numpy as np
import pytest
from scipy import stats as sp

from lib.stats import correlate, finite_rows, partial_corr, pearson


def sample(n=400, seed=0):
    """x and y driven by a shared cause z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    return z + 0.5 * rng.normal(size=n), 2 * z + 0.7 * rng.normal(size=n), z


def test_pearson_matches_scipy_and_the_definition():
    x, y, _ = sample(50)
    r, p = pearson(x, y)
    ref = sp.pearsonr(x, y)
    assert r == pytest.approx(ref[0], abs=1e-12) and p == pytest.approx(ref[1], rel=1e-9)
    dx, dy = x - x.mean(), y - y.mean()
    assert r == pytest.approx((dx @ dy) / math.sqrt((dx @ dx) * (dy @ dy)), abs=1e-12)
    assert isinstance(r, float) and isinstance(p, float)
    # a hand example: r of (1, 2, 3) and (1, 3, 2) is 0.5; p = 2 * P(|t_1| > 0.5 * sqrt(1 / 0.75))
    r, p = pearson([1, 2, 3], [1, 3, 2])
    assert r == pytest.approx(0.5) and p == pytest.approx(1 - 2 * math.atan(1 / math.sqrt(3)) / math.pi)
    assert all(math.isnan(v) for v in pearson([1, 2, 3], [1, 3, 2], min_n=4) + pearson([], []) + pearson([1], [2]))


def test_partial_correlation_matches_closed_form_and_removes_a_shared_cause():
    x, y, z = sample()
    r, p = partial_corr(x, y, z)
    c = np.corrcoef([x, y, z])
    closed = (c[0, 1] - c[0, 2] * c[1, 2]) / np.sqrt((1 - c[0, 2] ** 2) * (1 - c[1, 2] ** 2))
    assert abs(r - closed) < 1e-10 and c[0, 1] > 0.8 and abs(r) < 0.15 and p > 0.01
    t = closed * math.sqrt((len(x) - 3) / (1 - closed ** 2))  # Student's t with n - 3 dof
    assert p == pytest.approx(2 * sp.t.sf(abs(t), len(x) - 3), rel=1e-9)
    r2, p2 = partial_corr(x + y, y, z)
    assert r2 > 0.5 and p2 < 1e-10
    assert all(math.isnan(v) for v in partial_corr(x[:3], y[:3], z[:3]))  # needs 4 points
    assert all(math.isnan(v) for v in partial_corr(x[:5], y[:5], z[:5], min_n=6))
    assert np.isfinite(partial_corr(x[:4], y[:4], z[:4])).all()


def test_finite_rows_drops_non_finite_none_and_dropped_rows():
    cols = [[1.0, None, 3.0, 4.0], [1.0, 2.0, math.inf, 4.0], [0.0, 0.0, 0.0, math.nan]]
    assert finite_rows(cols).tolist() == [True, False, False, False]
    assert finite_rows([[1, 2, 3]], [False, True, False]).tolist() == [True, False, True]


def test_correlate_names_its_keys_and_uses_only_the_kept_rows():
    x, y, z = sample(60, seed=1)
    keep = np.ones(60, dtype=bool)
    keep[:10] = False
    xs = x.copy()
    xs[:10] = 1e9  # outliers in the rows left out must not matter
    got = correlate({"a": xs, "b": list(y)}, y, z, keep, ("val", "train"))
    assert set(got) == {"a", "b"}
    assert set(got["a"]) == {"r_val", "p_val", "r_train", "p_train", "partial_r_val", "partial_p_val"}
    assert got["a"]["r_val"] == pytest.approx(sp.pearsonr(x[10:], y[10:])[0], abs=1e-12)
    assert got["a"]["r_train"] == pytest.approx(sp.pearsonr(x[10:], z[10:])[0], abs=1e-12)
    assert got["a"]["partial_p_val"] == pytest.approx(partial_corr(x[10:], y[10:], z[10:])[1], rel=1e-12)
    assert got["b"]["r_val"] == pytest.approx(1.0)
    few = correlate({"a": x}, y, z, np.arange(60) < 3)  # fewer than 4 kept: all nan
    assert set(few["a"]) == {"r_y", "p_y", "r_z", "p_z", "partial_r_y", "partial_p_y"}
    assert all(math.isnan(v) for v in few["a"].values())
