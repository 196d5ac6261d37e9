"""Exact positive-rescaling teleportation vs the GL(h) teleport of eq. (46) (not a paper figure: the
course project's claim that the rescaling symmetry beats the paper's GL action).

(Leaky)ReLU is positively homogeneous, so W_m <- diag(e^{a_m}) W_m, W_{m+1} <- W_{m+1} diag(e^{-a_m}) on
every hidden layer m leaves the function unchanged on *every* input (G-SGD, Meng et al. 2019); the
teleport climbs ||grad L||^2 (Section 5.1, Algorithm 1's inner loop) by gradient ascent on the a_m.
Eq. (46) needs a pseudo-inverse of the activations and keeps the loss only on the teleport batch, and
only when that batch is no larger than the hidden widths (here 200 > 16, so it drifts even there).
Arms (same initial weights and teleport batches): none; reset-only (optimizer state reset at the
teleport moments, no teleport: a control); gl46 (eq. (46) on every layer pair, g = I + T, the
authors'); gl46-last (on (W_3, W_2) only, the authors' restriction); rescale (every hidden layer).
Protocol: MNIST 784-16-10-10 without biases, ReLU and LeakyReLU(0.1), SGD and Adagrad at lr 1e-2, 5
seeds, batches of 20 in order, 20 epochs; before each of the first 8 mini-batches of epochs 0 and 2, a
teleport on a fresh random batch of 200 images (10 ascent steps on log ||grad L||^2: plain ascent runs
away on both orbits), then the optimizer state is reset (the authors' code). A model's teleport is
undone (counted) if it makes ||grad L||^2 or the weights non-finite or moves its teleport-batch loss by
> 10 % (REJECT_DRIFT). Step sizes tuned per action by tune_rescaling_step_sizes.py (results/rescaling/
*sweep*.json): gl46 1e-3, gl46-last 1e-3, rescale 1e-2 (of 1e-3 ... 1). Results of other settings are
not replaced without --replace; an interrupted run resumes; a model whose loss turns non-finite or
> 1e6 is recorded as diverged and left out of means, gains and drifts (counted) and the drift figure.

    python teleport_relu_rescaling.py                                 # the protocol
    python teleport_relu_rescaling.py --widths=[784,128,64,10]        # the wider network
    python teleport_relu_rescaling.py --tag=big-steps --tele-lr-gl46=3e-3 --tele-lr-gl46-last=3e-3 \\
        --tele-lr-rescale=3e-2                                        # the big-steps variant (3x)
    python teleport_relu_rescaling.py --plot-only ...                 # redraw the figures from results
    python tune_rescaling_step_sizes.py ...                           # the step-size sweep

Outputs: under OUT_DIR, figures/rescaling/<tag>_<activation>_<optimizer>_{loss,drift}.png,
results/rescaling/<tag>_<activation>_<optimizer>.json (config, environment, data, per arm the
curves, every teleport's record, the epoch each diverged model diverged at, a summary) and
results/rescaling/<tag>_table.{json,md} (<tag>: dataset, plus the widths when not the preset's, plus
TAG), replacing the previous set only when complete (progress in OUT_DIR/.progress/). --plot-only
redraws the figures and prints the table, and writes nothing else.

CPU runtime (2 cores, load ~14; 4,000-image MNIST subset): ~5 min per activation, 784-128-64-10 ~17
min (one torch thread unless OMP_NUM_THREADS is set: launch-bound); --quick: 26 s CPU, 48-55 s wall.
Headline (mnist5k): rescaling is exact (test-set drift <= 3.4e-7, float32 round-off) where GL(46)
drifts it by a median 3e-6 ... 3e-4 (max 3.5e-2) and takes 2-3x longer per teleport; at the tuned step
sizes it gives the lowest mean training loss after 20 epochs in 3 of 4 settings, but by less than the
seed-to-seed spread of the paired difference, and on Adagrad most of any gain is the optimizer reset.
"""
import math
import os

import numpy as np
import torch

from lib.actions import GLAction, RescaleAction, group_element
from lib.arms import Arm, ArmHook, Moments
from lib.config import UsageError, check_choice, check_positive, run
from lib.data import load
from lib.io import (check_replace, environment, experiment_dirs, load_results, save_json, save_text, saved_config,
                    staged)
from lib.models import ACTIVATIONS as ACTIVATION_CHOICES, activation
from lib.optim import OPTIMIZERS as OPTIMIZER_CHOICES, check_strategy
from lib.plots import COLORS, plot_mean_std, save_figure
from lib.progress import Checkpoint
from lib.report import cut_diverged, diverged_arms, finite_stats, format_row, markdown_table
from lib.teleport import make_objective
from lib.train import make_model

# ---- config ---------------------------------------------------------------------------------
DATASET = "MNIST"              # MNIST, FashionMNIST or CIFAR10
WIDTHS = None                  # layer widths d_0..d_L, e.g. [784,128,64,10] (None: the dataset's preset)
ACTIVATIONS = ["relu", "leaky_relu"]  # hidden activations to run: relu, leaky_relu (slope 0.1)
OPTIMIZERS = ["sgd", "adagrad"]  # optimizers to run (lib.optim names)
LR = 1e-2                      # learning rate of every optimizer
ARMS = ["none", "reset-only", "gl46", "gl46-last", "rescale"]  # none, reset-only, gl46, gl46-last, rescale
SEEDS = [0, 1, 2, 3, 4]        # initialisation seeds, trained as one batched model per arm
EPOCHS = 20                    # training epochs
BATCH_SIZE = 20                # mini-batch size, batches in sequential order
TRAIN_SIZE = 50000             # training images (all available if fewer: mnist5k has 4,000)
SPLIT_SEED = 0                 # seed of the training subset
TELE_EPOCHS = [0, 2]           # teleport at the start of these epochs (0-based)
TELE_BATCHES = 8               # teleports per teleport epoch, before mini-batches 0..TELE_BATCHES-1
TELE_BATCH_SIZE = 200          # images per teleport batch (a second batch measures held-out drift)
TELE_STEPS = 10                # gradient-ascent steps per teleport
OBJECTIVE = "log_grad_norm"    # ascent on log ||grad L||^2 (steps relative to ||grad L||^2) or grad_norm
TELE_LR_GL46 = 1e-3            # ascent step size of the gl46 arm (tuned: tune_rescaling_step_sizes.py)
TELE_LR_GL46_LAST = 1e-3       # ascent step size of the gl46-last arm (tuned)
TELE_LR_RESCALE = 1e-2         # ascent step size of the rescale arm (tuned)
GL_GROUP = "first_order"       # GL element from T: first_order (g = I + T, the authors') or exp
REJECT_DRIFT = 0.1             # undo a model's teleport if its loss on the teleport batch moved more (relative)
OPT_STATE = "reset"            # optimizer state after a teleport: reset, keep or transport
TELE_SEED = 2024               # seed of the teleport batches (the same in every arm)
REPORT_EPOCHS = [1, 5, 20]     # epochs (1-based) whose losses go into the table
PLOT_ONLY = False              # redraw the figures from saved results (the table is printed, not rewritten)
DATA_DIR = "data"              # folder in torchvision's layout
DEVICE = "cpu"                 # cpu, cuda or auto
OUT_DIR = "."                  # figures/ and results/ go under this folder
TAG = ""                       # extra name for the output files of a variant run, e.g. "big-steps"
PROGRESS = True                # tqdm progress bars
FIG_DPI = 150                  # resolution of the PNG figures
CHECKPOINT_S = 30.0            # save progress after at most this many seconds of work (0: every epoch)
REPLACE = False                # True: replace saved results made with other settings or data
# ---------------------------------------------------------------------------------------------
PRESETS = {"DATASET": {"MNIST": {"WIDTHS": [784, 16, 10, 10]}, "FashionMNIST": {"WIDTHS": [784, 16, 10, 10]},
                       "CIFAR10": {"WIDTHS": [3072, 16, 10, 10]}}}
QUICK_SETTINGS = {"TRAIN_SIZE": 500, "EPOCHS": 3, "SEEDS": [0, 1], "TELE_BATCHES": 2, "TELE_BATCH_SIZE": 40,
                  "TELE_STEPS": 3, "REPORT_EPOCHS": [1, 3], "FIG_DPI": 50}

EXPERIMENT = "rescaling"
ACTIONS = {"gl46": lambda group: GLAction(46, group),                  # eq. (46), all pairs
           "gl46-last": lambda group: GLAction(46, group, pairs=[-1]),  # eq. (46), (W_L, W_{L-1})
           "rescale": lambda group: RescaleAction()}                   # every hidden layer
TELE_LR_SETTING = {"gl46": "TELE_LR_GL46", "gl46-last": "TELE_LR_GL46_LAST", "rescale": "TELE_LR_RESCALE"}
ARM_NAMES = ("none", "reset-only", *ACTIONS)
OBJECTIVES = ("log_grad_norm", "grad_norm")
FLOOR = 1e-10                   # drift plotted at this floor where it is exactly 0 (log scale)
ALL_DIVERGED = "nothing finite to draw: every seed diverged"
ARM_COLORS = {arm: COLORS["baseline" if arm == "none" else arm] for arm in ARM_NAMES}


def check_protocol(cfg):
    """Checks of the settings this script shares with tune_rescaling_step_sizes.py."""
    choices = [("activation", ACTIVATION_CHOICES, a) for a in cfg["ACTIVATIONS"]] + [("objective", OBJECTIVES,
               cfg["OBJECTIVE"])] + [("optimizer", OPTIMIZER_CHOICES, o) for o in cfg["OPTIMIZERS"]]
    for kind, allowed, name in choices:
        check_choice(kind, name, allowed)
    group_element(torch.zeros(1, 1, 1), cfg["GL_GROUP"])
    check_positive("learning rate", cfg["LR"])
    for name in ("BATCH_SIZE", "TELE_BATCH_SIZE", "TRAIN_SIZE", "TELE_BATCHES", "TELE_STEPS", "REJECT_DRIFT"):
        check_positive(name.lower(), cfg[name], allow_zero=name in ("TELE_BATCHES", "TELE_STEPS", "REJECT_DRIFT"))
    if not cfg["SEEDS"]:
        raise UsageError("SEEDS is empty")
    if len(widths := cfg["WIDTHS"]) < 3 or any(int(w) != w or w < 1 for w in widths):
        raise UsageError(f"WIDTHS must list >= 3 positive integers (at least one hidden layer), got {widths}")
    if not all(c.isalnum() or c in "-." for c in cfg["TAG"]):
        raise UsageError(f"TAG may hold letters, digits, '-' and '.', got {cfg['TAG']!r}")
    check_strategy(cfg["OPT_STATE"])


def validate(cfg):
    check_protocol(cfg)
    for name in cfg["ARMS"]:
        check_choice("arm", name, ARM_NAMES)
    check_positive("epochs", cfg["EPOCHS"], allow_zero=False)
    for setting in ("CHECKPOINT_S", *TELE_LR_SETTING.values()):
        check_positive(setting.lower(), cfg[setting])


def tag_of(cfg):
    """Output name: the dataset, plus the widths when not the dataset's preset, plus TAG."""
    widths, tag = cfg["WIDTHS"], cfg["DATASET"]
    tag += "" if widths == PRESETS["DATASET"][tag]["WIDTHS"] else f"_w{'-'.join(map(str, widths[1:-1]))}"
    return f"{tag}_{cfg['TAG']}" if cfg["TAG"] else tag


def load_data(cfg):
    """The run's data; on a CPU, unless OMP_NUM_THREADS says otherwise, one torch thread (a
    784-16-10-10 MLP at batch 20 is launch-bound: one thread is fastest)."""
    if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"], cfg["SPLIT_SEED"])
    if data.x_train.shape[1] != cfg["WIDTHS"][0]:
        raise UsageError(f"WIDTHS[0] = {cfg['WIDTHS'][0]} but {cfg['DATASET']} images have "
                         f"{data.x_train.shape[1]} values")
    return data


def make_arm(cfg, name, act, tele_lr=None):
    """The arm `name`: the baseline, the reset-only control, or a teleport by the action `name` at
    step size tele_lr (None: its TELE_LR_* setting), guarded by REJECT_DRIFT (lib.arms.Arm)."""
    if name in ("none", "reset-only"):
        return Arm(name, "none", cfg["OPT_STATE"]) if name == "reset-only" else Arm("none")
    return Arm(name, "teleport", cfg["OPT_STATE"], guard=cfg["REJECT_DRIFT"],
               teleport=dict(objective=make_objective(cfg["OBJECTIVE"], act), action=ACTIONS[name](cfg["GL_GROUP"]),
                             steps=cfg["TELE_STEPS"], lr=cfg[TELE_LR_SETTING[name]] if tele_lr is None else tele_lr))


def with_grad_norms(rec, objective):
    """rec plus grad_norm_before/after: ||grad L||^2 on the teleport batch per model (the exp of the
    objective for log_grad_norm, in float64)."""
    for k in ("before", "after"):
        if f"objective_{k}" in rec:
            v = torch.tensor(rec[f"objective_{k}"], dtype=torch.float64)
            rec[f"grad_norm_{k}"] = (v.exp() if objective == "log_grad_norm" else v).tolist()
    return rec


def run_arm(cfg, ckpt, unit, name, data, act_name, optimizer, epochs, tele_lr=None):
    """Train len(SEEDS) models of one arm as one batched model, the unit `unit` of ckpt (a finished
    unit is not run again, an interrupted one resumes). Returns (history, teleport records: one per
    moment with test_loss_before/after and `failed` per model; [] for an arm that does not teleport)."""
    if (done := ckpt.unit(unit)) is not None:
        return done["history"], done["teleports"]
    arm = make_arm(cfg, name, act := activation(act_name), tele_lr)
    W, opt = make_model(cfg["WIDTHS"], cfg["SEEDS"], optimizer, cfg["LR"], cfg["DEVICE"])
    moments = Moments(tuple(cfg["TELE_EPOCHS"]), cfg["TELE_BATCHES"], cfg["TELE_BATCH_SIZE"], cfg["TELE_SEED"])
    hook = ArmHook(W, opt, data, act, [arm], moments, test_drift=arm.move == "teleport")
    hist = ckpt.fit(unit, W, opt, data, act, epochs, cfg["BATCH_SIZE"], hook=hook, desc=unit,
                    progress=cfg["PROGRESS"])
    recs = [with_grad_norms(r, cfg["OBJECTIVE"]) for r in hook.records[name]] if arm.move == "teleport" else []
    ckpt.finish_unit(unit, {"history": hist, "teleports": recs})
    return hist, recs


def diverged_at(hist):
    """Per seed, the first epoch its training or test loss diverged at (lib.report.diverged_arms), or None."""
    return diverged_arms({"": {k: np.asarray(hist[k], dtype=float).T for k in ("train_loss", "test_loss")}})[""]


def ratio(recs, ok, key, drift=False):
    """key_after / key_before for every teleport and model ((n_teleports, K)), |after - before| / before
    with drift; nan where the teleport failed and for the models that diverged (ok: (K,) bool False)."""
    K, bad = len(ok), np.array([r["failed"] for r in recs], dtype=bool) | ~np.asarray(ok, dtype=bool)
    b, a = (np.array([[np.nan if v is None else v for v in r.get(f"{key}_{w}", [np.nan] * K)] for r in recs],
                     dtype=float) for w in ("before", "after"))
    b[bad] = a[bad] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(a - b) / b if drift else a / b


def nanstat(f, x):
    x = np.asarray(x, dtype=float)
    return float(f(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


TELE_STATS = {"grad_gain_median": ("grad_norm", False, np.median), "grad_gain_mean": ("grad_norm", False, np.mean),
              "drift_batch_median": ("loss", True, np.median), "drift_heldout_median": ("heldout_loss", True, np.median),
              "drift_test_median": ("test_loss", True, np.median), "drift_test_max": ("test_loss", True, np.max)}


def summarize(hist, recs, report_epochs):
    """The table's numbers for one arm, over the seeds that did not diverge (diverged_at; their
    number in n_diverged): mean losses at the report epochs and final accuracy, median gain and
    drifts over their successful teleports; the fraction of all teleports undone, mean teleport time."""
    at = diverged_at(hist)
    ok, nan = np.array([e is None for e in at]), float("nan")
    s = {f"{k}_{e}": finite_stats(hist[f"{k}_loss"][e - 1], ok)[0] for k in ("train", "test") for e in report_epochs}
    s.update(test_acc_final=finite_stats(hist["test_acc"][-1], ok)[0], train_time_s=float(hist["time_s"][-1]),
             diverged=at, n_diverged=int((~ok).sum()))
    s.update({name: nanstat(f, ratio(recs, ok, key, drift)) if recs else nan
              for name, (key, drift, f) in TELE_STATS.items()})
    s.update(failed_fraction=float(np.mean([r["failed"] for r in recs])) if recs else nan,
             teleport_time_s=nanstat(np.mean, [r.get("time_s", nan) for r in recs]))
    return s


def subject(res):
    """A figure's subject: the output tag, the data's label (where saved), the activation and optimizer."""
    dataset = res["config"].get("DATASET", "")
    data, variant = res.get("label", dataset), res["tag"].removeprefix(dataset).strip("_")
    return f"{data}{' [' + variant + ']' if variant else ''}, {res['activation']}, {res['optimizer']}"


def log_axis(ax, empty):
    """A log y axis; where no positive finite value is drawn, a fixed span and the note `empty`
    (instead of matplotlib's error)."""
    y = np.concatenate([np.asarray(line.get_ydata(), dtype=float).ravel() for line in ax.lines] or [[]])
    ax.set_yscale("log")
    if not (np.isfinite(y) & (y > 0)).any():
        ax.set_ylim(0.1, 10)
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center")


def plot_loss(res, path, dpi):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for arm, r in res["arms"].items():
        h = r["history"]
        at = diverged_at(h)  # a seed diverged in either curve is cut in both (test: from epoch 0)
        train = cut_diverged(np.asarray(h["train_loss"], dtype=float).T, at)
        test = cut_diverged(np.array([h["test_loss_init"], *h["test_loss"]], dtype=float).T, [e and e + 1 for e in at])
        plot_mean_std(axes[0], np.arange(1, train.shape[1] + 1), train, arm, ARM_COLORS[arm])
        plot_mean_std(axes[1], np.arange(0, test.shape[1]), test, arm, ARM_COLORS[arm])
    for ax, name in zip(axes, ("training loss (mean over the epoch's batches)", "test loss")):
        log_axis(ax, ALL_DIVERGED)
        for e in res["config"]["TELE_EPOCHS"]:
            ax.axvline(e, color="0.8", linestyle=":", linewidth=1)
        ax.set(xlabel="epoch", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    note = "; SGD has no state, so reset-only = none" if res["optimizer"] == "sgd" else ""
    fig.suptitle(f"{subject(res)} (mean ± std over {len(res['config']['SEEDS'])} "
                 f"seeds; dotted: teleport epochs{note})", fontsize=9)
    save_figure(fig, path, dpi)


def plot_drift(res, path, dpi):
    """Per teleport, gain and drifts of every seed (dots; not those of diverged seeds) and their median."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    panels = (("objective", "||grad L||² after / before (teleport batch)"),
              ("loss", "|ΔL| / L on the teleport batch"), ("test_loss", "|ΔL| / L on the test set"))
    for arm, r in res["arms"].items():
        if not (recs := r["teleports"]):
            continue
        x, ok = np.arange(1, len(recs) + 1), [e is None for e in diverged_at(r["history"])]
        for ax, (key, _) in zip(axes, panels):
            y = ratio(recs, ok, "grad_norm") if key == "objective" else np.maximum(ratio(recs, ok, key, True), FLOOR)
            ax.plot(np.repeat(x, y.shape[1]), y.ravel(), ".", color=ARM_COLORS[arm], alpha=0.35, markersize=4)
            lost = f" ({len(ok) - sum(ok)} of {len(ok)} diverged, not drawn)" if not all(ok) else ""
            ax.plot(x, [nanstat(np.median, row) for row in y], "-", color=ARM_COLORS[arm], label=arm + lost)
    for ax, (key, name) in zip(axes, panels):
        ax.set(xlabel="teleport (epochs " + ", ".join(map(str, res["config"]["TELE_EPOCHS"])) + ")", ylabel=name)
        log_axis(ax, ALL_DIVERGED if ax.lines else "no arm teleports")
        if ax.lines:  # some arm teleported
            ax.legend()
    fig.suptitle(f"{subject(res)}: per teleport, dots = seeds, "
                 f"line = median; exact 0 drawn at {FLOOR:g}", fontsize=9)
    save_figure(fig, path, dpi)


def table(cfg, all_res):
    """Printed and saved table rows: one per (activation, optimizer, arm), summarized from the
    curves and records (summarize: the seeds that diverged are left out, and counted)."""
    eps = [e for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]]
    header = (["activation", "optimizer", "arm"] + [f"train@{e}" for e in eps] + [f"test@{e}" for e in eps]
              + ["acc@end %", "‖∇L‖² gain (median)", "drift batch (median)", "drift test (median)",
                 "drift test (max)", "undone %", "teleport s", "train s", "diverged seeds"])
    rows = []
    for res in all_res:
        for arm, r in res["arms"].items():
            s = summarize(r["history"], r["teleports"], eps)
            bad = sorted(e for e in s["diverged"] if e is not None)
            rows.append([res["activation"], res["optimizer"], arm, *(s[f"{k}_{e}"] for k in ("train", "test") for e in eps),
                         *(s[k] for k in ("test_acc_final", "grad_gain_median", "drift_batch_median", "drift_test_median",
                                          "drift_test_max")),
                         100 * s["failed_fraction"], s["teleport_time_s"], s["train_time_s"],
                         f"{len(bad)} of {len(s['diverged'])} (from epoch {bad[0]})" if bad else "0"])
    return header, rows


def train_pair(cfg, ckpt, data, act_name, optimizer, tag):
    """Every arm for one activation and optimizer: the results dict saved per pair."""
    res = {"config": saved_config(cfg), "environment": environment(), "data": data.info, "label": data.label,
           "tag": tag, "widths": cfg["WIDTHS"], "activation": act_name, "optimizer": optimizer, "arms": {}}
    eps = [e for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]]
    for arm in cfg["ARMS"]:
        hist, recs = run_arm(cfg, ckpt, f"{act_name} {optimizer} {arm}", arm, data, act_name, optimizer, cfg["EPOCHS"])
        s = summarize(hist, recs, eps)
        ok = [e is None for e in s["diverged"]]
        res["arms"][arm] = {"history": hist, "teleports": recs, "diverged": s.pop("diverged"), "summary": s}
        last = {k: finite_stats(hist[f"{k}_loss"][-1], ok)[0] for k in ("train", "test")}
        print(format_row({"act": act_name, "opt": optimizer, "arm": arm, **last, "gain": s["grad_gain_median"],
                          "drift_test": s["drift_test_median"], "tele_s": s["teleport_time_s"], "train_s": s["train_time_s"],
                          **({"diverged": f"{s['n_diverged']} of {len(ok)}"} if s["n_diverged"] else {})}), flush=True)
    return res


def main(cfg):
    validate(cfg)
    tag, stem = tag_of(cfg), os.path.join(cfg["OUT_DIR"], "results", EXPERIMENT, tag_of(cfg))
    pairs = [(a, o) for a in cfg["ACTIVATIONS"] for o in cfg["OPTIMIZERS"]]
    if cfg["PLOT_ONLY"]:
        all_res = [load_results(f"{stem}_{a}_{o}.json") for a, o in pairs]
    else:  # saved results of other settings or data are refused (a pair's do not depend on which pairs run)
        outputs = {f"{stem}_{a}_{o}.json": ("ACTIVATIONS", "OPTIMIZERS") for a, o in pairs} | {f"{stem}_table.json": ()}
        check = lambda data=None: [check_replace(p, saved_config(cfg), ig, data=data) for p, ig in outputs.items()]  # noqa: E731
        check()  # the settings first, then (once loaded) the data too
        check(data := load_data(cfg))
        ckpt = Checkpoint(cfg, f"teleport_relu_rescaling-{tag}")
        all_res = [train_pair(cfg, ckpt, data, a, o, tag) for a, o in pairs]
    with staged(cfg["OUT_DIR"]) as out:  # the outputs replace the previous set only when all are written
        fig_dir, res_dir = experiment_dirs(EXPERIMENT, out)
        for res in all_res:
            base = f"{tag}_{res['activation']}_{res['optimizer']}"
            if not cfg["PLOT_ONLY"]:
                save_json(os.path.join(res_dir, base + ".json"), res)
            plot_loss(res, os.path.join(fig_dir, base + "_loss.png"), cfg["FIG_DPI"])
            plot_drift(res, os.path.join(fig_dir, base + "_drift.png"), cfg["FIG_DPI"])
        header, rows = table(all_res[0]["config"], all_res)
        md = markdown_table(header, [[v if not isinstance(v, float) or math.isfinite(v) else "–" for v in row]
                                     for row in rows])
        print(md)
        if not cfg["PLOT_ONLY"]:
            save_json(os.path.join(res_dir, f"{tag}_table.json"),
                      {"config": saved_config(cfg), "environment": environment(), "data": all_res[0]["data"],
                       "header": header, "rows": rows})
            save_text(os.path.join(res_dir, f"{tag}_table.md"), md + "\n")
    if not cfg["PLOT_ONLY"]:
        ckpt.finish()
    return all_res


if __name__ == "__main__":
    run(main, globals())
