"""Figures 5 and 13 (Section 5.1, App. F.2): teleportation speeds up AdaGrad, SGD with momentum,
RMSProp and Adam; control arms split the gain into its causes.

    python teleport_optimization.py                 # Figure 5/13 on MNIST, 4 optimizers x 6 arms
    python teleport_optimization.py --controls=False --out-dir=runs/two-arms   # baseline and teleport only
    python teleport_optimization.py --optimizers-run=adam --lr=3e-4 --out-dir=runs/adam   # another lr
    python teleport_optimization.py --quick         # a smoke run, under a minute

Protocol: 784-16-10-10 MLP, LeakyReLU(0.1), batches of 20, 5 seeds, 40 epochs; the teleport arm takes
10 ascent steps of ||grad L||^2 over g = I + T (eq. 46) before each of the first 8 batches of one
epoch, then resets the optimizer (the authors' per-optimizer lr, epoch and step size: PRESETS).
Runtime: 40-90 s on one thread of a 2-core CPU at load 1-4 (much of it compiling the training and
teleport steps, before the clocks start), bundled 4,000-image MNIST; --quick 15 s. An arm's 40 epochs take
1.0-1.3 s, the 8 teleports 0.06-0.08 s of it (2-3 epochs of 4,000 images here; Figure 13 per wall time).
Headline: the teleport arm's training loss is below the baseline's at epochs 1-5 (AdaGrad: 3-5).
Controls: AdaGrad's gain is the optimizer reset (reset-only reaches 106% of it); momentum's and
Adam's is the optimised move (reset-only and random-teleport: -7% to -1%), RMSProp's mostly (13%, 18%).

Outputs: under OUT_DIR, results/optimization/<DATASET>_<optimizer>.json (config, environment, data,
per arm the losses per epoch and run, times, teleport records, divergence epochs) and
<DATASET>_summary.json/.md (tables, verdicts); figures/optimization/<DATASET>_<optimizer>_loss_vs_epoch.png
(Figure 5) and _loss_vs_time.png (Figure 13). Written as a set when complete; progress in OUT_DIR/.progress/.
"""
import os

import numpy as np
import torch

from lib.actions import GLAction
from lib.arms import Arm, ArmHook, Moments
from lib.config import UsageError, check_choice, check_positive, run, with_preset
from lib.data import load
from lib.io import check_replace_set, environment, run_set, saved_config
from lib.models import Activation
from lib.plots import loss_panels, save_figure
from lib.progress import Checkpoint
from lib.report import diverged, finite_stats, format_row, markdown_table, stats_cell
from lib.teleport import make_objective, teleport
from lib.train import make_model, step_mode

# ---- config (override any with --NAME=value) ------------------------------------------------
DATASET = "MNIST"               # MNIST, FashionMNIST or CIFAR10
OPTIMIZERS_RUN = ["adagrad", "momentum", "rmsprop", "adam"]  # which optimizers, in order (also: sgd)
ARMS = ["baseline", "teleport"]  # arms to run: baseline, teleport, reset-only, random-teleport,
                                 # teleport-keep, teleport-transport
CONTROLS = True                 # True: add reset-only, random-teleport, teleport-keep, teleport-transport
EPOCHS = 40                     # training epochs
N_RUNS = 5                      # runs r = 0..N_RUNS-1, initialised with seed (r+1)*SEED_BASE
SEED_BASE = 54321               # the authors' initialisation seed unit
BATCH_SIZE = 20                 # mini-batch size, fixed sequential order
TRAIN_SIZE = 50000              # seeded random subset of the training set (all images if fewer)
SPLIT_SEED = 0                  # seed of that subset
LR = None                       # base learning rate, > 0; None: the optimizer's preset
TELE_EPOCH = None               # teleport in this 0-based epoch, < EPOCHS; None: the optimizer's preset
TELE_LR = None                  # teleport step size, >= 0; None: the optimizer's preset
TELE_BATCHES = 8                # teleport before each of the first TELE_BATCHES mini-batches
TELE_BATCH_SIZE = 200           # fresh random training images per teleport
TELE_STEPS = 10                 # gradient-ascent steps per teleport
STOP_ABOVE = 100.0              # stop a model's teleport once ||grad L||^2 exceeds this
TELE_SEED = 0                   # seed of the teleport batches (identical for every arm)
REPORT_EPOCHS = [1, 2, 5, 10, 40]   # 1-based epochs of the summary table
CONTROL_EPOCHS = [2, 5, 10, 40]     # 1-based epochs of the controls table
PLOT_ONLY = False               # redraw the figures from saved results (the tables are printed, not rewritten)
DATA_DIR = "data"               # datasets in torchvision's layout (--data-dir); MNIST falls back to the bundled subset
DEVICE = "cpu"                  # cpu, cuda or auto
OUT_DIR = "."                   # figures/ and results/ go under this folder
PROGRESS = True                 # tqdm bars
COMPILE = True                  # torch.compile the training step (update included) and the teleport's ascent step
                                # (CUDA graphs on a GPU; ~1 min to compile on a CPU, before the clock)
CHECKPOINT_S = 30.0             # save progress after at most this many seconds of work (0: every epoch)
REPLACE = False                 # True: replace saved results made with other settings or data
# ---------------------------------------------------------------------------------------------

# the authors' released settings: base lr, teleport epoch (0-based), teleport step size
PRESETS = {"OPTIMIZER": {"adagrad": {"LR": 1e-2, "TELE_EPOCH": 2, "TELE_LR": 1e-4},
                         "sgd": {"LR": 1e-2, "TELE_EPOCH": 2, "TELE_LR": 1e-4},
                         "momentum": {"LR": 1e-3, "TELE_EPOCH": 0, "TELE_LR": 5e-2},
                         "rmsprop": {"LR": 1e-4, "TELE_EPOCH": 0, "TELE_LR": 5e-2},
                         "adam": {"LR": 1e-4, "TELE_EPOCH": 0, "TELE_LR": 5e-2}}}
QUICK_SETTINGS = {"EPOCHS": 3, "N_RUNS": 2, "TRAIN_SIZE": 200, "TELE_BATCHES": 2, "TELE_BATCH_SIZE": 40,
                  "TELE_STEPS": 3, "REPORT_EPOCHS": [1, 2, 3], "CONTROL_EPOCHS": [2, 3], "PROGRESS": False,
                  "COMPILE": False}
WIDTHS = {"MNIST": [784, 16, 10, 10], "FashionMNIST": [784, 16, 10, 10], "CIFAR10": [3072, 128, 32, 10]}
CONTROL_ARMS = ["reset-only", "random-teleport", "teleport-keep", "teleport-transport"]
ARM_NAMES = ["baseline", "teleport", *CONTROL_ARMS]
STYLES = {"reset-only": ("--", "o"), "random-teleport": ("-.", "s"),  # the controls' line style and marker
          "teleport-keep": (":", "^"), "teleport-transport": ((0, (6, 2, 1, 2, 1, 2)), "v")}
ACT = Activation(0.1)  # LeakyReLU(0.1), the paper's
GUARD = float("inf")  # lib.arms guard: undo only moves that fail (LinAlgError, non-finite), whatever the loss change


def declare_arms(ocfg):
    """Every arm (lib.arms.Arm) with one optimizer's teleport settings. Controls: reset-only (the reset
    alone, at the teleport moments), random-teleport (a random g with the teleport's ||g - I|| at each
    moment), teleport-keep and -transport (optimizer state kept, or first moments pushed forward)."""
    tele = dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=ocfg["TELE_STEPS"],
                lr=ocfg["TELE_LR"], stop_above=ocfg["STOP_ABOVE"],
                compile=step_mode(ocfg["DEVICE"]) if ocfg["COMPILE"] else False)
    return {"baseline": Arm("baseline"),
            "teleport": Arm("teleport", "teleport", "reset", teleport=tele, guard=GUARD),
            "reset-only": Arm("reset-only", "none", "reset"),
            "random-teleport": Arm("random-teleport", "random", "reset", match="teleport", teleport=tele, guard=GUARD),
            "teleport-keep": Arm("teleport-keep", "teleport", "keep", teleport=tele, guard=GUARD),
            "teleport-transport": Arm("teleport-transport", "teleport", "transport", teleport=tele, guard=GUARD)}


def check(cfg):
    """Validate the settings (one-line UsageErrors); returns the arm names to run, teleport
    before random-teleport (which reuses its norms)."""
    check_choice("dataset", cfg["DATASET"], WIDTHS)
    for k in ("EPOCHS", "N_RUNS", "BATCH_SIZE", "TRAIN_SIZE", "TELE_BATCH_SIZE", "TELE_BATCHES", "TELE_STEPS",
              "CHECKPOINT_S"):  # the last three may be 0
        check_positive(k.lower(), cfg[k], allow_zero=k in ("TELE_BATCHES", "TELE_STEPS", "CHECKPOINT_S"))
    for opt in cfg["OPTIMIZERS_RUN"]:
        ocfg = with_preset(cfg, PRESETS, "OPTIMIZER", opt)  # an unknown optimizer is a UsageError
        for k in ("LR", "TELE_EPOCH", "TELE_LR"):
            if isinstance(ocfg[k], bool) or not isinstance(ocfg[k], int if k == "TELE_EPOCH" else (int, float)):
                raise UsageError(f"--{k.lower().replace('_', '-')}: expected a number, got {ocfg[k]!r}")
            check_positive(f"{opt} {k.lower()}", ocfg[k], allow_zero=k != "LR")
        if ocfg["TELE_EPOCH"] >= cfg["EPOCHS"]:
            raise UsageError(f"{opt} tele_epoch {ocfg['TELE_EPOCH']} is not below epochs = {cfg['EPOCHS']}")
    arms = list(dict.fromkeys(list(cfg["ARMS"]) + (CONTROL_ARMS if cfg["CONTROLS"] else [])))
    for a in arms:
        check_choice("arm", a, ARM_NAMES)
    if "random-teleport" in arms and "teleport" not in arms:
        raise UsageError("arm 'random-teleport' needs the 'teleport' arm (it reuses its norms)"
                         + ("; --controls=False runs the ARMS alone" if cfg["CONTROLS"] else ""))
    return sorted(arms, key=lambda a: a == "random-teleport")


def run_arm(ocfg, data, optimizer, arm, ckpt, matched=None):
    """The N_RUNS seeds of one arm as one batched model, the arm acting at the teleport moments
    (ArmHook): one unit of progress (a finished unit is not run again, an interrupted one resumes).
    Returns fit's curves (lists over epochs of N_RUNS values), the seeds and the arm's records.
    One model per arm: Adam's step count is per weight tensor, so arms sharing one could not reset alone."""
    unit = f"{optimizer} {arm.name}"
    if ckpt.unit(unit) is not None:
        return ckpt.unit(unit)
    seeds = [(r + 1) * ocfg["SEED_BASE"] for r in range(ocfg["N_RUNS"])]
    W, opt = make_model(WIDTHS[ocfg["DATASET"]], seeds, optimizer, ocfg["LR"], ocfg["DEVICE"], batched_optimizer=True)
    moments = Moments((ocfg["TELE_EPOCH"],), ocfg["TELE_BATCHES"], ocfg["TELE_BATCH_SIZE"], ocfg["TELE_SEED"])
    hook = ArmHook(W, opt, data, ACT, [arm], moments, matched=matched)
    if arm.move == "teleport" and arm.teleport["compile"]:  # compile its ascent step before the clock starts
        b = ocfg["TELE_BATCH_SIZE"]
        teleport([w.detach().clone() for w in W], data.x_train[:b], data.y_train[:b], ACT, **{**arm.teleport, "steps": 2})
    hist = ckpt.fit(unit, W, opt, data, ACT, ocfg["EPOCHS"], ocfg["BATCH_SIZE"], hook=hook, desc=unit,
                    progress=ocfg["PROGRESS"], compile=ocfg["COMPILE"])
    return ckpt.finish_unit(unit, {**hist, "seeds": seeds, "teleports": hook.records[arm.name]})


def norms_to_match(records, n_models, n_pairs):
    """The teleport arm's records as random-teleport reads them: norm 0 (no move) for the models
    the teleport left where they were (its linear algebra failed, or the guard undid the move)."""
    unmoved = lambda r: np.array(r.get("failed", [False] * n_models), bool)[:, None] | ("error" in r)  # noqa: E731
    return [{**r, "algebra_norm": np.where(unmoved(r), 0.0, np.asarray(
        r.get("algebra_norm", np.zeros((n_models, n_pairs))), float)).tolist()} for r in records]


def runs_diverged(h):
    """Per run, the first (1-based) epoch whose train or test loss is non-finite or absurd, or None:
    lib.report.diverged of the larger of the two (np.maximum keeps a NaN of either)."""
    return diverged(np.maximum(np.asarray(h["train_loss"], float), np.asarray(h["test_loss"], float)).T)


def run_optimizer(ocfg, data, optimizer, names, ckpt):
    """Every arm in `names` for one optimizer, one console row each; {arm: run_arm's result}."""
    arms, out, n_pairs = declare_arms(ocfg), {}, len(WIDTHS[ocfg["DATASET"]]) - 2
    for name in names:
        matched = None if arms[name].move != "random" else {
            "teleport": norms_to_match(out["teleport"]["teleports"], ocfg["N_RUNS"], n_pairs)}
        h = out[name] = dict(run_arm(ocfg, data, optimizer, arms[name], ckpt, matched))
        h["diverged"] = runs_diverged(h)
        ok = [d is None for d in h["diverged"]]
        row = {"opt": optimizer, "arm": f"{name:>18}", "time_s": float(h["time_s"][-1])}
        row.update({f"train@{e}": finite_stats(h["train_loss"][e - 1], ok)[0]
                    for e in ocfg["REPORT_EPOCHS"] if e <= len(h["train_loss"])})
        ratios = [np.mean(r["objective_after"]) / np.mean(r["objective_before"])
                  for r in h["teleports"] if "objective_after" in r]
        if ratios:
            row["|g|^2 x"] = float(np.mean(ratios))
        if not all(ok):
            row["diverged"] = f"{len(ok) - sum(ok)} of {len(ok)}"
        print(format_row(row))
    return out


def plot_optimizer(res, title, path_stem):
    """Figure 5 (x = epoch) and Figure 13 (x = the arm's wall time): training and test loss of
    every arm side by side (lib.plots.loss_panels: diverged runs left out and marked), baseline
    and teleport with a +-1 std band, the controls on top in their own line styles and markers."""
    order = [a for a in ARM_NAMES if a in res] + [a for a in res if a not in ARM_NAMES]
    curves = {a: {k: np.asarray(res[a][k], float).T for k in ("train_loss", "test_loss")} for a in order}
    for kind, xlabel in (("epoch", "epoch"), ("time", "wall time of the arm (s, all runs batched)")):
        x = {a: np.arange(1, len(res[a]["train_loss"]) + 1) if kind == "epoch" else np.asarray(res[a]["time_s"], float)
             for a in order}
        fig = loss_panels(curves, x, [("train_loss", "training loss"), ("test_loss", "test loss")], STYLES, title,
                          xlabel, "cross-entropy loss", integer_x=kind == "epoch")
        save_figure(fig, f"{path_stem}_loss_vs_{kind}.png")


def arm_stats(h, rep, ctl):
    """One arm's row of the summary: mean, std and number of runs (those that did not diverge)
    of the train loss at REPORT_EPOCHS and CONTROL_EPOCHS, of the test loss and accuracy at
    REPORT_EPOCHS; times; the epoch each run diverged at (None: it did not)."""
    at = runs_diverged(h)
    ok = [e is None for e in at]
    st = lambda key, e: finite_stats(h[key][e - 1], ok)  # noqa: E731
    return {"train_loss": {e: st("train_loss", e) for e in sorted(set(rep + ctl))},
            "test_loss": {e: st("test_loss", e) for e in rep}, "test_acc": {e: st("test_acc", e) for e in rep},
            "time_s": float(h["time_s"][-1]),
            "teleport_time_s": float(sum(r.get("time_s", 0.0) for r in h["teleports"])),
            "mean_train_loss_all_epochs": finite_stats(np.asarray(h["train_loss"], float).mean(0), ok)[0],
            "diverged": at,  # a failed teleport: its linear algebra failed, or the guard undid the move
            "teleports_failed": sum(any(r.get("failed", ())) or "error" in r for r in h["teleports"])}


def verdict(opt, res, stats, ctl):
    """The teleport arm's gain over the baseline (train loss averaged over all epochs, runs that
    diverged in neither arm) and the share of it each control reaches (also at CONTROL_EPOCHS).
    Returns the verdict and the comparison at epochs 1-5; 'diverged', no gain, if no run is left."""
    ok = {a: np.array([e is None for e in stats[a]["diverged"]]) for a in res}
    both, K = ok["baseline"] & ok["teleport"], len(ok["baseline"])
    lost = {a: int(K - ok[a].sum()) for a in ("baseline", "teleport")}
    if not both.any():
        text = f"{opt}: diverged (baseline: {lost['baseline']} of {K} runs, teleport: {lost['teleport']}), no gain"
        return {"gain": None, "diverged": lost, "text": text}, f"{opt}: diverged"
    loss = {a: np.asarray(res[a]["train_loss"], float) for a in res}  # (epochs, K)

    def gain(a, sel, e=None):  # baseline minus arm in train loss over the runs sel: all epochs, or epoch e
        return float((loss["baseline"] - loss[a])[slice(None) if e is None else e - 1][..., sel].mean())

    def share(a, sel, e=None):
        return gain(a, sel, e) / gain("teleport", sel, e) if gain("teleport", sel, e) else float("nan")
    text = (f"{opt}: teleport lowers the training loss averaged over all epochs by {gain('teleport', both):+.4f} below "
            "the baseline" + ("" if both.all() else f" (the {both.sum()} of {K} runs that diverged in neither arm)"))
    if stats["teleport"]["teleports_failed"]:
        text += f"; {stats['teleport']['teleports_failed']} teleports failed and left models where they were"
    shares, shares_at, e5 = {}, {}, 5 if 5 in ctl else ctl[-1]
    for arm in (a for a in CONTROL_ARMS if a in res):
        sel = both & ok[arm]
        if not sel.any():
            shares[arm], shares_at[arm], text = None, None, text + f"; {arm}: diverged"
            continue
        shares[arm], shares_at[arm] = share(arm, sel), {e: share(arm, sel, e) for e in ctl}
        text += (f"; {arm} reaches {100 * shares[arm]:.0f}% of that gain ({100 * shares_at[arm][e5]:.0f}% at epoch "
                 f"{e5})" + (f" ({sel.sum()} runs)" if sel.sum() < both.sum() else ""))
    b, t = (loss[a][:5][:, both].mean(1) for a in ("baseline", "teleport"))
    below = f"{opt}: " + ", ".join(f"{e + 1}: {'yes' if t[e] < b[e] else 'no'} ({t[e]:.4f} vs {b[e]:.4f})"
                                   for e in range(len(b)))
    return {"gain": gain("teleport", both), "diverged": lost, "share": shares, "share_at_epoch": shares_at,
            "text": text}, below


def summary(cfg, results):
    """Per optimizer and arm (arm_stats): mean train / test loss at REPORT_EPOCHS, time, diverged runs;
    mean +- std train loss at CONTROL_EPOCHS; the verdicts. Diverged runs are left out of every
    mean (lib.report.stats_cell says over how many runs, or 'diverged')."""
    rep, ctl = ([e for e in cfg[k] if e <= cfg["EPOCHS"]] for k in ("REPORT_EPOCHS", "CONTROL_EPOCHS"))
    n, rows, crows, verdicts, data, below = cfg["N_RUNS"], [], [], {}, {}, {}
    for opt, res in results.items():
        d = data[opt] = {arm: arm_stats(h, rep, ctl) for arm, h in res.items()}
        for arm, a in d.items():
            bad = sorted(e for e in a["diverged"] if e is not None)
            rows.append([opt, arm] + [f"{stats_cell(a['train_loss'][e], n)} / {stats_cell(a['test_loss'][e], n)}"
                                      for e in rep] + [f"{a['time_s']:.1f} ({a['teleport_time_s']:.1f})",
                                                       f"{len(bad)} (from epoch {bad[0]})" if bad else "0"])
            crows.append([opt, arm] + [stats_cell(a["train_loss"][e], n, "{:.4f} ± {:.4f}") for e in ctl])
        if "baseline" in res and "teleport" in res:
            verdicts[opt], below[opt] = verdict(opt, res, d, ctl)
    header = ["optimizer", "arm"] + [f"train / test @ {e}" for e in rep] + ["time s (teleports)", "diverged runs"]
    md = (f"## {cfg['DATASET']}: mean train / test loss over {n} runs\n\n" + markdown_table(header, rows)
          + f"\n\n## Controls: train loss, mean ± std over {n} runs\n\n"
          + markdown_table(["optimizer", "arm"] + [f"train @ {e}" for e in ctl], crows)
          + "\n\n" + "\n".join(f"- {v['text']}" for v in verdicts.values())
          + "\n\nTeleport arm's mean training loss below the baseline's, by epoch (teleport vs baseline):\n\n"
          + "\n".join(f"- {v}" for v in below.values()) + "\n")
    return md, {"per_arm": data, "verdicts": verdicts, "teleport_below_baseline": below}


def draw(opt, s, stem):
    """Figures 5/13 style loss panels of one optimizer's saved record, at `stem`_loss_vs_*.png."""
    n_runs = len(next(iter(s["arms"].values()))["train_loss"][0])
    plot_optimizer(s["arms"], f"{s['data']['label']}, {opt}: mean over {n_runs} runs (band: ±1 std)", stem)


def train_all(cfg, names, path):
    """Every optimizer's arms (settings and data checked against saved results first): what to save."""
    configs = {opt: with_preset(cfg, PRESETS, "OPTIMIZER", opt) for opt in cfg["OPTIMIZERS_RUN"]}
    check_replace_set(configs, path, cfg)
    data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"], cfg["SPLIT_SEED"])
    print(f"{data.label}: {len(data.y_train)} training, {len(data.y_test)} test images")
    check_replace_set(configs, path, cfg, data)
    ckpt = Checkpoint(cfg, f"teleport_optimization-{cfg['DATASET']}")
    return {opt: {"config": saved_config(ocfg), "environment": environment(), "optimizer": opt,
                  "data": {**data.info, "label": data.label}, "arms": run_optimizer(ocfg, data, opt, names, ckpt)}
            for opt, ocfg in configs.items()}, ckpt


def main(cfg):
    names = check(cfg)
    if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a 784-16-10-10 MLP at batch 20 is launch-bound: 1 thread is fastest
    return run_set(cfg, "optimization", lambda path: train_all(cfg, names, path), draw, summary)


if __name__ == "__main__":
    run(main, globals())
