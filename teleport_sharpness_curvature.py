"""Figure 4 (SGD) and Figure 11 (AdaGrad): teleporting to change sharpness or curvature
(Section 4.4, Appendix E.4), with control arms (`--controls`): random perturbations of the same
loss drift as each teleport, and the optimizer-state reset alone.

    python teleport_sharpness_curvature.py                                   # Figure 4, CIFAR-10
    python teleport_sharpness_curvature.py --optimizer=adagrad               # Figure 11
    python teleport_sharpness_curvature.py --dataset=MNIST --data-dir=datasets/mnist5k --controls
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

Controls (`--controls`):
- `perturb-only (<arm>)`: at the same moments, W + r u with u a random direction (Gaussian over
  all weights, unit norm per model) and r found by bisection per model so that the loss drift
  L(W + r u) - L(W) on the same teleport batch equals |median over seeds of the drift of the
  matching teleport arm| (the magnitude: a random move cannot lower the loss); state reset too.
- `reset-only` (AdaGrad only; with SGD it is the baseline): the state reset alone.

Outputs: figures/generalization/<dataset>_<optimizer>_{sharpness,curvature}.png,
results/generalization/<dataset>_<optimizer>.json (config, environment, data, every curve,
teleport and perturbation record, phi/psi on a fixed batch before, right after the teleports and
at the end) and <dataset>_<optimizer>_table.md, under OUT_DIR (TAG appended to the names).

CPU runtime (one thread on the 2 shared cores, other jobs running): MNIST 4,000-image subset with
--controls, 9 min (SGD, 45 models after the branch; 15 min under a load average of 12) and 16 min
(AdaGrad, 50 models, under that load); most of it is the teleports. CIFAR-10 at full size, run end
to end on CIFAR-sized synthetic data (50,000 x 3072, lib.data.write_fake): 116 s for epochs 0-20
(5 models, 5.8 s/epoch) and 1,137 s for epochs 20-40 (25 models, 57 s/epoch, 170 s of it the 20
teleports): 21 min for SGD without controls; about 35 min with --controls (45 models).
Headline (MNIST 4,000-image subset, 5 seeds, final test loss minus the baseline of the same seed):
SGD sharpness decrease -0.0021 +- 0.0011, increase +0.0002 +- 0.0048; curvature teleports with the
released step sizes do not move psi at all (|T| ~ 1e-4); with both step sizes 100 (--tag=curv-lr100)
psi moves by +50% / -15% and the test loss does not (-0.0003 +- 0.0073 / -0.0010 +- 0.0020). The
sharpness teleports change phi only through the loss itself (d phi per teleport = loss drift per
teleport), and under AdaGrad every teleport arm is indistinguishable from reset-only except
sharpness increase, which matches its perturb-only control.
"""
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.actions import GLAction  # noqa: E402
from lib.arms import Arm, ArmHook, Moments, branch  # noqa: E402
from lib.config import UsageError, check_choice, check_positive, run  # noqa: E402
from lib.data import load  # noqa: E402
from lib.io import environment, load_results, relative, save_json, save_text  # noqa: E402
from lib.metrics import psi, random_directions, random_lie_elements, sharpness  # noqa: E402
from lib.models import activation  # noqa: E402
from lib.plots import COLORS, plot_mean_std, save_figure  # noqa: E402
from lib.report import markdown_table  # noqa: E402
from lib.teleport import make_objective  # noqa: E402
from lib.train import fit, make_model  # noqa: E402

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
CONTROLS = False  # add perturb-only arms (and reset-only for adagrad)
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
# ---------------------------------------------------------------------------------------------

RELEASED = dict(SHARP_LR={"increase": 5e-2, "decrease": 5e-2}, CURV_LR={"increase": 2e-1, "decrease": 5e-2})
PRESETS = {  # the authors' learning rates and released teleport step sizes
    "DATASET": {"CIFAR10": RELEASED, "MNIST": RELEASED,
                "FashionMNIST": dict(SHARP_LR={"increase": 1e-1, "decrease": 3e-1},
                                     CURV_LR={"increase": 5e-3, "decrease": 3e-3})},
    "OPTIMIZER": {"sgd": dict(LR=0.02), "adagrad": dict(LR=0.01)}}
QUICK_SETTINGS = {"DATASET": "MNIST", "EPOCHS": 3, "BRANCH_EPOCH": 1, "N_RUNS": 2, "TRAIN_SIZE": 400, "TELE_BATCHES": 2,
                  "TELE_BATCH_SIZE": 100, "SHARP_STEPS": 2, "EVAL_BATCH_SIZE": 100, "EVAL_CURVES": 2}
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
        arms.append(Arm(name, "teleport", "reset", teleport=dict(action=GLAction(46, "first_order"),
                                                                 maximize=direction == "increase", **tele)))
    if cfg["CONTROLS"]:
        arms += [Arm(f"perturb-only ({a})", "perturb", "reset", match=a, seed=seed(a, 7)) for a in cfg["ARMS"]]
        if cfg["OPTIMIZER"] != "sgd":
            arms.append(Arm("reset-only", "none", "reset"))
    return arms


def landscape(W, X, Y, act, ts, dirs, curves):
    """phi (eq. 4, fixed displacements/directions) and psi (eq. 5, fixed curves of eq. 54) per model."""
    W = [w.detach() for w in W]
    return {"phi": sharpness(W, X, Y, act, ts, dirs).tolist(), "psi": psi(W, X, act, curves).detach().tolist()}


def train(cfg, data, act):
    """Phase 1 (seeds, epochs 0..BRANCH_EPOCH) and phase 2 (arms x seeds). Returns the results dict."""
    R, first, arms = cfg["N_RUNS"], cfg["BRANCH_EPOCH"], make_arms(cfg, act)
    names = [a.name for a in arms]  # arm-major: arm j holds models j*R..(j+1)*R-1
    seeds = [(r + 1) * cfg["SEED_BASE"] for r in range(R)]
    widths = [data.x_train.shape[1], *cfg["HIDDEN"], 10]
    W, opt = make_model(widths, seeds, cfg["OPTIMIZER"], cfg["LR"], data.x_train.device)
    t0 = time.perf_counter()
    h1 = fit(W, opt, data, act, first, cfg["BATCH_SIZE"], desc=f"epochs 0-{first} ({R} models)", progress=cfg["PROGRESS"])
    t_phase1 = time.perf_counter() - t0

    g = torch.Generator().manual_seed(cfg["TELEPORT_SEED"] + 12345)
    eval_idx = torch.randperm(data.x_train.shape[0], generator=g)[:cfg["EVAL_BATCH_SIZE"]].to(data.x_train.device)
    Xe, Ye, ts = data.x_train[eval_idx], data.y_train[eval_idx], displacements(cfg)
    dirs = random_directions(W, len(ts), "sphere", g)
    curves = [random_lie_elements(W, g) for _ in range(cfg["EVAL_CURVES"])]
    measure = lambda Wm: landscape(Wm, Xe, Ye, act, ts, dirs, curves)  # noqa: E731
    at_branch = measure(W)

    W2, opt2 = branch(W, opt, len(arms), cfg["OPTIMIZER"], cfg["LR"])
    moments = Moments((0,), cfg["TELE_BATCHES"], cfg["TELE_BATCH_SIZE"], cfg["TELEPORT_SEED"])
    hook = ArmHook(W2, opt2, data, act, arms, moments, after=measure)  # phi, psi right after the last teleport
    t0 = time.perf_counter()
    h2 = fit(W2, opt2, data, act, cfg["EPOCHS"] - first, cfg["BATCH_SIZE"], hook=hook,
             desc=f"epochs {first}-{cfg['EPOCHS']} ({len(arms) * R} models)", progress=cfg["PROGRESS"])
    t_phase2 = time.perf_counter() - t0

    per_arm = lambda values, j: values[j * R:(j + 1) * R]  # noqa: E731
    curves_out = {a: {k: np.asarray(h1[k] + [per_arm(row, j) for row in h2[k]]).T.tolist()  # (R, EPOCHS)
                      for k in ("train_loss", "test_loss", "test_acc")} for j, a in enumerate(names)}
    for c in curves_out.values():
        c["test_loss_init"], c["test_acc_init"] = h1["test_loss_init"], h1["test_acc_init"]
    after, final = hook.after or measure(W2), measure(W2)
    by_arm = lambda m: {a: {k: per_arm(v, j) for k, v in m.items()} for j, a in enumerate(names)}  # noqa: E731
    return {"seeds": seeds, "widths": widths, "arms": names, "curves": curves_out, "records": hook.records,
            "landscape": {"branch": at_branch, "after_teleport": by_arm(after), "final": by_arm(final)},
            "time_s": {"phase1": t_phase1, "phase2": t_phase2, "per_epoch_phase1": t_phase1 / max(first, 1),
                       "per_epoch_phase2": t_phase2 / (cfg["EPOCHS"] - first)}}


def summary(res):
    """One row per arm: final test loss/accuracy and train loss (mean, std over runs), the change
    of phi and psi from the branch point to right after the teleports, and the teleport's drift."""
    rows, b = [], res["landscape"]["branch"]
    base = {k: np.asarray(res["curves"]["baseline"][k])[:, -1] for k in ("test_loss", "train_loss")}
    for a in res["arms"]:
        te, acc, tr = (np.asarray(res["curves"][a][k])[:, -1] for k in ("test_loss", "test_acc", "train_loss"))
        after, recs = res["landscape"]["after_teleport"][a], res["records"].get(a, [])
        drift, dobj = 0.0, float("nan")
        if recs and "loss_after" in recs[0]:
            drift = np.mean([np.subtract(r["loss_after"], r["loss_before"]) for r in recs])
            dobj = float(np.mean([np.subtract(r["objective_after"], r["objective_before"]) for r in recs]))
        elif recs and "drift" in recs[0]:
            drift = np.mean([r["drift"] for r in recs])
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
    header = ["arm", "test loss", "test loss - baseline (same seed)", "test acc (%)", "train loss", "train loss - baseline",
              "gap test-train", "d phi (fixed batch)", "d psi (fixed batch)", "d objective/teleport", "loss drift/teleport"]
    dobj = lambda v: "-" if v is None or np.isnan(v) else f"{v:+.2e}"  # noqa: E731  (null in a saved JSON)
    return markdown_table(header, [[r["arm"], f"{r['test_loss']:.4f} ± {r['test_loss_std']:.4f}",
                                    f"{r['dtest_paired']:+.4f} ± {r['dtest_paired_std']:.4f}",
                                    f"{r['test_acc']:.2f} ± {r['test_acc_std']:.2f}", f"{r['train_loss']:.4f}",
                                    f"{r['dtrain_paired']:+.4f}", f"{r['gap']:.4f}", f"{r['dphi']:+.2e}",
                                    f"{r['dpsi']:+.2e}", dobj(r["dobjective_per_teleport"]),
                                    f"{r['drift_per_teleport']:+.2e}"] for r in rows])


def plot(res, kind, path, label):
    """Left: mean test loss (solid) and train loss (dashed) vs epoch, +-1 std over runs; the arms
    drawn from the branch epoch on. Right: the same minus the baseline of the same seed (paired),
    after the branch: the effect of each arm, which is small next to the train-test gap."""
    cfg, first = res["config"], res["config"]["BRANCH_EPOCH"]
    base = {k: np.asarray(res["curves"]["baseline"][k]) for k in ("test_loss", "train_loss")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    handles = []
    for arm, name, colour, marker in FIGURE_ARMS:
        arm = arm.format(kind=kind)
        if arm not in res["arms"]:
            continue
        c = {k: np.asarray(res["curves"][arm][k]) for k in ("test_loss", "train_loss")}
        x = np.arange(1, c["test_loss"].shape[1] + 1)
        after = slice(max(first - 1, 0), None)
        sel = slice(None) if arm == "baseline" else after
        for key, ls in (("test_loss", "-"), ("train_loss", "--")):
            kw = dict(color=colour, linestyle=ls + marker, alpha=0.07 if marker else 0.15)
            with matplotlib.rc_context({"lines.markersize": 4}):
                plot_mean_std(axes[0], x[sel], c[key][:, sel], **kw)
                plot_mean_std(axes[1], x[after], (c[key] - base[key])[:, after], **kw)
        handles.insert(0, plt.Line2D([], [], color=colour, marker=marker or None, label=name))
    handles += [plt.Line2D([], [], color="k", ls=ls, label=lab) for ls, lab in (("-", "test loss"), ("--", "train loss"))]
    for ax in axes:
        ax.axvline(first, color="k", lw=0.6, ls=":")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_xlabel("epoch")
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
    fig_dir, res_dir = (os.path.join(cfg["OUT_DIR"], kind, "generalization") for kind in ("figures", "results"))
    json_path = os.path.join(res_dir, f"{stem}.json")
    if cfg["PLOT_ONLY"]:  # the table is recomputed from the saved curves and records; the JSON is left as it is
        res = load_results(json_path)
        res["summary"] = summary(res)
    else:
        torch.manual_seed(cfg["TELEPORT_SEED"])
        data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
        saved = {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])}
        res = {"config": saved, "environment": environment(), "data": data.info, "label": data.label,
               **train(cfg, data, activation("leaky_relu"))}
        res["summary"] = summary(res)
        save_json(json_path, res)
    save_text(os.path.join(res_dir, f"{stem}_table.md"), table_markdown(res["summary"]) + "\n")
    label = res.get("label") or f"{res['config']['DATASET']} ({res['n_train']:,} train)"  # results saved without one
    for kind in [k for k in ("sharpness", "curvature") if any(a.startswith(k) for a in res["arms"])]:
        plot(res, kind, os.path.join(fig_dir, f"{stem}_{kind}.png"), label)
    print(table_markdown(res["summary"]))
    t = res["time_s"]
    print(f"time: {t['phase1']:.0f} s for epochs 0-{res['config']['BRANCH_EPOCH']} ({t['per_epoch_phase1']:.2f} s/epoch), "
          f"{t['phase2']:.0f} s after ({t['per_epoch_phase2']:.2f} s/epoch)")
    return res


if __name__ == "__main__":
    run(main, globals())
