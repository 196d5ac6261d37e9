"""Figure 7 (App. E.2): exact distances to the curves of minima and the expected displacement (eq. 65);
outputs replaced only as a complete set of the same protocol."""
import json
import math
import os
import shutil

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import minimize_scalar

import curvature_displacement as cd
from lib.config import UsageError, resolve
from lib.io import check_replace, load_json, relative
from conftest import interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "results", "curvature", "displacement.json")
SMALL = ["--n-angles=8", "--n-kappa=3", "--parabola-rs=[1.0]", "--circle-rs=[0.1]", "--fig-dpi=20"]


def _numeric_min(curve_point, p, lo, hi, n=20001):
    """min over s of |curve_point(s) - p|: a dense grid, then scipy's bounded Brent around the best."""
    s = np.linspace(lo, hi, n)
    pts = curve_point(s)
    i = np.argmin(np.hypot(pts[0] - p[0], pts[1] - p[1]))
    h = (hi - lo) / (n - 1)
    res = minimize_scalar(lambda t: math.hypot(*(np.array(curve_point(t)) - p)), bounds=(s[i] - h, s[i] + h),
                          method="bounded", options={"xatol": 1e-13})
    return res.fun


@pytest.mark.parametrize("kappa", [1e-4, 0.7, 4.0, 25.0])
def test_circle_closed_form_distance_matches_numerical_minimiser(kappa):
    R = 1 / kappa
    circle = lambda s: (R * np.sin(s), 2 * R * np.sin(s / 2) ** 2)  # noqa: E731  centre (0, R), origin at s = 0
    rng = np.random.default_rng(0)
    for p in rng.normal(scale=0.3, size=(6, 2)):
        half = min(np.pi, 4 * kappa)  # |p| < 2 is within arc length 4 of the origin
        assert cd.dist_to_circle(p, kappa) == pytest.approx(_numeric_min(circle, p, -half, half), abs=1e-10)


@pytest.mark.parametrize("k1", [0.0, 5e-7, 0.3, 2.0, 40.0])
def test_parabola_distance_matches_numerical_minimiser(k1):
    rng = np.random.default_rng(1)
    P = rng.normal(scale=0.5, size=(6, 2))
    d = cd.dist_to_parabola(P, k1)
    for p, dp in zip(P, d):
        assert dp == pytest.approx(_numeric_min(lambda t: (t, k1 * t * t), p, -3, 3), abs=1e-9)


@pytest.mark.parametrize("curve", ["parabola", "circle"])
@pytest.mark.parametrize("kappa", [0.0, 1e-6])
def test_zero_curvature_gives_two_r_over_pi(curve, kappa):
    # eq. (66): for a straight line dist = r |sin a|, whose mean over the circle is 2r/pi
    for r in (0.005, 0.1, 2.0):
        assert cd.expected_distance(curve, kappa, r, 1000) == pytest.approx(2 * r / math.pi, abs=1e-4 * r)


def test_midpoint_rule_matches_scipy_quad():
    for curve, kappa, r in [("circle", 6.0, 0.1), ("parabola", 9.0, 0.2)]:
        f = (lambda a: cd.dist_to_circle(r * np.array([np.cos(a), np.sin(a)]), kappa)) if curve == "circle" else \
            (lambda a: cd.dist_to_parabola(r * np.array([[np.cos(a), np.sin(a)]]), kappa / 2)[0])
        ref = quad(f, 0, 2 * np.pi, limit=200, epsabs=1e-12)[0] / (2 * np.pi)
        assert cd.expected_distance(curve, kappa, r, 2000) == pytest.approx(ref, rel=1e-6)


def test_known_answers_and_scale_invariance():
    # circle with kappa r = 1: (1/r) E dist = mean over s in [0, pi] of |2 sin s - 1| = (4 sqrt3 - 4)/pi - 1/3
    assert cd.expected_distance("circle", 10.0, 0.1, 4000) / 0.1 == pytest.approx((4 * 3 ** 0.5 - 4) / math.pi - 1 / 3, abs=1e-7)
    # a very sharp parabola is a half-line: r below it, r|cos a| above it -> 1/2 + 1/pi
    assert cd.expected_distance("parabola", 1e6, 1.0, 4000) == pytest.approx(0.5 + 1 / math.pi, abs=1e-3)
    # dist(r p, gamma_kappa) = r dist(p, gamma_{kappa r}): (1/r) E dist depends on kappa r only
    for curve in ("parabola", "circle"):
        a, b = cd.expected_distance(curve, 12.0, 0.5, 1000) / 0.5, cd.expected_distance(curve, 3.0, 2.0, 1000) / 2.0
        assert a == pytest.approx(b, rel=1e-10)


def test_quick_run_writes_figure_and_json(tmp_path):
    cfg = resolve(cd, ["--quick", f"--out-dir={tmp_path}"])
    panels, checks = cd.main(cfg)
    assert (tmp_path / "figures/curvature/displacement_vs_curvature.png").stat().st_size > 10000
    saved = load_json(tmp_path / "results/curvature/displacement.json")
    assert saved["config"]["N_ANGLES"] == cd.QUICK_SETTINGS["N_ANGLES"] and "torch" in saved["environment"]
    assert checks["kappa0_max_abs_err"] < 1e-4
    par, circ = np.array(saved["parabola"]["ratio"]), np.array(saved["circle"]["ratio"])
    assert par.shape == (5, cfg["N_KAPPA"]) and np.all(par[:, -1] > 2 / math.pi)   # rises at large kappa r
    assert np.all(np.diff(circ[-1]) < 0) and np.all(circ[:, -1] < circ[:, 0])      # falls with kappa


def test_overrides_reach_the_run(tmp_path):
    # a coarse quadrature (8 angles) on a 3-point kappa grid and one radius per panel: the saved
    # numbers are those of that quadrature, not of the default 4,000 nodes, and the grid follows N_KAPPA
    argv = SMALL + [f"--out-dir={tmp_path}"]
    cd.main(resolve(cd, argv))
    saved = load_json(tmp_path / "results/curvature/displacement.json")
    assert saved["config"]["N_ANGLES"] == 8 and saved["parabola"]["kappa"] == [0.0, 40.0, 80.0]
    par = saved["parabola"]["ratio"][0][1]
    assert par == pytest.approx(cd.expected_distance("parabola", 40.0, 1.0, 8), rel=1e-12)
    assert abs(par - cd.expected_distance("parabola", 40.0, 1.0, 4000)) > 1e-4
    assert saved["circle"]["ratio"][0][2] == pytest.approx(cd.expected_distance("circle", 10.0, 0.1, 8) / 0.1, rel=1e-12)
    assert saved["checks"]["circle_kappa_r_1_numeric"] == pytest.approx(cd.expected_distance("circle", 1.0, 1.0, 8))


def test_bad_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="N_ANGLES must be > 0"):
        cd.main(resolve(cd, ["--n-angles=0", f"--out-dir={tmp_path}"]))
    with pytest.raises(UsageError, match="r must be > 0"):
        cd.main(resolve(cd, ["--circle-rs=[-0.1]", f"--out-dir={tmp_path}"]))
    with pytest.raises(UsageError, match="PARABOLA_RS must be a non-empty list of radii"):
        cd.main(resolve(cd, ["--parabola-rs=[]", f"--out-dir={tmp_path}"]))
    assert not list(tmp_path.iterdir())  # refused before writing anything


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_results_are_strict_json_and_only_their_protocol_replaces_them(tmp_path):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    with open(COMMITTED) as fh:
        saved = json.load(fh, parse_constant=refuse)
    assert saved["environment"].get("git_commit") and saved["config"]["N_ANGLES"] == 4000
    cfg = resolve(cd, [])  # the plain command's settings are the committed protocol: it may replace them
    check_replace(COMMITTED, {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"])})
    (tmp_path / "results" / "curvature").mkdir(parents=True)
    shutil.copy(COMMITTED, tmp_path / "results" / "curvature")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="other settings: N_ANGLES=8 .saved: 4000.*--replace"):
        cd.main(resolve(cd, ["--n-angles=8", f"--out-dir={tmp_path}"]))
    assert snapshot(tmp_path) == before
    check_replace(tmp_path / "results/curvature/displacement.json", resolve(cd, ["--n-angles=8", "--replace"]))


def test_ctrl_c_is_one_line_and_keeps_the_previous_set(tmp_path, monkeypatch, capsys):
    cd.main(resolve(cd, SMALL + [f"--out-dir={tmp_path}"]))
    before = snapshot(tmp_path)
    assert len(before) == 2

    def interrupt(*args):  # the JSON is written (to the stage) by then
        raise KeyboardInterrupt
    monkeypatch.setattr(cd, "plot", interrupt)
    capsys.readouterr()
    err = interrupted(capsys, cd, SMALL + [f"--out-dir={tmp_path}"]).strip()
    assert "\n" not in err and err.startswith("interrupted:") and "unchanged" in err
    assert snapshot(tmp_path) == before and not list(tmp_path.glob(".staging-*"))
