"""Speed of correlation.py's two phases, interleaved in one process (the machine's speed drifts;
others share the CPU), medians over REPEATS:

  training  N_MODELS MLPs of the MNIST protocol (784-16-10-10, SGD lr 0.01, batch 20) as one
            batched model vs one model, per model-epoch: t(K=1) * N_MODELS / t(K=N_MODELS).
  metrics   phi (sphere and positive orthant, 20 displacements), L(w) and psi (eq. 54, all
            pairs) over N_DRAWS draws of 200 images, per model, three ways:
            today   the previous implementation, kept here as the baseline (`previous_measure`:
                    lib.metrics.sharpness per direction kind, psi by nested forward-mode autodiff
                    in float64, exact convention only), all models at once;
            ours    correlation.measure (draws batched, the first layer and the input batch's
                    pseudo-inverse shared by all models, psi in closed form under both
                    conventions, PSI_DTYPE float32), all models at once and one model alone;
            textbook one model at a time, one direction at a time (torch.nn.functional), psi by
                    nested forward-mode autodiff in float64 (lib.metrics.curvature).
            Ratios: today / ours at N_MODELS (per model), textbook / ours for one model and per
            model at N_MODELS. The Hessian measures (correlation.measure_hessian) are timed per
            draw too.

Checks on every repeat: ours equals today's phi and L(w) to 1e-5 and psi (float32) to 1e-4
relative, and the textbook way on model 0; the largest relative error of float32 psi against
float64 is printed. On trained models when WEIGHTS exists (correlation.py's saved weights),
else on freshly initialised ones (said so).

    OMP_NUM_THREADS=1 python benchmarks/bench_correlation.py
    python benchmarks/bench_correlation.py --quick   # seconds

CPU runtime: a few minutes (2 shared cores).

Outputs: printed only (timings, ratios, float32 errors and the full-protocol estimates); nothing
is written but lib.data's tensor cache under DATA_DIR.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import correlation  # noqa: E402
from lib.config import check_positive, resolve, run, with_preset  # noqa: E402
from lib.data import load, synthetic  # noqa: E402
from lib.io import load_tensors  # noqa: E402
from lib.metrics import curvature, sharpness  # noqa: E402
from lib.stats import draw_means  # noqa: E402
from lib.train import make_model, train_epoch  # noqa: E402

# ---- config -----------------------------------------------------------------------------------
N_MODELS = 100             # models trained / measured at once
TRAIN_IMAGES = 2000        # images per timed training pass (the first TRAIN_IMAGES of the set)
N_DRAWS = 4                # metric draws per timed pass
REPEATS = 3                # interleaved repeats; medians are reported
ESTIMATE_STEPS = 20        # training steps timed per dataset for the full-protocol estimates
WEIGHTS = "results/correlation/MNIST_weights.pt"  # trained models to measure (if present)
DATA_DIR = "data"          # torchvision layout (--data-dir)
DEVICE = "cpu"             # cpu, cuda or auto
# ------------------------------------------------------------------------------------------------
QUICK_SETTINGS = {"N_MODELS": 10, "TRAIN_IMAGES": 200, "N_DRAWS": 1, "REPEATS": 1, "ESTIMATE_STEPS": 2}
ACT = correlation.ACT
# correlation.py's default settings with each dataset's preset (widths, lr, displacements, chunk)
SETTINGS = {n: with_preset(resolve(correlation), correlation.PRESETS, "DATASETS", n)
            for n in correlation.PRESETS["DATASETS"]}
P = SETTINGS["MNIST"]


def previous_measure(W, data, act, ts, n_draws, batch, chunk, seed, psi_dtype=torch.float64):
    """correlation.measure as it was before the batched draws (the baseline 'today')."""
    W, Wd = [w.detach() for w in W], [w.detach().to(psi_dtype) for w in W]

    def one(j):
        X, Y, Ms, d_sph, d_pos = correlation.draw(j, data, W, len(ts), batch, seed)
        Ms, Xd, out = [M.to(psi_dtype) for M in Ms], X.to(psi_dtype), {m: [] for m in ("phi_sphere", "phi_orthant",
                                                                                      "psi", "loss_w")}
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
    return draw_means(one, n_draws)


def textbook(W, data, ts, n_draws, batch, seed):
    """One model (W: list of (1, out, in)) the straightforward way: per draw, the loss at each
    displaced weight one direction at a time, psi by nested forward-mode autodiff in float64."""
    w, sums = [x[0] for x in W], {}

    def loss(ws, X, Y):
        h = X
        for x in ws[:-1]:
            h = F.leaky_relu(h @ x.T, ACT.slope)
        return F.cross_entropy(h @ ws[-1].T, Y)
    with torch.no_grad():
        for j in range(n_draws):
            X, Y, Ms, d_sph, d_pos = correlation.draw(j, data, W, len(ts), batch, seed)
            phi = lambda D: np.mean([loss([a + t * d[i] for a, d in zip(w, D)], X, Y).item()  # noqa: E731
                                     for i, t in enumerate(ts)])
            vals = {"phi_sphere": phi(d_sph), "phi_orthant": phi(d_pos)}
            vals["loss_w"] = loss(w, X, Y).item()
            with torch.enable_grad():
                vals["psi"] = curvature([x.double() for x in W], X.double(), ACT, [M.double() for M in Ms]).item()
            sums = {k: sums.get(k, 0.0) + v for k, v in vals.items()}
    return {k: torch.tensor([v / n_draws], dtype=torch.float64) for k, v in sums.items()}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


def models(cfg):
    """The first N_MODELS trained models of WEIGHTS if it exists, else freshly initialised ones."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), cfg["WEIGHTS"])
    if os.path.exists(path) and len(t := load_tensors(path)) and t["W0"].shape[0] >= cfg["N_MODELS"]:
        print(f"metrics on the first {cfg['N_MODELS']} trained models of {cfg['WEIGHTS']}")
        return [t[f"W{j}"][:cfg["N_MODELS"]].to(cfg["DEVICE"]) for j in range(len(t))]
    print(f"metrics on freshly initialised models (no {cfg['WEIGHTS']} with {cfg['N_MODELS']} models)")
    seeds = [(i + 1) * P["SEED_BASE"] for i in range(cfg["N_MODELS"])]
    return [w.detach() for w in make_model(P["WIDTHS"], seeds, "sgd", P["LR"], cfg["DEVICE"])[0]]


def bench_metrics(cfg, data, W, rows):
    """One interleaved round of the metric ways on the models W; appends times to rows, returns
    the float32 errors."""
    n, ts, seed, one = cfg["N_DRAWS"], correlation.displacements(P), P["DRAW_SEED"], [w[:1] for w in W]
    t, old = _timed(lambda: previous_measure(W, data, ACT, ts, n, 200, P["CHUNK"], seed))
    rows["today"].append(t)
    t, new = _timed(lambda: correlation.measure(W, data, ACT, ts, n, 200, P["CHUNK"], seed))
    rows["ours"].append(t)
    t, new1 = _timed(lambda: correlation.measure(one, data, ACT, ts, n, 200, P["CHUNK"], seed))
    rows["ours_one"].append(t)
    t, text = _timed(lambda: textbook(one, data, ts, n, 200, seed))
    rows["textbook_one"].append(t)
    t, _ = _timed(lambda: correlation.measure_hessian(W, data, ACT, {**P, "HESSIAN_DRAWS": 1}))
    rows["hessian_per_draw"].append(t)
    new64 = correlation.measure(W, data, ACT, ts, n, 200, P["CHUNK"], seed, torch.float64)
    for k in ("phi_sphere", "phi_orthant", "loss_w"):
        assert _rel(new[k], old[k]) < 1e-5 and _rel(new1[k], text[k]) < 1e-5, k
    assert _rel(new["psi_exact"], old["psi"]) < 1e-4 and _rel(new1["psi_exact"], text["psi"]) < 1e-4
    assert _rel(new64["psi_exact"], old["psi"]) < 1e-10
    return {k: _rel(new[k], new64[k]) for k in ("psi_exact", "psi_authors")}  # phi is float32 either way


def main(cfg):
    for k in ("N_MODELS", "TRAIN_IMAGES", "N_DRAWS", "REPEATS"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    data = load("MNIST", cfg["DATA_DIR"], cfg["DEVICE"])
    X, Y = data.x_train[:cfg["TRAIN_IMAGES"]], data.y_train[:cfg["TRAIN_IMAGES"]]
    seeds = [(i + 1) * P["SEED_BASE"] for i in range(cfg["N_MODELS"])]
    W0, _ = make_model(P["WIDTHS"], seeds[:1], "sgd", P["LR"], cfg["DEVICE"])
    previous_measure(W0, data, ACT, correlation.displacements(P), 1, 200, 1, P["DRAW_SEED"])  # warm-up: jvp loads once
    Wm = models(cfg)
    rows = {k: [] for k in ("train_batched", "train_single", "today", "ours", "ours_one", "textbook_one",
                            "hessian_per_draw")}
    for r in range(cfg["REPEATS"]):
        Wb, ob = make_model(P["WIDTHS"], seeds, "sgd", P["LR"], cfg["DEVICE"])
        Ws, os_ = make_model(P["WIDTHS"], seeds[:1], "sgd", P["LR"], cfg["DEVICE"])
        tb, lb = _timed(lambda: train_epoch(Wb, ob, X, Y, ACT, 20))
        ts1, ls = _timed(lambda: train_epoch(Ws, os_, X, Y, ACT, 20))
        assert torch.allclose(lb[:1], ls, rtol=1e-4), (lb[0], ls)
        rows["train_batched"].append(tb)
        rows["train_single"].append(ts1)
        err = bench_metrics(cfg, data, Wm, rows)
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()))
    med = {k: float(np.median(v)) for k, v in rows.items()}
    K, n = cfg["N_MODELS"], cfg["N_DRAWS"]
    print(f"training, per model-epoch of {cfg['TRAIN_IMAGES']} images ({cfg['TRAIN_IMAGES'] / 20:.0f} steps): "
          f"batched {1e3 * med['train_batched'] / K:.2f} ms, one at a time {1e3 * med['train_single']:.2f} ms; "
          f"ratio {K * med['train_single'] / med['train_batched']:.1f}x")
    per = {k: 1e3 * med[k] / n / (K if k in ("today", "ours") else 1)
           for k in ("today", "ours", "ours_one", "textbook_one")}
    print(f"metrics (phi x2, L(w), psi), ms per model-draw: today {per['today']:.2f}, ours {per['ours']:.2f} "
          f"({K} models), ours one model {per['ours_one']:.2f}, textbook one model {per['textbook_one']:.2f}")
    print(f"  ratios: today / ours at {K} models {per['today'] / per['ours']:.1f}x; textbook / ours: one model "
          f"{per['textbook_one'] / per['ours_one']:.1f}x, per model at {K} models "
          f"{per['textbook_one'] / per['ours']:.1f}x")
    print(f"  Hessian measures (top eigenvalue, trace, adaptive sharpness x2) per draw at {K} models: "
          f"{med['hessian_per_draw']:.2f} s")
    print(f"  float32 psi against float64 (means over {n} draws), largest relative error over the models: "
          + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    med["float32_rel_err"] = err
    med["estimates_h"] = {n: estimate(n, cfg) for n in SETTINGS}
    return med


def estimate(name, cfg):
    """Full protocol of `name` (50,000 training images, 40 epochs, N_DRAWS=200) extrapolated
    from ESTIMATE_STEPS timed training steps and one timed metric draw, on synthetic tensors of
    the dataset's shape. Returns hours."""
    p = SETTINGS[name]
    data = synthetic(name, 20 * cfg["ESTIMATE_STEPS"], 20, device=cfg["DEVICE"])
    seeds = [(i + 1) * p["SEED_BASE"] for i in range(cfg["N_MODELS"])]
    W, opt = make_model(p["WIDTHS"], seeds, "sgd", p["LR"], cfg["DEVICE"])
    t_train, _ = _timed(lambda: train_epoch(W, opt, data.x_train, data.y_train, ACT, 20))
    t_draw, _ = _timed(lambda: correlation.measure(W, data, ACT, correlation.displacements(p), 1,
                                                   min(200, data.x_train.shape[0]), p["CHUNK"], p["DRAW_SEED"]))
    train_h = t_train / cfg["ESTIMATE_STEPS"] * (50000 / 20) * 40 / 3600
    metric_h = t_draw * 200 / 3600
    print(f"{name} full protocol ({cfg['N_MODELS']} models, 50,000 images, 40 epochs, 200 draws): "
          f"training {train_h:.2f} h + phi and psi {metric_h:.2f} h (from {cfg['ESTIMATE_STEPS']} steps and 1 draw)")
    return {"train": train_h, "metrics": metric_h}


if __name__ == "__main__":
    run(main, globals())
