"""Section 3 on two convex quadratics, x^2 + 9y^2 and the Booth function: gradient descent with and
without one teleport along SO(2) orbits (= level sets), checking Proposition 3.2 (after the teleport
grad f is a Hessian eigenvector, so the GD step is a damped Newton step), Propositions 3.5 / C.3 (the
optimality ratio ||grad f|| / max_level_set ||grad f|| then stays 1) and Theorem 3.1 (faster convergence).

    python teleport_quadratic.py                       # both functions
    python teleport_quadratic.py --functions=booth     # one of them
    python teleport_quadratic.py --quick               # the same runs, coarser contour plots

CPU runtime (2 cores): about 10 s of CPU time, most of it importing torch and matplotlib (--quick about
8 s); 20-30 s wall on the shared, loaded machine.
Headline: one teleport reaches loss 1e-6 in 9 GD steps instead of 88 on x^2 + 9y^2 (lr 0.05) and in
15 instead of 52 on Booth (lr 0.08); right after the teleport grad f is a Hessian eigenvector
(angle ~5e-15 rad, lambda_0 = 18) and the ratio stays 1 to 2e-16 until f <= 1e-6 (it leaves 1 only
below f ~ 1e-23, through rounding error).

The teleport maximises ||grad f(g_theta . w)||^2 over the angle theta by gradient ascent, checked
against the closed form (lib/quadratic.py). START, LR and TELEPORT_STEP default to per-function
presets. Beyond LR = 2/lambda_max = 2/18 GD diverges, and that is a result: the step it diverged at
is recorded, no step count or check comes from diverged values, the curves stop there (marked x),
and a teleport at a non-finite point is skipped. Outputs replace the previous set only once all are
written (a run takes seconds: nothing is saved to resume from), and results of other settings only
with --replace.

Outputs: figures/quadratic/<function>_{trajectories,loss,optimality}.png and
results/quadratic/<function>.json (the function's resolved config, environment, teleport record,
the checks of Props. 3.2, 3.5 and Thm. 3.1, divergence, and both trajectories), under OUT_DIR,
for each function in FUNCTIONS (x2_9y2 is x^2 + 9y^2).
"""
import json
import math
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib import quadratic  # noqa: E402
from lib.config import UsageError, check_choice, check_positive, run, with_preset  # noqa: E402
from lib.io import check_replace, environment, experiment_dirs, relative, save_json, staged  # noqa: E402
from lib.plots import COLORS, save_figure  # noqa: E402
from lib.quadratic import (descend, get_function, hessian, loss, newton_check, optimality_ratio,  # noqa: E402
                           so2_action, steps_to, wrap_half_turn)
from lib.report import diverged  # noqa: E402

# ---- config -------------------------------------------------------------------------------
FUNCTIONS = ["x2_9y2", "booth"]  # functions to run, in order: x2_9y2 (x^2 + 9y^2), booth
START = None               # (x, y) start; None: the function's preset
LR = None                  # gradient-descent step size, > 0; None: the function's preset
                           # (GD diverges beyond 2/lambda_max = 2/18: recorded as a result)
TELEPORT_STEP = None       # teleport right before this GD step (0 = at the start); None: the preset
STEPS = 120                # gradient-descent steps per run
LOSS_TARGET = 1e-6         # Theorem 3.1 check: steps until f <= LOSS_TARGET
TELEPORT_LR = 0.5          # gradient-ascent step on theta (the objective is the squared ratio, in [0, 1])
TELEPORT_MAX_STEPS = 500   # gradient-ascent steps at most
TELEPORT_TOL = 1e-13       # stop the ascent when |d ratio^2 / d theta| < this
CONTOUR_GRID = 400         # grid points per axis for the level-set plot
FIG_DPI = 200              # PNG resolution
OUT_DIR = "."              # root for figures/quadratic/ and results/quadratic/
REPLACE = False            # True: replace saved results made with other settings
# --------------------------------------------------------------------------------------------

PRESETS = {"FUNCTION": {
    "x2_9y2": {"START": (10.0, 0.1), "LR": 0.05, "TELEPORT_STEP": 5},
    "booth": {"START": (5.0, -5.0), "LR": 0.08, "TELEPORT_STEP": 4},
}}
QUICK_SETTINGS = {"CONTOUR_GRID": 100, "FIG_DPI": 60}
DIVERGED_ABOVE = 1e6   # a run has diverged once f > DIVERGED_ABOVE * f(START) (or f is not finite)
TITLES = {"x2_9y2": r"$f(x, y) = x^2 + 9y^2$",   # figure titles (file names keep the short names)
          "booth": r"Booth function $f(x, y) = (x + 2y - 7)^2 + (2x + y - 5)^2$"}
ARMS = {"baseline": "GD", "teleport": "GD + teleport before step {k}"}  # legend labels


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_settings(cfg, name):
    """The resolved settings of one function, checked; returns {START, LR, TELEPORT_STEP}."""
    s = {k: cfg[k] for k in ("START", "LR", "TELEPORT_STEP")}
    if not (isinstance(s["START"], (list, tuple)) and len(s["START"]) == 2 and all(map(is_number, s["START"]))):
        raise UsageError(f"START must be a pair of numbers (x, y), got {s['START']!r}")
    if loss(get_function(name), torch.tensor(s["START"], dtype=torch.float64)).item() == 0:
        raise UsageError(f"START {s['START']} is the minimiser of {name} (f = 0): the orbit is one point")
    if not (is_number(s["LR"]) and s["LR"] > 0):
        raise UsageError(f"LR must be a finite number > 0, got {s['LR']!r}")
    ts = s["TELEPORT_STEP"]
    if not (isinstance(ts, int) and not isinstance(ts, bool) and 0 <= ts <= cfg["STEPS"]):
        raise UsageError(f"TELEPORT_STEP must be a whole number of steps in [0, STEPS = {cfg['STEPS']}], got {ts!r}")
    return s


def saved_config(fcfg, name):
    """The config saved with one function's results, and compared with it before replacing them:
    its resolved settings with FUNCTION = name instead of the FUNCTIONS list (which does not change
    this function's numbers), OUT_DIR relative to the repository, tuples as JSON lists."""
    cfg = {k: v for k, v in fcfg.items() if k != "FUNCTIONS"}
    return json.loads(json.dumps({**cfg, "FUNCTION": name, "OUT_DIR": relative(fcfg["OUT_DIR"])}))


def before_divergence(losses, limit):
    """How many points of a loss curve come before the run diverged (lib.report.diverged)."""
    at = diverged([np.asarray(losses, dtype=float)], limit)[0]
    return len(losses) if at is None else at - 1


def experiment(cfg, name):
    """Both runs on one function (cfg: its resolved config) and the checks of Section 3, made on
    the points before a run diverged."""
    q = get_function(name)
    s, H = check_settings(cfg, name), hessian(q)
    ascent = (cfg["TELEPORT_LR"], cfg["TELEPORT_MAX_STEPS"], cfg["TELEPORT_TOL"])
    base, sb, _ = descend(q, s["START"], s["LR"], cfg["STEPS"])
    tele, st, rec = descend(q, s["START"], s["LR"], cfg["STEPS"], s["TELEPORT_STEP"], ascent)
    fb, rb, ft, rt = loss(q, base), optimality_ratio(q, base), loss(q, tele), optimality_ratio(q, tele)
    limit = DIVERGED_ABOVE * fb[0].item()
    nb, nt = before_divergence(fb, limit), before_divergence(ft, limit)
    k = rec["step"] + 1                                   # index of the teleported point in `tele`
    teleported = "theta" in rec and k < nt               # ... reached before the run diverged
    if teleported:
        above = (ft[k:nt] >= cfg["LOSS_TARGET"]).nonzero().flatten() + k
        above = above if len(above) else torch.tensor([k])
        dev_all = (rt[k:nt][ft[k:nt] > 0] - 1).abs()
        departs = next((int(i) for i in range(len(dev_all)) if dev_all[i] > 1e-6), None)
    lam = torch.linalg.eigvalsh(H)
    return {
        "function": name, "settings": s, "teleport": rec, "hessian": H, "hessian_eigenvalues": lam,
        "grad_norm_max_over_min_on_a_level_set": math.sqrt(torch.linalg.cond(H).item()),
        "theta_error_rad": abs(wrap_half_turn(rec["theta"] - rec["theta_closed_form"])) if "theta" in rec else None,
        "prop_3_2": newton_check(q, tele[k], s["LR"]) if teleported else None,
        "prop_3_5": {  # Prop. 3.5: the ratio stays 1 after one teleport
            "max_abs_ratio_minus_1_after_teleport_until_target": (rt[above] - 1).abs().max().item() if teleported else None,
            "max_ratio_no_teleport": rb[:nb].max().item(), "min_ratio_no_teleport": rb[:nb].min().item(),
            "gd_steps_after_teleport_until_ratio_departs_1e-6": departs if teleported else None,
            "loss_when_ratio_departs": ft[k + departs].item() if teleported and departs is not None else None},
        "theorem_3_1": {"steps_to_target_no_teleport": steps_to(fb, cfg["LOSS_TARGET"], sb) if nb == len(fb) else None,
                        "steps_to_target_teleport": steps_to(ft, cfg["LOSS_TARGET"], st) if nt == len(ft) else None},
        "divergence": {"limit": limit, "lr_times_lambda_max": s["LR"] * lam[-1].item(),
                       "diverged_at_step_no_teleport": int(sb[nb]) if nb < len(fb) else None,
                       "diverged_at_step_teleport": int(st[nt]) if nt < len(ft) else None},
        "curves": {"baseline": {"x": base[:, 0], "y": base[:, 1], "loss": fb, "ratio": rb, "step": sb},
                   "teleport": {"x": tele[:, 0], "y": tele[:, 1], "loss": ft, "ratio": rt, "step": st}},
    }


def shown(out):
    """Per arm: its curves cut where the run diverged (numpy), and the step it diverged at or None."""
    div = out["divergence"]
    cut = {}
    for arm, at in [("baseline", div["diverged_at_step_no_teleport"]), ("teleport", div["diverged_at_step_teleport"])]:
        c = {key: np.asarray(v, dtype=float) for key, v in out["curves"][arm].items()}
        n = before_divergence(c["loss"], div["limit"])
        cut[arm] = ({key: v[:n] for key, v in c.items()}, at)
    return cut


def label(arm, k, at):
    return ARMS[arm].format(k=k) + (f" (diverged at step {at})" if at is not None else "")


def plot_trajectories(q, out, path, grid, dpi):
    """Level sets with both trajectories (up to where they diverged) and the teleport jump."""
    cut, rec = shown(out), out["teleport"]
    (b, at_b), (t, at_t), k = cut["baseline"], cut["teleport"], rec["step"]
    jump = "theta" in rec and len(t["x"]) > k + 1      # the teleport came before the run diverged
    orbit = np.empty((0, 2))
    if jump:  # the level set through the pre-teleport point, drawn as its orbit
        thetas = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
        orbit = so2_action(q, torch.tensor(rec["w_before"], dtype=torch.float64), thetas).numpy()
    xs, ys = (np.concatenate([b[c], t[c], orbit[:, i]]) for i, c in enumerate("xy"))
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    half = 0.55 * max(xs.max() - xs.min(), ys.max() - ys.min(), 1e-9)
    X, Y = np.meshgrid(np.linspace(cx - half, cx + half, grid), np.linspace(cy - half, cy + half, grid))
    F = loss(q, torch.tensor(np.stack([X, Y], -1))).numpy()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.contour(X, Y, F, levels=np.geomspace(max(F.min(), 1e-3), F.max(), 14), colors="0.75", linewidths=0.7)
    if jump:
        ax.plot(orbit[:, 0], orbit[:, 1], ":", color="k", lw=1, label="orbit = level set at the teleport")
        ax.plot(t["x"][k + 1:], t["y"][k + 1:], "o-", ms=3, color=COLORS["teleport"], label=label("teleport", k, at_t))
    ax.plot(b["x"], b["y"], "o-", ms=3, color=COLORS["baseline"],
            label=label("baseline", k, at_b) if at_b is not None else "GD (the same until the teleport)")
    for arm, (c, at) in cut.items():
        if at is not None and (arm == "baseline" or jump):
            ax.plot(c["x"][-1], c["y"][-1], "x", ms=11, mew=2, color=COLORS[arm])
    if jump:
        ax.annotate("", xy=rec["w_after"], xytext=rec["w_before"],
                    arrowprops={"arrowstyle": "->", "color": COLORS["teleport"], "lw": 1.5, "ls": "--"})
        ax.plot(*rec["w_after"], "*", ms=14, color=COLORS["teleport"], label="teleport target")
    else:
        ax.text(0.02, 0.02, f"GD diverged before the teleport (before step {k}):\nthe teleport run is not drawn",
                transform=ax.transAxes, fontsize=8, color="0.3")
    ax.set(xlim=(cx - half, cx + half), ylim=(cy - half, cy + half), aspect="equal", xlabel="x", ylabel="y",
           title=f"{TITLES[q.name]}\nGD trajectories and the teleport")
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path, dpi)


def plot_curves(q, out, fig_dir, dpi, target, steps):
    """Loss (log scale) and optimality ratio against the GD step, each run cut where it diverged."""
    cut, k, t31 = shown(out), out["teleport"]["step"], out["theorem_3_1"]
    ends = [t31["steps_to_target_no_teleport"] or cut["baseline"][1] or steps,
            t31["steps_to_target_teleport"] or cut["teleport"][1] or steps]
    ratio_label = r"$\|\nabla f\| \,/\, \max_{level\ set} \|\nabla f\|$"
    for key, ylabel, fname, title in [("loss", "f(w)", "loss", "loss"), ("ratio", ratio_label, "optimality", "optimality ratio")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, (c, at) in cut.items():
            ax.plot(c["step"], c[key], "o-", ms=2.5, color=COLORS[arm], label=label(arm, k, at))
            if at is not None:
                ax.plot(c["step"][-1], c[key][-1], "x", ms=10, mew=2, color=COLORS[arm])
            zero = np.flatnonzero(c["loss"] == 0)
            if key == "ratio" and len(zero) and zero[0] > 0:  # at the minimiser the ratio is 0/0
                ax.annotate(f"f = 0 exactly from step {c['step'][zero[0]]:.0f}:\nthe ratio is 0/0", fontsize=7,
                            xy=(c["step"][zero[0] - 1], c["ratio"][zero[0] - 1]), xytext=(0, -30),
                            textcoords="offset points", ha="center", color=COLORS[arm], arrowprops={"arrowstyle": "-"})
        ax.axvline(k, color="0.6", lw=0.8, ls="--", label="teleport")
        if key == "loss":
            ax.set_yscale("log")
            ax.axhline(target, color="0.6", lw=0.8, ls=":", label=f"target f = {target:g}")
            low = min(np.nanmin(c["loss"]) for c, _ in cut.values())
            ax.set_ylim(max(min(low, target / 10), 1e-12), None)
        else:
            ax.set_ylim(0, 1.05)
            if t31["steps_to_target_teleport"] is not None:
                ax.axvline(t31["steps_to_target_teleport"], color=COLORS["teleport"], lw=0.8, ls=":",
                           label=f"teleport run reaches f = {target:g}")
            if out["prop_3_5"]["loss_when_ratio_departs"] is not None:
                ax.text(0.98, 0.55, "ratio leaves 1 only once f < %.0e:\nrounding error along the flat\n"
                        "direction outgrows the steep one" % out["prop_3_5"]["loss_when_ratio_departs"],
                        transform=ax.transAxes, ha="right", fontsize=7, color="0.3")
        ax.set_xlim(0, 1.15 * max(*ends, 10))
        ax.set(xlabel="GD step", ylabel=ylabel, title=f"{TITLES[q.name]}\n{title}")
        ax.legend(fontsize=8)
        save_figure(fig, f"{fig_dir}/{q.name}_{fname}.png", dpi)


def report(out, cfg):
    """The console summary of one function: the teleport, the checks, and how each run ended."""
    rec, p32, p35, t31, div = (out[k] for k in ("teleport", "prop_3_2", "prop_3_5", "theorem_3_1", "divergence"))
    s, lam = out["settings"], out["hessian_eigenvalues"].tolist()
    print(f"== {out['function']}: start {s['START']}, lr {s['LR']}, teleport before step {rec['step']}")
    print(f"Hessian eigenvalues {lam}; on a level set ||grad f|| varies by a factor "
          f"{out['grad_norm_max_over_min_on_a_level_set']:.4g}")
    if div["lr_times_lambda_max"] > 2:
        print(f"LR {s['LR']:g} > 2/lambda_max = {2 / lam[-1]:.4g}: GD diverges along the top Hessian eigenvector")
    if "theta" not in rec:
        print(f"teleport skipped: {rec['skipped']}")
    else:
        print(f"teleport: theta {rec['theta']:.12f} (closed form {rec['theta_closed_form']:.12f}, error "
              f"{out['theta_error_rad']:.1e} rad) in {rec['ascent_steps']} ascent steps; ratio^2 "
              f"{rec['ratio_sq_before']:.4f} -> {rec['ratio_sq_after']:.12f}; loss {rec['loss_before']:.6g} -> {rec['loss_after']:.6g}")
    if p32 is not None:
        print(f"Prop 3.2: angle(grad f, H grad f) = {p32['angle_grad_Hgrad_rad']:.1e} rad; lambda_0 = {p32['lambda_0']:.6g}; "
              f"GD step = Newton step with damping lr*lambda_0 = {p32['newton_step_size']:.4g} (rel. err {p32['gd_vs_newton_rel_err']:.1e})")
        until = (f"f <= {cfg['LOSS_TARGET']:g}" if div["diverged_at_step_teleport"] is None
                 else f"it diverged at step {div['diverged_at_step_teleport']}")
        print(f"Prop 3.5/C.3: after the teleport |ratio - 1| <= {p35['max_abs_ratio_minus_1_after_teleport_until_target']:.1e} "
              f"until {until}; without teleport ratio in [{p35['min_ratio_no_teleport']:.4f}, "
              f"{p35['max_ratio_no_teleport']:.4f}]; in floating point it departs by 1e-6 after "
              f"{p35['gd_steps_after_teleport_until_ratio_departs_1e-6']} more steps (f = {p35['loss_when_ratio_departs']})")
    ends = [f"{arm} never: diverged at step {at} (f > {DIVERGED_ABOVE:g} f(start))" if at is not None
            else f"{arm} {hit}" if hit is not None else f"{arm} not within {cfg['STEPS']}"
            for arm, hit, at in [("no teleport", t31["steps_to_target_no_teleport"], div["diverged_at_step_no_teleport"]),
                                 ("teleport", t31["steps_to_target_teleport"], div["diverged_at_step_teleport"])]]
    print(f"Thm 3.1: steps to f <= {cfg['LOSS_TARGET']:g}: {', '.join(ends)}")


def main(cfg):
    if not cfg["FUNCTIONS"]:
        raise UsageError(f"FUNCTIONS is empty; known: {', '.join(quadratic.FUNCTIONS)}")
    for name in cfg["FUNCTIONS"]:
        check_choice("function", name, quadratic.FUNCTIONS)
    for key in ("STEPS", "LOSS_TARGET", "TELEPORT_LR", "TELEPORT_MAX_STEPS", "CONTOUR_GRID", "FIG_DPI"):
        check_positive(key, cfg[key], allow_zero=False)
    if cfg["CONTOUR_GRID"] < 2:
        raise UsageError(f"CONTOUR_GRID must be >= 2, got {cfg['CONTOUR_GRID']}")
    runs = {name: with_preset(cfg, PRESETS, "FUNCTION", name) for name in cfg["FUNCTIONS"]}  # presets fill only None
    for name, fcfg in runs.items():  # every refusal before any work
        check_settings(fcfg, name)
        if not cfg["REPLACE"]:  # results of other settings are replaced only when asked
            check_replace(os.path.join(cfg["OUT_DIR"], "results", "quadratic", f"{name}.json"), saved_config(fcfg, name))
    results = {}
    with staged(cfg["OUT_DIR"]) as stage:  # the outputs replace the previous ones only when all are written
        fig_dir, res_dir = experiment_dirs("quadratic", stage)
        for name, fcfg in runs.items():
            out = experiment(fcfg, name)
            report(out, fcfg)
            save_json(f"{res_dir}/{name}.json", {"config": saved_config(fcfg, name), "environment": environment(), **out})
            plot_trajectories(get_function(name), out, f"{fig_dir}/{name}_trajectories.png", fcfg["CONTOUR_GRID"], fcfg["FIG_DPI"])
            plot_curves(get_function(name), out, fig_dir, fcfg["FIG_DPI"], fcfg["LOSS_TARGET"], fcfg["STEPS"])
            results[name] = out
    return results


if __name__ == "__main__":
    run(main, globals(), on_interrupt=lambda cfg: "a run takes seconds and saves nothing to resume; run it again")
