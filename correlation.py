"""Table 1 and Figures 9-10: sharpness and curvature of minima vs validation loss (Section 4.3,
Appendix E.3). Trains N_MODELS MLPs per dataset as one batched model, measures at each minimum the
sharpness phi (eq. 4; unit-sphere and the authors' positive-orthant directions), the curvature psi
(eq. 5; exp(tM).w under eq. (54) on all layer pairs) in two conventions, and beyond the paper the
top Hessian eigenvalue, the Hessian trace and adaptive sharpness (lib.hessian), and correlates each
with the validation loss: Pearson r with a bootstrap 95% interval over models, Kendall tau, and the
partial r given the training loss.

    python correlation.py                                   # the committed run (the bundled MNIST subset)
    python correlation.py --n-models=1000 --tag=1000-models # the committed 1,000-model variant
    python correlation.py --dataset=all                     # MNIST, FashionMNIST, CIFAR10 in turn
    python correlation.py --lr=0.05                         # any preset value can be overridden
    python correlation.py --skip-training                   # metrics from the saved weights
    python correlation.py --plot-only                       # figures and table from the JSONs

psi's conventions (lib.metrics.curve_derivatives): 'exact' differentiates the curve exp(tM).w itself;
'authors' sums each layer pair's own second derivative, as the authors' code does, dropping the
cross term 2A'B' = -2 V'_m M_(m-1) of each hidden layer that two pairs move. PSI_CONVENTION picks
the figures' psi; the table has both. Both come from the closed forms of eqs. (57)/(60) for all
models and several draws at once (float32 by default: within 1e-4 of float64, measured).

Protocol: draw j reseeds with DRAW_SEED * j (the authors' manual_seed(12345 * curve_idx)): all models
share its batch, directions and M. Runs resume (OUT_DIR/.progress/), write outputs as a set, keep
other settings' results unless --replace; diverged models (loss non-finite or > 1e6) are left out.

CPU runtime (2 cores, torch's 2 threads): 1,000 models on the 4,000-image MNIST subset end to end
in 7 min 08 s on a quiet machine (load < 2: training 250 s, phi and psi 109 s, Hessian measures 42 s);
100 models: training 115 s, phi and psi 107 s, Hessian measures 28 s at load average ~8 (one thread).
--quick: < 1 min.

Headline (MNIST subset, 1,000 models, 95% intervals): r(phi, val. loss) = 0.84 [0.81, 0.86] (paper
0.704), but r(phi, train loss) = 0.998 and given the training loss phi's partial r is -0.10; psi
+0.36 exact, +0.14 the authors' way (paper -0.050), partial r +0.05 / -0.09. The top Hessian
eigenvalue, trace and worst-case adaptive sharpness keep a small positive partial r (+0.15 to +0.18).

Outputs: under OUT_DIR, results/correlation/<dataset>.json (config, environment, data, per-model
losses, every measure, divergence epochs, correlations with intervals), <dataset>_training.json
(curves), <dataset>_weights.pt (for --skip-training), table1.md and table1.csv (Table 1 over every
saved dataset); figures/correlation/<dataset>_{sharpness_vs_val_loss,curvature_vs_val_loss,
sharpness_vs_curvature,hessian_vs_val_loss}.png; with --tag=T the stems <dataset>_T and table1_T;
while a run is unfinished, .progress/correlation-<dataset>.pt.
"""
import os
import time

import numpy as np
import torch

from lib.config import UsageError, check_choice, check_positive, run, with_preset
from lib.data import load
from lib.io import (check_replace, environment, experiment_dirs, load_json, load_results, load_tensors,
                    save_json, save_tensors, saved_config, staged)
from lib.hessian import adaptive_sharpness, hessian_trace, top_eigenvalue
from lib.metrics import curvatures_eq54, random_directions, random_lie_elements, sharpness_draws
from lib.models import activation, evaluate
from lib.plots import save_figure, scatter_panels
from lib.progress import Checkpoint
from lib.report import diverged_epochs, save_table
from lib.stats import bootstrap_ci, correlate, draw_means, finite_rows, kendall, pearson
from lib.train import make_model

# ---- config -------------------------------------------------------------------------------
DATASET = "MNIST"          # MNIST, FashionMNIST, CIFAR10, or all (the three in turn)
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
CHUNK = None               # models x draws per metric pass (None: the dataset's preset; lower saves memory)
PSI_DTYPE = "float32"      # dtype of the curvature computation (float32 or float64)
PSI_CONVENTION = "exact"   # the figures' psi: exact (the curve itself) or authors (pair-by-pair sum); table: both
HESSIAN_DRAWS = 4          # draws (their batches) the Hessian measures average over: the first of the N_DRAWS
LANCZOS_ITERS = 15         # Hessian-vector products per Lanczos run for the top eigenvalue (fewer if converged)
TRACE_SAMPLES = 20         # Rademacher vectors per Hutchinson trace; Gaussian draws per average-case adaptive sharpness
ASAM_RHO = 0.05            # radius of the adaptive sharpness (perturbation |w| * u, ||u|| <= rho)
ASAM_STEPS = 10            # ascent steps of the worst-case adaptive sharpness
BOOTSTRAP = 2000           # bootstrap resamples (over models) for the 95% intervals
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
TAG = ""                   # extra name for the output files of a variant run, e.g. "1000-models"
# -------------------------------------------------------------------------------------------
PRESETS = {"DATASETS": {  # the authors' released settings per dataset (DATASET=all: each in turn)
    "MNIST": dict(WIDTHS=[784, 16, 10, 10], LR=0.01, T_START=0.001, T_STEP=0.01, CHUNK=100),
    "FashionMNIST": dict(WIDTHS=[784, 16, 10, 10], LR=0.01, T_START=0.0001, T_STEP=0.001, CHUNK=100),
    "CIFAR10": dict(WIDTHS=[3072, 128, 32, 10], LR=0.02, T_START=0.0001, T_STEP=0.001, CHUNK=10)}}
QUICK_SETTINGS = dict(DATASET="MNIST", N_MODELS=4, EPOCHS=2, TRAIN_SIZE=200, N_DRAWS=3, METRIC_BATCH=40,
                      HESSIAN_DRAWS=1, LANCZOS_ITERS=5, TRACE_SAMPLES=2, ASAM_STEPS=2, BOOTSTRAP=200)
ACT = activation("leaky_relu")  # slope 0.1 (the paper's); no ReLU: eq. (54) inverts the activation
# Table 1 of the paper: Pearson r with the validation loss (its phi, on both of our phi rows)
SHARPNESS = {"MNIST": 0.704, "FashionMNIST": 0.790, "CIFAR10": 0.899}
CURVATURE = {"MNIST": -0.050, "FashionMNIST": -0.232, "CIFAR10": -0.167}  # the authors' code: pair-by-pair
PAPER = {"phi_sphere": SHARPNESS, "phi_orthant": SHARPNESS, "psi_exact": CURVATURE, "psi_authors": CURVATURE}
PHI_PSI = ("phi_sphere", "phi_orthant", "psi_exact", "psi_authors")  # over N_DRAWS draws
HESSIAN = ("hess_top", "hess_trace", "asam_worst", "asam_average")  # over HESSIAN_DRAWS draws
METRICS = PHI_PSI + HESSIAN
EXCESS = ("phi_sphere_excess", "phi_orthant_excess")  # phi - L(w) on the same draw batches
LABELS = {"phi_sphere": "sharpness phi (sphere)", "phi_orthant": "sharpness phi (positive orthant)",
          "psi_exact": "curvature psi (exact)", "psi_authors": "curvature psi (authors' pair sum)",
          "hess_top": "top Hessian eigenvalue", "hess_trace": "Hessian trace (Hutchinson)",
          "asam_worst": "adaptive sharpness, worst case", "asam_average": "adaptive sharpness, average case",
          "phi_sphere_excess": "excess sharpness phi - L(w) (sphere)",
          "phi_orthant_excess": "excess sharpness phi - L(w) (positive orthant)"}
TRAINING = ("N_MODELS", "SEED_BASE", "EPOCHS", "BATCH_SIZE", "TRAIN_SIZE", "LR", "WIDTHS")  # --skip-training checks


def stem(name, tag):
    """Output file stem: the dataset (or 'table1'), plus _TAG for a variant run."""
    return f"{name}_{tag}" if tag else name


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


def draws(js, data, W, n_t, batch, seed):
    """The draws js stacked: X (G, B, d_0), Y (G, B), Ms [(G, d, d) per pair], sphere and
    positive-orthant directions [(G, n_t, out, in) per layer]."""
    ds = [draw(j, data, W, n_t, batch, seed) for j in js]
    stack = lambda i: [torch.stack(v) for v in zip(*(d[i] for d in ds))]  # noqa: E731
    return torch.stack([d[0] for d in ds]), torch.stack([d[1] for d in ds]), stack(2), stack(3), stack(4)


def measure(W, data, act, ts, n_draws, batch, chunk, seed, psi_dtype=torch.float32, progress=False,
            resume=None, on_draw=None):
    """Per model (W: list of (K, out, in)) the means over n_draws draws of phi (eq. 4, over the
    displacements ts; sphere and positive-orthant directions), psi (eq. 5: curvature, eq. 47, of
    exp(tM).w under eq. (54), both conventions of lib.metrics.curve_derivatives; nan where a
    pseudo-inverse fails) and loss_w = L(w). About `chunk` (model, draw) pairs per pass: max(1,
    chunk // K) draws at once, models in chunks of `chunk`. resume, on_draw: see
    lib.stats.draw_means. Returns {name: (K,) tensor}."""
    W, K = [w.detach() for w in W], W[0].shape[0]
    group, cache = max(1, chunk // K), {}

    def one(j):
        if j not in cache:  # draws j, j + 1, ... computed at once, handed out one by one
            js = range(j, min(j + group, n_draws))
            X, Y, Ms, d_sph, d_pos = draws(js, data, W, len(ts), batch, seed)
            Xp, Ms, out = X.to(psi_dtype), [M.to(psi_dtype) for M in Ms], {m: [] for m in (*PHI_PSI, "loss_w")}
            for s in range(0, K, chunk):
                Wc = [w[s:s + chunk] for w in W]
                (ps, lw), (po, _) = (sharpness_draws(Wc, X, Y, act, ts, d) for d in (d_sph, d_pos))
                try:
                    pe, pa = curvatures_eq54([w.to(psi_dtype) for w in Wc], Xp, act, Ms)
                except torch.linalg.LinAlgError:
                    pe = pa = torch.full_like(ps, float("nan"))
                for k, v in zip((*PHI_PSI, "loss_w"), (ps, po, pe, pa, lw)):
                    out[k].append(v.double().cpu())
            vals = {k: torch.cat(v, 1) for k, v in out.items()}  # (G, K)
            cache.clear()
            cache.update({i: {k: v[n] for k, v in vals.items()} for n, i in enumerate(js)})
        return cache.pop(j)
    return draw_means(one, n_draws, resume, on_draw, progress, "phi, psi")


def measure_hessian(W, data, act, cfg, progress=False, resume=None, on_draw=None):
    """Per model the means over the first HESSIAN_DRAWS draws' batches of the top Hessian
    eigenvalue (Lanczos), the Hessian trace (Hutchinson) and the worst- and average-case adaptive
    sharpness (lib.hessian), models in chunks of CHUNK; random vectors from a generator seeded
    DRAW_SEED * j + 1 (they depend on the chunking). Returns {name: (K,) tensor}."""
    W, K, ch = [w.detach() for w in W], W[0].shape[0], cfg["CHUNK"]

    def one(j):
        X, Y = draw(j, data, W, 1, cfg["METRIC_BATCH"], cfg["DRAW_SEED"])[:2]
        gen, out = torch.Generator().manual_seed(cfg["DRAW_SEED"] * j + 1), {m: [] for m in HESSIAN}
        for s in range(0, K, ch):
            Wc = [w[s:s + ch] for w in W]
            out["hess_top"].append(top_eigenvalue(Wc, X, Y, act, "ce", cfg["LANCZOS_ITERS"], gen))
            out["hess_trace"].append(hessian_trace(Wc, X, Y, act, "ce", cfg["TRACE_SAMPLES"], gen))
            for kind in ("worst", "average"):
                out[f"asam_{kind}"].append(adaptive_sharpness(Wc, X, Y, act, cfg["ASAM_RHO"], "ce", kind,
                                                              cfg["ASAM_STEPS"], gen, samples=cfg["TRACE_SAMPLES"]))
        return {k: torch.cat(v).double().cpu() for k, v in out.items()}
    return draw_means(one, cfg["HESSIAN_DRAWS"], resume, on_draw, progress, "Hessian")


def kept(res):
    """(K,) bool: the models the correlations use: not diverged, every value finite."""
    cols = [res[k] for k in (*METRICS, *EXCESS, "val_loss", "train_loss_final", "train_loss_epoch_mean") if k in res]
    return finite_rows(cols, [e is not None for e in res.get("diverged_epoch", [None] * len(res["val_loss"]))])


def correlations(res, control):
    """Over the kept models (all nan when fewer than 4 are left): Pearson r (with p) of each metric
    with the validation loss and with the training loss, the partial r given the latter, Kendall's
    tau with the validation loss, and percentile-bootstrap 95% intervals over models (BOOTSTRAP
    resamples, seed 0) of r, partial r and tau with the validation loss (lib.stats.correlate)."""
    ok, val, tr = kept(res), res["val_loss"], res[f"train_loss_{control}"]
    ci = {"n": res["config"].get("BOOTSTRAP", 2000), "seed": 0}
    out = correlate({m: res[m] for m in (*METRICS, *EXCESS) if m in res}, val, tr, ok, ("val", "train"), ci=ci)
    tr, val = np.asarray(tr, dtype=float)[ok], np.asarray(val, dtype=float)[ok]
    (r, p), (tau, ptau) = pearson(tr, val, 4), kendall(tr, val, 4)
    return {**out, "train_loss": {"r_val": r, "p_val": p, "tau_val": tau, "p_tau_val": ptau,
                                  "ci_r_val": list(bootstrap_ci(tr, val, **ci)),
                                  "ci_tau_val": list(bootstrap_ci(tr, val, "kendall", **ci))}}


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
        if not os.path.exists(path := os.path.join(res_dir, f"{stem(name, cfg['TAG'])}_weights.pt")):
            raise UsageError(f"--skip-training: no saved weights at {path}; train first")
        t, training = load_tensors(path, cfg["DEVICE"]), load_json(path.replace("_weights.pt", "_training.json"))
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


def metric_unit(ckpt, unit, n, names, fn, at, dataset):
    """One resumable unit of ckpt: fn(W_idx, resume, on_draw) -> {name: (k,) tensor} over n draws on
    the models that did not diverge (at[i] is None; nan for the others), progress saved per draw.
    Returns ({name: (K,) float64 tensor}, seconds)."""
    if (done := ckpt.unit(unit)) is None:
        idx = [i for i, e in enumerate(at) if e is None]
        cur = ckpt.current if (ckpt.current or {}).get("unit") == unit else None
        t0, before = time.perf_counter(), cur["time_s"] if cur else 0.0
        spent = lambda: before + time.perf_counter() - t0  # noqa: E731 - seconds, interruptions aside
        save = lambda state: ckpt.save({"done": ckpt.done, "current": {"unit": unit, **state,  # noqa: E731
                                        "time_s": spent()}}, f"{dataset} {unit}, draw {state['draw']} of {n}")
        got, m = fn(idx, cur, save) if idx else {}, {}
        for k in names:
            m[k] = torch.full((len(at),), float("nan"), dtype=torch.float64)
            if idx:
                m[k][idx] = got[k]
        done = ckpt.finish_unit(unit, {"m": m, "time_s": spent()})
    return done["m"], done["time_s"]


def metrics(cfg, data, W, at, ckpt):
    """measure() and measure_hessian() as two units of ckpt. Returns ({name: (K,) tensor},
    {unit: seconds})."""
    sub = lambda idx: [w[idx] for w in W]  # noqa: E731
    phi_psi = lambda idx, cur, save: measure(  # noqa: E731
        sub(idx), data, ACT, displacements(cfg), cfg["N_DRAWS"], cfg["METRIC_BATCH"], cfg["CHUNK"],
        cfg["DRAW_SEED"], getattr(torch, cfg["PSI_DTYPE"]), cfg["PROGRESS"], cur, save)
    hessian = lambda idx, cur, save: measure_hessian(sub(idx), data, ACT, cfg, cfg["PROGRESS"], cur, save)  # noqa: E731
    m1, t1 = metric_unit(ckpt, "metrics", cfg["N_DRAWS"], (*PHI_PSI, "loss_w"), phi_psi, at, cfg["DATASET"])
    m2, t2 = metric_unit(ckpt, "hessian", cfg["HESSIAN_DRAWS"], HESSIAN, hessian, at, cfg["DATASET"])
    return {**m1, **m2}, {"metrics": t1, "hessian": t2}


def run_dataset(name, cfg, res_dir, ckpts):
    """Train (or load) and measure the models of one dataset under its preset, resuming from
    OUT_DIR/.progress/correlation-<name>.pt (appended to ckpts, for main to finish); write its
    results (and, when trained, its weights and curves) to res_dir and return them."""
    cfg = dataset_config(cfg, name)
    data = load(name, cfg["DATA_DIR"], cfg["DEVICE"], cfg["TRAIN_SIZE"])
    if cfg["WIDTHS"][0] != data.x_train.shape[1] or len(cfg["WIDTHS"]) < 3:  # psi needs a layer pair
        raise UsageError(f"--widths={cfg['WIDTHS']}: {name} needs d_0 = {data.x_train.shape[1]}, 3 layers or more")
    saved = saved_config(cfg)
    print(f"{data.label}: {len(data.y_test)} test images (the validation loss); SGD lr {cfg['LR']}")
    ckpts.append(ckpt := Checkpoint(cfg, f"correlation-{(out := stem(name, cfg['TAG']))}"))
    W, training = trained(cfg, data, ckpt, {"config": saved, "environment": environment(), "data": data.info})
    hist = training["history"]  # a non-finite final training or validation loss: diverged in the last epoch
    at = diverged_epochs(np.transpose(hist["train_loss"]), training["train_loss_final"], hist["test_loss"][-1])
    m, times = metrics(cfg, data, W, at, ckpt)
    res = {"config": saved, "environment": environment(), "data": data.info, "dataset": name,
           "label": data.label, "n_train": len(data.y_train), "n_test": len(data.y_test),
           "seeds": training["seeds"], "val_loss": hist["test_loss"][-1], "val_acc": hist["test_acc"][-1],
           "train_loss_epoch_mean": hist["train_loss"][-1], "train_loss_final": training["train_loss_final"],
           **{k: v.tolist() for k, v in m.items()}, "displacements": displacements(cfg),
           **{f"{k}_excess": (m[k] - m["loss_w"]).tolist() for k in ("phi_sphere", "phi_orthant")},
           "diverged_epoch": at, "n_diverged": sum(e is not None for e in at),
           "train_time_s": training["train_time_s"], "metric_time_s": times["metrics"],
           "hessian_time_s": times["hessian"]}
    res["n_kept"], res["correlations"] = int(kept(res).sum()), correlations(res, cfg["CONTROL"])
    if not cfg["SKIP_TRAINING"]:
        save_tensors(os.path.join(res_dir, f"{out}_weights.pt"), {f"W{j}": w for j, w in enumerate(W)})
        save_json(os.path.join(res_dir, f"{out}_training.json"), training)
    save_json(os.path.join(res_dir, f"{out}.json"), res)
    c = res["correlations"]
    print(f"{name}: train {res['train_time_s']:.0f} s, phi and psi {times['metrics']:.0f} s, Hessian measures "
          f"{times['hessian']:.0f} s; {res['n_diverged']} of "
          f"{len(at)} models diverged; r(val): "
          + ", ".join(f"{LABELS[k]} {c[k]['r_val']:+.3f} (partial {c[k]['partial_r_val']:+.3f})" for k in METRICS))
    return res


FIGURES = ("sharpness_vs_val_loss", "curvature_vs_val_loss", "sharpness_vs_curvature", "hessian_vs_val_loss")


def plot(res, fig_dir, dpi=200):
    """Four scatter figures per dataset, one point per kept model coloured by the training loss
    the saved correlations control for, r in the legend, diverged models counted in the title;
    psi in the convention PSI_CONVENTION."""
    name, c, cfg, ok = res["dataset"], res["correlations"], res["config"], kept(res)
    psi = f"psi_{cfg.get('PSI_CONVENTION', 'exact')}"
    label = res.get("label", f"{name} ({res['n_train']:,} train)")  # results saved without a label
    models = f"{len(ok)} models" if ok.all() else f"{ok.sum()} of {len(ok)} models (diverged or not finite: left out)"
    col = lambda k: np.asarray(res[k], dtype=float)[ok]  # noqa: E731
    axis = lambda k: LABELS[k].replace("phi", "$\\phi$").replace("psi", "$\\psi$")  # noqa: E731
    val = lambda k: (col(k), col("val_loss"), axis(k), "validation loss",  # noqa: E731
                     f"r = {c[k]['r_val']:.3f}, partial r | train loss = {c[k]['partial_r_val']:.3f}")
    r = f"r = {pearson(col('phi_sphere'), col(psi))[0]:.3f}" if ok.sum() >= 2 else "r: too few models"
    for fname, panels in zip(FIGURES, ([val("phi_sphere"), val("phi_orthant")], [val(psi)],
                                       [(col("phi_sphere"), col(psi), axis("phi_sphere"), axis(psi), r)],
                                       [val(k) for k in HESSIAN])):
        fig = scatter_panels(panels, col(f"train_loss_{cfg['CONTROL']}"), f"training loss ({cfg['CONTROL']})",
                             f"{label}, {models}", None if ok.all() else 9)
        save_figure(fig, os.path.join(fig_dir, f"{stem(name, cfg.get('TAG', ''))}_{fname}.png"), dpi=dpi)


def _cell(c, k, digits=3):
    """'r [low, high]' of statistic k (r_val, partial_r_val, tau_val) with its interval, 'n/a' if nan."""
    v, ci = c.get(k), c.get(f"ci_{k}")
    if v is None or v != v:
        return "n/a"
    return f"{v:+.{digits}f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci and ci[0] == ci[0] else "")


def table(res_dirs, tag=""):
    """Table 1 (Markdown, CSV; our correlations next to the paper's r) from every <dataset>.json
    (one at least), each taken from the first of res_dirs that holds it, written to res_dirs[0]:
    per measure and dataset Pearson r with the validation loss (p), its bootstrap 95% interval,
    Kendall tau, the partial r given the training loss and r with the training loss."""
    paths = {n: [os.path.join(d, f"{stem(n, tag)}.json") for d in res_dirs] for n in PRESETS["DATASETS"]}
    found = {n: load_json(next(filter(os.path.exists, ps))) for n, ps in paths.items() if any(map(os.path.exists, ps))}
    columns = ("r with val. loss [95% CI]", "p", "Kendall tau [95% CI]", "partial r given train loss [95% CI]",
               "r with train loss", "paper r")
    header = ["measure"] + [f"{n} {w}" for n in found for w in columns]

    def row(m):
        out = [LABELS.get(m, "training loss")]
        for n, f in found.items():
            c = f["correlations"].get(m, {})
            p = c.get("p_val")
            out += [_cell(c, "r_val"), "n/a" if p is None or p != p else f"{p:.1g}", _cell(c, "tau_val"),
                    _cell(c, "partial_r_val"), _cell(c, "r_train") if "r_train" in c else "-",
                    PAPER.get(m, {}).get(n, "-")]
        return out
    rows = [row(m) for m in (*METRICS, *EXCESS, "train_loss")]

    def size(f):  # results saved before divergence was recorded have no n_kept
        K, n = len(f["seeds"]), f.get("n_kept", len(f["seeds"]))
        left = f" ({K - n} left out: {f['n_diverged']} diverged in training, r over the other {n})" if n < K else ""
        return f"{K} models{left}, {f['n_train']} train / {f['n_test']} test images"
    quick = [n for n, f in found.items() if f["config"].get("QUICK")]
    cfg = next(iter(found.values()))["config"]
    note = (f"{', '.join(f'{n}: {size(f)}' for n, f in found.items())}. Intervals: percentile bootstrap over "
            f"models, {cfg.get('BOOTSTRAP')} resamples. The paper's sharpness r is repeated on both phi rows: the "
            f"paper defines phi with unit-sphere directions (eq. 4), the authors' code draws positive-orthant ones. "
            f"The paper's curvature r is repeated on both psi rows; it was computed the authors' way (pair-by-pair "
            f"sum, which drops the cross term -2 V'_m M_(m-1) of every hidden layer that two pairs move); 'exact' "
            f"is the curvature of the curve exp(tM).w itself. Top eigenvalue, trace and adaptive sharpness (rho "
            f"{cfg.get('ASAM_RHO')}) are not in the paper: means over the first {cfg.get('HESSIAN_DRAWS')} draws' "
            f"batches. Partial r: controlling for the training loss ({cfg['CONTROL']}).\n"
            + (f"\nQuick run (--quick): not the paper's protocol ({', '.join(quick)}).\n" if quick else ""))
    return save_table(os.path.join(res_dirs[0], stem("table1", tag)), header, rows,
                      "Table 1: correlation of each measure with the validation loss", note)


def main(cfg):
    check_choice("dataset", cfg["DATASET"], [*PRESETS["DATASETS"], "all"])
    check_choice("psi dtype", cfg["PSI_DTYPE"], ["float32", "float64"])
    check_choice("psi convention", cfg["PSI_CONVENTION"], ["exact", "authors"])
    check_choice("control", cfg["CONTROL"], ["final", "epoch_mean"])
    for k in ("N_MODELS", "EPOCHS", "BATCH_SIZE", "TRAIN_SIZE", "N_DRAWS", "METRIC_BATCH", "FIG_DPI", "HESSIAN_DRAWS",
              "LANCZOS_ITERS", "TRACE_SAMPLES", "ASAM_RHO", "BOOTSTRAP"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    check_positive("checkpoint_s", cfg["CHECKPOINT_S"])
    check_positive("asam_steps", cfg["ASAM_STEPS"])
    if not all(c.isalnum() or c in "-." for c in cfg["TAG"]):
        raise UsageError(f"TAG may hold letters, digits, '-' and '.', got {cfg['TAG']!r}")
    if cfg["N_MODELS"] < 4:
        raise UsageError(f"n_models must be >= 4 for a partial correlation, got {cfg['N_MODELS']}")
    saved_dir = os.path.join(cfg["OUT_DIR"], "results", "correlation")  # the previous complete set
    names = list(PRESETS["DATASETS"]) if cfg["DATASET"] == "all" else [cfg["DATASET"]]
    path = lambda n: os.path.join(saved_dir, f"{stem(n, cfg['TAG'])}.json")  # noqa: E731
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
        md = table([res_dir, saved_dir], cfg["TAG"])
    for ckpt in ckpts:
        ckpt.finish()
    print(md)
    return saved_dir


if __name__ == "__main__":
    run(main, globals())
