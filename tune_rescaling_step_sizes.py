"""Teleport step sizes for teleport_relu_rescaling.py: a sweep of the ascent step size of each teleport
action (gl46, gl46-last, rescale), under that script's protocol (not a paper figure).

For every action in ARMS, step size in TUNE_LRS, activation and optimizer, trains the SEEDS for
TUNE_EPOCHS epochs (3: covers the teleports of epochs 0 and 2) with that arm alone, exactly as
teleport_relu_rescaling.py runs it (its functions are imported), and picks per action the step size
with the lowest training loss of the last epoch, averaged over the activation/optimizer pairs, among
the step sizes with at most TUNE_MAX_UNDONE of the teleports undone by the guard (none such: the
fewest undone, then the lowest loss). A run in which some seed diverged (a training or test loss
non-finite or above 1e6, lib.report.diverged) counts as infinite.

    python tune_rescaling_step_sizes.py --arms="['rescale']"             # the committed sweeps
    python tune_rescaling_step_sizes.py --arms="['gl46','gl46-last']"
    python tune_rescaling_step_sizes.py --plot-only --arms="['rescale']"    # the table of a saved sweep
    python tune_rescaling_step_sizes.py --plot-only --sweep-name=plain_grad_norm_no_drift_guard

Results made with other settings or on other data are not replaced without --replace. Each run
(action, step size, activation, optimizer) is a unit of progress (lib.progress): an interrupted
sweep, started again with the same command, resumes.

Outputs: under OUT_DIR, results/rescaling/<tag>_stepsize_sweep_<name>.json (resolved config,
environment, data, one row per run with its mean training loss over the seeds that did not diverge
and how many diverged, per action the scores [step size, fraction undone, mean training loss] and the
chosen step sizes; <tag> as in teleport_relu_rescaling.py, <name> = SWEEP_NAME or the swept ARMS
joined by "_"), written when the sweep completes; the table of scores is printed. Progress is kept
in OUT_DIR/.progress/.

CPU runtime (2 cores shared with other jobs, load ~14; 4,000-image MNIST subset): ~10 min per
process (one per ARMS choice above); --quick (500 images, 2 seeds, 2 step sizes): 13 s of CPU time,
19-29 s on the 2 cores at load 4-6 (one torch thread unless OMP_NUM_THREADS is set, as in
teleport_relu_rescaling.py).
Headline (mnist5k, log objective, guard 0.1): gl46 1e-3, gl46-last 1e-3, rescale 1e-2 (of 1e-3 ... 1);
from 1e-2 (gl46) and 3e-2 (gl46-last, rescale) on, some activation/optimizer pair ends with a
non-finite training loss. Plain ascent on ||grad L||^2 without the drift guard
(MNIST_stepsize_sweep_plain_grad_norm_no_drift_guard.json): 1e-4 for every action, the smallest tried;
from 1e-3 (gl46) and 3e-3 (gl46-last, rescale) on, some pair reaches a training loss of 1e3 or more.
"""
import math
import os
from itertools import product

import numpy as np

import teleport_relu_rescaling as rescaling
from lib.config import UsageError, check_choice, check_positive, run
from lib.io import check_replace, environment, load_results, save_json, staged
from lib.progress import Checkpoint
from lib.report import format_row, markdown_table

# ---- config ---------------------------------------------------------------------------------
DATASET = "MNIST"              # MNIST, FashionMNIST or CIFAR10
WIDTHS = None                  # layer widths d_0..d_L, e.g. [784,128,64,10] (None: the dataset's preset)
ACTIVATIONS = ["relu", "leaky_relu"]  # hidden activations averaged over: relu, leaky_relu (slope 0.1)
OPTIMIZERS = ["sgd", "adagrad"]  # optimizers averaged over (lib.optim names)
LR = 1e-2                      # learning rate of every optimizer
ARMS = ["gl46", "gl46-last", "rescale"]  # teleport actions to tune: gl46, gl46-last, rescale
TUNE_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]  # teleport step sizes tried
TUNE_MAX_UNDONE = 0.1          # step sizes with a larger fraction of teleports undone are not chosen
TUNE_EPOCHS = 3                # training epochs per run
SEEDS = [0, 1, 2, 3, 4]        # initialisation seeds, trained as one batched model per run
BATCH_SIZE = 20                # mini-batch size, batches in sequential order
TRAIN_SIZE = 50000             # training images (all available if fewer: mnist5k has 4,000)
SPLIT_SEED = 0                 # seed of the training subset
TELE_EPOCHS = [0, 2]           # teleport at the start of these epochs (0-based)
TELE_BATCHES = 8               # teleports per teleport epoch, before mini-batches 0..TELE_BATCHES-1
TELE_BATCH_SIZE = 200          # images per teleport batch (a second batch measures held-out drift)
TELE_STEPS = 10                # gradient-ascent steps per teleport
OBJECTIVE = "log_grad_norm"    # ascent on log ||grad L||^2 (steps relative to ||grad L||^2) or grad_norm
GL_GROUP = "first_order"       # GL element from T: first_order (g = I + T, the authors') or exp
REJECT_DRIFT = 0.1             # undo a model's teleport if its loss on the teleport batch moved more (relative)
OPT_STATE = "reset"            # optimizer state after a teleport: reset, keep or transport
TELE_SEED = 2024               # seed of the teleport batches (the same in every run)
PLOT_ONLY = False              # print the table of a saved sweep, no training
SWEEP_NAME = ""                # <name> in the results file name ("": the swept ARMS joined by "_")
DATA_DIR = "data"              # folder in torchvision's layout
DEVICE = "cpu"                 # cpu, cuda or auto
OUT_DIR = "."                  # results/ goes under this folder
TAG = ""                       # extra name for the output file of a variant run
PROGRESS = True                # tqdm progress bars
CHECKPOINT_S = 30.0            # save progress after at most this many seconds of work (0: every epoch)
REPLACE = False                # True: replace a saved sweep made with other settings or data
# ---------------------------------------------------------------------------------------------
PRESETS = rescaling.PRESETS
QUICK_SETTINGS = {"TRAIN_SIZE": 500, "SEEDS": [0, 1], "TELE_BATCHES": 2, "TELE_BATCH_SIZE": 40, "TELE_STEPS": 3,
                  "TUNE_LRS": [1e-2, 1e-1]}

# the settings of teleport_relu_rescaling.py's protocol, read by its functions (check_protocol,
# tag_of, load_data, run_arm), which get just these
PROTOCOL = ("DATASET", "WIDTHS", "ACTIVATIONS", "OPTIMIZERS", "LR", "SEEDS", "BATCH_SIZE", "TRAIN_SIZE", "SPLIT_SEED",
            "TELE_EPOCHS", "TELE_BATCHES", "TELE_BATCH_SIZE", "TELE_STEPS", "OBJECTIVE", "GL_GROUP", "REJECT_DRIFT",
            "OPT_STATE", "TELE_SEED", "DATA_DIR", "DEVICE", "TAG", "PROGRESS")


def validate(cfg):
    rescaling.check_protocol({k: cfg[k] for k in PROTOCOL})
    for name in cfg["ARMS"]:
        check_choice("arm", name, rescaling.ACTIONS)
    if not cfg["ARMS"] or not cfg["TUNE_LRS"]:
        raise UsageError("ARMS and TUNE_LRS need at least one entry each")
    for lr in cfg["TUNE_LRS"]:
        check_positive("tune step size", lr)
    check_positive("tune_max_undone", cfg["TUNE_MAX_UNDONE"])
    check_positive("tune_epochs", cfg["TUNE_EPOCHS"], allow_zero=False)
    check_positive("checkpoint_s", cfg["CHECKPOINT_S"])
    if not all(c.isalnum() or c in "-._" for c in cfg["SWEEP_NAME"]):
        raise UsageError(f"SWEEP_NAME may hold letters, digits, '-', '_' and '.', got {cfg['SWEEP_NAME']!r}")


def as_loss(x):
    """A saved mean training loss: null (how strict JSON saves inf) and "inf" (older files) are inf."""
    return math.inf if x is None else float(x)


def pick(scores, max_undone):
    """Per action, the chosen step size. scores = {action: [[step size, fraction undone, mean training
    loss], ...]} in the order tried; the lowest loss among the step sizes with at most max_undone undone,
    else the fewest undone, then the lowest loss (ties: the first tried)."""
    best = {}
    for arm, rows in scores.items():
        rows = [(lr, undone, as_loss(loss)) for lr, undone, loss in rows]
        stable = [r for r in rows if r[1] <= max_undone]
        best[arm] = min(stable, key=lambda r: r[2])[0] if stable else min(rows, key=lambda r: r[1:])[0]
    return best


def sweep(cfg, data, ckpt):
    """Every action x step size x activation x optimizer, each run a unit of ckpt's progress.
    Returns (rows, scores)."""
    rows, scores, last, protocol = [], {}, cfg["TUNE_EPOCHS"], {k: cfg[k] for k in PROTOCOL}
    for arm in cfg["ARMS"]:
        scores[arm] = []
        for lr in cfg["TUNE_LRS"]:
            losses, undone = [], []
            for act_name, optimizer in product(cfg["ACTIVATIONS"], cfg["OPTIMIZERS"]):
                hist, recs = rescaling.run_arm(protocol, ckpt, f"tune {arm} {lr:g} {act_name} {optimizer}", arm,
                                               data, act_name, optimizer, last, lr)
                s = rescaling.summarize(hist, recs, [last])
                losses.append(math.inf if s["n_diverged"] else s[f"train_{last}"])
                undone.append(s["failed_fraction"])
                row = {"arm": arm, "tele_lr": lr, "activation": act_name, "optimizer": optimizer,
                       "train_loss_last": s[f"train_{last}"], "diverged": s["n_diverged"],
                       "grad_gain_median": s["grad_gain_median"], "drift_test_median": s["drift_test_median"],
                       "undone": s["failed_fraction"]}
                rows.append(row)
                print(format_row(row), flush=True)
            scores[arm].append([lr, float(np.mean(undone)), float(np.mean(losses))])
    return rows, scores


def score_table(scores, best):
    rows = [[arm, lr, 100 * undone, as_loss(loss), "<-" if lr == best[arm] else ""]
            for arm, sc in scores.items() for lr, undone, loss in sc]
    return markdown_table(["action", "step size", "undone %", "mean train loss (last epoch)", "chosen"], rows)


def main(cfg):
    validate(cfg)
    protocol = {k: cfg[k] for k in PROTOCOL}
    name = f"{rescaling.tag_of(protocol)}_stepsize_sweep_{cfg['SWEEP_NAME'] or '_'.join(cfg['ARMS'])}.json"
    path = os.path.join(cfg["OUT_DIR"], "results", rescaling.EXPERIMENT, name)
    if cfg["PLOT_ONLY"]:
        res = load_results(path)
        res["best"] = pick(res["scores"], res["config"].get("TUNE_MAX_UNDONE", cfg["TUNE_MAX_UNDONE"]))
    else:
        check_replace(path, rescaling.saved_config(cfg))
        data = rescaling.load_data(protocol)
        check_replace(path, rescaling.saved_config(cfg), data=data)
        ckpt = Checkpoint(cfg, f"tune_rescaling_step_sizes-{name[:-5]}")
        rows, scores = sweep(cfg, data, ckpt)
        res = {"config": rescaling.saved_config(cfg), "environment": environment(), "data": data.info,
               "rows": rows, "best": pick(scores, cfg["TUNE_MAX_UNDONE"]), "scores": scores}
        with staged(cfg["OUT_DIR"]) as out:
            save_json(os.path.join(out, "results", rescaling.EXPERIMENT, name), res)
        ckpt.finish()
    print(score_table(res["scores"], res["best"]))
    for arm, lr in res["best"].items():
        print(f"{arm}: chosen teleport step size {lr:g}")
    return res


if __name__ == "__main__":
    run(main, globals())
