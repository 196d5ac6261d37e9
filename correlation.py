"""Table 1 and Figures 9-10: sharpness and curvature of minima vs validation loss (Section 4.3,
Appendix E.3).

Trains N_MODELS MLPs per dataset (seeds (i+1)*54321, one batched model: they share the data
order), then measures at each final minimum the sharpness phi (eq. 4, with unit-sphere and with
the authors' positive-orthant directions) and the curvature psi (eq. 5, curves exp(tM).w under
the action of eq. (54) on all layer pairs), and correlates both with the validation loss
(Pearson r) and, controlling for the final training loss, by partial correlation.

    python correlation.py                                   # MNIST, FashionMNIST, CIFAR10 in turn
    python correlation.py --dataset=MNIST --data-dir=../shared/data/mnist5k   # the committed run
    python correlation.py --dataset=MNIST --lr=0.05         # any preset value can be overridden
    python correlation.py --skip-training                   # metrics from the saved weights
    python correlation.py --plot-only                       # figures and table from the JSONs

Common random numbers: draw j reseeds with DRAW_SEED * j (the authors' manual_seed(12345 *
curve_idx)), so every model sees the same batch, directions d and Lie-algebra elements M in draw
j, which lowers the variance of the comparison between models. (The authors reseed d and M but
take batches from one DataLoader iterator that runs on across models; here batches are shared.)

CPU runtime (2 shared cores, OMP_NUM_THREADS=1), real 4,000-image MNIST subset, 100 models:
training (40 epochs) 61 s, metrics (200 draws) 176 s (up to 4 minutes each under heavy load).
Full protocol (50,000 images), extrapolated by benchmarks/bench_correlation.py: MNIST and
FashionMNIST about 15-20 minutes each; CIFAR-10 about 6 h of training + 1 h of metrics on a CPU
(use --device=cuda). --quick (4 models, 200 images, 2 epochs, 3 draws): well under a minute.

Runs resume and never clobber: training and the metrics save progress under OUT_DIR/.progress/
after the first epoch or draw that ends CHECKPOINT_S seconds after the last save, and the same
command, run again (e.g. after Ctrl-C), goes on from there to the same numbers. The outputs
replace the previous set only when the whole run completes, and saved results of other settings
are kept unless --replace. A model whose training loss turns non-finite or absurd (> 1e6) is
recorded as diverged (with its epoch), not measured, and left out of the correlations, with the
count in the table.

Headline (MNIST subset; validation loss on its 1,000 test images): r(phi, val. loss) = 0.845
(paper 0.704), r(psi, val. loss) = +0.340 (paper -0.050); but phi correlates with the final
training loss at r = 0.998, and given the training loss the partial correlations vanish
(phi: -0.14, p = 0.18; psi: +0.02, p = 0.84).

Outputs: under OUT_DIR, results/correlation/<dataset>.json (config, environment, data, per-model
losses, phi, psi, the epoch each diverged model diverged at, correlations), <dataset>_training.json
(curves), <dataset>_weights.pt (for --skip-training), table1.md and table1.csv (Table 1 over every
saved dataset); figures/correlation/<dataset>_{sharpness_vs_val_loss,curvature_vs_val_loss,
sharpness_vs_curvature}.png; while a run is unfinished, .progress/correlation-<dataset>.pt.
"""
import csv
import io
import math
import os
import time

import numpy as np
import torch

from lib.config import UsageError, check_choice, check_positive, run, with_preset
from lib.data import load
from lib.io import (check_replace, environment, experiment_dirs, load_json, load_results, load_tensors,
                    relative, save_json, save_tensors, save_text, staged)
from lib.metrics import curvature, random_directions, random_lie_elements, sharpness
from lib.models import activation, evaluate
from lib.plots import save_figure
from lib.progress import Checkpoint
from lib.report import diverged, markdown_table
from lib.train import make_model

# ---- config -------------------------------------------------------------------------------
DATASET = "all"            # MNIST, FashionMNIST, CIFAR10, or all (the three in turn)
N_MODELS = 100             # models per dataset (>= 4); model i is seeded (i + 1) * SEED_BASE
SEED_BASE = 54321          # the authors' seed multiplier
EPOCHS = 40                # training epochs (the validation loss is taken after the last)
BATCH_SIZE = 20            # SGD mini-batch, fixed sequential order
TRAIN_SIZE = 50000         # training images (seeded subset; all of them when fewer exist)
LR = None                  # SGD learning rate (None: the dataset's preset)
WIDTHS = None              # layer widths d_0, ..., d_L (None: the dataset's preset)
N_DRAWS = 200              # draws for phi and psi (each: one batch, T_COUNT directions, one M per pair)
METRIC_BATCH = 200         # training images per draw
DRAW_SEED = 12345          # draw j reseeds with DRAW_SEED * j (shared by all models; so draw 0
                           # is seeded with 0 whatever DRAW_SEED, as in the authors' code)
T_START = None             # phi's displacements are T = T_START + T_STEP * i, i < T_COUNT
                           # (None: the dataset's preset, the authors' released grid)
T_STEP = None              # step of that grid (None: the dataset's preset)
T_COUNT = 20               # displacements (and directions of each kind) per draw
CHUNK = None               # models per metric pass (None: the dataset's preset; lower saves memory)
PSI_DTYPE = "float64"      # dtype of the curvature computation (float64 or float32)
CONTROL = "final"          # training loss the partial r controls for: final (whole set, final weights) or epoch_mean
SKIP_TRAINING = False      # load the saved final weights instead of training
PLOT_ONLY = False          # redraw figures and table from the saved JSONs
DATA_DIR = "data"          # folder in torchvision's layout
DEVICE = "cpu"             # cpu, cuda or auto
OUT_DIR = "."              # figures/correlation/ and results/correlation/ go under it
PROGRESS = True            # tqdm bars
FIG_DPI = 200              # PNG resolution (dots per inch)
CHECKPOINT_S = 30.0        # save progress after at most this many seconds of work (0: every epoch and draw)
REPLACE = False            # True: replace saved results made with other settings
# -------------------------------------------------------------------------------------------
# the authors' released settings per dataset (with DATASET=all each is applied in turn)
PRESETS = {"DATASETS": {
    "MNIST": dict(WIDTHS=[784, 16, 10, 10], LR=0.01, T_START=0.001, T_STEP=0.01, CHUNK=100),
    "FashionMNIST": dict(WIDTHS=[784, 16, 10, 10], LR=0.01, T_START=0.0001, T_STEP=0.001, CHUNK=100),
    "CIFAR10": dict(WIDTHS=[3072, 128, 32, 10], LR=0.02, T_START=0.0001, T_STEP=0.001, CHUNK=10),
}}
QUICK_SETTINGS = dict(DATASET="MNIST", N_MODELS=4, EPOCHS=2, TRAIN_SIZE=200, N_DRAWS=3, METRIC_BATCH=40)
ACT = activation("leaky_relu")  # slope 0.1 (the paper's); no ReLU: eq. (54) inverts the activation
# Table 1 of the paper: Pearson r with the validation loss
PAPER = {"sharpness": {"MNIST": 0.704, "FashionMNIST": 0.790, "CIFAR10": 0.899},
         "curvature": {"MNIST": -0.050, "FashionMNIST": -0.232, "CIFAR10": -0.167}}
METRICS = ("phi_sphere", "phi_orthant", "psi")
EXCESS = ("phi_sphere_excess", "phi_orthant_excess")  # phi - L(w) on the same draw batches
LABELS = {"phi_sphere": "sharpness (sphere)", "phi_orthant": "sharpness (positive orthant)",
          "psi": "curvature", "phi_sphere_excess": "excess sharpness phi - L(w) (sphere)",
          "phi_orthant_excess": "excess sharpness phi - L(w) (positive orthant)"}
# the settings the trained weights depend on: --skip-training refuses to measure under others
TRAINING = ("N_MODELS", "SEED_BASE", "EPOCHS", "BATCH_SIZE", "TRAIN_SIZE", "LR", "WIDTHS")


def displacements(cfg):
    """T = T_START, T_START + T_STEP, ... (T_COUNT values): the authors' np.arange grid."""
    return [cfg["T_START"] + cfg["T_STEP"] * i for i in range(cfg["T_COUNT"])]


def draw(j, data, W, n_t, batch, seed):
    """Draw j, identical for every model (common random numbers), from a generator seeded with
    seed * j: a batch of `batch` training images, one M per layer pair (entries U[0, 1], unit
    Frobenius norm: lib's random_lie_elements is exactly the authors' draw), n_t sphere and n_t
    positive-orthant unit directions (eq. 4; shapes (n_t, out, in), shared by the models)."""
    gen = torch.Generator().manual_seed(seed * j)
    idx = torch.randperm(data.x_train.shape[0], generator=gen)[:batch].to(data.x_train.device)
    Ms = random_lie_elements(W, gen)
    return (data.x_train[idx], data.y_train[idx], Ms,
            random_directions(W, n_t, "sphere", gen), random_directions(W, n_t, "positive_orthant", gen))


def measure(W, data, act, ts, n_draws, batch, chunk, seed, psi_dtype=torch.float64, progress=False,
            resume=None, on_draw=None):
    """phi (eq. 4) with sphere and positive-orthant directions, and psi (eq. 5), per model:
    the means over n_draws draws (see `draw`) of L(w + t_i d_i) over the displacements ts, and
    of the curvature (eq. 47) of exp(tM).w at t = 0 under eq. (54) on all pairs. Models go
    through in chunks of `chunk` (all n_t * chunk perturbed models in one forward pass).
    Also loss_w, the mean of L(w) itself over the same draw batches (phi - loss_w is the part of
    phi that the displacements add). W: list of (K, out, in). Returns {name: (K,) tensor}.
    on_draw({"draw": j + 1, "sums": ...}) after draw j; `resume`, such a state, goes on from
    its draw (every draw is reseeded, so the result is the same as in one go). A chunk whose
    pseudo-inverse fails gets psi = nan."""
    from tqdm import tqdm
    K = W[0].shape[0]
    W = [w.detach() for w in W]
    Wd = [w.to(psi_dtype) for w in W]
    state = resume or {"draw": 0, "sums": {m: torch.zeros(K, dtype=torch.float64) for m in (*METRICS, "loss_w")}}
    sums = state["sums"]
    for j in tqdm(range(state["draw"], n_draws), desc="phi, psi", disable=not progress, leave=False,
                  dynamic_ncols=True, initial=state["draw"], total=n_draws):
        X, Y, Ms, d_sph, d_pos = draw(j, data, W, len(ts), batch, seed)
        Ms, Xd = [M.to(psi_dtype) for M in Ms], X.to(psi_dtype)
        for s in range(0, K, chunk):
            Wc, sl = [w[s:s + chunk] for w in W], slice(s, s + chunk)
            sums["phi_sphere"][sl] += sharpness(Wc, X, Y, act, ts, d_sph).double().cpu()
            sums["phi_orthant"][sl] += sharpness(Wc, X, Y, act, ts, d_pos).double().cpu()
            sums["loss_w"][sl] += sharpness(Wc, X, Y, act, [0.0], [d[:1] for d in d_sph]).double().cpu()
            try:
                sums["psi"][sl] += curvature([w[sl] for w in Wd], Xd, act, Ms).double().cpu()
            except torch.linalg.LinAlgError:
                sums["psi"][sl] = float("nan")
        if on_draw is not None:
            on_draw({"draw": j + 1, "sums": sums})
    return {m: v / n_draws for m, v in sums.items()}


def partial_corr(x, y, z):
    """Partial correlation of x and y given z: regress x and y on z (with intercept), Pearson r
    of the residuals; p-value from Student's t with n - 3 degrees of freedom."""
    from scipy import stats
    x, y, z = (np.asarray(a, dtype=float) for a in (x, y, z))
    A = np.stack([np.ones_like(z), z], 1)
    rx = x - A @ np.linalg.lstsq(A, x, rcond=None)[0]
    ry = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
    r = float(np.corrcoef(rx, ry)[0, 1])
    df = len(x) - 3
    t = r * math.sqrt(df / max(1 - r * r, 1e-300))
    return r, float(2 * stats.t.sf(abs(t), df))


def kept(res):
    """(K,) bool: the models the correlations use: not diverged, every value finite."""
    cols = [res[k] for k in (*METRICS, *EXCESS, "val_loss", "train_loss_final", "train_loss_epoch_mean")]
    ok = np.isfinite(np.array(cols, dtype=float)).all(0)
    return ok & np.array([e is None for e in res.get("diverged_epoch", [None] * len(ok))])


def correlations(res, control):
    """Pearson r (scipy.stats.pearsonr, with p) of each metric with the validation loss, with
    the training loss, and the partial r with the validation loss given the training loss, over
    the kept models (all nan when fewer than 4 are left)."""
    from scipy.stats import pearsonr
    ok = kept(res)
    col = lambda k: np.asarray(res[k], dtype=float)[ok]  # noqa: E731
    val, tr = col("val_loss"), col(f"train_loss_{control}")
    nan = lambda *a: (math.nan, math.nan)  # noqa: E731 - too few models (the partial r has n - 3 dof)
    pearson, partial = (nan, nan) if ok.sum() < 4 else (pearsonr, partial_corr)
    out = {}
    for m in (*METRICS, *EXCESS):
        (r, p), (rt, pt), (rp, pp) = pearson(col(m), val), pearson(col(m), tr), partial(col(m), val, tr)
        out[m] = {"r_val": float(r), "p_val": float(p), "r_train": float(rt), "p_train": float(pt),
                  "partial_r_val": rp, "partial_p_val": pp}
    r, p = pearson(tr, val)
    out["train_loss"] = {"r_val": float(r), "p_val": float(p)}
    return out


def dataset_config(cfg, name):
    """cfg for one dataset: its preset filled in where cfg holds None."""
    cfg = {**with_preset(cfg, PRESETS, "DATASETS", name), "DATASET": name}
    for k in ("LR", "T_COUNT", "CHUNK"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    return cfg


def check_saved(path, cfg):
    """lib.io.check_replace on a saved <dataset>.json; SKIP_TRAINING is not compared (measuring
    the saved weights, whose training settings are checked, gives a full run's numbers)."""
    check_replace(path, cfg, ignore=("SKIP_TRAINING",))


def train(cfg, data, ckpt):
    """Train the N_MODELS models of cfg["DATASET"] as one batched model (resuming an interrupted
    training). Returns the final weights, the history and the final training loss and accuracy."""
    unit = f"{cfg['DATASET']} training"
    done = ckpt.unit(unit)
    if done is None:
        seeds = [(i + 1) * cfg["SEED_BASE"] for i in range(cfg["N_MODELS"])]
        W, opt = make_model(cfg["WIDTHS"], seeds, "sgd", cfg["LR"], cfg["DEVICE"])
        hist = ckpt.fit(unit, W, opt, data, ACT, cfg["EPOCHS"], cfg["BATCH_SIZE"],
                        desc=f"{cfg['DATASET']} train", progress=cfg["PROGRESS"])
        tr_final, tr_acc = evaluate(W, data.x_train, data.y_train, ACT)
        done = ckpt.finish_unit(unit, {"W": [w.detach().cpu() for w in W], "history": hist, "seeds": seeds,
                                          "train_loss_final": tr_final.tolist(), "train_acc_final": tr_acc.tolist()})
    return [w.to(cfg["DEVICE"]) for w in done["W"]], {k: v for k, v in done.items() if k != "W"}


def load_trained(cfg, res_dir):
    """The saved final weights and training record of cfg["DATASET"] (--skip-training)."""
    path = os.path.join(res_dir, f"{cfg['DATASET']}_weights.pt")
    if not os.path.exists(path):
        raise UsageError(f"--skip-training: no saved weights at {path}; train first")
    t = load_tensors(path, cfg["DEVICE"])
    training = load_json(os.path.join(res_dir, f"{cfg['DATASET']}_training.json"))
    old = training.get("config", {})
    differ = [f"{k}={old[k]!r}" for k in TRAINING if k in old and old[k] != cfg[k]]
    if differ:
        raise UsageError(f"--skip-training: the saved weights were trained with {', '.join(differ)}; "
                         f"use those values or train again")
    W = [t[f"W{j}"] for j in range(len(t))]
    if W[0].shape[0] != cfg["N_MODELS"]:
        raise UsageError(f"--skip-training: saved weights hold {W[0].shape[0]} models, not {cfg['N_MODELS']}")
    return W, training


def diverged_at(training):
    """Per model, the epoch at which its training diverged (lib.report.diverged: a loss turned
    non-finite or above 1e6; the final training and validation losses count as the last
    epoch's), or None."""
    hist = training["history"]
    E = len(hist["train_loss"])
    curves = np.column_stack([np.asarray(hist["train_loss"], dtype=float).T,
                              np.asarray(training["train_loss_final"], dtype=float),
                              np.asarray(hist["test_loss"][-1], dtype=float)])
    return [None if e is None else min(e, E) for e in diverged(curves)]


def metrics(cfg, data, W, at, ckpt):
    """measure() on the models that did not diverge (nan for the others), saving progress per
    draw through ckpt. Returns ({name: (K,) tensor}, seconds)."""
    done = ckpt.unit("metrics")
    if done is None:
        idx = [i for i, e in enumerate(at) if e is None]
        cur = ckpt.current if ckpt.current is not None and ckpt.current["unit"] == "metrics" else None
        t0, before, n = time.perf_counter(), cur["time_s"] if cur else 0.0, cfg["N_DRAWS"]

        def on_draw(state):
            ckpt.save({"done": ckpt.done, "current": {"unit": "metrics", **state,
                                                       "time_s": before + time.perf_counter() - t0}},
                      f"{cfg['DATASET']} metrics, draw {state['draw']} of {n}")
        m = {k: torch.full((len(at),), math.nan, dtype=torch.float64) for k in (*METRICS, "loss_w")}
        if idx:
            got = measure([w[idx] for w in W], data, ACT, displacements(cfg), n, cfg["METRIC_BATCH"], cfg["CHUNK"],
                          cfg["DRAW_SEED"], getattr(torch, cfg["PSI_DTYPE"]), cfg["PROGRESS"], cur, on_draw)
            for k, v in got.items():
                m[k][idx] = v
        done = ckpt.finish_unit("metrics", {"m": m, "time_s": before + time.perf_counter() - t0})
    return done["m"], done["time_s"]


def run_dataset(name, cfg, res_dir, ckpts):
    """Train (or load) and measure the models of one dataset under its preset, resuming from
    OUT_DIR/.progress/correlation-<name>.pt; write its results (and, when trained, its weights
    and curves) to res_dir and return them, whose config is this dataset's resolved one."""
    cfg = dataset_config(cfg, name)
    data = load(name, cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
    if cfg["WIDTHS"][0] != data.x_train.shape[1] or len(cfg["WIDTHS"]) < 3:  # psi needs a layer pair
        raise UsageError(f"--widths={cfg['WIDTHS']}: {name} needs d_0 = {data.x_train.shape[1]}, 3 layers or more")
    saved = {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])}
    print(f"{data.label}: {len(data.y_test)} test images (the validation loss); SGD lr {cfg['LR']}")
    ckpt = Checkpoint(cfg, f"correlation-{name}")
    ckpts.append(ckpt)  # main finishes them once the outputs are in place
    if cfg["SKIP_TRAINING"]:
        W, training = load_trained(cfg, os.path.join(cfg["OUT_DIR"], "results", "correlation"))
    else:
        W, training = train(cfg, data, ckpt)
        training = {"config": saved, "environment": environment(), "data": data.info, **training,
                    "train_time_s": training["history"]["time_s"][-1]}
    at = diverged_at(training)
    m, metric_time = metrics(cfg, data, W, at, ckpt)
    hist = training["history"]
    res = {"config": saved, "environment": environment(), "data": data.info, "dataset": name,
           "label": data.label, "n_train": len(data.y_train), "n_test": len(data.y_test),
           "seeds": training["seeds"], "val_loss": hist["test_loss"][-1], "val_acc": hist["test_acc"][-1],
           "train_loss_epoch_mean": hist["train_loss"][-1], "train_loss_final": training["train_loss_final"],
           **{k: v.tolist() for k, v in m.items()}, "displacements": displacements(cfg),
           **{f"{k}_excess": (m[k] - m["loss_w"]).tolist() for k in ("phi_sphere", "phi_orthant")},
           "diverged_epoch": at, "n_diverged": sum(e is not None for e in at),
           "train_time_s": training["train_time_s"], "metric_time_s": metric_time}
    res["n_kept"] = int(kept(res).sum())
    res["correlations"] = correlations(res, cfg["CONTROL"])
    if not cfg["SKIP_TRAINING"]:
        save_tensors(os.path.join(res_dir, f"{name}_weights.pt"), {f"W{j}": w for j, w in enumerate(W)})
        save_json(os.path.join(res_dir, f"{name}_training.json"), training)
    save_json(os.path.join(res_dir, f"{name}.json"), res)
    c = res["correlations"]
    print(f"{name}: train {res['train_time_s']:.0f} s, metrics {metric_time:.0f} s; {res['n_diverged']} of "
          f"{len(at)} models diverged; r(val): "
          + ", ".join(f"{LABELS[k]} {c[k]['r_val']:+.3f} (partial {c[k]['partial_r_val']:+.3f})" for k in METRICS))
    return res


def plot(res, fig_dir, dpi=200):
    """Three scatter plots per dataset, one point per kept model coloured by its training loss
    (the one the saved correlations control for), r in the legend; diverged models are counted
    in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from scipy.stats import pearsonr
    name, c, control = res["dataset"], res["correlations"], res["config"]["CONTROL"]
    label = res.get("label", f"{name} ({res['n_train']:,} train)")  # results saved without a label
    ok = kept(res)
    models = f"{len(ok)} models" if ok.all() else f"{ok.sum()} of {len(ok)} models (diverged or not finite: left out)"
    tr = np.asarray(res[f"train_loss_{control}"], dtype=float)[ok]
    pairs = {"sharpness_vs_val_loss": [("phi_sphere", "val_loss"), ("phi_orthant", "val_loss")],
             "curvature_vs_val_loss": [("psi", "val_loss")],
             "sharpness_vs_curvature": [("phi_sphere", "psi")]}
    for fname, panels in pairs.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.4), squeeze=False,
                                 layout="constrained")
        for ax, (xk, yk) in zip(axes[0], panels):
            x, y = np.asarray(res[xk], dtype=float)[ok], np.asarray(res[yk], dtype=float)[ok]
            if yk == "val_loss":
                lab = f"r = {c[xk]['r_val']:.3f}, partial r | train loss = {c[xk]['partial_r_val']:.3f}"
            else:
                lab = f"r = {pearsonr(x, y)[0]:.3f}" if len(x) >= 2 else "r: too few models"
            sc = ax.scatter(x, y, c=tr, cmap="viridis", s=14)
            ax.set_xlabel(f"{LABELS[xk]} " + ("$\\phi$" if xk.startswith("phi") else "$\\psi$"))
            ax.set_ylabel("validation loss" if yk == "val_loss" else "curvature $\\psi$")
            ax.legend(handles=[Line2D([], [], ls="", marker="o", color="0.5", label=lab)], loc="best", fontsize=8)
            ax.set_title(f"{label}, {models}", **({} if ok.all() else {"fontsize": 9}))
        if ok.any():
            fig.colorbar(sc, ax=axes[0].tolist(), label=f"training loss ({control})")
        save_figure(fig, os.path.join(fig_dir, f"{name}_{fname}.png"), dpi=dpi)


def table(res_dirs):
    """Table 1 (Markdown, CSV) from every <dataset>.json, each taken from the first of res_dirs
    that holds it, written to res_dirs[0]: our r next to the paper's."""
    found = {}
    for n in PRESETS["DATASETS"]:
        for path in (os.path.join(d, f"{n}.json") for d in res_dirs):
            if n not in found and os.path.exists(path):
                found[n] = load_json(path)
    if not found:
        return None
    header = ["measure"] + [f"{n} {w}" for n in found for w in ("ours", "paper")]
    value = lambda v: "n/a" if v is None or v != v else v  # noqa: E731 - r over fewer than 4 models

    def row(title, m, k, paper=None):
        return [title] + [v for n in found for v in (value(found[n]["correlations"][m][k]), paper[n] if paper else "-")]
    rows = []
    for m in (*METRICS, *EXCESS):
        paper = PAPER["curvature" if m == "psi" else "sharpness"] if m in METRICS else None
        rows.append(row(f"{LABELS[m]}: r with val. loss", m, "r_val", paper))
        rows.append(row(f"{LABELS[m]}: partial r given train loss", m, "partial_r_val"))
        if m in METRICS:
            rows.append(row(f"{LABELS[m]}: r with train loss", m, "r_train"))
    rows.append(row("train loss: r with val. loss", "train_loss", "r_val"))

    def size(f):
        K, n = len(f["seeds"]), f.get("n_kept", len(f["seeds"]))  # results saved before divergence was kept
        left = f" ({K - n} left out: {f['n_diverged']} diverged in training, r over the other {n})" if n < K else ""
        return f"{K} models{left}, {f['n_train']} train / {f['n_test']} test images"
    sizes = ", ".join(f"{n}: {size(f)}" for n, f in found.items())
    control = next(iter(found.values()))["config"]["CONTROL"]
    quick = [n for n, f in found.items() if f["config"].get("QUICK")]
    md = (f"# Table 1: Pearson correlation with the validation loss\n\n{markdown_table(header, rows)}\n\n"
          f"{sizes}. The paper's sharpness r is repeated on both sharpness rows: the paper defines phi "
          f"with unit-sphere directions (eq. 4), the authors' code draws positive-orthant ones. "
          f"Partial r: controlling for the training loss ({control}).\n"
          + (f"\nQuick run (--quick): not the paper's protocol ({', '.join(quick)}).\n" if quick else ""))
    save_text(os.path.join(res_dirs[0], "table1.md"), md)
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + [[f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows])
    save_text(os.path.join(res_dirs[0], "table1.csv"), buf.getvalue())
    return md


def main(cfg):
    check_choice("dataset", cfg["DATASET"], [*PRESETS["DATASETS"], "all"])
    check_choice("psi dtype", cfg["PSI_DTYPE"], ["float64", "float32"])
    check_choice("control", cfg["CONTROL"], ["final", "epoch_mean"])
    for k in ("N_MODELS", "EPOCHS", "BATCH_SIZE", "TRAIN_SIZE", "N_DRAWS", "METRIC_BATCH", "FIG_DPI"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    check_positive("checkpoint_s", cfg["CHECKPOINT_S"])
    if cfg["N_MODELS"] < 4:
        raise UsageError(f"n_models must be >= 4 for a partial correlation, got {cfg['N_MODELS']}")
    saved_dir = os.path.join(cfg["OUT_DIR"], "results", "correlation")  # the previous complete set
    names = list(PRESETS["DATASETS"]) if cfg["DATASET"] == "all" else [cfg["DATASET"]]
    path = lambda n: os.path.join(saved_dir, f"{n}.json")  # noqa: E731
    if cfg["PLOT_ONLY"] and cfg["DATASET"] == "all":  # every dataset that has saved results
        names = [n for n in names if os.path.exists(path(n))] or names[:1]
    if not cfg["PLOT_ONLY"]:  # before any work: refuse to replace results of other settings
        for name in names:
            check_saved(path(name), dataset_config(cfg, name))
    ckpts = []
    with staged(cfg["OUT_DIR"]) as out:  # the outputs replace the previous set only when complete
        fig_dir, res_dir = experiment_dirs("correlation", out)
        for name in names:
            res = load_results(path(name)) if cfg["PLOT_ONLY"] else run_dataset(name, cfg, res_dir, ckpts)
            plot(res, fig_dir, cfg["FIG_DPI"])
        md = table([res_dir, saved_dir])
    for ckpt in ckpts:
        ckpt.finish()
    if md:
        print(md)
    return saved_dir


if __name__ == "__main__":
    run(main, globals())
