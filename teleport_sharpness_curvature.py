"""Figure 4 (SGD) and Figure 11 (AdaGrad): teleporting to change sharpness or curvature
(Section 4.4, Appendix E.4), with the controls of issue 7 (`--controls`).

    python teleport_sharpness_curvature.py                                   # Figure 4, CIFAR-10
    python teleport_sharpness_curvature.py --optimizer=adagrad               # Figure 11
    python teleport_sharpness_curvature.py --dataset=MNIST --data-dir=../shared/data/mnist5k --controls

Protocol: 5 MLPs (seeds (r+1)*54321), 3072-32-10-10 (784-32-10-10 for MNIST-sized sets), no
biases, LeakyReLU(0.1), cross-entropy, batches of 20 in a fixed sequential order. The 5 seeds
train to epoch 20 as one batched model; the weights (and the optimizer state) are then copied
into arms x seeds models that train epochs 20-40 as one batched model. Arms: baseline,
sharpness increase/decrease (phi, eq. 4), curvature increase/decrease (psi, eq. 5). Before each
of the first 5 mini-batches of epoch 20 (as the authors' code does) every teleport arm teleports
on a fresh random batch of 2,000 training images, all layer pairs at once, g = I + T, action
eq. (46); its optimizer state is then reset (for AdaGrad: the accumulated squared gradients of
its model slices zeroed, which equals a new torch.optim.Adagrad since lr_decay = 0 makes the
update independent of the step count).

Controls (`--controls`):
- `perturb-only (<arm>)`: at the same moments, a random direction u (Gaussian over all weights,
  unit norm per model) scaled to W + r u, with r found by bisection per model so that the loss
  drift L(W + r u) - L(W) on the same teleport batch equals |median over seeds of the drift of
  the matching teleport arm on that batch| (the magnitude: a random move cannot lower the loss);
  the optimizer state is reset as in the teleport arm.
- `reset-only` (AdaGrad only; with SGD it is the baseline): the state reset alone.

Outputs: figures/generalization/<dataset>_<optimizer>_{sharpness,curvature}.png,
results/generalization/<dataset>_<optimizer>.json (every curve, teleport and perturbation record,
phi/psi on a fixed batch before, right after the teleports and at the end) and
<dataset>_<optimizer>_table.md.

CPU runtime (one thread on the 2 shared cores, other jobs running): MNIST 5k subset with
--controls, 9 min (SGD, 45 models after the branch; 15 min under a load average of 12) and 16 min
(AdaGrad, 50 models, under that load); most of it is the teleports. CIFAR-10 at full size, run end
to end on CIFAR-sized synthetic data (50,000 x 3072, lib.data.write_fake): 116 s for epochs 0-20
(5 models, 5.8 s/epoch) and 1,137 s for epochs 20-40 (25 models, 57 s/epoch, 170 s of it the 20
teleports): 21 min for SGD without controls; about 35 min with --controls (45 models).
Headline (MNIST 5k subset, 5 seeds, final test loss minus the baseline of the same seed):
SGD sharpness decrease -0.0021 +- 0.0011, increase +0.0002 +- 0.0048; curvature teleports with the
released step sizes do not move psi at all (|T| ~ 1e-4); with 500x larger steps psi moves by +50% /
-15% and the test loss does not (-0.0003 +- 0.0073 / -0.0010 +- 0.0020). The sharpness teleports
change phi only through the loss itself (d phi per teleport = loss drift per teleport), and under
AdaGrad every teleport arm is indistinguishable from reset-only except sharpness increase, which
matches its perturb-only control.
"""
import math
import os
import time

import numpy as np
import torch

# ---- config ---------------------------------------------------------------------------------
DATASET = "CIFAR10"  # MNIST, FashionMNIST or CIFAR10
OPTIMIZER = "sgd"  # sgd (Figure 4) or adagrad (Figure 11)
LR = None  # learning rate; None = 0.02 for sgd, 0.01 for adagrad
EPOCHS = 40  # total training epochs
BRANCH_EPOCH = 20  # epoch at whose start the arms branch and teleport
BATCH_SIZE = 20  # training mini-batch, fixed sequential order
N_RUNS = 5  # seeds per arm, seed of run r = (r + 1) * SEED_BASE
SEED_BASE = 54321  # the authors' seed
TRAIN_SIZE = 50000  # training images (all if fewer exist)
HIDDEN = None  # hidden widths; None = per dataset (32, 10)
ARMS = ["sharpness-increase", "sharpness-decrease", "curvature-increase", "curvature-decrease"]  # teleport arms
CONTROLS = False  # add perturb-only arms (and reset-only for adagrad)
TELE_BATCHES = 5  # teleports per arm: before each of the first TELE_BATCHES batches of BRANCH_EPOCH
TELE_BATCH_SIZE = 2000  # images per teleport batch (random subset of the training set)
SHARP_STEPS = 10  # gradient steps on T per teleport batch, sharpness
SHARP_LR = None  # {"increase": x, "decrease": y}; None = per dataset
SHARP_TS = [0.0001, 0.02, 0.001]  # displacements of eq. (4): start, stop (excluded), step
# (eq. 4 as the paper: one unit-sphere direction per displacement. The authors' teleport_sharpness
#  uses 100 positive-orthant directions per t = 0.1..0.9 and ignores its t_start/t_end arguments.)
SHARP_STOP_ABOVE = 2.0  # stop a model's sharpness teleport once phi exceeds this
CURV_STEPS = 1  # gradient steps on T per teleport batch, curvature
CURV_LR = None  # {"increase": x, "decrease": y}; None = per dataset
# (The paper, Algorithm 1: gradient steps on the whole algebra element T. The authors' code instead
#  climbs a scalar t along one unnormalised random M on one pair, so its step sizes move T far less
#  here: |T| ~ 1e-4 on MNIST; see README.)
CURV_CURVES = 1  # random curves per psi evaluation inside the teleport (the authors: 1)
EVAL_BATCH_SIZE = 500  # fixed training batch on which phi and psi are measured
EVAL_CURVES = 4  # fixed random curves for the measured psi
TAG = ""  # appended to the output names (e.g. for a run with other step sizes)
TELEPORT_SEED = 0  # seeds the teleport batches and random directions (same for every arm)
DATA_DIR = "data"  # dataset root (torchvision layout)
DEVICE = "cpu"  # cpu, cuda or auto
OUT_DIR = "."  # figures/ and results/ go under this folder
PLOT_ONLY = False  # redraw the figures from the saved JSON
PROGRESS = True  # tqdm bars
# ---------------------------------------------------------------------------------------------

DATASET_DEFAULTS = {  # the authors' released teleport step sizes (issue 4)
    "CIFAR10": {"hidden": [32, 10], "sharp_lr": {"increase": 5e-2, "decrease": 5e-2},
                "curv_lr": {"increase": 2e-1, "decrease": 5e-2}},
    "MNIST": {"hidden": [32, 10], "sharp_lr": {"increase": 5e-2, "decrease": 5e-2},
              "curv_lr": {"increase": 2e-1, "decrease": 5e-2}},
    "FashionMNIST": {"hidden": [32, 10], "sharp_lr": {"increase": 1e-1, "decrease": 3e-1},
                     "curv_lr": {"increase": 5e-3, "decrease": 3e-3}},
}
OPTIMIZER_LR = {"sgd": 0.02, "adagrad": 0.01}
TELEPORT_ARMS = ("sharpness-increase", "sharpness-decrease", "curvature-increase", "curvature-decrease")
EXPERIMENT = "generalization"

_QUICK = {"EPOCHS": 3, "BRANCH_EPOCH": 1, "N_RUNS": 2, "TRAIN_SIZE": 400, "TELE_BATCHES": 2,
          "TELE_BATCH_SIZE": 100, "SHARP_STEPS": 2, "EVAL_BATCH_SIZE": 100, "EVAL_CURVES": 2}


def resolve(cfg):
    """Validate the config and fill the per-dataset / per-optimizer defaults (in place)."""
    from lib.config import UsageError, check_choice, check_positive
    from lib.data import DATASETS
    check_choice("dataset", cfg["DATASET"], DATASETS)
    check_choice("optimizer", cfg["OPTIMIZER"], tuple(OPTIMIZER_LR))
    d = DATASET_DEFAULTS[cfg["DATASET"]]
    for key, default in (("LR", OPTIMIZER_LR[cfg["OPTIMIZER"]]), ("HIDDEN", d["hidden"]),
                         ("SHARP_LR", d["sharp_lr"]), ("CURV_LR", d["curv_lr"])):
        if cfg[key] is None:
            cfg[key] = default
    check_positive("learning rate", cfg["LR"])
    for key in ("SHARP_LR", "CURV_LR"):
        if not isinstance(cfg[key], dict) or set(cfg[key]) != {"increase", "decrease"}:
            raise UsageError(f"--{key.lower()} must be a dict with keys 'increase' and 'decrease'")
        for v in cfg[key].values():
            check_positive(f"{key.lower()} step size", v)
    for arm in cfg["ARMS"]:
        check_choice("arm", arm, TELEPORT_ARMS)
    for key in ("EPOCHS", "BATCH_SIZE", "N_RUNS", "TELE_BATCH_SIZE", "EVAL_BATCH_SIZE", "EVAL_CURVES",
                "CURV_CURVES"):
        check_positive(key.lower(), cfg[key], allow_zero=False)
    for key in ("TELE_BATCHES", "SHARP_STEPS", "CURV_STEPS"):
        check_positive(key.lower(), cfg[key])
    if not 0 <= cfg["BRANCH_EPOCH"] < cfg["EPOCHS"]:
        raise UsageError(f"branch_epoch must be in [0, epochs), got {cfg['BRANCH_EPOCH']}")
    return cfg


def arm_names(cfg):
    """baseline, the teleport arms, then the controls."""
    arms = ["baseline", *cfg["ARMS"]]
    if cfg["CONTROLS"]:
        arms += [f"perturb-only ({a})" for a in cfg["ARMS"]]
        if cfg["OPTIMIZER"] != "sgd":
            arms.append("reset-only")
    return arms


def displacements(cfg):
    start, stop, step = cfg["SHARP_TS"]
    return [float(t) for t in np.arange(start, stop - step / 2, step)]


def reset_slices(opt, W, sl):
    """Per-model optimizer reset: zero the AdaGrad accumulator of model slice `sl`. With
    initial_accumulator_value = 0 and lr_decay = 0 this is exactly a fresh torch.optim.Adagrad
    for those models. SGD has no state."""
    for p in W:
        state = opt.state.get(p, {})
        if "sum" in state:
            state["sum"][sl] = 0


def branch(W, opt, n_arms, optimizer, lr):
    """Copy K trained models (and their optimizer state) into n_arms * K models, arm-major."""
    from lib.optim import make_optimizer
    W2 = [w.detach().repeat(n_arms, 1, 1).requires_grad_() for w in W]
    opt2 = make_optimizer(optimizer, W2, lr)
    for p, p2 in zip(W, W2):
        for k, v in opt.state.get(p, {}).items():
            opt2.state[p2][k] = v.repeat(n_arms, 1, 1).clone() if v.dim() == 3 else v.clone()
    return W2, opt2


def matched_perturbation(W, X, Y, act, target, generator, iters=40):
    """W + r u per model, u a random unit direction over all weights (Gaussian), r >= 0 by
    bisection so that the loss drift L(W + r u; X) - L(W; X) equals `target` (K,).
    Returns (new W, record with target, drift, norm)."""
    from lib.metrics import random_directions
    from lib.models import loss_fn
    u = [d[0] for d in random_directions(W, 1, "sphere", generator, per_model=True)]  # unit norm per model
    target = torch.as_tensor(target, dtype=W[0].dtype, device=W[0].device)
    with torch.no_grad():
        base = loss_fn(W, X, Y, act)
        move = lambda r: [w + r.view(-1, 1, 1) * d for w, d in zip(W, u)]  # noqa: E731
        drift = lambda r: loss_fn(move(r), X, Y, act) - base  # noqa: E731
        lo, hi = torch.zeros_like(target), torch.full_like(target, 1e-2)
        for _ in range(40):  # grow the bracket until the drift reaches the target
            hi = torch.where(drift(hi) < target, 2 * hi, hi)
        for _ in range(iters):
            mid = (lo + hi) / 2
            below = drift(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        r = (lo + hi) / 2
        return move(r), {"target": target.tolist(), "drift": drift(r).tolist(), "norm": r.tolist()}


def landscape(W, X, Y, act, ts, dirs, curves):
    """phi (eq. 4, fixed displacements/directions) and psi (eq. 5, fixed curves of eq. 54) per model."""
    from lib.metrics import psi, sharpness
    W = [w.detach() for w in W]
    with torch.no_grad():
        phi = sharpness(W, X, Y, act, ts, dirs)
    return {"phi": phi.tolist(), "psi": psi(W, X, act, curves).detach().tolist()}


class BranchHook:
    """hook(epoch, i) for lib.train.fit on the branched model: before each of the first
    TELE_BATCHES batches of its first epoch, every teleport arm teleports its model slice on a
    fresh random batch, then the controls act (perturb-only matches the teleport's drift), and
    the optimizer state of every arm but the baseline is reset. After the last teleport phi and
    psi are measured on the fixed evaluation batch."""

    def __init__(self, W, opt, data, act, cfg, arms, measure):
        from lib.actions import GLAction
        from lib.teleport import make_objective
        self.W, self.opt, self.data, self.act, self.cfg, self.arms = W, opt, data, act, cfg, arms
        self.R, self.measure = cfg["N_RUNS"], measure
        self.gen = torch.Generator().manual_seed(cfg["TELEPORT_SEED"])
        self.action = GLAction(46, "first_order")  # g = I + T on all pairs, eq. (46)
        ts = displacements(cfg)
        self.setup, self.gens = {}, {}
        for arm in arms:  # a generator per arm: an arm's draws do not depend on which arms run
            j = TELEPORT_ARMS.index(arm.split("(")[-1].rstrip(")")) if arm != "baseline" and arm != "reset-only" else 0
            self.gens[arm] = torch.Generator().manual_seed(cfg["TELEPORT_SEED"] * 1000 + 17 * j
                                                           + (7 if arm.startswith("perturb") else 1))
        for arm in cfg["ARMS"]:
            kind, direction = arm.split("-")
            if kind == "sharpness":
                obj = make_objective("sharpness", act, ts=ts, kind="sphere", generator=self.gens[arm])
                kw = dict(steps=cfg["SHARP_STEPS"], lr=cfg["SHARP_LR"][direction], stop_above=cfg["SHARP_STOP_ABOVE"])
            else:  # psi of eq. (5) on curves of the eq. (54) action; the move itself uses eq. (46)
                obj = make_objective("curvature", act, n_curves=cfg["CURV_CURVES"], generator=self.gens[arm])
                kw = dict(steps=cfg["CURV_STEPS"], lr=cfg["CURV_LR"][direction])
            self.setup[arm] = dict(objective=obj, action=self.action, maximize=direction == "increase", **kw)
        self.records = {a: [] for a in arms if a != "baseline"}
        self.after = None

    def _slice(self, arm):
        a = self.arms.index(arm)
        return slice(a * self.R, (a + 1) * self.R)

    def _write(self, arm, new):
        with torch.no_grad():
            for w, v in zip(self.W, new):
                w[self._slice(arm)] = v

    def __call__(self, epoch, i):
        from lib.teleport import teleport
        if epoch != 0 or i >= self.cfg["TELE_BATCHES"]:
            return
        n, size = self.data.x_train.shape[0], self.cfg["TELE_BATCH_SIZE"]
        idx = torch.randperm(n, generator=self.gen)[:2 * size].to(self.W[0].device)
        X, Y = self.data.x_train[idx[:size]], self.data.y_train[idx[:size]]
        held = (self.data.x_train[idx[size:]], self.data.y_train[idx[size:]])
        drift = {}
        for arm in self.cfg["ARMS"]:
            Ws = [w.detach()[self._slice(arm)] for w in self.W]
            new, rec, _ = teleport(Ws, X, Y, self.act, heldout=held if len(held[0]) else None, **self.setup[arm])
            self._write(arm, new)
            drift[arm] = float(np.median(np.subtract(rec["loss_after"], rec["loss_before"])))
            self.records[arm].append({"batch": i, **rec})
        for arm in self.arms:
            if arm.startswith("perturb-only"):
                source = arm.split("(")[1].rstrip(")")
                Ws = [w.detach()[self._slice(arm)] for w in self.W]
                new, rec = matched_perturbation(Ws, X, Y, self.act, [abs(drift[source])] * self.R, self.gens[arm])
                self._write(arm, new)
                self.records[arm].append({"batch": i, "matched_median_drift": drift[source], **rec})
            elif arm == "reset-only":
                self.records[arm].append({"batch": i})
            if arm != "baseline":
                reset_slices(self.opt, self.W, self._slice(arm))
        if i == self.cfg["TELE_BATCHES"] - 1:
            self.after = self.measure(self.W)


def split_arms(values, arms, R):
    """(n_arms * R) per-model values -> {arm: R values}."""
    return {a: values[j * R:(j + 1) * R] for j, a in enumerate(arms)}


def train(cfg, data, act):
    """Phase 1 (seeds, epochs 0..BRANCH_EPOCH) and phase 2 (arms x seeds). Returns the results dict."""
    from lib.metrics import random_directions, random_lie_elements
    from lib.train import fit, make_model
    R, arms = cfg["N_RUNS"], arm_names(cfg)
    seeds = [(r + 1) * cfg["SEED_BASE"] for r in range(R)]
    widths = [data.x_train.shape[1], *cfg["HIDDEN"], 10]
    W, opt = make_model(widths, seeds, cfg["OPTIMIZER"], cfg["LR"], data.x_train.device)
    t0 = time.perf_counter()
    h1 = fit(W, opt, data, act, cfg["BRANCH_EPOCH"], cfg["BATCH_SIZE"], desc=f"epochs 0-{cfg['BRANCH_EPOCH']} ({R} models)",
             progress=cfg["PROGRESS"])
    t_phase1 = time.perf_counter() - t0

    g = torch.Generator().manual_seed(cfg["TELEPORT_SEED"] + 12345)
    eval_idx = torch.randperm(data.x_train.shape[0], generator=g)[:cfg["EVAL_BATCH_SIZE"]].to(data.x_train.device)
    Xe, Ye = data.x_train[eval_idx], data.y_train[eval_idx]
    ts = displacements(cfg)
    dirs = random_directions(W, len(ts), "sphere", g)
    curves = [random_lie_elements(W, g) for _ in range(cfg["EVAL_CURVES"])]
    measure = lambda Wm: landscape(Wm, Xe, Ye, act, ts, dirs, curves)  # noqa: E731
    at_branch = measure(W)

    W2, opt2 = branch(W, opt, len(arms), cfg["OPTIMIZER"], cfg["LR"])
    hook = BranchHook(W2, opt2, data, act, cfg, arms, measure)
    t0 = time.perf_counter()
    h2 = fit(W2, opt2, data, act, cfg["EPOCHS"] - cfg["BRANCH_EPOCH"], cfg["BATCH_SIZE"], hook=hook,
             desc=f"epochs {cfg['BRANCH_EPOCH']}-{cfg['EPOCHS']} ({len(arms) * R} models)", progress=cfg["PROGRESS"])
    t_phase2 = time.perf_counter() - t0
    final = measure(W2)

    curves_out = {}
    for a in arms:
        curves_out[a] = {}
        for k in ("train_loss", "test_loss", "test_acc"):
            per_epoch = [row for row in h1[k]] + [split_arms(row, arms, R)[a] for row in h2[k]]
            curves_out[a][k] = np.asarray(per_epoch).T.tolist()  # (R, EPOCHS)
        curves_out[a]["test_loss_init"], curves_out[a]["test_acc_init"] = h1["test_loss_init"], h1["test_acc_init"]
    after = hook.after or measure(W2)
    landscape_out = {"branch": at_branch,
                     "after_teleport": {a: {m: split_arms(after[m], arms, R)[a] for m in after} for a in arms},
                     "final": {a: {m: split_arms(final[m], arms, R)[a] for m in final} for a in arms}}
    return {"seeds": seeds, "widths": widths, "arms": arms, "curves": curves_out, "records": hook.records,
            "landscape": landscape_out,
            "time_s": {"phase1": t_phase1, "phase2": t_phase2,
                       "per_epoch_phase1": t_phase1 / max(cfg["BRANCH_EPOCH"], 1),
                       "per_epoch_phase2": t_phase2 / (cfg["EPOCHS"] - cfg["BRANCH_EPOCH"])}}


def summary(res):
    """One row per arm: final test loss/accuracy and train loss (mean, std over runs), the change
    of phi and psi from the branch point to right after the teleports, and the teleport's drift."""
    rows = []
    b = res["landscape"]["branch"]
    base = {k: np.asarray(res["curves"]["baseline"][k])[:, -1] for k in ("test_loss", "train_loss")}
    for a in res["arms"]:
        c = res["curves"][a]
        te, acc, tr = (np.asarray(c[k])[:, -1] for k in ("test_loss", "test_acc", "train_loss"))
        after = res["landscape"]["after_teleport"][a]
        recs = res["records"].get(a, [])
        dobj = float("nan")
        if recs and "loss_after" in recs[0]:
            drift = np.mean([np.subtract(r["loss_after"], r["loss_before"]) for r in recs])
            dobj = float(np.mean([np.subtract(r["objective_after"], r["objective_before"]) for r in recs]))
        elif recs and "drift" in recs[0]:
            drift = np.mean([r["drift"] for r in recs])
        else:
            drift = 0.0
        rows.append({"arm": a, "test_loss": float(te.mean()), "test_loss_std": float(te.std()),
                     "dtest_paired": float((te - base["test_loss"]).mean()),
                     "dtest_paired_std": float((te - base["test_loss"]).std()),
                     "dtrain_paired": float((tr - base["train_loss"]).mean()),
                     "test_acc": float(acc.mean()), "test_acc_std": float(acc.std()),
                     "train_loss": float(tr.mean()), "gap": float((te - tr).mean()),
                     "dphi": float(np.mean(np.subtract(after["phi"], b["phi"]))),
                     "dpsi": float(np.mean(np.subtract(after["psi"], b["psi"]))),
                     "dobjective_per_teleport": dobj, "drift_per_teleport": float(drift)})
    return rows


def table_markdown(rows):
    from lib.results import markdown_table
    header = ["arm", "test loss", "test loss - baseline (same seed)", "test acc (%)", "train loss",
              "train loss - baseline", "gap test-train", "d phi (fixed batch)",
              "d psi (fixed batch)", "d objective/teleport", "loss drift/teleport"]
    return markdown_table(header, [[r["arm"], f"{r['test_loss']:.4f} ± {r['test_loss_std']:.4f}",
                                    f"{r['dtest_paired']:+.4f} ± {r['dtest_paired_std']:.4f}",
                                    f"{r['test_acc']:.2f} ± {r['test_acc_std']:.2f}", f"{r['train_loss']:.4f}",
                                    f"{r['dtrain_paired']:+.4f}",
                                    f"{r['gap']:.4f}", f"{r['dphi']:+.2e}", f"{r['dpsi']:+.2e}",
                                    "-" if math.isnan(r["dobjective_per_teleport"]) else f"{r['dobjective_per_teleport']:+.2e}",
                                    f"{r['drift_per_teleport']:+.2e}"] for r in rows])


STYLE = {"baseline": ("baseline", None), "increase": ("increase", None), "decrease": ("decrease", None),
         "perturb-increase": ("perturb-only", "^"), "perturb-decrease": ("perturb-only", "v"),
         "reset-only": ("reset-only", None)}


def plot(res, kind, path):
    """Left: mean test loss (solid) and train loss (dashed) vs epoch, +-1 std over runs; the arms
    drawn from the branch epoch on. Right: the same minus the baseline of the same seed (paired),
    after the branch: the effect of each arm, which is small next to the train-test gap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.results import COLORS, plot_mean_std, save_figure
    cfg = res["config"]
    arms = {}
    for d in ("decrease", "increase"):  # controls first, so the teleport arms are drawn on top
        if f"perturb-only ({kind}-{d})" in res["arms"]:
            arms[f"perturb-{d}"] = f"perturb-only ({kind}-{d})"
    if "reset-only" in res["arms"]:
        arms["reset-only"] = "reset-only"
    for d in ("decrease", "increase"):
        if f"{kind}-{d}" in res["arms"]:
            arms[d] = f"{kind}-{d}"
    arms["baseline"] = "baseline"
    first = cfg["BRANCH_EPOCH"]
    base = {k: np.asarray(res["curves"]["baseline"][k]) for k in ("test_loss", "train_loss")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, arm in arms.items():
        colour_key, marker = STYLE[key]
        c = {k: np.asarray(res["curves"][arm][k]) for k in ("test_loss", "train_loss")}
        x = np.arange(1, c["test_loss"].shape[1] + 1)
        sel = slice(0 if arm == "baseline" else max(first - 1, 0), None)
        label = f"teleport ({key})" if key in ("increase", "decrease") else arm
        alpha = 0.15 if marker is None else 0.07
        for name, ls in (("test_loss", "-"), ("train_loss", "--")):
            fmt, lab = ls + (marker or ""), label if name == "test_loss" else None
            with matplotlib.rc_context({"lines.markersize": 3.5}):
                plot_mean_std(axes[0], x[sel], c[name][:, sel], label=lab, color=COLORS[colour_key],
                              linestyle=fmt, alpha=alpha)
                after = slice(max(first - 1, 0), None)
                plot_mean_std(axes[1], x[after], (c[name] - base[name])[:, after], label=lab,
                              color=COLORS[colour_key], linestyle=fmt, alpha=alpha)
    for ax in axes:
        ax.axvline(first, color="k", lw=0.6, ls=":")
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("loss (test solid, train dashed)")
    axes[1].set_ylabel("loss minus baseline, same seed")
    axes[0].set_title(f"{cfg['DATASET']}, {cfg['OPTIMIZER']}: teleport to change {kind}")
    axes[1].set_title(f"effect of the arms (teleports in the first {cfg['TELE_BATCHES']} batches after epoch {first})",
                      fontsize=10)
    axes[1].legend(fontsize=8)
    save_figure(fig, path)


def main(cfg):
    from lib.data import load
    from lib.models import activation
    from lib.results import atomic_path, environment, experiment_dirs, format_row, load_json, save_json
    resolve(cfg)
    fig_dir, res_dir = experiment_dirs(EXPERIMENT, cfg["OUT_DIR"])
    stem = f"{cfg['DATASET']}_{cfg['OPTIMIZER']}" + (f"_{cfg['TAG']}" if cfg["TAG"] else "")
    json_path = os.path.join(res_dir, f"{stem}.json")
    if cfg["PLOT_ONLY"]:  # redraw from the saved JSON; the table is recomputed from its curves and records
        res = load_json(json_path)
        res["summary"] = summary(res)
        save_json(json_path, res)
    else:
        torch.manual_seed(cfg["TELEPORT_SEED"])
        data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
        res = {"config": cfg, "environment": environment(), **train(cfg, data, activation("leaky_relu"))}
        res["n_train"], res["n_test"] = data.x_train.shape[0], data.x_test.shape[0]
        res["summary"] = summary(res)
        save_json(json_path, res)
    with atomic_path(os.path.join(res_dir, f"{stem}_table.md")) as tmp, open(tmp, "w") as fh:
        fh.write(table_markdown(res["summary"]) + "\n")
    for kind in [k for k in ("sharpness", "curvature") if any(a.startswith(k) for a in res["arms"])]:
        plot(res, kind, os.path.join(fig_dir, f"{stem}_{kind}.png"))
    for r in res["summary"]:
        print(format_row({k: v for k, v in r.items() if not k.endswith("_std")}, {"arm": 34}))  # noqa: E501
    print(table_markdown(res["summary"]))
    t = res["time_s"]
    print(f"time: {t['phase1']:.0f} s for epochs 0-{cfg['BRANCH_EPOCH']} ({t['per_epoch_phase1']:.2f} s/epoch), "
          f"{t['phase2']:.0f} s after ({t['per_epoch_phase2']:.2f} s/epoch)")
    return res


if __name__ == "__main__":
    from lib.config import run
    run(main, globals(), _QUICK)
