"""Figures 5 and 13 (Section 5.1, App. F.2): teleportation speeds up AdaGrad, SGD with momentum,
RMSProp and Adam; with --controls, control arms that split the gain into its causes.

    python teleport_optimization.py                 # Figure 5/13 on MNIST, 4 optimizers, 2 arms
    python teleport_optimization.py --controls      # + reset-only, random-teleport, teleport-keep/-transport
    python teleport_optimization.py --optimizers-run="['adam']" --lr=3e-4   # one optimizer, another lr
    python teleport_optimization.py --quick         # a smoke run, under a minute

Protocol (the paper's, with the authors' released hyperparameters where the paper is silent):
784-16-10-10 MLP without biases, LeakyReLU(0.1), cross-entropy, mini-batches of 20 in a fixed
sequential order, 5 runs initialised with seeds (r+1)*54321, 40 epochs. Teleport arm: before
each of the first 8 mini-batches of epoch 0 (momentum, RMSProp, Adam) or epoch 2 (AdaGrad,
SGD; 0-based, i.e. the 3rd epoch), 10 gradient-ascent steps on g = I + T with the action of
eq. (46) on every layer pair, maximising ||grad L||^2 on a fresh random batch of 200 training
images, stopping once ||grad L||^2 > 100; the optimizer state is then reset, as the authors do.
Learning rate, teleport epoch and teleport step size are the authors' per-optimizer values
(PRESETS); a value given (--lr=..., --tele-epoch=..., --tele-lr=...) applies to every optimizer run.

Arms (lib.arms.Arm, see declare_arms) run one after another, each as one batched model of the
5 seeds (weights (5, out, in), one torch.optim optimizer): Adam keeps one step count per weight
tensor, so arms sharing a batched model could not reset their state alone. All arms teleport on
the same random images (lib.arms.ArmHook's batch generator is seeded with TELE_SEED for each).

CPU runtime on the real 4,000-image MNIST subset (--data-dir=../shared/data/mnist5k), one thread
of a quiet 2-core machine: 70 s with --controls (4 optimizers x 6 arms x 5 seeds x 40 epochs),
including the one-off torch.compile of the training step (COMPILE; compiled training is 1.6x
faster per seed-epoch than the eager engine, benchmarks/bench_training.py); --quick: 15 s. The
full 50,000-image protocol has 12.5x as many batches per epoch: about 5 min for the two default
arms, 15 min with --controls (estimated, not measured: the full set is not on this machine).

Headline (mnist5k, 5 seeds): the teleport arm's training loss is below the baseline's at every
epoch 1-5 for momentum, RMSProp and Adam, and from epoch 3 (after its teleport) for AdaGrad. The
controls split the causes: for AdaGrad the whole gain comes from the optimizer reset (reset-only
reaches 106% of it, teleport with the state kept 0%); for momentum and Adam it comes from the
optimised move (reset-only and a random move of the same size: about 0%); RMSProp is in between
(reset-only 14%, random move 15%). Per wall time (Figure 13) the 8 teleports cost 0.6-0.7 s,
about 10 compiled epochs of this small subset, and the teleport arm stays behind the baseline.
Tables: results/optimization/MNIST_summary.md.

Outputs: under OUT_DIR, results/optimization/<DATASET>_<optimizer>.json per optimizer (its
resolved config, the environment, the data, and per arm the train/test loss and accuracy per
epoch and run, wall time and teleport records), results/optimization/<DATASET>_summary.json and
.md (loss tables, the controls' shares of the teleport gain), and
figures/optimization/<DATASET>_<optimizer>_loss_vs_epoch.png (Figure 5) and _loss_vs_time.png
(Figure 13): train and test loss side by side, every arm.
"""
import os

import numpy as np
import torch

from lib.actions import GLAction
from lib.arms import Arm, ArmHook, Moments
from lib.config import UsageError, check_choice, check_positive, run, with_preset
from lib.data import load
from lib.io import environment, experiment_dirs, load_results, relative, save_json, save_text
from lib.models import Activation
from lib.plots import COLORS, plot_mean_std, save_figure
from lib.report import format_row, markdown_table
from lib.teleport import make_objective
from lib.train import fit, make_model

# ---- config (override any with --NAME=value) ------------------------------------------------
DATASET = "MNIST"               # MNIST, FashionMNIST or CIFAR10
OPTIMIZERS_RUN = ["adagrad", "momentum", "rmsprop", "adam"]  # which optimizers, in order (also: sgd)
ARMS = ["baseline", "teleport"]  # arms to run: baseline, teleport, reset-only, random-teleport,
                                 # teleport-keep, teleport-transport
CONTROLS = False                # True: add reset-only, random-teleport, teleport-keep, teleport-transport
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
PLOT_ONLY = False               # redraw figures and tables from saved results
DATA_DIR = "data"               # datasets in torchvision's layout (--data-dir)
DEVICE = "cpu"                  # cpu, cuda or auto
OUT_DIR = "."                   # figures/ and results/ go under this folder
PROGRESS = True                 # tqdm bars
COMPILE = True                  # torch.compile the training step (1.6x faster per seed-epoch; ~20 s to compile)
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


def declare_arms(ocfg):
    """Every arm (lib.arms.Arm) with one optimizer's resolved teleport settings: the controls
    reset-only (the optimizer reset alone, at the teleport moments), random-teleport (a random
    group element with the algebra norms ||g - I|| the teleport arm found at each moment),
    teleport-keep and -transport (optimizer state kept, or first moments pushed forward)."""
    tele = dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=ocfg["TELE_STEPS"],
                lr=ocfg["TELE_LR"], stop_above=ocfg["STOP_ABOVE"])
    return {"baseline": Arm("baseline"),
            "teleport": Arm("teleport", "teleport", "reset", teleport=tele),
            "reset-only": Arm("reset-only", "none", "reset"),
            "random-teleport": Arm("random-teleport", "random", "reset", match="teleport", teleport=tele),
            "teleport-keep": Arm("teleport-keep", "teleport", "keep", teleport=tele),
            "teleport-transport": Arm("teleport-transport", "teleport", "transport", teleport=tele)}


def arms_of(cfg):
    """The arm names to run, teleport before random-teleport (which reuses its norms)."""
    arms = list(dict.fromkeys(list(cfg["ARMS"]) + (CONTROL_ARMS if cfg["CONTROLS"] else [])))
    for a in arms:
        check_choice("arm", a, ARM_NAMES)
    if "random-teleport" in arms and "teleport" not in arms:
        raise UsageError("arm 'random-teleport' needs the 'teleport' arm (it reuses its norms)")
    return sorted(arms, key=lambda a: a == "random-teleport")


def check(cfg):
    check_choice("dataset", cfg["DATASET"], WIDTHS)
    for k in ("EPOCHS", "N_RUNS", "BATCH_SIZE", "TRAIN_SIZE", "TELE_BATCH_SIZE"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    for k in ("TELE_BATCHES", "TELE_STEPS"):
        check_positive(k.lower(), cfg[k])
    for opt in cfg["OPTIMIZERS_RUN"]:
        ocfg = with_preset(cfg, PRESETS, "OPTIMIZER", opt)  # an unknown optimizer is a UsageError
        for k in ("LR", "TELE_EPOCH", "TELE_LR"):
            if isinstance(ocfg[k], bool) or not isinstance(ocfg[k], int if k == "TELE_EPOCH" else (int, float)):
                raise UsageError(f"--{k.lower().replace('_', '-')}: expected a number, got {ocfg[k]!r}")
            check_positive(f"{opt} {k.lower()}", ocfg[k], allow_zero=k != "LR")
        if ocfg["TELE_EPOCH"] >= cfg["EPOCHS"]:
            raise UsageError(f"{opt} tele_epoch {ocfg['TELE_EPOCH']} is not below epochs = {cfg['EPOCHS']}")
    return arms_of(cfg)


def run_arm(ocfg, data, optimizer, arm, matched=None):
    """Train the N_RUNS seeds of one arm as one batched model, the arm carried out by an ArmHook
    at the teleport moments. Returns fit's curves (lists over epochs of N_RUNS values) plus the
    seeds and the arm's records ('teleports')."""
    seeds = [(r + 1) * ocfg["SEED_BASE"] for r in range(ocfg["N_RUNS"])]
    W, opt = make_model(WIDTHS[ocfg["DATASET"]], seeds, optimizer, ocfg["LR"], ocfg["DEVICE"])
    moments = Moments((ocfg["TELE_EPOCH"],), ocfg["TELE_BATCHES"], ocfg["TELE_BATCH_SIZE"], ocfg["TELE_SEED"])
    hook = ArmHook(W, opt, data, ACT, [arm], moments, matched=matched)
    hist = fit(W, opt, data, ACT, ocfg["EPOCHS"], ocfg["BATCH_SIZE"], hook=hook, desc=f"{optimizer} {arm.name}",
               progress=ocfg["PROGRESS"], compile=ocfg["COMPILE"])
    return {**hist, "seeds": seeds, "teleports": hook.records[arm.name]}


def run_optimizer(ocfg, data, optimizer, names):
    arms, out = declare_arms(ocfg), {}
    for name in names:
        matched = {"teleport": out["teleport"]["teleports"]} if arms[name].move == "random" else None
        h = out[name] = run_arm(ocfg, data, optimizer, arms[name], matched)
        row = {"opt": optimizer, "arm": f"{name:>18}", "time_s": float(h["time_s"][-1])}
        row.update({f"train@{e}": float(np.mean(h["train_loss"][e - 1]))
                    for e in ocfg["REPORT_EPOCHS"] if e <= len(h["train_loss"])})
        if h["teleports"] and "objective_before" in h["teleports"][0]:
            row["|g|^2 x"] = float(np.mean([np.mean(r["objective_after"]) / np.mean(r["objective_before"])
                                            for r in h["teleports"]]))
        print(format_row(row))
    return out


def plot_optimizer(res, title, path_stem):
    """Figure 5 (x = epoch) and Figure 13 (x = the arm's wall time): training loss (left) and
    test loss (right), mean over the runs; baseline and teleport with a +-1 std band, the
    controls drawn on top in their own line styles and markers."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, MaxNLocator
    order = [a for a in ARM_NAMES if a in res] + [a for a in res if a not in ARM_NAMES]
    for x_kind in ("epoch", "time"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, key in zip(axes, ("train_loss", "test_loss")):
            for arm in order:
                runs = np.asarray(res[arm][key], float).T  # (K, E)
                x = np.arange(1, runs.shape[1] + 1) if x_kind == "epoch" else np.asarray(res[arm]["time_s"], float)
                if arm in STYLES:
                    ls, marker = STYLES[arm]
                    ax.plot(x, runs.mean(0), linestyle=ls, marker=marker, markevery=max(1, len(x) // 8), ms=4,
                            lw=1.3, color=COLORS.get(arm), label=arm, zorder=3, markerfacecolor="none")
                else:
                    plot_mean_std(ax, x, runs, label=arm, color=COLORS.get(arm))
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter())  # 2.2, not 2.2 x 10^0
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
            ax.set_title("training loss" if key == "train_loss" else "test loss", fontsize=10)
            ax.set_xlabel("epoch" if x_kind == "epoch" else "wall time of the arm (s, all runs batched)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=x_kind == "epoch"))
        axes[0].set_ylabel("cross-entropy loss")
        axes[1].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        save_figure(fig, f"{path_stem}_loss_vs_{x_kind}.png")


def stat(h, key, epoch):
    v = np.asarray(h[key][epoch - 1], float)
    return float(v.mean()), float(v.std())


def share(base, tele, arm):
    """The part of the teleport arm's gain over the baseline that `arm` reaches."""
    return (base - arm) / (base - tele) if base != tele else float("nan")


def summary(cfg, results):
    """Per optimizer and arm: mean train/test loss at REPORT_EPOCHS and total time; mean +- std
    train loss at CONTROL_EPOCHS and the share of the teleport gain that each control reaches.
    Gain = baseline minus arm in train loss averaged over all epochs (and at each epoch)."""
    rep = [e for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]]
    ctl = [e for e in cfg["CONTROL_EPOCHS"] if e <= cfg["EPOCHS"]]
    rows, crows, verdicts, data, below = [], [], {}, {}, {}
    for opt, res in results.items():
        d = data[opt] = {}
        for arm, h in res.items():
            d[arm] = {"train_loss": {e: stat(h, "train_loss", e) for e in sorted(set(rep + ctl))},
                      "test_loss": {e: stat(h, "test_loss", e) for e in rep},
                      "test_acc": {e: stat(h, "test_acc", e) for e in rep},
                      "time_s": float(h["time_s"][-1]),
                      "teleport_time_s": float(sum(r.get("time_s", 0.0) for r in h["teleports"])),
                      "mean_train_loss_all_epochs": float(np.mean(h["train_loss"]))}
            a = d[arm]
            rows.append([opt, arm] + [f"{a['train_loss'][e][0]:.4g} / {a['test_loss'][e][0]:.4g}" for e in rep]
                        + [f"{a['time_s']:.1f} ({a['teleport_time_s']:.1f})"])
            crows.append([opt, arm] + [f"{a['train_loss'][e][0]:.4f} ± {a['train_loss'][e][1]:.4f}" for e in ctl])
        if "baseline" not in res or "teleport" not in res:
            continue
        mean = {arm: d[arm]["mean_train_loss_all_epochs"] for arm in res}
        at = {arm: {e: d[arm]["train_loss"][e][0] for e in ctl} for arm in res}
        gain = mean["baseline"] - mean["teleport"]
        controls = [arm for arm in res if arm not in ("baseline", "teleport")]
        shares = {arm: (mean["baseline"] - mean[arm]) / gain if gain else float("nan") for arm in controls}
        shares_at = {arm: {e: share(at["baseline"][e], at["teleport"][e], at[arm][e]) for e in ctl} for arm in controls}
        e5 = 5 if 5 in ctl else ctl[-1]
        text = f"{opt}: teleport lowers the training loss averaged over all epochs by {gain:+.4f} below the baseline"
        for arm in (a for a in CONTROL_ARMS if a in shares):
            text += (f"; {arm} reaches {100 * shares[arm]:.0f}% of that gain "
                     f"({100 * shares_at[arm][e5]:.0f}% at epoch {e5})")
        verdicts[opt] = {"gain": gain, "share": shares, "share_at_epoch": shares_at, "text": text}
        b, t = (np.asarray(res[a]["train_loss"][:5], float).mean(1) for a in ("baseline", "teleport"))
        below[opt] = f"{opt}: " + ", ".join(f"{e + 1}: {'yes' if t[e] < b[e] else 'no'} ({t[e]:.4f} vs {b[e]:.4f})"
                                            for e in range(len(b)))
    header = ["optimizer", "arm"] + [f"train / test @ {e}" for e in rep] + ["time s (teleports)"]
    cheader = ["optimizer", "arm"] + [f"train @ {e}" for e in ctl]
    md = (f"## {cfg['DATASET']}: mean train / test loss over {cfg['N_RUNS']} runs\n\n" + markdown_table(header, rows)
          + f"\n\n## Controls: train loss, mean ± std over {cfg['N_RUNS']} runs\n\n" + markdown_table(cheader, crows)
          + "\n\n" + "\n".join(f"- {v['text']}" for v in verdicts.values())
          + "\n\nTeleport arm's mean training loss below the baseline's, by epoch (teleport vs baseline):\n\n"
          + "\n".join(f"- {v}" for v in below.values()) + "\n")
    return md, {"per_arm": data, "verdicts": verdicts, "teleport_below_baseline": below}


def saved_config(cfg):
    return {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])}


def main(cfg):
    names = check(cfg)
    if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a 784-16-10-10 MLP at batch 20 is launch-bound: 1 thread is fastest
    fig_dir, res_dir = experiment_dirs("optimization", cfg["OUT_DIR"])
    tag, results, data, run_cfg = cfg["DATASET"], {}, None, saved_config(cfg)
    for opt in cfg["OPTIMIZERS_RUN"]:
        path = os.path.join(res_dir, f"{tag}_{opt}.json")
        if cfg["PLOT_ONLY"]:
            saved = load_results(path)
            run_cfg = {**saved["config"], "PLOT_ONLY": True}  # the config the results were made with
        else:
            if data is None:
                data = load(tag, cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"], cfg["SPLIT_SEED"])
                print(f"{data.label}: {len(data.y_train)} training, {len(data.y_test)} test images")
            ocfg = with_preset(cfg, PRESETS, "OPTIMIZER", opt)
            saved = {"config": saved_config(ocfg), "environment": environment(), "optimizer": opt,
                     "data": {**data.info, "label": data.label}, "arms": run_optimizer(ocfg, data, opt, names)}
            save_json(path, saved)
        results[opt] = saved["arms"]
        label = saved["data"]["label"] if "data" in saved else f"{tag} ({saved['n_train']:,} train)"  # older files
        n_runs = len(next(iter(saved["arms"].values()))["train_loss"][0])
        plot_optimizer(saved["arms"], f"{label}, {opt}: mean over {n_runs} runs (band: ±1 std)",
                       os.path.join(fig_dir, f"{tag}_{opt}"))
    md, summ = summary(run_cfg, results)
    print("\n" + md)
    save_json(os.path.join(res_dir, f"{tag}_summary.json"), {"config": run_cfg, "environment": environment(), **summ})
    save_text(os.path.join(res_dir, f"{tag}_summary.md"), md)
    return results


if __name__ == "__main__":
    run(main, globals())
