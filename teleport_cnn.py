"""Beyond the paper: does teleportation help a small CNN? `lib.teleport_module` on an
`nn.Module` trained with torch.optim SGD-momentum and Adam, against reset-only and random controls.

    python teleport_cnn.py                  # MNIST, momentum and Adam, 4 arms x 5 seeds, 10 epochs
    python teleport_cnn.py --optimizers-run=adam --lr=3e-4 --out-dir=runs/adam   # another lr
    python teleport_cnn.py --plot-only      # redraw the figures from the saved results
    python teleport_cnn.py --quick          # a smoke run, seconds

Protocol (ours: the paper has no CNN protocol): Conv(1,8,3)-ReLU-MaxPool(2)-Conv(8,16,3)-ReLU-MaxPool(2)-
Flatten-Linear(400,10), 5,258 weights, PyTorch's default init with seed SEED_BASE + r; cross-entropy,
batches of 64 in an order reshuffled every epoch (seeded, the same for every run and arm), 10 epochs,
5 seeds; SGD with momentum 0.9 at lr 0.02 and Adam at 1e-3 (standard values, our choice, the same for
every arm). The teleport arm runs teleport_module before the first 2 batches of epochs 0, 1 and 2 on
200 fresh training images: 10 steps of gradient ascent, step 0.05, on log ||grad L||^2 over the positive
rescaling of every hidden channel (group="rescale", 8 + 16 channels: exact on every input), optimizer
state reset. Ascent on the log raises ||grad L||^2 along the same direction with a step divided by
||grad L||^2, which varies by three orders of magnitude between the moments and runs (0.04 to
118 before the committed run's teleports).
Step sizes from a brief sweep (ours): plain ascent on ||grad L||^2 barely moved it at step 0.01
(x1.00-1.06 at most single teleports) and overflowed at 0.1 (x1e3-4e6 at epoch-1 moments); on the log,
step 0.1 gives x1.2-2.8 per single teleport, but the two back-to-back teleports of a moment compound
(x18-1500 at the second) and momentum SGD then fell to chance level (loss 2.303) in 4 of 5 seeds;
step 0.05 (3 seeds, 4 epochs): x1.1-3.9 per teleport, median 1.23-1.28, no collapse; 0.03: median
1.10-1.14. --tele-objective=grad_norm --tele-lr=0.01 runs the plain ascent. Controls at the same
moments: reset-only (the reset, no move) and random-teleport (random_teleport_module with the `size`
of the teleport of the same seed and moment, state reset). Wall time: training steps and arm moments
(teleport, reset), evaluation excluded; a teleport's cost in optimizer steps is its wall time over the
run's median step time.
Runtime: 11 min on one thread of 2 shared cores at load 8-10 (about 5 min idle, est.), bundled
4,000-image MNIST; --quick a few seconds. Wall times on shared cores are noisy: the arms of a seed run
back to back so that load changes fall on all arms alike.
Headline: the teleports lower the epoch-1 training loss (mean of its batches, paired by seed, 5 seeds:
momentum -0.10 +- 0.05, Adam -0.034 +- 0.019; as much against reset-only and random-teleport), then
trail at epoch 2 (+0.11 +- 0.11, +0.027 +- 0.014) and are level by epoch 10 (-0.001 +- 0.005,
+0.007 +- 0.012). One teleport costs 75-76 optimizer steps (median; 6 per run, ~7 epochs of steps in
all), so per wall time the teleport arm trails throughout.

Outputs: under OUT_DIR, results/cnn/<DATASET>_<optimizer>.json (config, environment, data, per arm the
losses per epoch and run, wall times, median step times, every teleport's report with its cost in
optimizer steps, divergence epochs) and <DATASET>_summary.json/.md (tables, paired differences,
teleport costs); figures/cnn/<DATASET>_<optimizer>_loss_vs_epoch.png and _loss_vs_time.png. Written
as a set when complete; progress in OUT_DIR/.progress/ (per optimizer, seed and arm).
"""
import json
import os
from time import perf_counter

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lib import random_teleport_module, teleport_module
from lib.config import UsageError, check_choice, check_positive, run, with_preset
from lib.data import load
from lib.io import check_replace_set, environment, run_set, saved_config
from lib.optim import make_optimizer, reset_state
from lib.plots import loss_panels, save_figure
from lib.progress import Checkpoint
from lib.report import diverged, finite_stats, format_row, markdown_table, mean_std_cell

# ---- config (override any with --NAME=value) ------------------------------------------------
DATASET = "MNIST"               # MNIST or FashionMNIST (28x28 grey images, the CNN's input)
OPTIMIZERS_RUN = ["momentum", "adam"]  # torch.optim optimizers, in order: momentum (SGD, momentum 0.9),
                                       # adam (also: sgd, adagrad, rmsprop, with --lr)
ARMS = ["baseline", "teleport", "reset-only", "random-teleport"]  # arms to run (random-teleport needs teleport)
EPOCHS = 10                     # training epochs
N_RUNS = 5                      # runs r = 0..N_RUNS-1, initialised with seed SEED_BASE + r
SEED_BASE = 0                   # initialisation seed of run 0
BATCH_SIZE = 64                 # mini-batch size
ORDER_SEED = 0                  # seed of the data order, reshuffled every epoch, the same for every run and arm
TRAIN_SIZE = 50000              # seeded random subset of the training set (all images if fewer)
SPLIT_SEED = 0                  # seed of that subset
LR = None                       # base learning rate, > 0; None: the optimizer's preset
TELE_LR = None                  # teleport step size, >= 0; None: the optimizer's preset
TELE_STEPS = 10                 # gradient-ascent steps per teleport
TELE_OBJECTIVE = "log_grad_norm"  # ascent on log ||grad L||^2 (raises ||grad L||^2, scale-free step), or grad_norm
                                  # (ascent on ||grad L||^2 itself), or another objective teleport_module knows
TELE_EPOCHS = [0, 1, 2]         # 0-based epochs with teleport moments, each < EPOCHS
TELE_BATCHES = 2                # a moment before each of the first TELE_BATCHES mini-batches of those epochs
TELE_BATCH_SIZE = 200           # fresh random training images per teleport (as many again for the held-out drift)
TELE_SEED = 0                   # seed of the teleport batches (the same for every run and arm)
REPORT_EPOCHS = [1, 2, 5, 10]   # 1-based epochs of the summary tables
PLOT_ONLY = False               # redraw the figures from saved results (the tables are printed, not rewritten)
DATA_DIR = "data"               # datasets in torchvision's layout (--data-dir); MNIST falls back to the bundled subset
DEVICE = "cpu"                  # cpu, cuda or auto
OUT_DIR = "."                   # figures/ and results/ go under this folder
PROGRESS = True                 # tqdm bars
CHECKPOINT_S = 30.0             # save progress after at most this many seconds of work (0: every epoch)
REPLACE = False                 # True: replace saved results made with other settings or data
# ---------------------------------------------------------------------------------------------

# our choices (no CNN protocol in the paper): standard learning rates; teleport step sizes tuned once
# so that ||grad L||^2 grows by a visible factor without blowing up (see the docstring)
PRESETS = {"OPTIMIZER": {"momentum": {"LR": 2e-2, "TELE_LR": 0.05},
                         "adam": {"LR": 1e-3, "TELE_LR": 0.05},
                         "sgd": {"LR": 5e-2, "TELE_LR": 0.05},
                         "adagrad": {"LR": 1e-2, "TELE_LR": 0.05},
                         "rmsprop": {"LR": 1e-3, "TELE_LR": 0.05}}}
QUICK_SETTINGS = {"EPOCHS": 2, "N_RUNS": 2, "TRAIN_SIZE": 256, "TELE_EPOCHS": [0, 1], "TELE_BATCHES": 1,
                  "TELE_BATCH_SIZE": 32, "TELE_STEPS": 3, "REPORT_EPOCHS": [1, 2], "PROGRESS": False}
ARM_NAMES = ["baseline", "teleport", "reset-only", "random-teleport"]
STYLES = {"reset-only": ("--", "o"), "random-teleport": ("-.", "s")}  # the controls' line style and marker
GROUP = "rescale"  # the symmetry: positive rescaling of every hidden channel and unit


def make_cnn(seed):
    """Conv(1,8,3)-ReLU-MaxPool(2)-Conv(8,16,3)-ReLU-MaxPool(2)-Flatten-Linear(400,10), PyTorch's
    default init drawn from `seed` (the global generator left as it was). Input (B, 1, 28, 28)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


def check(cfg):
    """Validate the settings (one-line UsageErrors); returns the arms to run in order."""
    check_choice("dataset", cfg["DATASET"], ("MNIST", "FashionMNIST"))
    for k in ("EPOCHS", "N_RUNS", "BATCH_SIZE", "TRAIN_SIZE", "TELE_BATCH_SIZE", "TELE_BATCHES", "TELE_STEPS",
              "CHECKPOINT_S"):
        check_positive(k.lower(), cfg[k], allow_zero=k in ("TELE_BATCHES", "TELE_STEPS", "CHECKPOINT_S"))
    for opt in cfg["OPTIMIZERS_RUN"]:
        ocfg = with_preset(cfg, PRESETS, "OPTIMIZER", opt)  # an unknown optimizer is a UsageError
        for k in ("LR", "TELE_LR"):
            if isinstance(ocfg[k], bool) or not isinstance(ocfg[k], (int, float)):
                raise UsageError(f"--{k.lower().replace('_', '-')}: expected a number, got {ocfg[k]!r}")
            check_positive(f"{opt} {k.lower()}", ocfg[k], allow_zero=k != "LR")
    bad = [e for e in cfg["TELE_EPOCHS"] if not (isinstance(e, int) and 0 <= e < cfg["EPOCHS"])]
    if bad:
        raise UsageError(f"tele_epochs {bad} are not 0-based epochs below epochs = {cfg['EPOCHS']}")
    for a in cfg["ARMS"]:
        check_choice("arm", a, ARM_NAMES)
    check_choice("tele_objective", cfg["TELE_OBJECTIVE"], ("log_grad_norm", "grad_norm"))
    if "random-teleport" in cfg["ARMS"] and "teleport" not in cfg["ARMS"]:
        raise UsageError("arm 'random-teleport' needs the 'teleport' arm (it takes the size of its teleports)")
    return [a for a in ARM_NAMES if a in cfg["ARMS"]]


def moment_batches(data, cfg, epoch, i):
    """The teleport batch and the held-out batch of the moment before batch i of `epoch`:
    2 x TELE_BATCH_SIZE distinct training images drawn with seed TELE_SEED + 1000 * epoch + i,
    the same for every run and arm. Returns ((x, y), (x_heldout, y_heldout)), x: (B, 1, 28, 28)."""
    gen = torch.Generator().manual_seed(cfg["TELE_SEED"] + 1000 * epoch + i)
    n = min(2 * cfg["TELE_BATCH_SIZE"], len(data.y_train))
    idx = torch.randperm(len(data.y_train), generator=gen)[:n].to(data.y_train.device)
    x, y = data.x_train[idx].view(-1, 1, 28, 28), data.y_train[idx]
    half = n // 2
    return (x[:half], y[:half]), (x[half:], y[half:])


def plain(report):
    """A teleport report as JSON-ready numbers, strings and lists (what a checkpoint may hold)."""
    return json.loads(json.dumps(report, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def act(arm, model, opt, data, cfg, epoch, i, seed, matched):
    """What `arm` does at the moment before batch i of `epoch` (the model and optimizer changed in
    place): teleport (teleport_module, state reset), reset-only (lib.optim.reset_state: a fresh
    state, as a newly built optimizer), random-teleport (random_teleport_module with the size of
    the matched teleport report, generator seeded by the run's seed and the moment). Returns the
    record: the API's report (teleport arms), the moment and the arm's wall time."""
    t0 = perf_counter()
    (x, y), heldout = moment_batches(data, cfg, epoch, i)
    if arm == "teleport":
        rep = teleport_module(model, F.cross_entropy, x, y, group=GROUP, objective=cfg["TELE_OBJECTIVE"],
                              steps=cfg["TELE_STEPS"], lr=cfg["TELE_LR"], optimizer=opt, state="reset",
                              heldout=heldout)
    elif arm == "random-teleport":
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 1000 * epoch + i)
        rep = random_teleport_module(model, matched["size"], group=GROUP, generator=gen, optimizer=opt,
                                     state="reset", loss_fn=F.cross_entropy, inputs=x, targets=y, heldout=heldout)
    else:
        reset_state(opt)
        rep = {}
    return {**plain(rep), "epoch": epoch, "batch": i, "wall_s": perf_counter() - t0}


@torch.no_grad()
def evaluate(model, x, y):
    """Mean cross-entropy and accuracy (%) of the model on (x, y) in one pass; x: (N, 784)."""
    out = model(x.view(-1, 1, 28, 28))
    return F.cross_entropy(out, y).item(), 100.0 * (out.argmax(1) == y).float().mean().item()


def train_run(cfg, data, optimizer, arm, r, ckpt, matched=None):
    """Run r of one arm, one unit of progress (a finished unit is not run again, an interrupted one
    resumes from its last saved epoch with weights, optimizer state and records). Returns per epoch
    train_loss (mean batch loss), test_loss, test_acc, time_s (cumulative: steps and the arm's
    moments), the median step time and the arm's records (each with cost_steps = wall_s / median
    step time)."""
    unit, seed = f"{optimizer} seed {r} {arm}", cfg["SEED_BASE"] + r
    if ckpt.unit(unit) is not None:
        return ckpt.unit(unit)
    model = make_cnn(seed).to(cfg["DEVICE"])
    opt = make_optimizer(optimizer, model.parameters(), cfg["LR"])
    moments = {(e, i) for e in cfg["TELE_EPOCHS"] for i in range(cfg["TELE_BATCHES"])} if arm != "baseline" else set()
    matched = {(m["epoch"], m["batch"]): m for m in matched or []}
    if ckpt.current is not None and ckpt.current["unit"] == unit:
        model.load_state_dict(ckpt.current["model"])
        opt.load_state_dict(ckpt.current["opt"])
        h = ckpt.current["hist"]
    else:
        h = {"train_loss": [], "test_loss": [], "test_acc": [], "time_s": [], "step_s": [], "records": [],
             "test_loss_init": evaluate(model, data.x_test, data.y_test)[0]}
    n, b = len(data.y_train), cfg["BATCH_SIZE"]
    for epoch in tqdm(range(len(h["train_loss"]), cfg["EPOCHS"]), desc=unit, disable=not cfg["PROGRESS"],
                      leave=False, initial=len(h["train_loss"]), total=cfg["EPOCHS"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["ORDER_SEED"] * 10007 + epoch))
        elapsed, total = h["time_s"][-1] if h["time_s"] else 0.0, 0.0
        for i in range(-(-n // b)):
            if (epoch, i) in moments:
                h["records"].append(act(arm, model, opt, data, cfg, epoch, i, seed, matched.get((epoch, i))))
                elapsed += h["records"][-1]["wall_s"]
            idx = order[i * b:(i + 1) * b].to(data.y_train.device)
            t0 = perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx].view(-1, 1, 28, 28)), data.y_train[idx])
            loss.backward()
            opt.step()
            if torch.device(cfg["DEVICE"]).type == "cuda":
                torch.cuda.synchronize()
            h["step_s"].append(perf_counter() - t0)
            elapsed += h["step_s"][-1]
            total += loss.item()
        te, acc = evaluate(model, data.x_test, data.y_test)
        for k, v in (("train_loss", total / -(-n // b)), ("test_loss", te), ("test_acc", acc), ("time_s", elapsed)):
            h[k].append(v)
        ckpt.save({"done": ckpt.done, "current": {"unit": unit, "model": model.state_dict(), "opt": opt.state_dict(),
                                                  "hist": h}}, f"{unit}, epoch {len(h['train_loss'])} of {cfg['EPOCHS']}")
    med = float(np.median(h["step_s"]))
    out = {k: v for k, v in h.items() if k != "step_s"}
    out.update(seed=seed, step_median_s=med, records=[{**m, "cost_steps": m["wall_s"] / med} for m in h["records"]])
    return ckpt.finish_unit(unit, out)


def warm_up(cfg, data, optimizer):
    """A few untimed steps and a teleport of a scratch model, so that the first timed run does not
    pay for torch's first calls."""
    model = make_cnn(cfg["SEED_BASE"]).to(cfg["DEVICE"])
    opt = make_optimizer(optimizer, model.parameters(), cfg["LR"])
    for i in range(5):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x_train[:cfg["BATCH_SIZE"]].view(-1, 1, 28, 28)), data.y_train[:cfg["BATCH_SIZE"]]).backward()
        opt.step()
    if cfg["TELE_STEPS"]:
        act("teleport", model, opt, data, cfg, 0, 0, cfg["SEED_BASE"], None)


def run_optimizer(cfg, data, optimizer, names, ckpt):
    """Every arm in `names` for one optimizer, N_RUNS runs each, the arms of a seed back to back
    (so that a change in the machine's load falls on all arms alike; random-teleport after
    teleport, whose sizes it takes); one console row per arm. Returns {arm: {curve: (epochs, runs)
    lists, seeds, step_median_s (runs,), teleports: per run the records, diverged}}."""
    warm_up(cfg, data, optimizer)
    runs = {name: [] for name in names}
    for r in tqdm(range(cfg["N_RUNS"]), desc=optimizer, disable=not cfg["PROGRESS"]):
        for name in names:
            matched = runs["teleport"][r]["records"] if name == "random-teleport" else None
            runs[name].append(train_run(cfg, data, optimizer, name, r, ckpt, matched))
    out = {}
    for name, rs in runs.items():
        h = out[name] = {k: np.asarray([u[k] for u in rs], float).T.tolist()
                         for k in ("train_loss", "test_loss", "test_acc", "time_s")}
        h.update(test_loss_init=[u["test_loss_init"] for u in rs], seeds=[u["seed"] for u in rs],
                 step_median_s=[u["step_median_s"] for u in rs], teleports=[u["records"] for u in rs])
        h["diverged"] = runs_diverged(h)
        ok = [d is None for d in h["diverged"]]
        row = {"opt": optimizer, "arm": f"{name:>15}", "time_s": float(np.mean(h["time_s"][-1]))}
        row.update({f"train@{e}": finite_stats(h["train_loss"][e - 1], ok)[0]
                    for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]})
        ratios = [grad_norm_ratio(m) for recs in h["teleports"] for m in recs if "objective_before" in m]
        if ratios:
            row["|g|^2 x (median)"] = float(np.median(ratios))
        print(format_row(row))
    return out


def grad_norm_ratio(m):
    """||grad L||^2 after / before of a teleport record (its objective: ||grad L||^2 or its log)."""
    if m["objective"] == "log_grad_norm":
        return float(np.exp(m["objective_after"] - m["objective_before"]))
    return m["objective_after"] / m["objective_before"] if m["objective"] == "grad_norm" else float("nan")


def runs_diverged(h):
    """Per run, the first (1-based) epoch whose train or test loss is non-finite or above 1e6, or None."""
    return diverged(np.maximum(np.asarray(h["train_loss"], float), np.asarray(h["test_loss"], float)).T)


def plot_optimizer(res, title, path_stem):
    """Loss vs epoch and loss vs wall time (the mean over runs of the arm's cumulative time:
    training steps and moments, evaluation excluded): training and test loss of every arm
    (lib.plots.loss_panels: baseline and teleport with a +-1 std band, the controls on top)."""
    order = [a for a in ARM_NAMES if a in res]
    curves = {a: {k: np.asarray(res[a][k], float).T for k in ("train_loss", "test_loss")} for a in order}
    for kind, xlabel in (("epoch", "epoch"), ("time", "wall time (s, mean over runs; evaluation excluded)")):
        x = {a: np.arange(1, len(res[a]["train_loss"]) + 1) if kind == "epoch"
             else np.asarray(res[a]["time_s"], float).mean(1) for a in order}
        fig = loss_panels(curves, x, [("train_loss", "training loss"), ("test_loss", "test loss")], STYLES, title,
                          xlabel, "cross-entropy loss", integer_x=kind == "epoch")
        save_figure(fig, f"{path_stem}_loss_vs_{kind}.png")


def paired(res, arm, other, key, e):
    """(mean, std, n) over runs that diverged in neither arm of arm minus other (same seed) in `key` at epoch e."""
    ok = [a is None and b is None for a, b in zip(res[arm]["diverged"], res[other]["diverged"])]
    return finite_stats(np.asarray(res[arm][key][e - 1], float) - np.asarray(res[other][key][e - 1], float), ok)


def teleport_stats(res):
    """Medians (and ranges) over every teleport of every run: the ascent's gain in the objective,
    the loss drift on the teleport batch and the held-out batch, the size, the wall time and its
    cost in optimizer steps; and the median step time."""
    recs = [m for rs in res["teleport"]["teleports"] for m in rs]
    f = lambda k: np.asarray([m.get(k, np.nan) for m in recs], float)  # noqa: E731
    values = {"grad_norm_ratio": np.asarray([grad_norm_ratio(m) for m in recs], float),
              "loss_drift": np.abs(f("loss_after") - f("loss_before")),
              "heldout_loss_drift": np.abs(f("heldout_loss_after") - f("heldout_loss_before")),
              "size": f("size"), "wall_s": f("wall_s"), "cost_steps": f("cost_steps")}
    stats = {k: {"median": float(np.nanmedian(v)), "min": float(np.nanmin(v)), "max": float(np.nanmax(v))}
             for k, v in values.items()}
    stats["n"] = len(recs)
    stats["step_median_s"] = float(np.median(res["teleport"]["step_median_s"]))
    stats["notices"] = sorted({n for m in recs for n in m.get("notices", [])})
    return stats


def summary(cfg, results):
    """Per optimizer: every arm's mean +- std train and test loss at REPORT_EPOCHS over the runs that
    did not diverge, its wall time; the teleport arm minus each other arm, paired by seed; the
    teleport statistics and costs. Returns (Markdown, JSON-ready dict)."""
    rep = [e for e in cfg["REPORT_EPOCHS"] if e <= cfg["EPOCHS"]]
    md, out = [], {}
    for opt, res in results.items():
        o = out[opt] = {"per_arm": {}, "paired": {}}
        rows = []
        for arm, h in res.items():
            ok = [d is None for d in h["diverged"]]
            a = o["per_arm"][arm] = {k: {e: finite_stats(h[k][e - 1], ok) for e in rep} for k in ("train_loss", "test_loss")}
            a["time_s"] = float(np.mean(h["time_s"][-1]))
            a["moment_time_s"] = float(np.mean([sum(m["wall_s"] for m in rs) for rs in h["teleports"]]))
            a["diverged"] = h["diverged"]
            rows.append([arm] + [f"{mean_std_cell(*a['train_loss'][e][:2])} / {mean_std_cell(*a['test_loss'][e][:2])}"
                                 for e in rep] + [f"{a['time_s']:.1f} ({a['moment_time_s']:.2f})",
                                                  str(sum(not k for k in ok))])
        md += [f"## {opt}: train / test loss, mean ± std over {cfg['N_RUNS']} runs\n",
               markdown_table(["arm"] + [f"epoch {e}" for e in rep] + ["time s (moments)", "diverged runs"], rows), ""]
        if "teleport" in res:
            others = [a for a in ARM_NAMES if a in res and a != "teleport"]
            o["paired"] = {other: {k: {e: paired(res, "teleport", other, k, e) for e in rep}
                                   for k in ("train_loss", "test_loss")} for other in others}
            prow = [[f"teleport − {other}"] + [" / ".join(mean_std_cell(*o["paired"][other][k][e][:2], spec="+.4f")
                                                          for k in ("train_loss", "test_loss")) for e in rep]
                    for other in others]
            md += ["Teleport minus each arm, same seed (train / test; negative: teleport lower):\n",
                   markdown_table(["difference"] + [f"epoch {e}" for e in rep], prow), ""]
            t = o["teleport"] = teleport_stats(res)
            md += [f"Teleports ({t['n']}): ||grad L||^2 after/before median {t['grad_norm_ratio']['median']:.3g} "
                   f"(range {t['grad_norm_ratio']['min']:.3g}-{t['grad_norm_ratio']['max']:.3g}); loss drift on the "
                   f"teleport batch median {t['loss_drift']['median']:.2g} (max {t['loss_drift']['max']:.2g}), held out "
                   f"{t['heldout_loss_drift']['median']:.2g} (max {t['heldout_loss_drift']['max']:.2g}); size median "
                   f"{t['size']['median']:.3g}; one teleport takes {t['wall_s']['median'] * 1e3:.1f} ms (median) = "
                   f"{t['cost_steps']['median']:.1f} optimizer steps of {t['step_median_s'] * 1e3:.2f} ms "
                   f"(range {t['cost_steps']['min']:.1f}-{t['cost_steps']['max']:.1f})"
                   + (f"; notices: {'; '.join(t['notices'])}" if t["notices"] else "") + ".", ""]
    return "\n".join(md) + "\n", out


def draw(opt, s, stem):
    """Figures 5/13 style loss panels of one optimizer's saved record, at `stem`_loss_vs_*.png."""
    n_runs = len(s["arms"]["baseline" if "baseline" in s["arms"] else next(iter(s["arms"]))]["seeds"])
    plot_optimizer(s["arms"], f"{s['data']['label']}, small CNN, {opt} (lr {s['config']['LR']:g}): "
                   f"mean over {n_runs} runs (band: ±1 std)", stem)


def train_all(cfg, names, path):
    """Every optimizer's arms (settings and data checked against saved results first): what to save."""
    configs = {opt: with_preset(cfg, PRESETS, "OPTIMIZER", opt) for opt in cfg["OPTIMIZERS_RUN"]}
    check_replace_set(configs, path, cfg)
    data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"], cfg["SPLIT_SEED"])
    print(f"{data.label}: {len(data.y_train)} training, {len(data.y_test)} test images")
    check_replace_set(configs, path, cfg, data)
    ckpt, arch = Checkpoint(cfg, f"teleport_cnn-{cfg['DATASET']}"), repr(make_cnn(cfg["SEED_BASE"]))
    return {opt: {"config": saved_config(ocfg), "environment": environment(), "optimizer": opt,
                  "model": arch, "data": {**data.info, "label": data.label},
                  "arms": run_optimizer(ocfg, data, opt, names, ckpt)} for opt, ocfg in configs.items()}, ckpt


def main(cfg):
    names = check(cfg)
    if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a 5,258-weight CNN at batch 64: one thread, steadier on shared cores
    return run_set(cfg, "cnn", lambda path: train_all(cfg, names, path), draw, summary)


if __name__ == "__main__":
    run(main, globals())
