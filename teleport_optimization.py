"""Figures 5 and 13 (Section 5.1, App. F.2): teleportation speeds up AdaGrad, SGD with momentum,
RMSProp and Adam; with --figure=12, Figure 12 (App. F.1): optimizer-state strategies for
momentum and the two AdaGrad teleport objectives. Issue 7's controls with --controls.

    python teleport_optimization.py                        # Figure 5/13 on MNIST, 4 optimizers, 2 arms
    python teleport_optimization.py --controls             # + reset-only, random-teleport, teleport-keep/-transport
    python teleport_optimization.py --figure=12            # Figure 12
    python teleport_optimization.py --quick                # a smoke run, under a minute

Protocol (the paper's, with the authors' released hyperparameters where the paper is silent):
784-16-10-10 MLP without biases, LeakyReLU(0.1), cross-entropy, mini-batches of 20 in a fixed
sequential order, 5 runs initialised with seeds (r+1)*54321, 40 epochs. Teleport arm: before
each of the first 8 mini-batches of epoch 0 (momentum, RMSProp, Adam) or epoch 2 (AdaGrad,
SGD; 0-based, i.e. the 3rd epoch), 10 gradient-ascent steps on g = I + T with the action of
eq. (46) on every layer pair, maximising ||grad L||^2 on a fresh random batch of 200 training
images, stopping once ||grad L||^2 > 100; the optimizer state is then reset, as the authors do.

Engine: the 5 runs of one arm share the data order and train as one batched model (weights
(5, out, in), one torch.optim optimizer). Arms run one after another, not batched together:
torch.optim keeps scalar per-tensor state (Adam's and RMSProp's `step`), so resetting the state
of some models of a batch but not others would need a custom optimizer. All arms teleport on the
same random images (TeleportHook's generator is seeded identically for every arm), and the
random-teleport arm reuses the Frobenius norms ||g - I|| the teleport arm found at each moment.

CPU runtime on the real 4,000-image MNIST subset (--data-dir=../shared/data/mnist5k), one thread
of a quiet 2-core machine: 70 s with --controls (4 optimizers x 6 arms x 5 seeds x 40 epochs),
including the one-off torch.compile of the training step (COMPILE; --compile=False trains eagerly,
about 1.6x slower per step); --figure=12: 15 s; --quick: 15 s. The full 50,000-image protocol has
12.5x as many batches per epoch: about 5 min for the two default arms, 15 min with --controls
(estimated, not measured: the full set is not on this machine).

Headline (mnist5k, 5 seeds): the teleport arm's training loss is below the baseline's at every
epoch 1-5 for momentum, RMSProp and Adam, and from epoch 3 (after its teleport) for AdaGrad. The
controls split the causes: for AdaGrad the whole gain comes from the optimizer reset (reset-only
reaches 106% of it, teleport with the state kept 0%); for momentum and Adam it comes from the
optimised move (reset-only and a random move of the same size: about 0%); RMSProp is in between
(reset-only 14%, random move 15%). Per wall time (Figure 13) the 8 teleports cost 0.6-0.7 s,
about 10 compiled epochs of this small subset, and the teleport arm stays behind the baseline. Tables: results/optimization/MNIST_summary.md.
"""
import os

import numpy as np
import torch

from lib.actions import GLAction
from lib.config import UsageError, check_choice, check_positive, run
from lib.data import load
from lib.metrics import adagrad_preconditioner
from lib.models import Activation, loss_fn
from lib.optim import make_optimizer
from lib.results import (COLORS, environment, experiment_dirs, format_row, load_json, markdown_table,
                         plot_mean_std, save_figure, save_json)
from lib.teleport import make_objective
from lib.train import TeleportHook, fit, make_model, teleport_model

# ---- config (override any with --NAME=value) ------------------------------------------------
FIGURE = 5                      # 5 (Figures 5 and 13) or 12 (Figure 12)
DATASET = "MNIST"               # MNIST, FashionMNIST or CIFAR10
OPTIMIZERS_RUN = ["adagrad", "momentum", "rmsprop", "adam"]  # which optimizers (also: sgd)
ARMS = ["baseline", "teleport"]  # arms to run; see _ARM_SPECS for the controls
CONTROLS = False                # True: add reset-only, random-teleport, teleport-keep, teleport-transport
EPOCHS = 40                     # training epochs
N_RUNS = 5                      # runs r = 0..N_RUNS-1, initialised with seed (r+1)*SEED_BASE
SEED_BASE = 54321               # the authors' initialisation seed unit
BATCH_SIZE = 20                 # mini-batch size, fixed sequential order
TRAIN_SIZE = 50000              # seeded random subset of the training set (all images if fewer)
SPLIT_SEED = 0                  # seed of that subset
TELE_BATCHES = 8                # teleport before each of the first TELE_BATCHES mini-batches
TELE_BATCH_SIZE = 200           # fresh random training images per teleport
TELE_STEPS = 10                 # gradient-ascent steps per teleport
STOP_ABOVE = 100.0              # stop a model's teleport once ||grad L||^2 exceeds this
TELE_SEED = 0                   # seed of the teleport batches (identical for every arm)
REPORT_EPOCHS = [1, 2, 5, 10, 40]   # 1-based epochs of the summary table
CONTROL_EPOCHS = [2, 5, 10, 40]     # 1-based epochs of the controls table (issue 7)
# Figure 12 (App. F.1)
F12_EPOCHS = 300                # full-batch epochs
F12_RUNS = 5                    # repeats, data and weights seeded 0..F12_RUNS-1
F12_TELE_EPOCH = 5              # the single teleport, before this (0-based) epoch
F12_TELE_STEPS = 10             # gradient-ascent steps of that teleport
F12_MOMENTUM_LR = 5e-4          # base lr of SGD with momentum 0.9 (not in the paper; see README)
F12_MOMENTUM_TELE_LR = 1e-11    # teleport step size for (a) (not in the paper; largest finite of 1e-13..3e-11)
F12_ADAGRAD_LR = 3.0            # base lr of AdaGrad (not in the paper; see README)
F12_GRAD_TELE_LR = 1e-9        # teleport step, max ||grad L||^2 (paper: 1.2e-5, non-finite here; see README)
F12_ANORM_TELE_LR = 1e-5        # teleport step, max ||grad L||_A^2 (paper: 7.5e-3, non-finite here; see README)
# plumbing
PLOT_ONLY = False               # redraw figures and tables from saved results
DATA_DIR = "data"               # datasets in torchvision's layout (--data-dir)
DEVICE = "cpu"                  # cpu, cuda or auto
OUT_DIR = "."                   # figures/ and results/ go under this folder
PROGRESS = True                 # tqdm bars
COMPILE = True                  # torch.compile the training step (~2x faster per step; ~20 s to compile)
# ---------------------------------------------------------------------------------------------

DATASETS = {"MNIST": {"widths": [784, 16, 10, 10]},
            "FashionMNIST": {"widths": [784, 16, 10, 10]},
            "CIFAR10": {"widths": [3072, 128, 32, 10]}}
# the authors' released settings: base lr, teleport epoch (0-based), teleport step size
OPTIMIZER_SETTINGS = {"adagrad": {"lr": 1e-2, "tele_epoch": 2, "tele_lr": 1e-4},
                      "sgd": {"lr": 1e-2, "tele_epoch": 2, "tele_lr": 1e-4},
                      "momentum": {"lr": 1e-3, "tele_epoch": 0, "tele_lr": 5e-2},
                      "rmsprop": {"lr": 1e-4, "tele_epoch": 0, "tele_lr": 5e-2},
                      "adam": {"lr": 1e-4, "tele_epoch": 0, "tele_lr": 5e-2}}
# arm -> (TeleportHook mode or None for no hook, optimizer-state strategy after each teleport)
_ARM_SPECS = {"baseline": (None, "reset"), "teleport": ("teleport", "reset"),
             "reset-only": ("reset-only", "reset"), "random-teleport": ("random", "reset"),
             "teleport-keep": ("teleport", "keep"), "teleport-transport": ("teleport", "transport")}
_CONTROL_ARMS = ["reset-only", "random-teleport", "teleport-keep", "teleport-transport"]
_QUICK = {"EPOCHS": 3, "N_RUNS": 2, "TRAIN_SIZE": 200, "TELE_BATCHES": 2, "TELE_BATCH_SIZE": 40,
          "TELE_STEPS": 3, "REPORT_EPOCHS": [1, 2, 3], "CONTROL_EPOCHS": [2, 3],
          "F12_EPOCHS": 20, "F12_RUNS": 2, "F12_TELE_EPOCH": 5, "PROGRESS": False, "COMPILE": False}
ACT = Activation(0.1)  # LeakyReLU(0.1), the paper's


def arms_of(cfg):
    arms = list(cfg["ARMS"]) + (_CONTROL_ARMS if cfg["CONTROLS"] else [])
    arms = list(dict.fromkeys(arms))
    for a in arms:
        check_choice("arm", a, _ARM_SPECS)
    if "random-teleport" in arms and "teleport" not in arms:
        raise UsageError("arm 'random-teleport' needs the 'teleport' arm (it reuses its norms)")
    return sorted(arms, key=lambda a: a == "random-teleport")  # teleport before random-teleport


def check(cfg):
    check_choice("figure", cfg["FIGURE"], (5, 12))
    check_choice("dataset", cfg["DATASET"], cfg["DATASETS"])
    for o in cfg["OPTIMIZERS_RUN"]:
        check_choice("optimizer", o, cfg["OPTIMIZER_SETTINGS"])
        for k, v in cfg["OPTIMIZER_SETTINGS"][o].items():
            check_positive(f"{o} {k}", v)
    for k in ("EPOCHS", "N_RUNS", "BATCH_SIZE", "TRAIN_SIZE", "TELE_BATCH_SIZE", "F12_EPOCHS", "F12_RUNS"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    for k in ("TELE_BATCHES", "TELE_STEPS", "F12_TELE_STEPS", "F12_MOMENTUM_LR", "F12_MOMENTUM_TELE_LR",
              "F12_ADAGRAD_LR", "F12_GRAD_TELE_LR", "F12_ANORM_TELE_LR"):
        check_positive(k.lower(), cfg[k])


# ---- Figure 5 / 13 ----------------------------------------------------------------------------
def make_hook(cfg, W, opt, data, optimizer, arm, random_norms=None):
    """The arm's TeleportHook (None for the baseline): teleport / reset-only / random moments
    before the first TELE_BATCHES mini-batches of the optimizer's teleport epoch."""
    s = cfg["OPTIMIZER_SETTINGS"][optimizer]
    mode, strategy = _ARM_SPECS[arm]
    if mode is None:
        return None
    return TeleportHook(W, opt, data, ACT, [s["tele_epoch"]], cfg["TELE_BATCHES"], cfg["TELE_BATCH_SIZE"],
                        torch.Generator().manual_seed(cfg["TELE_SEED"]), strategy=strategy, mode=mode,
                        random_norms=random_norms, objective=make_objective("grad_norm", ACT),
                        action=GLAction(46), steps=cfg["TELE_STEPS"], lr=s["tele_lr"],
                        stop_above=cfg["STOP_ABOVE"])


def run_arm(cfg, data, optimizer, arm, random_norms=None):
    """Train the N_RUNS seeds of one arm as one batched model. Returns fit's curves (lists over
    epochs of N_RUNS values) plus the seeds and the teleport records ('teleports')."""
    seeds = [(r + 1) * cfg["SEED_BASE"] for r in range(cfg["N_RUNS"])]
    W, opt = make_model(cfg["DATASETS"][cfg["DATASET"]]["widths"], seeds, optimizer,
                        cfg["OPTIMIZER_SETTINGS"][optimizer]["lr"], cfg["DEVICE"])
    hook = make_hook(cfg, W, opt, data, optimizer, arm, random_norms)
    hist = fit(W, opt, data, ACT, cfg["EPOCHS"], cfg["BATCH_SIZE"], hook=hook,
               desc=f"{optimizer} {arm}", progress=cfg["PROGRESS"], compile=cfg["COMPILE"])
    hist["seeds"] = seeds
    hist["teleports"] = [] if hook is None else hook.records
    return hist


def run_optimizer(cfg, data, optimizer, arms):
    out = {}
    for arm in arms:
        norms = None
        if _ARM_SPECS[arm][0] == "random":
            norms = [torch.tensor(r["algebra_norm"]) for r in out["teleport"]["teleports"]]
        out[arm] = run_arm(cfg, data, optimizer, arm, norms)
        h = out[arm]
        row = {"opt": optimizer, "arm": f"{arm:>18}", "time_s": float(h["time_s"][-1])}
        for e in cfg["REPORT_EPOCHS"]:
            if e <= len(h["train_loss"]):
                row[f"train@{e}"] = float(np.mean(h["train_loss"][e - 1]))
        tele = h["teleports"]
        if tele and "objective_before" in tele[0]:
            row["|g|^2 x"] = float(np.mean([np.mean(r["objective_after"]) / np.mean(r["objective_before"])
                                            for r in tele]))
        print(format_row(row))
    return out


def plot_optimizer(res, dataset, optimizer, fig_dir):
    """Figure 5 (x = epoch) and Figure 13 (x = the arm's mean wall time): training loss dashed,
    test loss solid with a +-1 std band over the runs for the paper's two arms; the controls
    in muted colours, thinner and without bands, drawn underneath."""
    import matplotlib.pyplot as plt
    order = sorted(res, key=lambda a: a in ("baseline", "teleport"))
    for x_kind in ("epoch", "time"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for arm in order:
            h = res[arm]
            tr, te = np.asarray(h["train_loss"], float).T, np.asarray(h["test_loss"], float).T  # (K, E)
            x = np.arange(1, tr.shape[1] + 1) if x_kind == "epoch" else np.asarray(h["time_s"], float)
            main_arm = arm in ("baseline", "teleport")
            c, lw = COLORS.get(arm), (1.6 if main_arm else 0.9)
            ax.plot(x, tr.mean(0), "--", color=c, lw=lw, alpha=1 if main_arm else 0.8)
            if main_arm:
                plot_mean_std(ax, x, te, label=arm, color=c)
            else:
                ax.plot(x, te.mean(0), "-", color=c, lw=lw, alpha=0.8, label=arm)
        ax.set_yscale("log")
        ax.set_xlabel("epoch" if x_kind == "epoch" else "wall time (s) of the arm (5 runs batched)")
        ax.set_ylabel("loss (train dashed, test solid)")
        ax.set_title(f"{dataset}, {optimizer}")
        ax.legend(fontsize=7)
        save_figure(fig, os.path.join(fig_dir, f"{dataset}_{optimizer}_loss_vs_{x_kind}.png"))


def stat(h, key, epoch):
    v = np.asarray(h[key][epoch - 1], float)
    return float(v.mean()), float(v.std())


def summary(cfg, results):
    """Per optimizer: mean train/test loss at REPORT_EPOCHS and total time per arm (issue 3); mean
    +- std train loss at CONTROL_EPOCHS per arm and the share of the teleport gain that each
    control reaches (issue 7). Gain = baseline minus arm in train loss averaged over all epochs."""
    rep = [e for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]]
    ctl = [e for e in cfg["CONTROL_EPOCHS"] if e <= cfg["EPOCHS"]]
    rows, crows, verdicts, data = [], [], {}, {}
    for opt, res in results.items():
        data[opt] = {}
        for arm, h in res.items():
            d = {"train_loss": {e: stat(h, "train_loss", e) for e in sorted(set(rep + ctl))},
                 "test_loss": {e: stat(h, "test_loss", e) for e in rep},
                 "test_acc": {e: stat(h, "test_acc", e) for e in rep},
                 "time_s": float(h["time_s"][-1]),
                 "teleport_time_s": float(sum(r.get("time_s", 0.0) for r in h["teleports"])),
                 "mean_train_loss_all_epochs": float(np.mean(h["train_loss"]))}
            data[opt][arm] = d
            rows.append([opt, arm] + [f"{d['train_loss'][e][0]:.4g} / {d['test_loss'][e][0]:.4g}" for e in rep]
                        + [f"{d['time_s']:.1f} ({d['teleport_time_s']:.1f})"])
            crows.append([opt, arm] + [f"{d['train_loss'][e][0]:.4f} ± {d['train_loss'][e][1]:.4f}" for e in ctl])
        if "baseline" in res and "teleport" in res:
            base = data[opt]["baseline"]["mean_train_loss_all_epochs"]
            gain = base - data[opt]["teleport"]["mean_train_loss_all_epochs"]
            shares = {arm: (base - data[opt][arm]["mean_train_loss_all_epochs"]) / gain if gain else float("nan")
                      for arm in res if arm not in ("baseline", "teleport")}
            shares_at = {arm: {e: ((data[opt]["baseline"]["train_loss"][e][0] - data[opt][arm]["train_loss"][e][0])
                                   / (data[opt]["baseline"]["train_loss"][e][0] - data[opt]["teleport"]["train_loss"][e][0]))
                               if data[opt]["baseline"]["train_loss"][e][0] != data[opt]["teleport"]["train_loss"][e][0]
                               else float("nan") for e in ctl} for arm in shares}
            e5 = 5 if 5 in ctl else ctl[-1]
            text = (f"{opt}: teleport lowers the training loss averaged over all epochs by {gain:+.4f} "
                    f"below the baseline")
            for arm in ("reset-only", "random-teleport", "teleport-keep", "teleport-transport"):
                if arm in shares:
                    text += (f"; {arm} reaches {100 * shares[arm]:.0f}% of that gain "
                             f"({100 * shares_at[arm][e5]:.0f}% at epoch {e5})")
            verdicts[opt] = {"gain": gain, "share": shares, "share_at_epoch": shares_at, "text": text}
    below = {}
    for opt, res in results.items():
        if "baseline" in res and "teleport" in res:
            n = min(5, cfg["EPOCHS"])
            b, t = (np.asarray(res[a]["train_loss"][:n], float).mean(1) for a in ("baseline", "teleport"))
            below[opt] = f"{opt}: " + ", ".join(f"{e + 1}: {'yes' if t[e] < b[e] else 'no'} ({t[e]:.4f} vs {b[e]:.4f})"
                                                for e in range(n))
    header = ["optimizer", "arm"] + [f"train / test @ {e}" for e in rep] + ["time s (teleports)"]
    cheader = ["optimizer", "arm"] + [f"train @ {e}" for e in ctl]
    md = (f"## {cfg['DATASET']}: mean train / test loss over {cfg['N_RUNS']} runs\n\n" + markdown_table(header, rows)
          + f"\n\n## Controls: train loss, mean ± std over {cfg['N_RUNS']} runs\n\n" + markdown_table(cheader, crows)
          + "\n\n" + "\n".join(f"- {v['text']}" for v in verdicts.values())
          + "\n\nTeleport arm's mean training loss below the baseline's, by epoch (teleport vs baseline):\n\n"
          + "\n".join(f"- {v}" for v in below.values()) + "\n")
    return md, {"per_arm": data, "verdicts": verdicts, "teleport_below_baseline": below}


def figure5(cfg):
    fig_dir, res_dir = experiment_dirs("optimization", cfg["OUT_DIR"])
    arms = arms_of(cfg)
    results, run_cfg = {}, cfg  # with PLOT_ONLY, the config the results were made with
    data = None
    for opt in cfg["OPTIMIZERS_RUN"]:
        path = os.path.join(res_dir, f"{cfg['DATASET']}_{opt}.json")
        if cfg["PLOT_ONLY"]:
            if not os.path.exists(path):
                raise UsageError(f"--plot-only: no saved results at {path}")
            saved = load_json(path)
            results[opt], run_cfg = saved["arms"], {**saved["config"], "PLOT_ONLY": True}
        else:
            if data is None:
                data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"], cfg["SPLIT_SEED"])
                print(f"{cfg['DATASET']}: {len(data.y_train)} training, {len(data.y_test)} test images")
            results[opt] = run_optimizer(cfg, data, opt, arms)
            save_json(path, {"config": cfg, "environment": environment(), "optimizer": opt,
                             "settings": cfg["OPTIMIZER_SETTINGS"][opt], "n_train": len(data.y_train),
                             "n_test": len(data.y_test), "arms": results[opt]})
        plot_optimizer(results[opt], cfg["DATASET"], opt, fig_dir)
    md, summ = summary(run_cfg, results)
    print("\n" + md)
    tag = cfg["DATASET"]
    save_json(os.path.join(res_dir, f"{tag}_summary.json"), {"config": run_cfg, "environment": environment(), **summ})
    with open(os.path.join(res_dir, f".tmp-{tag}_summary.md"), "w") as fh:
        fh.write(md)
    os.replace(os.path.join(res_dir, f".tmp-{tag}_summary.md"), os.path.join(res_dir, f"{tag}_summary.md"))
    return results


# ---- Figure 12 -------------------------------------------------------------------------------
_F12_WIDTHS = [5, 6, 7, 8]   # X in R^{5x4}, Y in R^{8x4}; W1: 6x5, W2: 7x6, W3: 8x7 (App. F.1)
_F12_BATCH = 4


def f12_problem(seeds, device):
    """Weights and data uniform on [0, 1] per repeat (App. F.1); X: (4, 5), Y: (4, 8) in rows."""
    Ws, Xs, Ys = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        Xs.append(torch.rand(_F12_BATCH, _F12_WIDTHS[0], generator=g))
        Ys.append(torch.rand(_F12_BATCH, _F12_WIDTHS[-1], generator=g))
        Ws.append([torch.rand(o, i, generator=g) for i, o in zip(_F12_WIDTHS[:-1], _F12_WIDTHS[1:])])
    W = [torch.stack(w).to(device).requires_grad_() for w in zip(*Ws)]
    return W, torch.stack(Xs).to(device), torch.stack(Ys).to(device)


def f12_loss(W, X, Y):
    """||Y - W3 s(W2 s(W1 X))||^2 per repeat (App. F.1): lib's 'mse' is half of it."""
    return 2 * loss_fn(W, X, Y, ACT, "mse")


def f12_run(cfg, optimizer, lr, tele=None):
    """Full-batch training of the F12_RUNS repeats (one batched model; each repeat has its own
    data, so X: (K, 4, 5)). tele = dict(strategy, objective, lr) teleports once before epoch
    F12_TELE_EPOCH. Returns the loss curve (K, epochs+1) and the teleport record."""
    W, X, Y = f12_problem(range(cfg["F12_RUNS"]), cfg["DEVICE"])
    opt = make_optimizer(optimizer, W, lr)
    curve, rec = [f12_loss(W, X, Y).detach()], None
    for epoch in range(cfg["F12_EPOCHS"]):
        if tele is not None and epoch == cfg["F12_TELE_EPOCH"]:
            rec = f12_teleport(cfg, W, opt, X, Y, **tele)
        opt.zero_grad(set_to_none=True)
        loss = f12_loss(W, X, Y)
        loss.sum().backward()
        opt.step()
        curve.append(f12_loss(W, X, Y).detach())
    return torch.stack(curve, 1).cpu().numpy(), rec


def f12_teleport(cfg, W, opt, X, Y, strategy, objective, lr):
    """One teleport of all repeats, each on its own full batch (X: (K, 4, 5) works through lib's
    batched forward and action), climbing ||grad L||^2 or ||grad L||_A^2 of the paper's loss
    L = 2 * lib's 'mse', so ||grad L||^2 = 4 ||grad L_mse||^2 (A comes from the optimizer, which
    trains on L itself); then the optimizer-state strategy (lib.optim)."""
    from lib.metrics import grad_norm_sq
    A = adagrad_preconditioner(opt, W) if objective == "a_norm" else None
    obj = lambda V, x, y: 4 * grad_norm_sq(V, x, y, ACT, "mse", A)  # noqa: E731
    return teleport_model(W, opt, X, Y, ACT, strategy, objective=obj, action=GLAction(46),
                          steps=cfg["F12_TELE_STEPS"], lr=lr, loss="mse")


def plot_f12(curves, path, title, tele_epoch):
    """Log loss vs epoch, mean +- std over repeats (the band's lower edge clipped at the lowest
    run so that it stays positive on the log axis). A curve that turns non-finite is drawn up to
    there and its label says from which epoch; the y range follows the finite curves."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    palette = {"no teleport": COLORS["baseline"], "reset": COLORS["teleport"], "keep": COLORS["teleport-keep"],
               "transport": COLORS["teleport-transport"], "||grad L||^2": COLORS["teleport"],
               "||grad L||_A^2": COLORS["teleport-transport"]}
    top = 0.0
    for name, c in curves.items():
        c = np.asarray(c, float)
        x, label = np.arange(c.shape[1]), name
        bad = ~np.isfinite(c).all(0) | (c.max(0) > 1e3 * np.nanmax(c[:, 0]))
        if bad.any():
            label += f" (diverges at epoch {int(np.argmax(bad))})"
            c, x = c[:, :np.argmax(bad)], x[:np.argmax(bad)]
        else:
            top = max(top, c.max())
        mean, std = c.mean(0), c.std(0)
        ax.plot(x, mean, color=palette.get(name), label=label, lw=1.4)
        ax.fill_between(x, np.maximum(mean - std, c.min(0)), mean + std, color=palette.get(name), alpha=0.15, lw=0)
    ax.axvline(tele_epoch, color="k", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(top=2 * top if top else None)
    ax.set_xlabel(f"epoch (teleport before epoch {tele_epoch}, dotted)")
    ax.set_ylabel("loss ||Y - f(X)||^2")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def figure12(cfg):
    fig_dir, res_dir = experiment_dirs("optimization", cfg["OUT_DIR"])
    path = os.path.join(res_dir, "figure12.json")
    if cfg["PLOT_ONLY"]:
        if not os.path.exists(path):
            raise UsageError(f"--plot-only: no saved results at {path}")
        saved = load_json(path)
    else:
        mom, ada, recs = {}, {}, {}
        mom["no teleport"], _ = f12_run(cfg, "momentum", cfg["F12_MOMENTUM_LR"])
        for strategy in ("transport", "keep", "reset"):
            mom[strategy], recs[f"momentum-{strategy}"] = f12_run(
                cfg, "momentum", cfg["F12_MOMENTUM_LR"],
                {"strategy": strategy, "objective": "grad_norm", "lr": cfg["F12_MOMENTUM_TELE_LR"]})
        ada["no teleport"], _ = f12_run(cfg, "adagrad", cfg["F12_ADAGRAD_LR"])
        for name, obj, lr in (("||grad L||^2", "grad_norm", cfg["F12_GRAD_TELE_LR"]),
                              ("||grad L||_A^2", "a_norm", cfg["F12_ANORM_TELE_LR"])):
            ada[name], recs[f"adagrad-{obj}"] = f12_run(cfg, "adagrad", cfg["F12_ADAGRAD_LR"],
                                                        {"strategy": "keep", "objective": obj, "lr": lr})
        saved = {"config": cfg, "environment": environment(), "momentum": mom, "adagrad": ada, "teleports": recs}
        save_json(path, saved)
    plot_f12(saved["momentum"], os.path.join(fig_dir, "momentum_strategies.png"),
             "SGD momentum: optimizer state after the teleport", saved["config"]["F12_TELE_EPOCH"])
    plot_f12(saved["adagrad"], os.path.join(fig_dir, "adagrad_objectives.png"),
             "AdaGrad: teleport objective", saved["config"]["F12_TELE_EPOCH"])
    for part in ("momentum", "adagrad"):
        for name, c in saved[part].items():
            c = np.asarray(c, float)
            print(format_row({"part": part, "arm": f"{name:>15}", **{f"loss@{e}": float(c[:, e].mean())
                                                                   for e in (cfg["F12_TELE_EPOCH"], 20, 100, c.shape[1] - 1)
                                                                   if e < c.shape[1]}}))
    return saved


def main(cfg):
    check(cfg)
    if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a 784-16-10-10 MLP at batch 20 is launch-bound: 1 thread is fastest
    return figure5(cfg) if cfg["FIGURE"] == 5 else figure12(cfg)


if __name__ == "__main__":
    run(main, globals(), _QUICK)
