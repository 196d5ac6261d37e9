"""Figure 7 (b)(c), Appendix E.2: expected displacement of a shifted minimum vs the curvature of
the curve of minima.

    python curvature_displacement.py           # full kappa grids, 4,000-point quadrature
    python curvature_displacement.py --quick   # coarser grids

CPU runtime (2 cores): about 7 s of CPU time, ~20 s wall on the shared machine (--quick: ~2 s CPU).
Headline: (1/r) E dist = 2/pi = 0.6366 for a straight line (eq. 66) and depends on kappa r only.
Circle gamma_2: it falls with curvature (0.5987 at kappa r = 1, the largest in (c)). Parabola gamma_1:
it first falls too (minimum 0.6138 at kappa r = 1.83), is back at 2/pi at kappa r = 4.73, then rises
(0.7757 at kappa r = 160, the right end of (b) for r = 2; limit 1/2 + 1/pi = 0.818).

For a curve of minima gamma through w0 = (0, 0), shift w0 by r in a direction uniform on the circle
and average the distance to gamma (eq. 65):
    E dist = (1/2pi) int_0^{2pi} dist(r (cos a, sin a), gamma) da.
gamma_1(t) = (t, k1 t^2), curvature kappa = 2 k1 at w0; gamma_2 = circle of radius k2 centred at
(0, k2), curvature kappa = 1 / k2. Distances are exact: the circle in closed form, the parabola
by the real roots of the cubic d/dt |gamma_1(t) - p|^2 = 0. The integral is the midpoint rule on
N_ANGLES uniform angles (checked against scipy.integrate.quad in the tests).

A run takes seconds, so nothing is saved to resume from: its outputs replace the previous ones
as a set when it completes, an interrupted run (Ctrl-C) leaves them as they were. Saved results
made with other settings are replaced only with --replace (or written elsewhere with --out-dir).

Outputs: figures/curvature/displacement_vs_curvature.png (panels b and c) and
results/curvature/displacement.json (config, environment, the (1/r) E dist grids of both panels and
the closed-form checks), under OUT_DIR.
"""
import math
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lib.config import UsageError, check_positive, run  # noqa: E402
from lib.io import check_replace, environment, experiment_dirs, relative, save_json, staged  # noqa: E402
from lib.plots import save_figure  # noqa: E402

# ---- config -------------------------------------------------------------------------------
PARABOLA_RS = [0.1, 0.2, 0.5, 1.0, 2.0]        # shift radii r for gamma_1 (Figure 7b)
CIRCLE_RS = [0.005, 0.01, 0.02, 0.05, 0.1]     # shift radii r for gamma_2 (Figure 7c)
PARABOLA_KAPPA_MAX = 80.0                      # kappa = 2 k1 in [0, this] (the authors' k1 < 40)
CIRCLE_KAPPA_MAX = 10.0                        # kappa = 1 / k2 in [0, this] (the authors' k2 >= 0.1)
N_KAPPA = 101                                  # curvature values per panel (uniform grid)
FIG_DPI = 200                                  # PNG resolution
N_ANGLES = 4000                                # midpoint-rule nodes on the circle of shifts (rel. err ~1e-8)
OUT_DIR = "."                                  # root for figures/curvature/ and results/curvature/
REPLACE = False                                # True: replace saved results made with other settings
# --------------------------------------------------------------------------------------------

QUICK_SETTINGS = {"N_KAPPA": 21, "N_ANGLES": 1000, "FIG_DPI": 60}


def dist_to_circle(p, kappa):
    """Exact distance from points p (..., 2) to the circle of radius 1/kappa centred at (0, 1/kappa)
    (through the origin, curvature kappa; kappa = 0: the x-axis). Written without cancellation:
    | ||p - c|| - R | = | kappa |p|^2 - 2 p_y | / (1 + ||kappa p - (0, 1)||)."""
    x, y = p[..., 0], p[..., 1]
    return np.abs(kappa * (x * x + y * y) - 2 * y) / (1 + np.hypot(kappa * x, 1 - kappa * y))


def dist_to_parabola(p, k1, polish=3):
    """Exact distance from points p (N, 2) to gamma_1(t) = (t, k1 t^2) (curvature 2 k1 at 0):
    the minimiser over t solves 2 k1^2 t^3 + (1 - 2 k1 p_y) t - p_x = 0 (the stationarity of
    |gamma_1(t) - p|^2); all three roots, from the batched companion matrix, are tried (a complex
    root's real part only gives a larger distance, so the minimum is the real minimiser's), each
    polished by `polish` Newton steps."""
    x, y = p[..., 0], p[..., 1]
    if k1 == 0:
        return np.abs(y)
    a, b = (1 - 2 * k1 * y) / (2 * k1 ** 2), -x / (2 * k1 ** 2)   # t^3 + a t + b = 0
    comp = np.zeros(x.shape + (3, 3))
    comp[..., 0, 1], comp[..., 0, 2], comp[..., 1, 0], comp[..., 2, 1] = -a, -b, 1.0, 1.0
    t = np.linalg.eigvals(comp).real                                 # (N, 3)
    for _ in range(polish):  # the companion matrix is ill-conditioned for small k1 (|a| ~ 1/k1^2)
        g, dg = t ** 3 + a[..., None] * t + b[..., None], 3 * t * t + a[..., None]
        t = np.where(np.abs(dg) > 1e-12, t - g / np.where(np.abs(dg) > 1e-12, dg, 1.0), t)
    d = np.hypot(t - x[..., None], k1 * t * t - y[..., None])
    return d.min(-1)


def shifts(r, n):
    """n points r (cos a, sin a), a on the midpoint grid of [0, 2pi): (n, 2)."""
    a = 2 * np.pi * (np.arange(n) + 0.5) / n
    return r * np.stack([np.cos(a), np.sin(a)], -1)


def expected_distance(curve, kappa, r, n):
    """eq. (65): E_{|w - w0| = r} dist(w, gamma) for gamma = 'parabola' or 'circle' of curvature
    kappa at w0 = 0, by the n-point midpoint rule (spectrally accurate where smooth)."""
    p = shifts(r, n)
    d = dist_to_parabola(p, kappa / 2) if curve == "parabola" else dist_to_circle(p, kappa)
    return float(d.mean())


def sweep(curve, rs, kappa_max, n_kappa, n_angles):
    """(1/r) E dist for each r (rows) and each kappa in linspace(0, kappa_max, n_kappa) (columns)."""
    kappas = np.linspace(0, kappa_max, n_kappa)
    return kappas, np.array([[expected_distance(curve, k, r, n_angles) / r for k in kappas] for r in rs])


def experiment(cfg):
    """Both panels' sweeps and the closed-form checks of eq. (66), printed as they come."""
    panels = {}
    for curve, rs, kmax in [("parabola", cfg["PARABOLA_RS"], cfg["PARABOLA_KAPPA_MAX"]),
                            ("circle", cfg["CIRCLE_RS"], cfg["CIRCLE_KAPPA_MAX"])]:
        kappas, ratio = sweep(curve, rs, kmax, cfg["N_KAPPA"], cfg["N_ANGLES"])
        panels[curve] = {"kappa": kappas, "r": rs, "ratio": ratio}
        for r, row in zip(rs, ratio):
            print(f"{curve:8s} r {r:<6g} (1/r) E dist: kappa=0 {row[0]:.6f}  kappa={kmax:g} {row[-1]:.6f}  "
                  f"range [{row.min():.6f}, {row.max():.6f}]")
    checks = {"two_over_pi": 2 / math.pi,
              "kappa0_max_abs_err": max(float(np.abs(p["ratio"][:, 0] - 2 / math.pi).max()) for p in panels.values()),
              "parabola_limit_kappa_r_inf": 0.5 + 1 / math.pi,
              "circle_kappa_r_1_closed_form": (4 * math.sqrt(3) - 4) / math.pi - 1 / 3,
              "circle_kappa_r_1_numeric": expected_distance("circle", 1.0, 1.0, cfg["N_ANGLES"])}
    print(f"eq. (66): kappa = 0 gives 2/pi = {2 / math.pi:.6f}, max error {checks['kappa0_max_abs_err']:.1e}; "
          f"circle at kappa r = 1: {checks['circle_kappa_r_1_numeric']:.6f} (closed form {checks['circle_kappa_r_1_closed_form']:.6f})")
    return panels, checks


def plot(panels, path, dpi):
    """Figure 7 (b) and (c): (1/r) E dist against the curvature, one line per shift radius r."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (curve, cmap, xlabel) in zip(axes, [("parabola", "Blues", r"$\kappa = 2k_1$"),
                                                ("circle", "Oranges", r"$\kappa = 1/k_2$")]):
        p = panels[curve]
        colors = plt.get_cmap(cmap)(np.linspace(0.35, 0.95, len(p["r"])))
        for r, row, col in zip(p["r"], p["ratio"], colors):
            ax.plot(p["kappa"], row, color=col, lw=2, label=f"r={r:g}")
        ax.axhline(2 / math.pi, color="0.3", ls=":", lw=1.2, zorder=3, label=r"$2/\pi$ (eq. 66)")  # above the curves
        ax.set(xlabel=xlabel, ylabel=r"$\frac{1}{r}\,\mathbb{E}_{S_r}\,\mathrm{dist}(w, \gamma)$",
               title=(r"(b) $\gamma_1(t) = (t, k_1 t^2)$" if curve == "parabola" else r"(c) circle of radius $k_2$"))
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi)


def main(cfg):
    for key in ("PARABOLA_KAPPA_MAX", "CIRCLE_KAPPA_MAX", "N_KAPPA", "N_ANGLES", "FIG_DPI"):
        check_positive(key, cfg[key], allow_zero=False)
    for key in ("PARABOLA_RS", "CIRCLE_RS"):
        rs = cfg[key]
        if not (rs and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rs)):
            raise UsageError(f"{key} must be a non-empty list of radii, got {rs!r}")
        for r in rs:
            check_positive("r", r, allow_zero=False)
    saved = {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"])}
    if not cfg["REPLACE"]:  # results of other settings are replaced only when asked
        check_replace(os.path.join(cfg["OUT_DIR"], "results", "curvature", "displacement.json"), saved)
    panels, checks = experiment(cfg)
    with staged(cfg["OUT_DIR"]) as stage:  # the outputs replace the previous ones only when all are written
        fig_dir, res_dir = experiment_dirs("curvature", stage)
        save_json(f"{res_dir}/displacement.json", {"config": saved, "environment": environment(), "checks": checks, **panels})
        plot(panels, f"{fig_dir}/displacement_vs_curvature.png", cfg["FIG_DPI"])
    return panels, checks


if __name__ == "__main__":
    run(main, globals(), on_interrupt=lambda cfg: "a run takes seconds and saves nothing to resume; run it again")
