"""Figure 4 (SGD) and Figure 11 (AdaGrad): teleporting to change sharpness or curvature
(Section 4.4, Appendix E.4), with control arms: random perturbations and optimizer-state resets.

    python teleport_sharpness_curvature.py                                   # Figure 4, CIFAR-10
    python teleport_sharpness_curvature.py --optimizer=adagrad               # Figure 11
    python teleport_sharpness_curvature.py --dataset=MNIST --data-dir=datasets/mnist5k
    python teleport_sharpness_curvature.py --quick                           # bundled MNIST, tiny

Protocol: 5 seeds of a bias-free LeakyReLU MLP (3072- or 784-32-10-10, batches of 20 in a fixed order)
train to epoch 20 as one batched model, then branch with their optimizer state (lib.arms) into a
baseline and arms that teleport (g = I + T, eq. 46) to raise or lower phi (eq. 4) or psi (eq. 5) on a
fresh batch of 2,000 training images before each of the first 5 batches of epoch 20, then reset their
optimizer state, and train on to epoch 40. A failed or non-finite teleport is undone; a run whose
loss turns non-finite or exceeds 1e6 is diverged: left out of the means, counted in the table.

Controls: `perturb-only (<arm>)`, a random move with the |median loss drift| of the matching teleport
arm on the same batch, then the reset; `reset-only` (AdaGrad), the reset alone.

Runtime (CPU, one thread): MNIST 4,000-image subset with controls 9 min (SGD), 16 min (AdaGrad, load
average 12); CIFAR-10-sized synthetic data 21 min (SGD, no controls; about 35 min with); --quick 30 s.

Headline (MNIST subset, final test loss minus the same seed's baseline): SGD sharpness decrease
-0.0021 +- 0.0011, increase +0.0002 +- 0.0048; with the released step sizes curvature teleports do not
move psi (|T| ~ 1e-4); with step sizes 100 (--tag=curv-lr100) psi moves +50% / -15%, the test loss
does not (-0.0003 +- 0.0073 / -0.0010 +- 0.0020). A sharpness teleport changes phi by its loss drift;
under AdaGrad each teleport arm matches reset-only or (sharpness increase) its perturb-only control.

Outputs: figures/generalization/<stem>_{sharpness,curvature}.png, results/generalization/<stem>.json
(config, environment, data, curves, teleport and perturbation records, phi/psi at the branch, after
the teleports and at the end, the epoch each diverged run diverged) and <stem>_table.md, under OUT_DIR,
<stem> = <dataset>_<optimizer>[_<TAG>]; the set replaces the previous one only when the run completes,
results of other settings only with --replace. Progress is saved in OUT_DIR/.progress/: rerun resumes.
"""
import os

import numpy as np
import torch

from lib.actions import GLAction
from lib.arms import Arm, ArmHook, Moments, branch
from lib.config import UsageError, check_choice, check_positive, run
from lib.data import load
from lib.io import check_replace, environment, load_results, save_json, save_text, saved_config, staged
from lib.metrics import psi, random_directions, random_lie_elements, sharpness
from lib.models import activation
from lib.plots import COLORS, branch_panels, save_figure
from lib.progress import Checkpoint
from lib.report import (cell, diverged_arms, diverged_note, finite_stats, markdown_table, mean_std_cell, move_drift,
                        paired_stats)
from lib.teleport import make_objective
from lib.train import make_model

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
TELEPORT_ARMS = ("sharpness-increase", "sharpness-decrease", "curvature-increase", "curvature-decrease")
# per arm of a figure: legend, colour, marker (test loss solid, train dashed); teleport arms drawn last, on top
FIGURE_ARMS = [("perturb-only ({kind}-decrease)", "perturb-only (decrease)", "#17becf", "v"),
               ("perturb-only ({kind}-increase)", "perturb-only (increase)", "#ff7f0e", "^"),
               ("reset-only", "reset-only", COLORS["reset-only"], "s"),
               ("{kind}-decrease", "teleport (decrease)", COLORS["decrease"], ""),
               ("{kind}-increase", "teleport (increase)", COLORS["increase"], ""),
               ("baseline", "baseline", COLORS["baseline"], "")]
HEADER = ["arm", "test loss", "test loss - baseline (same seed)", "test acc (%)", "train loss", "train loss - baseline",
          "gap test-train", "d phi (fixed batch)", "d psi (fixed batch)", "d objective/teleport", "loss drift/teleport"]
CELLS = [("train_loss", ".4f"), ("dtrain_paired", "+.4f"), ("gap", ".4f"), ("dphi", "+.2e"), ("dpsi", "+.2e"),
         ("dobjective_per_teleport", "+.2e"), ("drift_per_teleport", "+.2e")]  # the table's single-number columns


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


def train(cfg, data, act, ckpt):
    """Phase 1 (seeds, epochs 0..BRANCH_EPOCH) and phase 2 (arms x seeds), each a unit of the
    checkpoint `ckpt` (lib.progress): resumed where it stopped. Returns the results dict."""
    R, first, arms = cfg["N_RUNS"], cfg["BRANCH_EPOCH"], make_arms(cfg, act)
    names = [a.name for a in arms]  # arm-major: arm j holds models j*R..(j+1)*R-1
    seeds, widths = [(r + 1) * cfg["SEED_BASE"] for r in range(R)], [data.x_train.shape[1], *cfg["HIDDEN"], 10]
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
        hook = ArmHook(W2, opt2, data, act, arms, moments, after=measure)  # phi, psi right after the last teleport
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
            "diverged": diverged_arms(curves_out),
            "time_s": {"phase1": t1, "phase2": t2, "per_epoch_phase1": t1 / max(first, 1),
                       "per_epoch_phase2": t2 / (cfg["EPOCHS"] - first)}}


def summary(res):
    """One row per arm: final test loss/accuracy and train loss (mean, std over the `n` of `of`
    runs that did not diverge), the change of phi and psi from the branch point to right after the
    teleports, and the teleport's drift; paired differences (minus the baseline of the same seed)
    over the seeds where neither diverged; `undone`: teleports the guard undid."""
    rows, at, land = [], res["diverged"], res["landscape"]
    branch_point = {m: np.asarray(land["branch"][m], dtype=float) for m in ("phi", "psi")}
    final = lambda a, k: np.asarray(res["curves"][a][k], dtype=float)[:, -1]  # noqa: E731
    for a in res["arms"]:
        keep, recs = np.array([e is None for e in at[a]]), res["records"].get(a, [])
        te, acc, tr = (final(a, k) for k in ("test_loss", "test_acc", "train_loss"))
        (mte, ste, n), (macc, sacc, _) = finite_stats(te, keep), finite_stats(acc, keep)
        (dte, dte_s, _), (dtr, _, _) = (paired_stats(final(a, k), final("baseline", k), at[a], at["baseline"])
                                        for k in ("test_loss", "train_loss"))
        dphi, dpsi = (finite_stats(np.asarray(land["after_teleport"][a][m], dtype=float) - v, keep)[0]
                      for m, v in branch_point.items())
        drift, dobj = move_drift(recs, keep)  # arms that do not move: no drift
        rows.append({"arm": a, "test_loss": mte, "test_loss_std": ste, "dtest_paired": dte, "dtest_paired_std": dte_s,
                     "dtrain_paired": dtr, "test_acc": macc, "test_acc_std": sacc,
                     "train_loss": finite_stats(tr, keep)[0], "gap": finite_stats(te - tr, keep)[0], "dphi": dphi,
                     "dpsi": dpsi, "dobjective_per_teleport": dobj, "drift_per_teleport": drift, "n": n, "of": len(keep),
                     "undone": sum(sum(r.get("failed", [])) for r in recs)})
    return rows


def table_markdown(rows, at):
    """The summary as Markdown ('-' for nan); below it, the runs that diverged and the teleports undone."""
    lines = [[r["arm"] + (f" ({r['n']} of {r['of']} runs)" if r["n"] < r["of"] else ""),
              mean_std_cell(r["test_loss"], r["test_loss_std"]),
              mean_std_cell(r["dtest_paired"], r["dtest_paired_std"], "+.4f"),
              mean_std_cell(r["test_acc"], r["test_acc_std"], ".2f"), *(cell(r[k], spec) for k, spec in CELLS)]
             for r in rows]
    notes, undone = diverged_note(at), ", ".join(f"{r['arm']} {r['undone']}" for r in rows if r["undone"])
    return "\n\n".join([markdown_table(HEADER, lines)]
                        + [f"Diverged runs (loss non-finite or above 1e6), left out of the means and the paired "
                           f"differences: {notes}."] * bool(notes)
                        + [f"Teleports undone (linear algebra failed or a non-finite result), models x moments: "
                           f"{undone}."] * bool(undone))


def plot(res, kind, path, label):
    """Mean test (solid) and train (dashed) loss of the `kind` arms and the controls, and their
    paired effect (minus the same seed's baseline) after the branch: lib.plots.branch_panels."""
    cfg, at = res["config"], res["diverged"]
    fig, axes = branch_panels(res["curves"], at, [(a.format(kind=kind), *rest) for a, *rest in FIGURE_ARMS],
                              cfg["BRANCH_EPOCH"])
    if all(e is not None for v in at.values() for e in v):
        axes[0].text(0.5, 0.5, "every run diverged (epochs in the table)", transform=axes[0].transAxes, ha="center")
    symbol = r"sharpness $\phi$ (eq. 4)" if kind == "sharpness" else r"curvature $\psi$ (eq. 5)"
    fig.suptitle(f"{label}, {cfg['OPTIMIZER']}: teleporting to change {symbol}")
    axes[1].set_title(f"effect of the arms (teleports in the first {cfg['TELE_BATCHES']} batches after "
                      f"epoch {cfg['BRANCH_EPOCH']})", fontsize=10)
    save_figure(fig, path)


def main(cfg):
    check(cfg)
    stem = f"{cfg['DATASET']}_{cfg['OPTIMIZER']}" + (f"_{cfg['TAG']}" if cfg["TAG"] else "")
    json_path = os.path.join(cfg["OUT_DIR"], "results", "generalization", f"{stem}.json")
    if cfg["PLOT_ONLY"]:  # the table is recomputed from the saved curves and records; the JSON is left as it is
        res = load_results(json_path)
        res["diverged"] = res.get("diverged") or diverged_arms(res["curves"])  # results saved without it
    else:
        check_replace(json_path, cfg)
        if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # small batched MLPs: one thread is fastest (two stall each other on busy cores)
        torch.manual_seed(cfg["TELEPORT_SEED"])
        data = load(cfg["DATASET"], cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
        check_replace(json_path, cfg, data=data)
        saved = saved_config(cfg)
        ckpt = Checkpoint(cfg, f"teleport_sharpness_curvature-{stem}")
        res = {"config": saved, "environment": environment(), "data": data.info, "label": data.label,
               **train(cfg, data, activation("leaky_relu"), ckpt)}
    res["summary"] = summary(res)
    table = table_markdown(res["summary"], res["diverged"])
    with staged(cfg["OUT_DIR"]) as out:  # the whole set replaces the previous one only when complete
        fig_dir, res_dir = (os.path.join(out, kind, "generalization") for kind in ("figures", "results"))
        if not cfg["PLOT_ONLY"]:
            save_json(os.path.join(res_dir, f"{stem}.json"), res)
        save_text(os.path.join(res_dir, f"{stem}_table.md"), table + "\n")
        label = res.get("label") or f"{res['config']['DATASET']} ({res['n_train']:,} train)"  # results saved without one
        for kind in [k for k in ("sharpness", "curvature") if any(a.startswith(k) for a in res["arms"])]:
            plot(res, kind, os.path.join(fig_dir, f"{stem}_{kind}.png"), label)
    if not cfg["PLOT_ONLY"]:
        ckpt.finish()
    t, first = res["time_s"], res["config"]["BRANCH_EPOCH"]
    print(f"{table}\ntime: {t['phase1']:.0f} s for epochs 0-{first} ({t['per_epoch_phase1']:.2f} s/epoch), "
          f"{t['phase2']:.0f} s after ({t['per_epoch_phase2']:.2f} s/epoch)")
    return res


if __name__ == "__main__":
    run(main, globals())
