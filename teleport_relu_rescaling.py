"""Exact positive-rescaling teleportation vs the GL(h) teleport of eq. (46) (issue 6; not a paper
figure: the course project's claim that the rescaling symmetry beats the paper's GL action).

(Leaky)ReLU is positively homogeneous, sigma(alpha z) = alpha sigma(z) for alpha > 0, so scaling the
incoming weights of hidden neuron i by alpha_i = exp(a_i) and its outgoing weights by 1/alpha_i leaves
the network's function unchanged on *every* input (G-SGD, Meng et al. 2019):
    W_m <- diag(e^{a_m}) W_m,   W_{m+1} <- W_{m+1} diag(e^{-a_m}),   every hidden layer m at once.
The Lie algebra is the diagonal (a_m in R^{d_m}); teleportation climbs ||grad L||^2 (Section 5.1,
Algorithm 1's inner loop) by gradient ascent on a. The GL(h) action of eq. (46) needs a pseudo-inverse
of the activations and preserves the loss only on the teleport batch (and only when the batch is no
larger than the hidden widths; here 200 > 16, so it drifts even there).

Arms (5 seeds each, same initial weights and the same teleport batches in every arm):
  none       no teleport
  reset-only no teleport, but the optimizer state is reset at the teleport moments (a control, added
             here: for Adagrad the reset alone changes the trajectory)
  gl46       eq. (46) on every layer pair, g = I + T (the authors' parametrisation)
  gl46-last  eq. (46) on the last pair (W_3, W_2) only (the authors' original restriction)
  rescale    positive rescaling of every hidden layer, alpha = exp(a)
Protocol: MNIST 784-16-10-10 without biases, ReLU and LeakyReLU(0.1), SGD and Adagrad at lr 1e-2,
batches of 20 in sequential order, 20 epochs; teleport before each of the first 8 mini-batches of
epochs 0 and 2, each on a fresh random batch of 200 training images, 10 ascent steps; optimizer state
reset after each teleport (the authors' code).
Two choices not in the issue, both forced by the measurements (results/rescaling/*sweep*.json):
  * ascent on log ||grad L||^2 (OBJECTIVE): the same direction as on ||grad L||^2, with steps relative
    to ||grad L||^2. Plain ascent on ||grad L||^2 runs away on both orbits (both are unbounded above):
    at any step size that moves the weights, some seeds reach non-finite ||grad L||^2 or training
    losses of 1e6 and more (MNIST_stepsize_sweep_plain_grad_norm_no_drift_guard.json).
  * a guard (REJECT_DRIFT): a model's teleport is undone if it makes ||grad L||^2 or the weights
    non-finite, or moves the loss on its own teleport batch by more than 10 %; the table counts these.
Teleport step sizes, tuned once per action by `--tune=True` (3 epochs, all four activation/optimizer
pairs, lowest mean training loss among step sizes with <= 10 % of teleports undone):
gl46 1e-3, gl46-last 1e-3, rescale 1e-2 (of 1e-3 ... 1). The wider network reuses them.

    python teleport_relu_rescaling.py --data-dir=../shared/data/mnist5k     # the protocol
    python teleport_relu_rescaling.py --widths=[784,128,64,10] ...           # the wider network
    python teleport_relu_rescaling.py --tune=True ...                        # the step-size sweep
    python teleport_relu_rescaling.py --plot-only=True ...                   # redraw from results

Outputs: figures/rescaling/<tag>_<activation>_<optimizer>_{loss,drift}.png,
results/rescaling/<tag>_<activation>_<optimizer>.json, results/rescaling/<tag>_table.{json,md}
(<tag> = dataset, plus the widths when not the default, plus TAG when given).
CPU runtime (2 cores shared with other jobs, load ~14; 4,000-image MNIST subset): the protocol ~5 min
per activation (run as two processes), the sweep ~10 min per process, 784-128-64-10 ~17 min per activation.
Headline (mnist5k): rescaling is exact (test-set drift <= 3.4e-7, float32 round-off) where GL(46)
drifts it by a median 3e-6 ... 3e-4 (max 3.5e-2) and takes 2-3x longer per teleport; at the tuned step sizes it gives the
lowest mean training loss after 20 epochs in 3 of 4 settings, but by less than the seed-to-seed spread
of the paired difference, and on Adagrad most of any gain is the optimizer reset (reset-only control).
"""
import math
import os

import numpy as np
import torch

from lib.actions import GLAction, RescaleAction, group_element
from lib.config import UsageError, check_choice, check_positive, run
from lib.data import check_dataset, load
from lib.models import ACTIVATIONS as _ACTIVATION_CHOICES, activation, evaluate
from lib.optim import OPTIMIZERS as _OPTIMIZER_CHOICES, STRATEGIES as _STRATEGIES
from lib.results import (COLORS as _COLORS, atomic_path, environment, experiment_dirs, format_row, load_json,
                         markdown_table, plot_mean_std, save_figure, save_json)
from lib.teleport import make_objective
from lib.train import TeleportHook, fit, make_model

# ---------------------------------------------------------------------------------------------
DATASET = "MNIST"              # MNIST, FashionMNIST or CIFAR10
WIDTHS = None                  # layer widths d_0..d_L, e.g. [784,128,64,10]; None = DATASET_DEFAULTS
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
TELE_LR = {"gl46": 1e-3, "gl46-last": 1e-3, "rescale": 1e-2}  # ascent step size per action (tuned, --tune)
GL_GROUP = "first_order"       # GL element from T: first_order (g = I + T, the authors') or exp
REJECT_DRIFT = 0.1             # undo a model's teleport if its loss on the teleport batch moved more (relative)
OPT_STATE = "reset"            # optimizer state after a teleport: reset, keep or transport
TELE_SEED = 2024               # seed of the teleport batches (the same in every arm)
REPORT_EPOCHS = [1, 5, 20]     # epochs (1-based) whose losses go into the table
TUNE = False                   # True: run the step-size sweep instead of the protocol
TUNE_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]  # step sizes tried by the sweep
TUNE_MAX_UNDONE = 0.1          # sweep: step sizes with more teleports undone (fraction) are not chosen
TUNE_EPOCHS = 3                # epochs per sweep run (covers the teleports of epochs 0 and 2)
PLOT_ONLY = False              # True: redraw figures and table from saved results, no training
DATA_DIR = "data"              # folder in torchvision's layout (--data-dir)
DEVICE = "cpu"                 # cpu, cuda or auto (--device)
OUT_DIR = "."                  # figures/ and results/ go under this folder
TAG = ""                       # extra name for the output files of a variant run, e.g. "big-steps"
PROGRESS = True                # tqdm progress bars
FIG_DPI = 150                  # resolution of the PNG figures
# ---------------------------------------------------------------------------------------------

DATASET_DEFAULTS = {           # per-dataset defaults
    "MNIST": {"WIDTHS": [784, 16, 10, 10]},
    "FashionMNIST": {"WIDTHS": [784, 16, 10, 10]},
    "CIFAR10": {"WIDTHS": [3072, 16, 10, 10]},
}
_QUICK = {"EPOCHS": 3, "SEEDS": [0, 1], "TELE_BATCHES": 2, "TELE_BATCH_SIZE": 40, "TELE_STEPS": 3,
          "REPORT_EPOCHS": [1, 3], "TUNE_LRS": [1e-2, 1e-1], "TUNE_EPOCHS": 3, "FIG_DPI": 50}
_EXPERIMENT = "rescaling"
_ACTIONS = {"gl46": lambda group: GLAction(46, group),                  # eq. (46), all pairs
           "gl46-last": lambda group: GLAction(46, group, pairs=[-1]),  # eq. (46), (W_L, W_{L-1})
           "rescale": lambda group: RescaleAction()}                   # every hidden layer
_ARM_NAMES = ("none", "reset-only", *_ACTIONS)
_OBJECTIVES = ("log_grad_norm", "grad_norm")
_FLOOR = 1e-10                  # drift plotted at this floor where it is exactly 0 (log scale)


def validate(cfg):
    check_dataset(cfg["DATASET"])
    for name in cfg["ACTIVATIONS"]:
        check_choice("activation", name, _ACTIVATION_CHOICES)
    for name in cfg["OPTIMIZERS"]:
        check_choice("optimizer", name, _OPTIMIZER_CHOICES)
    for name in cfg["ARMS"]:
        check_choice("arm", name, _ARM_NAMES)
    check_choice("optimizer-state strategy", cfg["OPT_STATE"], _STRATEGIES)
    check_choice("objective", cfg["OBJECTIVE"], _OBJECTIVES)
    group_element(torch.zeros(1, 1, 1), cfg["GL_GROUP"])
    check_positive("learning rate", cfg["LR"])
    for name in ("EPOCHS", "BATCH_SIZE", "TELE_BATCH_SIZE", "TRAIN_SIZE", "TUNE_EPOCHS"):
        check_positive(name.lower(), cfg[name], allow_zero=False)
    for name in ("TELE_BATCHES", "TELE_STEPS"):
        check_positive(name.lower(), cfg[name])
    cfg["TELE_LR"] = {**TELE_LR, **cfg["TELE_LR"]}  # an override may name only some actions
    check_positive("reject_drift", cfg["REJECT_DRIFT"])
    for arm in cfg["ARMS"]:
        if arm in _ACTIONS and arm not in cfg["TELE_LR"]:
            raise UsageError(f"TELE_LR has no step size for arm {arm!r}")
    for arm, lr in cfg["TELE_LR"].items():
        check_choice("TELE_LR action", arm, _ACTIONS)
        check_positive(f"teleport step size of {arm}", lr)
    for lr in cfg["TUNE_LRS"]:
        check_positive("tune step size", lr)
    if not cfg["SEEDS"]:
        raise UsageError("SEEDS is empty")
    widths = cfg["WIDTHS"] or DATASET_DEFAULTS[cfg["DATASET"]]["WIDTHS"]
    if len(widths) < 3 or any(int(w) != w or w < 1 for w in widths):
        raise UsageError(f"WIDTHS must list >= 3 positive integers (at least one hidden layer), got {widths}")
    if not all(c.isalnum() or c in "-." for c in cfg["TAG"]):
        raise UsageError(f"TAG may hold letters, digits, '-' and '.', got {cfg['TAG']!r}")
    return list(widths)


def tag_of(cfg, widths):
    default = DATASET_DEFAULTS[cfg["DATASET"]]["WIDTHS"]
    tag = cfg["DATASET"] if widths == default else f"{cfg['DATASET']}_w{'-'.join(map(str, widths[1:-1]))}"
    return f"{tag}_{cfg['TAG']}" if cfg["TAG"] else tag


class DriftHook:
    """Wraps a TeleportHook: evaluates the whole test set just before and after each teleport and
    adds test_loss_before / test_loss_after (per model) to the teleport's record.

    Guard: a teleport that leaves a model's weights or ||grad L||^2 non-finite, or changes the loss on
    its own teleport batch by more than `reject_drift` (relative), is undone for that model, and
    `failed` (per model) says so; a teleport whose pseudo-inverse raises is undone for all models.
    (The pseudo-inverse of eq. (46) and its derivative blow up where sigma(g V h) is near
    rank-deficient, e.g. with dead ReLU units; a too large rescaling step overflows exp(a).)
    The optimizer-state strategy still runs, as it would after a teleport."""

    def __init__(self, hook, data, act, reject_drift=float("inf"), log_objective=False):
        self.hook, self.data, self.act, self.reject_drift = hook, data, act, reject_drift
        self.log_objective = log_objective

    def __call__(self, epoch, i):
        h = self.hook
        if epoch not in h.epochs or i >= h.n_batches:
            return
        before = evaluate(h.W, self.data.x_test, self.data.y_test, self.act)[0]
        backup = [w.detach().clone() for w in h.W]
        try:
            h(epoch, i)
            rec = h.records[-1]
        except torch.linalg.LinAlgError as e:
            rec = {"epoch": epoch, "batch": i, "error": str(e).splitlines()[0]}
            h.records.append(rec)
            with torch.no_grad():
                for w, b in zip(h.W, backup):
                    w.copy_(b)
            from lib.optim import apply_strategy
            apply_strategy(h.opt, h.W, h.strategy)
        bad = ~torch.stack([w.detach().flatten(1).isfinite().all(1) for w in h.W]).all(0)
        if "objective_after" in rec:
            lb, la = torch.tensor(rec["loss_before"]), torch.tensor(rec["loss_after"])
            ok = torch.tensor(rec["objective_after"]).isfinite() & ((la - lb).abs() <= self.reject_drift * lb)
            bad |= ~ok.to(bad.device)
        else:
            bad[:] = True
        with torch.no_grad():
            for w, b in zip(h.W, backup):
                w[bad] = b[bad]
        after = evaluate(h.W, self.data.x_test, self.data.y_test, self.act)[0]
        for k in ("before", "after"):
            if f"objective_{k}" in rec:
                v = torch.tensor(rec[f"objective_{k}"], dtype=torch.float64)
                rec[f"grad_norm_{k}"] = (v.exp() if self.log_objective else v).tolist()
        rec.update(test_loss_before=before.tolist(), test_loss_after=after.tolist(), failed=bad.tolist())


def run_arm(cfg, arm, data, widths, act, optimizer, epochs, tele_lr, desc=""):
    """Train len(SEEDS) models of one arm as one batched model. Returns (history, teleport records)."""
    W, opt = make_model(widths, cfg["SEEDS"], optimizer, cfg["LR"], cfg["DEVICE"])
    hook = None
    if arm == "reset-only":
        hook = TeleportHook(W, opt, data, act, cfg["TELE_EPOCHS"], cfg["TELE_BATCHES"], cfg["TELE_BATCH_SIZE"],
                            torch.Generator().manual_seed(cfg["TELE_SEED"]), strategy=cfg["OPT_STATE"],
                            mode="reset-only")
        return fit(W, opt, data, act, epochs, cfg["BATCH_SIZE"], hook=hook, desc=desc, progress=cfg["PROGRESS"]), []
    if arm in _ACTIONS:
        tele = TeleportHook(W, opt, data, act, cfg["TELE_EPOCHS"], cfg["TELE_BATCHES"], cfg["TELE_BATCH_SIZE"],
                            torch.Generator().manual_seed(cfg["TELE_SEED"]), strategy=cfg["OPT_STATE"],
                            objective=make_objective(cfg["OBJECTIVE"], act), action=_ACTIONS[arm](cfg["GL_GROUP"]),
                            steps=cfg["TELE_STEPS"], lr=tele_lr)
        hook = DriftHook(tele, data, act, cfg["REJECT_DRIFT"], cfg["OBJECTIVE"] == "log_grad_norm")
    hist = fit(W, opt, data, act, epochs, cfg["BATCH_SIZE"], hook=hook, desc=desc, progress=cfg["PROGRESS"])
    return hist, ([] if hook is None else hook.hook.records)


def per_teleport(recs, key):
    """A recorded quantity for every teleport and model, (n_teleports, K); nan where it failed."""
    K = len(next(r["failed"] for r in recs))
    out = np.array([r.get(key, [np.nan] * K) for r in recs], dtype=float)
    out[np.array([r["failed"] for r in recs], dtype=bool)] = np.nan
    return out


def rel_drift(recs, key):
    """|L_after - L_before| / L_before for every teleport and model: (n_teleports, K)."""
    b, a = per_teleport(recs, f"{key}_before"), per_teleport(recs, f"{key}_after")
    return np.abs(a - b) / b


def gain(recs):
    """||grad L||^2 after / before on the teleport batch: (n_teleports, K)."""
    with np.errstate(invalid="ignore"):
        return per_teleport(recs, "grad_norm_after") / per_teleport(recs, "grad_norm_before")


def _nanstat(f, x):
    x = np.asarray(x, dtype=float)
    return float(f(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


def summarize(hist, recs, report_epochs):
    """The table's numbers for one arm: mean losses at the report epochs, median gain and drifts
    over the successful teleports, the fraction of teleports undone, mean teleport time."""
    tr, te = np.array(hist["train_loss"], dtype=float), np.array(hist["test_loss"], dtype=float)
    s = {f"train_{e}": float(tr[e - 1].mean()) for e in report_epochs}
    s.update({f"test_{e}": float(te[e - 1].mean()) for e in report_epochs})
    s["test_acc_final"] = float(np.mean(hist["test_acc"][-1]))
    s["train_time_s"] = float(hist["time_s"][-1])
    nan = float("nan")
    s.update(grad_gain_median=nan, grad_gain_mean=nan, drift_batch_median=nan, drift_heldout_median=nan,
             drift_test_median=nan, drift_test_max=nan, failed_fraction=nan, teleport_time_s=nan)
    if recs:
        s.update(grad_gain_median=_nanstat(np.median, gain(recs)), grad_gain_mean=_nanstat(np.mean, gain(recs)),
                 drift_batch_median=_nanstat(np.median, rel_drift(recs, "loss")),
                 drift_heldout_median=_nanstat(np.median, rel_drift(recs, "heldout_loss")),
                 drift_test_median=_nanstat(np.median, rel_drift(recs, "test_loss")),
                 drift_test_max=_nanstat(np.max, rel_drift(recs, "test_loss")),
                 failed_fraction=float(np.mean([r["failed"] for r in recs])),
                 teleport_time_s=_nanstat(np.mean, [r.get("time_s", nan) for r in recs]))
    return s


def color(arm):
    return _COLORS["baseline" if arm == "none" else arm]


def plot_loss(res, path, dpi):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for arm, r in res["arms"].items():
        h = r["history"]
        E = len(h["train_loss"])
        plot_mean_std(axes[0], np.arange(1, E + 1), np.array(h["train_loss"]).T, arm, color(arm))
        test = np.array([h["test_loss_init"], *h["test_loss"]]).T
        plot_mean_std(axes[1], np.arange(0, E + 1), test, arm, color(arm))
    for ax, name in zip(axes, ("training loss (mean over the epoch's batches)", "test loss")):
        for e in res["config"]["TELE_EPOCHS"]:
            ax.axvline(e, color="0.8", linestyle=":", linewidth=1)
        ax.set(xlabel="epoch", ylabel=name, yscale="log")
        ax.legend()
    fig.suptitle(f"{res['tag']}, {res['activation']}, {res['optimizer']} (mean ± std over {len(res['config']['SEEDS'])} seeds; "
                 f"dotted: teleport epochs; SGD has no state, so reset-only = none)", fontsize=9)
    save_figure(fig, path, dpi)


def plot_drift(res, path, dpi):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    panels = (("objective", "||grad L||² after / before (teleport batch)"),
              ("loss", "|ΔL| / L on the teleport batch"), ("test_loss", "|ΔL| / L on the test set"))
    for arm, r in res["arms"].items():
        recs = r["teleports"]
        if not recs:
            continue
        x = np.arange(1, len(recs) + 1)
        for ax, (key, _) in zip(axes, panels):
            y = gain(recs) if key == "objective" else np.maximum(rel_drift(recs, key), _FLOOR)
            ax.plot(np.repeat(x, y.shape[1]), y.ravel(), ".", color=color(arm), alpha=0.35, markersize=4)
            ax.plot(x, [_nanstat(np.median, row) for row in y], "-", color=color(arm), label=arm)
    for ax, (key, name) in zip(axes, panels):
        ax.set(xlabel="teleport (epochs " + ", ".join(map(str, res["config"]["TELE_EPOCHS"])) + ")",
               ylabel=name, yscale="log")
        ax.legend()
    fig.suptitle(f"{res['tag']}, {res['activation']}, {res['optimizer']}: per teleport, dots = seeds, "
                 f"line = median; exact 0 drawn at {_FLOOR:g}", fontsize=9)
    save_figure(fig, path, dpi)


def _num(x):
    """A saved number back from JSON (nan is saved as null)."""
    return float("nan") if x is None else x


def table(cfg, all_res):
    """Printed and saved table rows: one per (activation, optimizer, arm)."""
    eps = [e for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]]
    header = (["activation", "optimizer", "arm"] + [f"train@{e}" for e in eps] + [f"test@{e}" for e in eps]
              + ["acc@end %", "‖∇L‖² gain (median)", "drift batch (median)", "drift test (median)",
                 "drift test (max)", "undone %", "teleport s", "train s"])
    rows = []
    for res in all_res:
        for arm, r in res["arms"].items():
            s = {k: _num(v) for k, v in r["summary"].items()}
            rows.append([res["activation"], res["optimizer"], arm] + [s[f"train_{e}"] for e in eps]
                        + [s[f"test_{e}"] for e in eps]
                        + [s["test_acc_final"], s["grad_gain_median"], s["drift_batch_median"],
                           s["drift_test_median"], s["drift_test_max"], 100 * s["failed_fraction"],
                           s["teleport_time_s"], s["train_time_s"]])
    return header, rows


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)


def tune(cfg, data, widths, res_dir, tag):
    """The step-size sweep: every action x step size x activation x optimizer, TUNE_EPOCHS epochs.
    Picks per action the step size with the lowest training loss of the sweep's last epoch, averaged
    over the activation/optimizer pairs, among those with at most TUNE_MAX_UNDONE of the teleports
    undone by the guard (none such: the fewest undone)."""
    from itertools import product
    rows, best, scores = [], {}, {}
    for arm in [a for a in cfg["ARMS"] if a in _ACTIONS]:
        scores[arm] = {}
        for lr in cfg["TUNE_LRS"]:
            losses, failed = [], []
            for act_name, optimizer in product(cfg["ACTIVATIONS"], cfg["OPTIMIZERS"]):
                hist, recs = run_arm(cfg, arm, data, widths, activation(act_name), optimizer, cfg["TUNE_EPOCHS"],
                                     lr, desc=f"tune {arm} {lr:g} {act_name} {optimizer}")
                s = summarize(hist, recs, [cfg["TUNE_EPOCHS"]])
                loss = s[f"train_{cfg['TUNE_EPOCHS']}"]
                losses.append(loss if math.isfinite(loss) else float("inf"))
                failed.append(s["failed_fraction"])
                row = {"arm": arm, "tele_lr": lr, "activation": act_name, "optimizer": optimizer,
                       "train_loss_last": loss, "grad_gain_median": s["grad_gain_median"],
                       "drift_test_median": s["drift_test_median"], "undone": s["failed_fraction"]}
                rows.append(row)
                print(format_row(row), flush=True)
            scores[arm][lr] = (float(np.mean(failed)), float(np.mean(losses)))
        stable = [lr for lr, (undone, _) in scores[arm].items() if undone <= cfg["TUNE_MAX_UNDONE"]]
        best[arm] = (min(stable, key=lambda lr: scores[arm][lr][1]) if stable
                     else min(scores[arm], key=scores[arm].get))
        print(f"{arm}: best teleport step size {best[arm]:g} (undone, mean train loss: {scores[arm][best[arm]]})",
              flush=True)
    save_json(os.path.join(res_dir, f"{tag}_stepsize_sweep_{'_'.join(scores)}.json"),
              {"config": cfg, "environment": environment(), "rows": rows, "best": best,
               "scores": {a: [[lr, *v] for lr, v in sc.items()] for a, sc in scores.items()}})
    return best


def main(cfg):
    widths = validate(cfg)
    fig_dir, res_dir = experiment_dirs(_EXPERIMENT, cfg["OUT_DIR"])
    tag = tag_of(cfg, widths)
    if cfg["PLOT_ONLY"]:
        all_res = [load_json(os.path.join(res_dir, f"{tag}_{a}_{o}.json"))
                   for a in cfg["ACTIVATIONS"] for o in cfg["OPTIMIZERS"]
                   if os.path.exists(os.path.join(res_dir, f"{tag}_{a}_{o}.json"))]
        if not all_res:
            raise UsageError(f"no saved results for {tag} under {res_dir}")
    else:
        data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"], cfg["SPLIT_SEED"])
        if data.x_train.shape[1] != widths[0]:
            raise UsageError(f"WIDTHS[0] = {widths[0]} but {cfg['DATASET']} images have {data.x_train.shape[1]} values")
        if cfg["TUNE"]:
            return tune(cfg, data, widths, res_dir, tag)
        all_res = []
        for act_name in cfg["ACTIVATIONS"]:
            for optimizer in cfg["OPTIMIZERS"]:
                res = {"config": cfg, "environment": environment(), "tag": tag, "widths": widths,
                       "activation": act_name, "optimizer": optimizer, "n_train": int(data.x_train.shape[0]),
                       "n_test": int(data.x_test.shape[0]), "arms": {}}
                for arm in cfg["ARMS"]:
                    hist, recs = run_arm(cfg, arm, data, widths, activation(act_name), optimizer, cfg["EPOCHS"],
                                         cfg["TELE_LR"].get(arm, 0.0), desc=f"{act_name} {optimizer} {arm}")
                    s = summarize(hist, recs, [e for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]])
                    res["arms"][arm] = {"history": hist, "teleports": recs, "summary": s}
                    print(format_row({"act": act_name, "opt": optimizer, "arm": arm,
                                      "train": s[f"train_{cfg['EPOCHS']}"] if cfg["EPOCHS"] in cfg["REPORT_EPOCHS"]
                                      else float(np.mean(hist["train_loss"][-1])),
                                      "test": float(np.mean(hist["test_loss"][-1])),
                                      "gain": s["grad_gain_median"], "drift_test": s["drift_test_median"],
                                      "tele_s": s["teleport_time_s"], "train_s": s["train_time_s"]}))
                save_json(os.path.join(res_dir, f"{tag}_{act_name}_{optimizer}.json"), res)
                all_res.append(res)
    for res in all_res:
        base = os.path.join(fig_dir, f"{tag}_{res['activation']}_{res['optimizer']}")
        plot_loss(res, base + "_loss.png", cfg["FIG_DPI"])
        plot_drift(res, base + "_drift.png", cfg["FIG_DPI"])
    header, rows = table(all_res[0]["config"], all_res)
    md = markdown_table(header, rows)
    print(md)
    save_json(os.path.join(res_dir, f"{tag}_table.json"),
              {"config": cfg, "environment": environment(), "header": header, "rows": rows})
    write_text(os.path.join(res_dir, f"{tag}_table.md"), md + "\n")
    return all_res


if __name__ == "__main__":
    run(main, globals(), _QUICK)
