"""Beyond the paper: which landscape measures survive an exact symmetry. A positive rescaling of
the hidden neurons of a (Leaky)ReLU network, W_m <- diag(alpha) W_m, W_{m+1} <- W_{m+1}
diag(alpha)^-1, leaves the function unchanged on every input, so a measure of the minimum that
moves under it describes the parametrisation, not the function the network computes (Dinh et
al. 2017 make this argument for sharpness). This script measures how far each measure moves.

    python rescaling_invariance.py            # the committed run: 20 models per activation
    python rescaling_invariance.py --quick    # a smoke run, seconds

Protocol: N_MODELS 784-16-10-10 MLPs per activation (LeakyReLU 0.1 and ReLU), trained as in
Table 1 (correlation.py: SGD lr 0.01, batch 20, 40 epochs, seeds (i + 1) * 54321) on MNIST (the
bundled 4,000/1,000-image subset where the full set is absent). Then, in float64, each model is
moved (a) by random exact rescalings, log alpha ~ N(0, s^2) per hidden neuron for each s of
RESCALE_SIZES, and (b) by a rescaling teleport that climbs log ||grad L||^2 (lib.teleport with
RescaleAction, TELE_STEPS steps of TELE_LR). Checked: the largest change of any output (logit)
on the test set. Measured before and after on one fixed batch of METRIC_BATCH training images,
with the same random numbers before and after (directions, Lie-algebra elements, probe vectors,
start points): the loss, ||grad L||^2, phi (eq. 4, sphere directions, the Table 1 displacement
grid) and phi - L(w), psi (eq. 5, exact and the authors' convention; eq. (54) needs an invertible
activation: LeakyReLU only), the
top Hessian eigenvalue (Lanczos), the Hessian trace (Hutchinson) and adaptive sharpness (Kwon et
al. 2021; Andriushchenko et al. 2023: worst and average case; lib/hessian.py). Reported: the
relative change |m' - m| / |m| per model, its median and maximum over the models.

CPU runtime (2 shared cores, one torch thread): 47 s CPU, 2 min 27 s wall at load average 9
(training about 2/3 of it). --quick: seconds.
Headline (results/invariance/MNIST_table.md): every transformation leaves every test-set logit
within 7e-14 (float64). Adaptive sharpness moves by at most 3e-14 relative, rounding like the
loss itself; everything else moves. Under the teleport (||grad L||^2 x 2.4, median, LeakyReLU)
phi - L(w) moves by a median 62%, psi by 14%, the top eigenvalue by 150%, the trace by 81%;
under random rescalings with s = 2 phi - L(w), the top eigenvalue and the trace by factors of
10^3 and more, psi by 68% (phi itself only by 26%: it is
mostly L(w)).

Outputs: under OUT_DIR, results/invariance/<dataset>.json (config, environment, data, per
activation: the per-model values of every measure before and after each transformation, their
relative changes with median and max, the output change, the teleport record) and
<dataset>_table.md; figures/invariance/<dataset>_relative_change.png (median and max relative
change per measure and transformation, log scale). They replace the previous set only when all
are written; results made with other settings are not replaced without --replace. While a run is
unfinished, OUT_DIR/.progress/invariance-<dataset>.pt (the same command resumes).
"""
import os

import numpy as np
import torch

from lib.actions import RescaleAction
from lib.config import UsageError, check_choice, check_positive, run
from lib.data import load
from lib.hessian import adaptive_sharpness, hessian_trace, top_eigenvalue
from lib.io import (check_replace, environment, experiment_dirs, load_results, save_json, save_text, saved_config,
                    staged)
from lib.metrics import grad_norm_sq, psi, random_directions, random_lie_elements, sharpness
from lib.models import activation, forward, loss_fn
from lib.plots import save_figure
from lib.progress import Checkpoint
from lib.report import markdown_table
from lib.teleport import make_objective, teleport
from lib.train import make_model

# ---- config (override any with --NAME=value) ----------------------------------------------
DATASET = "MNIST"                    # MNIST or FashionMNIST (784 inputs; the bundled subset for MNIST)
ACTIVATIONS = ["leaky_relu", "relu"]  # leaky_relu (slope 0.1) and/or relu; psi needs leaky_relu
N_MODELS = 20                        # models per activation; model i is seeded (i + 1) * SEED_BASE
SEED_BASE = 54321                    # Table 1's seed multiplier
WIDTHS = [784, 16, 10, 10]           # layer widths d_0, ..., d_L (Table 1's MNIST preset)
EPOCHS = 40                          # SGD training epochs (Table 1's protocol)
BATCH_SIZE = 20                      # SGD mini-batch, fixed sequential order
LR = 0.01                            # SGD learning rate (Table 1's MNIST preset)
TRAIN_SIZE = 50000                   # training images (all of them when fewer exist)
METRIC_BATCH = 500                   # training images every measure (and the teleport) uses, <= 784 (eq. 54)
RESCALE_SIZES = [0.1, 0.5, 2.0]      # std s of log alpha per hidden neuron, one random rescaling per s
TELE_STEPS = 10                      # ascent steps of the rescaling teleport
TELE_LR = 0.3                        # its step size on log ||grad L||^2 (0.3: ||grad L||^2 x 2-5)
T_START = 0.001                      # phi's displacements T_START + T_STEP * i (Table 1's MNIST grid)
T_STEP = 0.01                        # step of that grid
T_COUNT = 20                         # displacements and sphere directions of phi
PSI_DRAWS = 10                       # draws of Lie-algebra elements (one M per pair) for psi
LANCZOS_ITERS = 20                   # Hessian-vector products of the top-eigenvalue Lanczos run (at most)
TRACE_SAMPLES = 20                   # Rademacher vectors of the Hutchinson trace
ASAM_RHO = 0.05                      # adaptive sharpness radius: delta = |w| * u, ||u|| <= rho (worst), u ~ N(0, rho^2) (average)
ASAM_STEPS = 10                      # ascent steps of the worst-case adaptive sharpness
ASAM_SAMPLES = 10                    # random draws of the average-case adaptive sharpness
SEED = 0                             # the metric batch, rescalings and every measure's random numbers
PLOT_ONLY = False                    # redraw the figure and table from the saved JSON
DATA_DIR = "data"                    # folder in torchvision's layout
DEVICE = "cpu"                       # cpu, cuda or auto
OUT_DIR = "."                        # figures/invariance/ and results/invariance/ go under it
PROGRESS = True                      # tqdm bars
FIG_DPI = 200                        # PNG resolution (dots per inch)
CHECKPOINT_S = 30.0                  # save progress after at most this many seconds of work
REPLACE = False                      # True: replace saved results made with other settings
# -------------------------------------------------------------------------------------------
QUICK_SETTINGS = dict(N_MODELS=3, EPOCHS=1, TRAIN_SIZE=200, METRIC_BATCH=40, TELE_STEPS=3, PSI_DRAWS=2,
                      LANCZOS_ITERS=5, TRACE_SAMPLES=3, ASAM_STEPS=2, ASAM_SAMPLES=2, FIG_DPI=60)
MEASURES = {"loss": "loss L(w) (control)", "grad_norm": "||grad L||^2 (the teleport's objective)",
            "phi": "phi, eq. (4)", "phi_excess": "phi - L(w)", "psi": "psi, eq. (5)",
            "psi_authors": "psi, the authors' convention",
            "top_eigenvalue": "top Hessian eigenvalue", "hessian_trace": "Hessian trace (Hutchinson)",
            "asam_worst": "adaptive sharpness, worst case", "asam_average": "adaptive sharpness, average case"}
TICKS = {"loss": "loss L(w)", "grad_norm": "||grad L||^2", "phi": "phi", "phi_excess": "phi - L(w)",
         "psi": "psi, exact", "psi_authors": "psi, authors'", "top_eigenvalue": "top eigenvalue",
         "hessian_trace": "Hessian trace", "asam_worst": "adaptive, worst", "asam_average": "adaptive, average"}


def transformed(cfg, W, X, Y, act):
    """{name: weights} of the exact rescalings of W (float64, (K, out, in) each) and the
    teleport's record: 'random s=...' draws log alpha ~ N(0, s^2) per model and hidden neuron;
    'teleport' climbs log ||grad L||^2 on (X, Y) by gradient ascent on log alpha."""
    gen, action, out = torch.Generator().manual_seed(cfg["SEED"] + 1), RescaleAction(), {}
    for s in cfg["RESCALE_SIZES"]:
        a = [s * torch.randn(shape, generator=gen, dtype=W[0].dtype).to(W[0].device)
             for shape in action.algebra_shapes(W)]
        out[f"random s={s:g}"] = action(W, a)
    new, rec, _ = teleport(W, X, Y, act, make_objective("log_grad_norm", act), action, cfg["TELE_STEPS"],
                           cfg["TELE_LR"])
    out["teleport"] = new
    return out, rec


def measures(cfg, W, X, Y, act):
    """Every measure of MEASURES per model, (K,) float64 on the CPU; each measure draws its random
    numbers from its own generator seeded SEED, so two weight sets see the same numbers."""
    gen = lambda: torch.Generator().manual_seed(cfg["SEED"])  # noqa: E731
    ts = [cfg["T_START"] + cfg["T_STEP"] * i for i in range(cfg["T_COUNT"])]
    W = [w.detach() for w in W]
    m = {"loss": loss_fn(W, X, Y, act).detach(),
         "grad_norm": grad_norm_sq([w.clone().requires_grad_() for w in W], X, Y, act).detach(),
         "phi": sharpness(W, X, Y, act, ts, random_directions(W, len(ts), "sphere", gen())).detach()}
    m["phi_excess"] = m["phi"] - m["loss"]
    for k, convention in (("psi", "exact"), ("psi_authors", "authors")):
        if act.slope:  # eq. (54) inverts the activation
            g = gen()
            Ms = [random_lie_elements(W, g) for _ in range(cfg["PSI_DRAWS"])]
            m[k] = psi(W, X, act, Ms, convention=convention).detach()
        else:
            m[k] = torch.full_like(m["loss"], float("nan"))
    m["top_eigenvalue"] = top_eigenvalue(W, X, Y, act, iters=cfg["LANCZOS_ITERS"], generator=gen())
    m["hessian_trace"], m["hessian_trace_se"] = hessian_trace(W, X, Y, act, samples=cfg["TRACE_SAMPLES"],
                                                              generator=gen(), return_se=True)
    for kind in ("worst", "average"):
        m[f"asam_{kind}"] = adaptive_sharpness(W, X, Y, act, cfg["ASAM_RHO"], kind=kind, steps=cfg["ASAM_STEPS"],
                                               samples=cfg["ASAM_SAMPLES"], generator=gen())
    return {k: v.double().cpu() for k, v in m.items()}


def relative_change(before, after):
    """|after - before| / |before| per model (nan where before is 0 or either is not finite)."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, np.abs(a - b) / np.abs(b), np.nan)


def summary(values):
    """Median and max over the models of a (K,) array, ignoring nan (both None when all nan)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return {"median": float(np.median(v)), "max": float(v.max())} if len(v) else {"median": None, "max": None}


def study(cfg, data, act_name, ckpt):
    """Train the models of one activation (resumable), move them by every transformation, and
    measure: {"train", "output_change", "teleport", "before", "after", "relative_change"}."""
    if (done := ckpt.unit(act_name)) is not None:
        return done
    act, unit = activation(act_name), f"{act_name} training"
    if (trained := ckpt.unit(unit)) is None:
        seeds = [(i + 1) * cfg["SEED_BASE"] for i in range(cfg["N_MODELS"])]
        W, opt = make_model(cfg["WIDTHS"], seeds, "sgd", cfg["LR"], cfg["DEVICE"])
        hist = ckpt.fit(unit, W, opt, data, act, cfg["EPOCHS"], cfg["BATCH_SIZE"], desc=f"{act_name} train",
                        progress=cfg["PROGRESS"])
        trained = ckpt.finish_unit(unit, {"W": [w.detach().cpu() for w in W], "seeds": seeds,
                                          "val_loss": hist["test_loss"][-1], "val_acc": hist["test_acc"][-1]})
    W = [w.to(cfg["DEVICE"], torch.float64) for w in trained["W"]]
    idx = torch.randperm(data.x_train.shape[0], generator=torch.Generator().manual_seed(cfg["SEED"]))
    idx = idx[:cfg["METRIC_BATCH"]].to(data.x_train.device)
    X, Y, Xte = data.x_train[idx].double(), data.y_train[idx], data.x_test.double()
    moved, tele = transformed(cfg, W, X, Y, act)
    out0 = forward(W, Xte, act)
    before = measures(cfg, W, X, Y, act)
    res = {"train": {k: trained[k] for k in ("seeds", "val_loss", "val_acc")}, "output_change": {},
           "teleport": {k: tele[k] for k in ("objective_before", "objective_after", "algebra_norm")},
           "before": {k: v.tolist() for k, v in before.items()}, "after": {}, "relative_change": {}}
    for name, V in moved.items():
        change = (forward(V, Xte, act) - out0).abs().flatten(1).amax(1)
        after = measures(cfg, V, X, Y, act)
        rel = {k: relative_change(before[k], after[k]) for k in MEASURES}
        res["output_change"][name] = {"per_model": change.tolist(), "max": change.max().item(),
                                      "relative_max": (change / out0.abs().flatten(1).amax(1)).max().item()}
        res["after"][name] = {k: v.tolist() for k, v in after.items()}
        res["relative_change"][name] = {k: {"per_model": r.tolist(), **summary(r)} for k, r in rel.items()}
    return ckpt.finish_unit(act_name, res)


def cell(s):
    return "n/a" if s["median"] is None else f"{s['median']:.2g} / {s['max']:.2g}"


def table(res):
    """Markdown: per activation, one row per measure, per transformation the median / max
    relative change over the models; the output change and the teleport's gain above."""
    parts = [f"# Relative change |m' - m| / |m| of each measure under exact rescalings: median / max over "
             f"the {res['config']['N_MODELS']} models ({res['label']})\n"]
    for act_name, r in res["activations"].items():
        names = list(r["relative_change"])
        rows = [["max abs. change of any test-set logit"] + [f"{r['output_change'][n]['max']:.1g}" for n in names]]
        rows += [[MEASURES[k]] + [cell(r["relative_change"][n][k]) for n in names] for k in MEASURES]
        gain = np.asarray(r["teleport"]["objective_after"]) - np.asarray(r["teleport"]["objective_before"])
        parts.append(f"## {act_name}\n\n" + markdown_table(["measure", *names], rows)
                     + f"\n\nTeleport: log ||grad L||^2 up by {np.median(gain):.3g} (median; ||grad L||^2 x "
                     f"{np.exp(np.median(gain)):.3g}).\n")
    c = res["config"]
    parts.append(f"Random s: log alpha ~ N(0, s^2) per hidden neuron. Measured in float64 on {c['METRIC_BATCH']} "
                 f"training images with the same random numbers before and after; adaptive sharpness rho = "
                 f"{c['ASAM_RHO']}; psi needs an invertible activation (n/a for ReLU).\n")
    return "\n".join(parts)


def plot(res, path, dpi):
    """Median (bar) and max (tick) relative change per measure, one panel per activation, log scale."""
    import matplotlib.pyplot as plt
    acts = list(res["activations"])
    fig, axes = plt.subplots(1, len(acts), figsize=(6.5 * len(acts), 4.2), squeeze=False)
    for ax, act_name in zip(axes[0], acts):
        rc = res["activations"][act_name]["relative_change"]
        names, keys = list(rc), [k for k in MEASURES if k != "grad_norm"]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            x = np.arange(len(keys)) + (i - (len(names) - 1) / 2) * width
            med = [max(rc[n][k]["median"] or np.nan, 1e-17) for k in keys]
            top = [max(rc[n][k]["max"] or np.nan, 1e-17) for k in keys]
            ax.bar(x, med, width, label=n, color=f"C{i}")
            ax.plot(x, top, "_", color="k", ms=6)
        ax.set_yscale("log")
        ax.set_ylim(1e-17, None)
        ax.axhline(1e-12, color="0.6", lw=0.8, ls=":")
        ax.set_xticks(np.arange(len(keys)), [TICKS.get(k, k) for k in keys],
                      rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("relative change (bar: median, tick: max)")
        ax.set_title(f"{act_name}: {res['label']}, {res['config']['N_MODELS']} models", fontsize=9)
        ax.legend(fontsize=7, title="exact rescaling", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)


def main(cfg):
    check_choice("dataset", cfg["DATASET"], ["MNIST", "FashionMNIST"])
    for a in cfg["ACTIVATIONS"]:
        activation(a)  # UsageError for an unknown one
    for k in ("N_MODELS", "EPOCHS", "BATCH_SIZE", "TRAIN_SIZE", "METRIC_BATCH", "T_COUNT", "PSI_DRAWS",
              "LANCZOS_ITERS", "TRACE_SAMPLES", "ASAM_SAMPLES", "FIG_DPI"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    for k in ("TELE_STEPS", "TELE_LR", "ASAM_RHO", "ASAM_STEPS", "CHECKPOINT_S"):
        check_positive(k.lower(), cfg[k])
    check_positive("lr", cfg["LR"], allow_zero=False)
    w = cfg["WIDTHS"]
    if not (isinstance(w, list) and len(w) >= 3 and all(isinstance(d, int) and d > 0 for d in w)):
        raise UsageError(f"--widths: expected a list of at least 3 positive layer widths "
                         f"(input, hidden..., classes), got {w!r}")
    for s in cfg["RESCALE_SIZES"]:
        check_positive("rescale_sizes", s, allow_zero=False)
    name = cfg["DATASET"]
    fig_path = os.path.join("figures", "invariance", f"{name}_relative_change.png")
    res_path = os.path.join("results", "invariance", f"{name}.json")
    if cfg["PLOT_ONLY"]:
        res = load_results(os.path.join(cfg["OUT_DIR"], res_path))
        plot(res, os.path.join(cfg["OUT_DIR"], fig_path), cfg["FIG_DPI"])
        print(md := table(res))
        return md
    if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small MLPs: launch-bound, one thread is steadier on shared cores
    data = load(name, cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
    saved = saved_config(cfg)
    check_replace(os.path.join(cfg["OUT_DIR"], res_path), saved, data=data)
    ckpt = Checkpoint(cfg, f"invariance-{name}")
    res = {"config": saved, "environment": environment(), "data": data.info, "label": data.label,
           "activations": {a: study(cfg, data, a, ckpt) for a in cfg["ACTIVATIONS"]}}
    with staged(cfg["OUT_DIR"]) as out:
        experiment_dirs("invariance", out)
        save_json(os.path.join(out, res_path), res)
        save_text(os.path.join(out, "results", "invariance", f"{name}_table.md"), md := table(res))
        plot(res, os.path.join(out, fig_path), cfg["FIG_DPI"])
    ckpt.finish()
    print(md)
    return md


if __name__ == "__main__":
    run(main, globals())
