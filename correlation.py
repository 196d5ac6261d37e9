"""Table 1 and Figures 9-10: sharpness and curvature of minima vs validation loss (Section 4.3,
Appendix E.3). Trains N_MODELS MLPs per dataset as one batched model, measures at each minimum the
sharpness phi (eq. 4; unit-sphere and the authors' positive-orthant directions) and the curvature
psi (eq. 5; exp(tM).w under eq. (54) on all layer pairs), and correlates both with the validation
loss: Pearson r, and the partial r given the training loss.

    python correlation.py                                   # MNIST, FashionMNIST, CIFAR10 in turn
    python correlation.py --dataset=MNIST                   # the committed run (the bundled MNIST subset)
    python correlation.py --dataset=MNIST --lr=0.05         # any preset value can be overridden
    python correlation.py --skip-training                   # metrics from the saved weights
    python correlation.py --plot-only                       # figures and table from the JSONs

Protocol: draw j reseeds with DRAW_SEED * j (the authors' manual_seed(12345 * curve_idx)): all models
share its batch, directions and M. Runs resume (OUT_DIR/.progress/), write outputs as a set, keep
other settings' results unless --replace; diverged models (loss non-finite or > 1e6) are left out.

CPU runtime (2 shared cores, OMP_NUM_THREADS=1), 4,000-image MNIST subset, 100 models: training 61 s,
metrics 176 s. Full protocol, extrapolated by benchmarks/bench_correlation.py: MNIST, FashionMNIST
15-20 min each; CIFAR-10 6 h training + 1 h metrics (use --device=cuda). --quick: < 1 min.

Headline (MNIST subset, 1,000 test images): r(phi, val. loss) = 0.845 (paper 0.704), r(psi, val.
loss) = +0.340 (paper -0.050); but r(phi, final train loss) = 0.998, and given the train loss the
partial r vanish (phi: -0.14, p = 0.18; psi: +0.02, p = 0.84).

Outputs: under OUT_DIR, results/correlation/<dataset>.json (config, environment, data, per-model
losses, phi, psi, divergence epochs, correlations), <dataset>_training.json (curves),
<dataset>_weights.pt (for --skip-training), table1.md and table1.csv (Table 1 over every saved
dataset); figures/correlation/<dataset>_{sharpness_vs_val_loss,curvature_vs_val_loss,
sharpness_vs_curvature}.png; while a run is unfinished, .progress/correlation-<dataset>.pt.
"""
import os
import time

import numpy as np
import torch

from lib.config import UsageError, check_choice, check_positive, run, with_preset
from lib.data import load
from lib.io import (check_replace, environment, experiment_dirs, load_json, load_results, load_tensors,
                    relative, save_json, save_tensors, staged)
from lib.metrics import curvature, random_directions, random_lie_elements, sharpness
from lib.models import activation, evaluate
from lib.plots import save_figure, scatter_panels
from lib.progress import Checkpoint
from lib.report import diverged_epochs, save_table
from lib.stats import correlate, draw_means, finite_rows, pearson
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
DRAW_SEED = 12345          # draw j reseeds with DRAW_SEED * j, for all models (draw 0: seed 0, as the authors')
T_START = None             # phi's displacements T_START + T_STEP * i, i < T_COUNT (None: the dataset's preset)
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
PRESETS = {"DATASETS": {  # the authors' released settings per dataset (DATASET=all: each in turn)
    "MNIST": dict(WIDTHS=[784, 16, 10, 10], LR=0.01, T_START=0.001, T_STEP=0.01, CHUNK=100),
    "FashionMNIST": dict(WIDTHS=[784, 16, 10, 10], LR=0.01, T_START=0.0001, T_STEP=0.001, CHUNK=100),
    "CIFAR10": dict(WIDTHS=[3072, 128, 32, 10], LR=0.02, T_START=0.0001, T_STEP=0.001, CHUNK=10)}}
QUICK_SETTINGS = dict(DATASET="MNIST", N_MODELS=4, EPOCHS=2, TRAIN_SIZE=200, N_DRAWS=3, METRIC_BATCH=40)
ACT = activation("leaky_relu")  # slope 0.1 (the paper's); no ReLU: eq. (54) inverts the activation
# Table 1 of the paper: Pearson r with the validation loss (its phi, on both of our phi rows)
SHARPNESS = {"MNIST": 0.704, "FashionMNIST": 0.790, "CIFAR10": 0.899}
PAPER = {"phi_sphere": SHARPNESS, "phi_orthant": SHARPNESS,
         "psi": {"MNIST": -0.050, "FashionMNIST": -0.232, "CIFAR10": -0.167}}
METRICS = ("phi_sphere", "phi_orthant", "psi")
EXCESS = ("phi_sphere_excess", "phi_orthant_excess")  # phi - L(w) on the same draw batches
LABELS = {"phi_sphere": "sharpness (sphere)", "phi_orthant": "sharpness (positive orthant)",
          "psi": "curvature", "phi_sphere_excess": "excess sharpness phi - L(w) (sphere)",
          "phi_orthant_excess": "excess sharpness phi - L(w) (positive orthant)"}
TRAINING = ("N_MODELS", "SEED_BASE", "EPOCHS", "BATCH_SIZE", "TRAIN_SIZE", "LR", "WIDTHS")  # --skip-training checks


def displacements(cfg):
    """T = T_START, T_START + T_STEP, ... (T_COUNT values): the authors' np.arange grid."""
    return [cfg["T_START"] + cfg["T_STEP"] * i for i in range(cfg["T_COUNT"])]


def draw(j, data, W, n_t, batch, seed):
    """Draw j, the same for every model, from a generator seeded with seed * j: `batch` training
    images, one M per layer pair (the authors' draw: entries U[0, 1], unit Frobenius norm), n_t
    sphere and n_t positive-orthant unit directions (eq. 4; shapes (n_t, out, in))."""
    gen = torch.Generator().manual_seed(seed * j)
    idx = torch.randperm(data.x_train.shape[0], generator=gen)[:batch].to(data.x_train.device)
    return (data.x_train[idx], data.y_train[idx], random_lie_elements(W, gen),
            random_directions(W, n_t, "sphere", gen), random_directions(W, n_t, "positive_orthant", gen))


def measure(W, data, act, ts, n_draws, batch, chunk, seed, psi_dtype=torch.float64, progress=False,
            resume=None, on_draw=None):
    """Per model (W: list of (K, out, in)), in chunks of `chunk` models, the means over n_draws
    draws of phi (eq. 4, over the displacements ts; sphere and positive-orthant directions), psi
    (eq. 5: curvature, eq. 47, of exp(tM).w under eq. (54); nan where a pseudo-inverse fails) and
    loss_w = L(w). resume, on_draw: see lib.stats.draw_means. Returns {name: (K,) tensor}."""
    W, Wd = [w.detach() for w in W], [w.detach().to(psi_dtype) for w in W]

    def one(j):
        X, Y, Ms, d_sph, d_pos = draw(j, data, W, len(ts), batch, seed)
        Ms, Xd, out = [M.to(psi_dtype) for M in Ms], X.to(psi_dtype), {m: [] for m in (*METRICS, "loss_w")}
        for s in range(0, W[0].shape[0], chunk):
            Wc = [w[s:s + chunk] for w in W]
            out["phi_sphere"].append(sharpness(Wc, X, Y, act, ts, d_sph))
            out["phi_orthant"].append(sharpness(Wc, X, Y, act, ts, d_pos))
            out["loss_w"].append(sharpness(Wc, X, Y, act, [0.0], [d[:1] for d in d_sph]))
            try:
                out["psi"].append(curvature([w[s:s + chunk] for w in Wd], Xd, act, Ms))
            except torch.linalg.LinAlgError:
                out["psi"].append(torch.full((Wc[0].shape[0],), float("nan")))
        return {k: torch.cat([v.double().cpu() for v in vs]) for k, vs in out.items()}
    return draw_means(one, n_draws, resume, on_draw, progress, "phi, psi")


def kept(res):
    """(K,) bool: the models the correlations use: not diverged, every value finite."""
    cols = [res[k] for k in (*METRICS, *EXCESS, "val_loss", "train_loss_final", "train_loss_epoch_mean")]
    return finite_rows(cols, [e is not None for e in res.get("diverged_epoch", [None] * len(res["val_loss"]))])


def correlations(res, control):
    """Over the kept models (all nan when fewer than 4 are left): Pearson r (with p) of each metric
    with the validation loss and with the training loss, and the partial r given the latter."""
    ok, val, tr = kept(res), res["val_loss"], res[f"train_loss_{control}"]
    out = correlate({m: res[m] for m in (*METRICS, *EXCESS)}, val, tr, ok, ("val", "train"))
    r, p = pearson(np.asarray(tr, dtype=float)[ok], np.asarray(val, dtype=float)[ok], 4)
    return {**out, "train_loss": {"r_val": r, "p_val": p}}


def dataset_config(cfg, name):
    """cfg for one dataset: its preset filled in where cfg holds None."""
    cfg = {**with_preset(cfg, PRESETS, "DATASETS", name), "DATASET": name}
    for k in ("LR", "T_COUNT", "CHUNK"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    return cfg


def check_saved(path, cfg):
    """check_replace on a saved <dataset>.json; SKIP_TRAINING gives a full run's numbers too."""
    check_replace(path, cfg, ignore=("SKIP_TRAINING",))


def trained(cfg, data, ckpt, record):
    """The final weights and training record: with SKIP_TRAINING the saved ones (refused if trained
    with other settings), else the N_MODELS models trained as one batched model (resuming an
    interrupted training) and `record` with their history, seeds, time, final loss and accuracy."""
    name, res_dir = cfg["DATASET"], os.path.join(cfg["OUT_DIR"], "results", "correlation")
    if cfg["SKIP_TRAINING"]:
        if not os.path.exists(path := os.path.join(res_dir, f"{name}_weights.pt")):
            raise UsageError(f"--skip-training: no saved weights at {path}; train first")
        t, training = load_tensors(path, cfg["DEVICE"]), load_json(os.path.join(res_dir, f"{name}_training.json"))
        old, W = training.get("config", {}), [t[f"W{j}"] for j in range(len(t))]
        if differ := [f"{k}={old[k]!r}" for k in TRAINING if k in old and old[k] != cfg[k]]:
            raise UsageError(f"--skip-training: the saved weights were trained with {', '.join(differ)}; "
                             f"use those values or train again")
        if W[0].shape[0] != cfg["N_MODELS"]:
            raise UsageError(f"--skip-training: saved weights hold {W[0].shape[0]} models, not {cfg['N_MODELS']}")
        return W, training
    if (done := ckpt.unit(unit := f"{name} training")) is None:
        seeds = [(i + 1) * cfg["SEED_BASE"] for i in range(cfg["N_MODELS"])]
        W, opt = make_model(cfg["WIDTHS"], seeds, "sgd", cfg["LR"], cfg["DEVICE"])
        hist = ckpt.fit(unit, W, opt, data, ACT, cfg["EPOCHS"], cfg["BATCH_SIZE"], desc=f"{name} train",
                        progress=cfg["PROGRESS"])
        tr_final, tr_acc = evaluate(W, data.x_train, data.y_train, ACT)
        done = ckpt.finish_unit(unit, {"W": [w.detach().cpu() for w in W], "history": hist, "seeds": seeds,
                                          "train_loss_final": tr_final.tolist(), "train_acc_final": tr_acc.tolist()})
    return [w.to(cfg["DEVICE"]) for w in done["W"]], {**record, **{k: v for k, v in done.items() if k != "W"},
                                                       "train_time_s": done["history"]["time_s"][-1]}


def metrics(cfg, data, W, at, ckpt):
    """measure() on the models that did not diverge (nan for the others), saving progress per
    draw through ckpt. Returns ({name: (K,) tensor}, seconds)."""
    if (done := ckpt.unit("metrics")) is None:
        idx, n = [i for i, e in enumerate(at) if e is None], cfg["N_DRAWS"]
        cur = ckpt.current if (ckpt.current or {}).get("unit") == "metrics" else None
        t0, before = time.perf_counter(), cur["time_s"] if cur else 0.0
        spent = lambda: before + time.perf_counter() - t0  # noqa: E731 - seconds, interruptions aside
        save = lambda state: ckpt.save({"done": ckpt.done, "current": {"unit": "metrics", **state,  # noqa: E731
                                        "time_s": spent()}}, f"{cfg['DATASET']} metrics, draw {state['draw']} of {n}")
        m = {k: torch.full((len(at),), float("nan"), dtype=torch.float64) for k in (*METRICS, "loss_w")}
        if idx:
            got = measure([w[idx] for w in W], data, ACT, displacements(cfg), n, cfg["METRIC_BATCH"], cfg["CHUNK"],
                          cfg["DRAW_SEED"], getattr(torch, cfg["PSI_DTYPE"]), cfg["PROGRESS"], cur, save)
            for k, v in got.items():
                m[k][idx] = v
        done = ckpt.finish_unit("metrics", {"m": m, "time_s": spent()})
    return done["m"], done["time_s"]


def run_dataset(name, cfg, res_dir, ckpts):
    """Train (or load) and measure the models of one dataset under its preset, resuming from
    OUT_DIR/.progress/correlation-<name>.pt (appended to ckpts, for main to finish); write its
    results (and, when trained, its weights and curves) to res_dir and return them."""
    cfg = dataset_config(cfg, name)
    data = load(name, cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
    if cfg["WIDTHS"][0] != data.x_train.shape[1] or len(cfg["WIDTHS"]) < 3:  # psi needs a layer pair
        raise UsageError(f"--widths={cfg['WIDTHS']}: {name} needs d_0 = {data.x_train.shape[1]}, 3 layers or more")
    saved = {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])}
    print(f"{data.label}: {len(data.y_test)} test images (the validation loss); SGD lr {cfg['LR']}")
    ckpts.append(ckpt := Checkpoint(cfg, f"correlation-{name}"))
    W, training = trained(cfg, data, ckpt, {"config": saved, "environment": environment(), "data": data.info})
    hist = training["history"]  # a non-finite final training or validation loss: diverged in the last epoch
    at = diverged_epochs(np.transpose(hist["train_loss"]), training["train_loss_final"], hist["test_loss"][-1])
    m, metric_time = metrics(cfg, data, W, at, ckpt)
    res = {"config": saved, "environment": environment(), "data": data.info, "dataset": name,
           "label": data.label, "n_train": len(data.y_train), "n_test": len(data.y_test),
           "seeds": training["seeds"], "val_loss": hist["test_loss"][-1], "val_acc": hist["test_acc"][-1],
           "train_loss_epoch_mean": hist["train_loss"][-1], "train_loss_final": training["train_loss_final"],
           **{k: v.tolist() for k, v in m.items()}, "displacements": displacements(cfg),
           **{f"{k}_excess": (m[k] - m["loss_w"]).tolist() for k in ("phi_sphere", "phi_orthant")},
           "diverged_epoch": at, "n_diverged": sum(e is not None for e in at),
           "train_time_s": training["train_time_s"], "metric_time_s": metric_time}
    res["n_kept"], res["correlations"] = int(kept(res).sum()), correlations(res, cfg["CONTROL"])
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
    """Three scatter figures per dataset, one point per kept model coloured by the training loss
    the saved correlations control for, r in the legend, diverged models counted in the title."""
    name, c, control, ok = res["dataset"], res["correlations"], res["config"]["CONTROL"], kept(res)
    label = res.get("label", f"{name} ({res['n_train']:,} train)")  # results saved without a label
    models = f"{len(ok)} models" if ok.all() else f"{ok.sum()} of {len(ok)} models (diverged or not finite: left out)"
    col = lambda k: np.asarray(res[k], dtype=float)[ok]  # noqa: E731
    axis = lambda k: f"{LABELS[k]} $\\phi$" if k.startswith("phi") else "curvature $\\psi$"  # noqa: E731
    val = lambda k: (col(k), col("val_loss"), axis(k), "validation loss",  # noqa: E731
                     f"r = {c[k]['r_val']:.3f}, partial r | train loss = {c[k]['partial_r_val']:.3f}")
    r = f"r = {pearson(col('phi_sphere'), col('psi'))[0]:.3f}" if ok.sum() >= 2 else "r: too few models"
    for fname, panels in {"sharpness_vs_val_loss": [val("phi_sphere"), val("phi_orthant")],
                          "curvature_vs_val_loss": [val("psi")],
                          "sharpness_vs_curvature": [(col("phi_sphere"), col("psi"), axis("phi_sphere"),
                                                      axis("psi"), r)]}.items():
        fig = scatter_panels(panels, col(f"train_loss_{control}"), f"training loss ({control})",
                             f"{label}, {models}", None if ok.all() else 9)
        save_figure(fig, os.path.join(fig_dir, f"{name}_{fname}.png"), dpi=dpi)


def table(res_dirs):
    """Table 1 (Markdown, CSV; our r next to the paper's) from every <dataset>.json (one at least),
    each taken from the first of res_dirs that holds it, written to res_dirs[0]."""
    paths = {n: [os.path.join(d, f"{n}.json") for d in res_dirs] for n in PRESETS["DATASETS"]}
    found = {n: load_json(next(filter(os.path.exists, ps))) for n, ps in paths.items() if any(map(os.path.exists, ps))}
    header = ["measure"] + [f"{n} {w}" for n in found for w in ("ours", "paper")]
    value = lambda v: "n/a" if v is None or v != v else v  # noqa: E731 - r over fewer than 4 models

    def row(title, m, k, paper=None):
        return [title] + [v for n in found for v in (value(found[n]["correlations"][m][k]), paper[n] if paper else "-")]
    rows = []
    for m in (*METRICS, *EXCESS):
        rows += [row(f"{LABELS[m]}: r with val. loss", m, "r_val", PAPER.get(m)),
                 row(f"{LABELS[m]}: partial r given train loss", m, "partial_r_val")]
        rows += [row(f"{LABELS[m]}: r with train loss", m, "r_train")] if m in METRICS else []
    rows.append(row("train loss: r with val. loss", "train_loss", "r_val"))

    def size(f):  # results saved before divergence was recorded have no n_kept
        K, n = len(f["seeds"]), f.get("n_kept", len(f["seeds"]))
        left = f" ({K - n} left out: {f['n_diverged']} diverged in training, r over the other {n})" if n < K else ""
        return f"{K} models{left}, {f['n_train']} train / {f['n_test']} test images"
    quick = [n for n, f in found.items() if f["config"].get("QUICK")]
    note = (f"{', '.join(f'{n}: {size(f)}' for n, f in found.items())}. The paper's sharpness r is repeated on "
            f"both sharpness rows: the paper defines phi with unit-sphere directions (eq. 4), the authors' code "
            f"draws positive-orthant ones. Partial r: controlling for the training loss "
            f"({next(iter(found.values()))['config']['CONTROL']}).\n"
            + (f"\nQuick run (--quick): not the paper's protocol ({', '.join(quick)}).\n" if quick else ""))
    return save_table(os.path.join(res_dirs[0], "table1"), header, rows,
                      "Table 1: Pearson correlation with the validation loss", note)


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
    for name in [] if cfg["PLOT_ONLY"] else names:  # before any work: refuse to replace other settings' results
        check_saved(path(name), dataset_config(cfg, name))
    ckpts = []
    with staged(cfg["OUT_DIR"]) as out:  # the outputs replace the previous set only when complete
        fig_dir, res_dir = experiment_dirs("correlation", out)
        for name in names:
            plot(load_results(path(name)) if cfg["PLOT_ONLY"] else run_dataset(name, cfg, res_dir, ckpts),
                 fig_dir, cfg["FIG_DPI"])
        md = table([res_dir, saved_dir])
    for ckpt in ckpts:
        ckpt.finish()
    print(md)
    return saved_dir


if __name__ == "__main__":
    run(main, globals())
