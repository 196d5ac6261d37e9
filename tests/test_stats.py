"""lib.stats against known answers: Pearson r and p from scipy and by hand, the partial
correlation against its closed form and a hand-computed p-value, Kendall's tau (1 for a monotone
non-linear relation), bootstrap intervals that cover the true correlation of synthetic draws at
about their level, the rows kept, the per-column summary; too few rows give nan, not an error."""
import math

import numpy as np
import pytest
from scipy import stats as sp

from lib.stats import bootstrap_ci, correlate, finite_rows, kendall, partial_corr, pearson


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


def test_kendall_is_one_for_a_monotone_non_linear_relation_and_matches_scipy():
    x = np.linspace(-2, 3, 30)
    tau, p = kendall(x, np.exp(3 * x))
    assert tau == pytest.approx(1.0) and p < 1e-10 and pearson(x, np.exp(3 * x))[0] < 0.8
    assert kendall(x, -x ** 3)[0] == pytest.approx(-1.0)
    a, b, _ = sample(40, seed=2)
    ref = sp.kendalltau(a, b)
    assert kendall(a, b) == pytest.approx((ref[0], ref[1]), rel=1e-12)
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4])[0] == pytest.approx(4 / 6)  # 5 concordant, 1 discordant pair
    assert all(math.isnan(v) for v in kendall([1], [2]) + kendall([1, 2], [2, 1], min_n=3))


def draw_pairs(n, rho, rng):
    """n pairs from a bivariate normal with correlation rho."""
    x, e = rng.normal(size=(2, n))
    return x, rho * x + math.sqrt(1 - rho ** 2) * e


def test_bootstrap_interval_covers_the_true_correlation_at_about_its_level():
    rng, rho, hits, widths = np.random.default_rng(0), 0.5, 0, []
    for i in range(100):
        x, y = draw_pairs(60, rho, rng)
        lo, hi = bootstrap_ci(x, y, n=500, seed=i)
        hits += lo <= rho <= hi
        widths.append(hi - lo)
        assert lo < pearson(x, y)[0] < hi
    # the percentile bootstrap under-covers slightly at n = 60; resampling x and y separately
    # (not as pairs) would centre the intervals on 0 and cover 0.5 almost never
    assert 85 <= hits <= 100
    # the width of a 95% interval: about 2 * 1.96 * (1 - rho^2) / sqrt(n) = 0.38
    assert 0.28 < np.median(widths) < 0.48


def test_bootstrap_is_deterministic_pairs_resampled_and_leaves_out_non_finite_rows():
    x, y, z = sample(80, seed=3)
    ci = bootstrap_ci(x, y, seed=5)
    assert ci == bootstrap_ci(x, y, seed=5) and ci != bootstrap_ci(x, y, seed=6)
    by_hand = bootstrap_ci(x, y, lambda a, b: np.corrcoef(a, b)[0, 1], seed=5)  # the same resamples
    assert by_hand == pytest.approx(ci, abs=1e-12)
    xn, yn = np.append(x, [np.nan, 1.0]), np.append(y, [2.0, np.inf])
    assert bootstrap_ci(xn, list(yn), seed=5) == pytest.approx(ci, abs=1e-12)
    wide, narrow = bootstrap_ci(x, y, level=0.99), bootstrap_ci(x, y, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert bootstrap_ci(np.exp(x), x, "kendall") == pytest.approx((1.0, 1.0))  # monotone in every resample
    assert all(math.isnan(v) for v in bootstrap_ci(x[:3], y[:3]) + bootstrap_ci([1.0] * 9, list(range(9))))
    # a third of the resamples of 5 rows with one 1 have a constant x (r undefined): skipped
    assert np.isfinite(bootstrap_ci([0, 0, 0, 0, 1.0], [1, 2, 3, 4, 5.0])).all()


def test_bootstrap_interval_of_the_partial_correlation():
    """x and y share the cause z: r is large, the partial r given z is 0, and its interval says so;
    the partial statistic by the residual form (partial_corr) on the same resamples agrees."""
    x, y, z = sample(200, seed=4)
    lo, hi = bootstrap_ci(x, y, z=z, n=1000)
    assert lo < 0 < hi and hi - lo < 0.35 and bootstrap_ci(x, y, n=1000)[0] > 0.7
    resid = bootstrap_ci(x, y, lambda a, b, c: partial_corr(a, b, c)[0], n=200, z=z)
    assert resid == pytest.approx(bootstrap_ci(x, y, n=200, z=z), abs=1e-10)
    with pytest.raises(ValueError):
        bootstrap_ci(x, y, "kendall", z=z)


def test_correlate_adds_kendall_and_intervals_on_request():
    x, y, z = sample(60, seed=5)
    keep = np.arange(60) >= 5
    got = correlate({"a": x}, y, z, keep, ("val", "train"), ci={"n": 300, "seed": 1})["a"]
    assert got["tau_val"] == pytest.approx(kendall(x[5:], y[5:])[0], abs=1e-12)
    assert got["ci_r_val"] == pytest.approx(list(bootstrap_ci(x[5:], y[5:], n=300, seed=1)), abs=1e-12)
    assert got["ci_partial_r_val"] == pytest.approx(list(bootstrap_ci(x[5:], y[5:], n=300, seed=1, z=z[5:])))
    assert got["ci_tau_val"][0] < got["tau_val"] < got["ci_tau_val"][1]
    assert "tau_val" not in correlate({"a": x}, y, z, keep, ("val", "train"))["a"]  # unchanged without ci
