"""Figure 4 (SGD) and Figure 11 (AdaGrad): teleporting to change sharpness or curvature
(Section 4.4, Appendix E.4), with control arms (on by default; `--controls=False` drops them):
random perturbations of the same loss drift as each teleport, and the optimizer-state reset alone.

    python teleport_sharpness_curvature.py                                   # Figure 4, CIFAR-10
    python teleport_sharpness_curvature.py --optimizer=adagrad               # Figure 11
    python teleport_sharpness_curvature.py --dataset=MNIST --data-dir=datasets/mnist5k
    python teleport_sharpness_curvature.py --quick                           # bundled MNIST, tiny

Protocol: 5 MLPs (seeds (r+1)*54321), 3072-32-10-10 (784-32-10-10 for MNIST-sized sets), no
biases, LeakyReLU(0.1), cross-entropy, batches of 20 in a fixed sequential order. The 5 seeds
train to epoch 20 as one batched model, then are copied with their optimizer state into arms x
seeds models that train epochs 20-40 as one batched model (lib.arms). Arms: baseline, sharpness
increase/decrease (phi, eq. 4), curvature increase/decrease (psi, eq. 5). Before each of the
first 5 mini-batches of epoch 20 (as the authors' code does) every teleport arm teleports on a
fresh random batch of 2,000 training images, all layer pairs at once, g = I + T, action eq. (46);
its optimizer state is then reset (AdaGrad: its models' squared-gradient sums zeroed, which equals
a new torch.optim.Adagrad since lr_decay = 0 makes the update independent of the step count).

Controls (CONTROLS):
- `perturb-only (<arm>)`: at the same moments, W + r u with u a random direction (Gaussian over
  all weights, unit norm per model) and r found by bisection per model so that the loss drift
  L(W + r u) - L(W) on the same teleport batch equals |median over seeds of the drift of the
  matching teleport arm| (the magnitude: a random move cannot lower the loss); state reset too.
- `reset-only` (AdaGrad only; with SGD it is the baseline): the state reset alone.

Outputs: figures/generalization/<dataset>_<optimizer>_{sharpness,curvature}.png,
results/generalization/<dataset>_<optimizer>.json (config, environment, data, every curve,
teleport and perturbation record, phi/psi on a fixed batch before, right after the teleports and
at the end, the epoch at which each diverged run diverged) and <dataset>_<optimizer>_table.md,
under OUT_DIR (TAG appended to the names). The set replaces the previous one only when the run
completes; saved results of other settings only with --replace. Progress is saved under
OUT_DIR/.progress/ (phase 1, then phase 2, every CHECKPOINT_S s): the same command resumes.

Divergence is a result: a run whose loss turns non-finite or exceeds 1e6 is recorded as diverged
(at which epoch), left out of the means and the paired differences (the table counts it) and
marked x in the figures; a teleport whose linear algebra fails or ends non-finite is undone.

CPU runtime (one thread on the 2 shared cores, other jobs running): MNIST 4,000-image subset with
the controls, 9 min (SGD, 45 models after the branch; 15 min under a load average of 12) and 16 min
(AdaGrad, 50 models, under that load); most of it is the teleports. CIFAR-10 at full size, run end
to end on CIFAR-sized synthetic data (50,000 x 3072, lib.data.write_fake): 116 s for epochs 0-20
(5 models, 5.8 s/epoch) and 1,137 s for epochs 20-40 (25 models, 57 s/epoch, 170 s of it the 20
teleports): 21 min for SGD without controls; about 35 min with them (45 models). --quick: 26 s
(15 s CPU) under a load average of 4.
Headline (MNIST 4,000-image subset, 5 seeds, final test loss minus the baseline of the same seed):
SGD sharpness decrease -0.0021 +- 0.0011, increase +0.0002 +- 0.0048; curvature teleports with the
released step sizes do not move psi at all (|T| ~ 1e-4); with both step sizes 100 (--tag=curv-lr100)
psi moves by +50% / -15% and the test loss does not (-0.0003 +- 0.0073 / -0.0010 +- 0.0020). The
sharpness teleports change phi only through the loss itself (d phi per teleport = loss drift per
teleport), and under AdaGrad every teleport arm is indistinguishable from reset-only except
sharpness increase, which matches its perturb-only control.
"""
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.actions import GLAction  # noqa: E402
from lib.arms import Arm, ArmHook, Moments, branch  # noqa: E402
from lib.config import UsageError, check_choice, check_positive, run  # noqa: E402
from lib.data import load  # noqa: E402
from lib.io import (check_replace, environment, load_results, relative, save_json, save_text,  # noqa: E402
                    staged)
from lib.metrics import psi, random_directions, random_lie_elements, sharpness  # noqa: E402
from lib.models import activation, loss_fn  # noqa: E402
from lib.plots import COLORS, plot_mean_std, save_figure  # noqa: E402
from lib.progress import Checkpoint  # noqa: E402
from lib.report import diverged, finite_stats, markdown_table  # noqa: E402
from lib.teleport import make_objective  # noqa: E402
from lib.train import make_model  # noqa: E402

# ---- config ---------------------------------------------------------------------------------
DATASET = "CIFAR10"  # MNIST, FashionMNIST or CIFAR10
OPTIMIZER = "sgd"  # sgd (Figure 4) or adagrad (Figure 11)
LR = None  # training learning rate; None = the optimizer's preset
EPOCHS = 40  # total training epochs
BRANCH_EPOCH = 20  # epoch at whose start the arms branch and teleport
BATCH_SIZE = 20  # training mini-batch, fixed sequential order
N_RUNS = 5  # seeds per arm, seed of run r = (r + 1) * SEED_BASE
SEED_BASE = 54321  # the authors' seed
TRAIN_SIZE = 50000  # training images (all if fewer exist)
HIDDEN = [32, 10]  # hidden widths (the authors' for every dataset)
ARMS = ["sharpness-increase", "sharpness-decrease", "curvature-increase", "curvature-decrease"]  # teleport arms (of these four)
CONTROLS = True  # add perturb-only arms (and reset-only for adagrad)
TELE_BATCHES = 5  # teleports per arm: before each of the first TELE_BATCHES batches of BRANCH_EPOCH
TELE_BATCH_SIZE = 2000  # images per teleport batch (random subset of the training set)
SHARP_STEPS = 10  # gradient steps on T per teleport batch, sharpness
SHARP_LR = None  # {"increase": x, "decrease": y} teleport step sizes; None = the dataset's preset
SHARP_TS = [0.0001, 0.02, 0.001]  # displacements of eq. (4): start, stop (excluded), step
# (eq. 4 as the paper: one unit-sphere direction per displacement. The authors' teleport_sharpness
#  uses 100 positive-orthant directions per t = 0.1..0.9 and ignores its t_start/t_end arguments.)
SHARP_STOP_ABOVE = 2.0  # stop a model's sharpness teleport once phi exceeds this
CURV_STEPS = 1  # gradient steps on T per teleport batch, curvature
CURV_LR = None  # {"increase": x, "decrease": y} teleport step sizes; None = the dataset's preset
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
PLOT_ONLY = False  # redraw the figures and the table from the saved JSON
PROGRESS = True  # tqdm bars
REPLACE = False  # True: replace saved results made with other settings
CHECKPOINT_S = 30.0  # save progress after at most this many seconds of work (0: every epoch)
# ---------------------------------------------------------------------------------------------

RELEASED = dict(SHARP_LR={"increase": 5e-2, "decrease": 5e-2}, CURV_LR={"increase": 2e-1, "decrease": 5e-2})
PRESETS = {  # the authors' learning rates and released teleport step sizes
    "DATASET": {"CIFAR10": RELEASED, "MNIST": RELEASED,
                "FashionMNIST": dict(SHARP_LR={"increase": 1e-1, "decrease": 3e-1},
                                     CURV_LR={"increase": 5e-3, "decrease": 3e-3})},
    "OPTIMIZER": {"sgd": dict(LR=0.02), "adagrad": dict(LR=0.01)}}
QUICK_SETTINGS = {"DATASET": "MNIST", "EPOCHS": 3, "BRANCH_EPOCH": 1, "N_RUNS": 2, "TRAIN_SIZE": 400, "TELE_BATCHES": 2,
                  "TELE_BATCH_SIZE": 100, "SHARP_STEPS": 2, "EVAL_BATCH_SIZE": 100, "EVAL_CURVES": 2,
                  "SHARP_STOP_ABOVE": 10.0}  # SGD: phi ~2.3 after one epoch, above 2: let the sharpness teleports act
# names in configs saved by the older script; their values are in HIDDEN, SHARP_LR, CURV_LR and LR
TELEPORT_ARMS = ("sharpness-increase", "sharpness-decrease", "curvature-increase", "curvature-decrease")
# per arm of a figure: legend, colour, marker (test loss solid, train dashed); teleport arms drawn last, on top
FIGURE_ARMS = [("perturb-only ({kind}-decrease)", "perturb-only (decrease)", "#17becf", "v"),
               ("perturb-only ({kind}-increase)", "perturb-only (increase)", "#ff7f0e", "^"),
               ("reset-only", "reset-only", COLORS["reset-only"], "s"),
               ("{kind}-decrease", "teleport (decrease)", COLORS["decrease"], ""),
               ("{kind}-increase", "teleport (increase)", COLORS["increase"], ""),
               ("baseline", "baseline", COLORS["baseline"], "")]


def check(cfg):
    """One-line UsageErrors for bad settings (the presets already check DATASET and OPTIMIZER)."""
    check_positive("learning rate", cfg["LR"])
    for key in ("SHARP_LR", "CURV_LR"):
        if not isinstance(cfg[key], dict) or set(cfg[key]) != {"increase", "decrease"}:
            raise UsageError(f"--{key.lower().replace('_', '-')} must be a dict with keys 'increase' and 'decrease'")
        for v in cfg[key].values():
            check_positive(f"{key.lower()} step size", v)
    for arm in cfg["ARMS"]:
        check_choice("arm", arm, TELEPORT_ARMS)
    if len(set(cfg["ARMS"])) < len(cfg["ARMS"]):
        raise UsageError(f"--arms lists an arm twice: {cfg['ARMS']}")
    for key in ("EPOCHS", "BATCH_SIZE", "N_RUNS", "TELE_BATCH_SIZE", "EVAL_BATCH_SIZE", "EVAL_CURVES", "CURV_CURVES",
                "TELE_BATCHES", "SHARP_STEPS", "CURV_STEPS"):
        check_positive(key.lower(), cfg[key], allow_zero=key in ("TELE_BATCHES", "SHARP_STEPS", "CURV_STEPS"))
    if len(cfg["SHARP_TS"]) != 3 or not 0 < cfg["SHARP_TS"][2]:
        raise UsageError(f"--sharp-ts must be [start, stop, step] with step > 0, got {cfg['SHARP_TS']}")
    if not 0 <= cfg["BRANCH_EPOCH"] < cfg["EPOCHS"]:
        raise UsageError(f"branch_epoch must be in [0, epochs), got {cfg['BRANCH_EPOCH']}")


def displacements(cfg):
    start, stop, step = cfg["SHARP_TS"]
    return [float(t) for t in np.arange(start, stop - step / 2, step)]


def make_arms(cfg, act):
    """baseline, the teleport arms, then the controls, as lib.arms.Arm. Every arm that draws has
    its own generator, seeded by the position of its teleport arm in TELEPORT_ARMS."""
    ts, seed = displacements(cfg), lambda arm, k: cfg["TELEPORT_SEED"] * 1000 + 17 * TELEPORT_ARMS.index(arm) + k
    arms = [Arm("baseline")]
    for name in cfg["ARMS"]:
        kind, direction = name.split("-")
        g = torch.Generator().manual_seed(seed(name, 1))
        if kind == "sharpness":
            tele = dict(objective=make_objective("sharpness", act, ts=ts, kind="sphere", generator=g),
                        steps=cfg["SHARP_STEPS"], lr=cfg["SHARP_LR"][direction], stop_above=cfg["SHARP_STOP_ABOVE"])
        else:  # psi of eq. (5) on curves of the eq. (54) action; the move itself uses eq. (46)
            tele = dict(objective=make_objective("curvature", act, n_curves=cfg["CURV_CURVES"], generator=g),
                        steps=cfg["CURV_STEPS"], lr=cfg["CURV_LR"][direction])
        arms.append(Arm(name, "teleport", "reset", guard=float("inf"),  # undo only failed or non-finite teleports
                        teleport=dict(action=GLAction(46, "first_order"), maximize=direction == "increase", **tele)))
    if cfg["CONTROLS"]:
        arms += [Arm(f"perturb-only ({a})", "perturb", "reset", match=a, seed=seed(a, 7)) for a in cfg["ARMS"]]
        if cfg["OPTIMIZER"] != "sgd":
            arms.append(Arm("reset-only", "none", "reset"))
    return arms


def landscape(W, X, Y, act, ts, dirs, curves):
    """phi (eq. 4, fixed displacements/directions) and psi (eq. 5, fixed curves of eq. 54) per
    model; NaN for a model whose weights are not finite or whose psi's linear algebra fails."""
    W, nan = [w.detach() for w in W], float("nan")
    ok = torch.stack([w.flatten(1).isfinite().all(1) for w in W]).all(0).tolist()
    if not all(ok):  # diverged models: measure the others
        sub = landscape([w[[k for k, o in enumerate(ok) if o]] for w in W], X, Y, act, ts, dirs, curves) \
            if any(ok) else {"phi": [], "psi": []}
        return {m: [v.pop(0) if o else nan for o in ok] for m, v in sub.items()}
    phi = sharpness(W, X, Y, act, ts, dirs).tolist()
    try:
        return {"phi": phi, "psi": psi(W, X, act, curves).detach().tolist()}
    except torch.linalg.LinAlgError:  # e.g. an SVD that does not converge: one model at a time
        return {"phi": phi, "psi": [nan] if len(ok) == 1 else
                [landscape([w[k:k + 1] for w in W], X, Y, act, ts, dirs, curves)["psi"][0] for k in range(len(ok))]}


class Hook(ArmHook):
    """lib.arms.ArmHook; a teleport whose linear algebra failed (undone by the arm's guard)
    records its unchanged loss, so the perturb-only arm matching it moves by a zero drift."""

    def act_arm(self, arm, X, Y, held):
        rec = super().act_arm(arm, X, Y, held)
        if "error" in rec:
            with torch.no_grad():
                rec["loss_before"] = rec["loss_after"] = loss_fn([w[self.models(arm)] for w in self.W], X, Y,
                                                                 self.act).tolist()
        return rec


def train(cfg, data, act, ckpt):
    """Phase 1 (seeds, epochs 0..BRANCH_EPOCH) and phase 2 (arms x seeds), each a unit of the
    checkpoint `ckpt` (lib.progress): resumed where it stopped. Returns the results dict."""
    R, first, arms = cfg["N_RUNS"], cfg["BRANCH_EPOCH"], make_arms(cfg, act)
    names = [a.name for a in arms]  # arm-major: arm j holds models j*R..(j+1)*R-1
    seeds = [(r + 1) * cfg["SEED_BASE"] for r in range(R)]
    widths = [data.x_train.shape[1], *cfg["HIDDEN"], 10]
    W, opt = make_model(widths, seeds, cfg["OPTIMIZER"], cfg["LR"], data.x_train.device)
    g = torch.Generator().manual_seed(cfg["TELEPORT_SEED"] + 12345)  # draws depend on the shapes only
    eval_idx = torch.randperm(data.x_train.shape[0], generator=g)[:cfg["EVAL_BATCH_SIZE"]].to(data.x_train.device)
    Xe, Ye, ts = data.x_train[eval_idx], data.y_train[eval_idx], displacements(cfg)
    dirs = random_directions(W, len(ts), "sphere", g)
    curves = [random_lie_elements(W, g) for _ in range(cfg["EVAL_CURVES"])]
    measure = lambda Wm: landscape(Wm, Xe, Ye, act, ts, dirs, curves)  # noqa: E731

    p1 = ckpt.unit("phase1")
    if p1 is None:
        h1 = ckpt.fit("phase1", W, opt, data, act, first, cfg["BATCH_SIZE"], desc=f"epochs 0-{first} ({R} models)",
                      progress=cfg["PROGRESS"])
        p1 = ckpt.finish_unit("phase1", {"W": [w.detach().cpu().clone() for w in W], "opt": opt.state_dict(),
                                         "hist": h1, "branch": measure(W)})
    with torch.no_grad():
        for w, v in zip(W, p1["W"]):
            w.copy_(v)
    opt.load_state_dict(p1["opt"])

    p2 = ckpt.unit("phase2")
    if p2 is None:
        W2, opt2 = branch(W, opt, len(arms), cfg["OPTIMIZER"], cfg["LR"])
        moments = Moments((0,), cfg["TELE_BATCHES"], cfg["TELE_BATCH_SIZE"], cfg["TELEPORT_SEED"])
        # the objectives' generators are not in the hook's state: they draw only in epoch 0, and
        # progress is saved at the end of an epoch, so a resumed phase 2 never needs them
        hook = Hook(W2, opt2, data, act, arms, moments, after=measure)  # phi, psi right after the last teleport
        h2 = ckpt.fit("phase2", W2, opt2, data, act, cfg["EPOCHS"] - first, cfg["BATCH_SIZE"], hook=hook,
                      desc=f"epochs {first}-{cfg['EPOCHS']} ({len(arms) * R} models)", progress=cfg["PROGRESS"])
        p2 = ckpt.finish_unit("phase2", {"hist": h2, "records": hook.records, "after": hook.after or measure(W2),
                                         "final": measure(W2)})

    h1, h2 = p1["hist"], p2["hist"]
    per_arm = lambda values, j: values[j * R:(j + 1) * R]  # noqa: E731
    curves_out = {a: {k: np.asarray(h1[k] + [per_arm(row, j) for row in h2[k]]).T.tolist()  # (R, EPOCHS)
                      for k in ("train_loss", "test_loss", "test_acc")} for j, a in enumerate(names)}
    for c in curves_out.values():
        c["test_loss_init"], c["test_acc_init"] = h1["test_loss_init"], h1["test_acc_init"]
    by_arm = lambda m: {a: {k: per_arm(v, j) for k, v in m.items()} for j, a in enumerate(names)}  # noqa: E731
    t1, t2 = (h["time_s"][-1] if h["time_s"] else 0.0 for h in (h1, h2))  # training time, summed over resumes
    return {"seeds": seeds, "widths": widths, "arms": names, "curves": curves_out, "records": p2["records"],
            "landscape": {"branch": p1["branch"], "after_teleport": by_arm(p2["after"]), "final": by_arm(p2["final"])},
            "diverged": diverged_at(curves_out),
            "time_s": {"phase1": t1, "phase2": t2, "per_epoch_phase1": t1 / max(first, 1),
                       "per_epoch_phase2": t2 / (cfg["EPOCHS"] - first)}}


def diverged_at(curves):
    """{arm: per run, the epoch at which its train or test loss turned non-finite or above 1e6, or None}."""
    at = {a: zip(*(diverged(c[k]) for k in ("train_loss", "test_loss"))) for a, c in curves.items()}
    return {a: [min([e for e in pair if e is not None], default=None) for pair in v] for a, v in at.items()}


def per_teleport(recs, keep, key, minus=None):
    """Mean over the moments and the kept models (keep: (R,) bool) of r[key] (minus r[minus])."""
    v = [np.subtract(r[key], r[minus]) if minus else r[key] for r in recs if key in r]
    return finite_stats(np.asarray(v, dtype=float).reshape(-1, len(keep))[:, keep].ravel())[0]


def summary(res):
    """One row per arm: final test loss/accuracy and train loss (mean, std over the `n` of `of`
    runs that did not diverge), the change of phi and psi from the branch point to right after the
    teleports, and the teleport's drift; paired differences (minus the baseline of the same seed)
    over the seeds where neither diverged; `undone`: teleports the guard undid."""
    rows, b, at = [], res["landscape"]["branch"], res.get("diverged") or diverged_at(res["curves"])
    final = lambda a, k: np.asarray(res["curves"][a][k], dtype=float)[:, -1]  # noqa: E731
    base = {k: final("baseline", k) for k in ("test_loss", "train_loss")}
    for a in res["arms"]:
        keep = np.array([e is None for e in at[a]])
        pair = keep & np.array([e is None for e in at["baseline"]])
        te, acc, tr = (final(a, k) for k in ("test_loss", "test_acc", "train_loss"))
        after, recs = res["landscape"]["after_teleport"][a], res["records"].get(a, [])
        drift, dobj = 0.0 if keep.any() else float("nan"), float("nan")  # arms that do not move: no drift
        if recs and "loss_after" in recs[0]:
            drift = per_teleport(recs, keep, "loss_after", "loss_before")
            dobj = per_teleport(recs, keep, "objective_after", "objective_before")
        elif recs and "drift" in recs[0]:
            drift = per_teleport(recs, keep, "drift")
        (mte, ste, n), (dte, dte_s, _) = finite_stats(te, keep), finite_stats(te - base["test_loss"], pair)
        d = {m: finite_stats(np.subtract(np.asarray(after[m], float), np.asarray(b[m], float)), keep)[0]
             for m in ("phi", "psi")}
        rows.append({"arm": a, "test_loss": mte, "test_loss_std": ste, "dtest_paired": dte, "dtest_paired_std": dte_s,
                     "dtrain_paired": finite_stats(tr - base["train_loss"], pair)[0],
                     "test_acc": finite_stats(acc, keep)[0], "test_acc_std": finite_stats(acc, keep)[1],
                     "train_loss": finite_stats(tr, keep)[0], "gap": finite_stats(te - tr, keep)[0],
                     "dphi": d["phi"], "dpsi": d["psi"], "dobjective_per_teleport": dobj, "drift_per_teleport": drift,
                     "n": n, "of": len(keep), "undone": sum(sum(r.get("failed", [])) for r in recs)})
    return rows


def table_markdown(rows, at):
    """The summary as Markdown (nan as '-'); below it, the runs that diverged and the teleports undone."""
    header = ["arm", "test loss", "test loss - baseline (same seed)", "test acc (%)", "train loss", "train loss - baseline",
              "gap test-train", "d phi (fixed batch)", "d psi (fixed batch)", "d objective/teleport", "loss drift/teleport"]
    f = lambda r, k, spec: "-" if r[k] is None or not np.isfinite(r[k]) else format(r[k], spec)  # noqa: E731
    lines = [[r["arm"] + (f" ({r['n']} of {r['of']} runs)" if r.get("n", 0) < r.get("of", 0) else ""),
              f"{f(r, 'test_loss', '.4f')} ± {f(r, 'test_loss_std', '.4f')}",
              f"{f(r, 'dtest_paired', '+.4f')} ± {f(r, 'dtest_paired_std', '.4f')}",
              f"{f(r, 'test_acc', '.2f')} ± {f(r, 'test_acc_std', '.2f')}", f(r, "train_loss", ".4f"),
              f(r, "dtrain_paired", "+.4f"), f(r, "gap", ".4f"), f(r, "dphi", "+.2e"), f(r, "dpsi", "+.2e"),
              f(r, "dobjective_per_teleport", "+.2e"), f(r, "drift_per_teleport", "+.2e")] for r in rows]
    notes = [f"{a} " + ", ".join(f"run {i + 1} at epoch {e}" for i, e in enumerate(v) if e is not None)
             for a, v in at.items() if any(e is not None for e in v)]
    undone = [f"{r['arm']} {r['undone']}" for r in rows if r.get("undone")]
    return "\n\n".join([markdown_table(header, lines)]
                        + ["Diverged runs (loss non-finite or above 1e6), left out of the means and the paired "
                           "differences: " + "; ".join(notes) + "."] * bool(notes)
                        + ["Teleports undone (linear algebra failed or a non-finite result), models x moments: "
                           + ", ".join(undone) + "."] * bool(undone))


def cut(curves, at):
    """(R, E) curves with each diverged run's values from its divergence epoch on set to nan."""
    c = np.array(curves, dtype=float)
    for r, e in enumerate(at):
        if e is not None:
            c[r, e - 1:] = np.nan
    return c


def plot(res, kind, path, label):
    """Left: mean test loss (solid) and train loss (dashed) vs epoch, +-1 std over runs; the arms
    drawn from the branch epoch on. Right: the same minus the baseline of the same seed (paired),
    after the branch: the effect of each arm, which is small next to the train-test gap. Diverged
    runs are left out from their divergence on (x: their last point; the legend counts them)."""
    cfg, first, at = res["config"], res["config"]["BRANCH_EPOCH"], res.get("diverged") or diverged_at(res["curves"])
    base = {k: cut(res["curves"]["baseline"][k], at["baseline"]) for k in ("test_loss", "train_loss")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    handles = []
    for arm, name, colour, marker in FIGURE_ARMS:
        arm = arm.format(kind=kind)
        if arm not in res["arms"]:
            continue
        c = {k: cut(res["curves"][arm][k], at[arm]) for k in ("test_loss", "train_loss")}
        x = np.arange(1, c["test_loss"].shape[1] + 1)
        after = slice(max(first - 1, 0), None)
        sel = slice(None) if arm == "baseline" else after
        for key, ls in (("test_loss", "-"), ("train_loss", "--")):
            kw = dict(color=colour, linestyle=ls + marker, alpha=0.07 if marker else 0.15)
            with matplotlib.rc_context({"lines.markersize": 4}):
                plot_mean_std(axes[0], x[sel], c[key][:, sel], **kw)
                plot_mean_std(axes[1], x[after], (c[key] - base[key])[:, after], **kw)
        n = sum(e is not None for e in at[arm])
        name += f" ({n} of {len(at[arm])} diverged)" if n else ""
        handles.insert(0, plt.Line2D([], [], color=colour, marker=marker or None, label=name))
    handles += [plt.Line2D([], [], color="k", ls=ls, label=lab) for ls, lab in (("-", "test loss"), ("--", "train loss"))]
    epochs = cfg["EPOCHS"]
    for ax, x0 in zip(axes, (1, first)):
        ax.axvline(first, color="k", lw=0.6, ls=":")
        ax.set_xlim(x0 - 0.04 * (epochs - x0) - 0.5, epochs + 0.04 * (epochs - x0) + 0.5)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_xlabel("epoch")
    if all(e is not None for v in at.values() for e in v):
        axes[0].text(0.5, 0.5, "every run diverged (epochs in the table)", transform=axes[0].transAxes, ha="center")
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("loss minus baseline, same seed")
    symbol = r"sharpness $\phi$ (eq. 4)" if kind == "sharpness" else r"curvature $\psi$ (eq. 5)"
    fig.suptitle(f"{label}, {cfg['OPTIMIZER']}: teleporting to change {symbol}")
    axes[1].set_title(f"effect of the arms (teleports in the first {cfg['TELE_BATCHES']} batches after "
                      f"epoch {first})", fontsize=10)
    axes[1].legend(handles=handles, fontsize=8)
    save_figure(fig, path)


def main(cfg):
    check(cfg)
    stem = f"{cfg['DATASET']}_{cfg['OPTIMIZER']}" + (f"_{cfg['TAG']}" if cfg["TAG"] else "")
    json_path = os.path.join(cfg["OUT_DIR"], "results", "generalization", f"{stem}.json")
    if cfg["PLOT_ONLY"]:  # the table is recomputed from the saved curves and records; the JSON is left as it is
        res = load_results(json_path)
        res["summary"] = summary(res)
    else:
        check_replace(json_path, cfg)
        if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # small batched MLPs: one thread is fastest (two stall each other on busy cores)
        torch.manual_seed(cfg["TELEPORT_SEED"])
        data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
        check_replace(json_path, cfg, data=data)
        saved = {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])}
        ckpt = Checkpoint(cfg, f"teleport_sharpness_curvature-{stem}")
        res = {"config": saved, "environment": environment(), "data": data.info, "label": data.label,
               **train(cfg, data, activation("leaky_relu"), ckpt)}
        res["summary"] = summary(res)
    at = res.get("diverged") or diverged_at(res["curves"])
    with staged(cfg["OUT_DIR"]) as out:  # the whole set replaces the previous one only when complete
        fig_dir, res_dir = (os.path.join(out, kind, "generalization") for kind in ("figures", "results"))
        if not cfg["PLOT_ONLY"]:
            save_json(os.path.join(res_dir, f"{stem}.json"), res)
        save_text(os.path.join(res_dir, f"{stem}_table.md"), table_markdown(res["summary"], at) + "\n")
        label = res.get("label") or f"{res['config']['DATASET']} ({res['n_train']:,} train)"  # results saved without one
        for kind in [k for k in ("sharpness", "curvature") if any(a.startswith(k) for a in res["arms"])]:
            plot(res, kind, os.path.join(fig_dir, f"{stem}_{kind}.png"), label)
    if not cfg["PLOT_ONLY"]:
        ckpt.finish()
    print(table_markdown(res["summary"], at))
    t = res["time_s"]
    print(f"time: {t['phase1']:.0f} s for epochs 0-{res['config']['BRANCH_EPOCH']} ({t['per_epoch_phase1']:.2f} s/epoch), "
          f"{t['phase2']:.0f} s after ({t['per_epoch_phase2']:.2f} s/epoch)")
    return res


if __name__ == "__main__":
    run(main, globals())
