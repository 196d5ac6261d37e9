"""Speed of correlation.py's two phases, batched against one model at a time, interleaved (the
machine's speed drifts; others share the CPU):

  training  N_MODELS MLPs of the MNIST protocol (784-16-10-10, SGD lr 0.01, batch 20) as one
            batched model (K = N_MODELS) vs one model (K = 1) on the same preloaded tensors;
            the ratio is per model-epoch: t(K=1) * N_MODELS / t(K=N_MODELS).
  metrics   phi (sphere and positive orthant, 20 displacements) and psi (eq. 54, all pairs) over
            N_DRAWS draws of 200 images, all models in one pass vs one model alone.

Both baselines are measured on one model and multiplied by N_MODELS: every model costs the
same. Also checks that model 0's loss and metrics agree between the two ways.

    OMP_NUM_THREADS=1 python benchmarks/bench_correlation.py
    python benchmarks/bench_correlation.py --quick   # seconds

CPU runtime: a few minutes (2 shared cores).

Outputs: printed only (timings, ratios and the full-protocol estimates); nothing is written but
lib.data's tensor cache under DATA_DIR.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import correlation  # noqa: E402
from lib.config import check_positive, resolve, run, with_preset  # noqa: E402
from lib.data import load, synthetic  # noqa: E402
from lib.train import make_model, train_epoch  # noqa: E402

# ---- config -----------------------------------------------------------------------------------
N_MODELS = 100             # models trained / measured at once
TRAIN_IMAGES = 2000        # images per timed training pass (the first TRAIN_IMAGES of the set)
N_DRAWS = 2                # metric draws per timed pass
REPEATS = 3                # interleaved repeats; medians are reported
ESTIMATE_STEPS = 20        # training steps timed per dataset for the full-protocol estimates
DATA_DIR = "data"          # torchvision layout (--data-dir)
DEVICE = "cpu"             # cpu, cuda or auto
# ------------------------------------------------------------------------------------------------
QUICK_SETTINGS = {"N_MODELS": 10, "TRAIN_IMAGES": 200, "N_DRAWS": 1, "REPEATS": 1, "ESTIMATE_STEPS": 2}
ACT = correlation.ACT
# correlation.py's default settings with each dataset's preset (widths, lr, displacements, chunk)
SETTINGS = {n: with_preset(resolve(correlation), correlation.PRESETS, "DATASETS", n)
            for n in correlation.PRESETS["DATASETS"]}
P = SETTINGS["MNIST"]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(cfg):
    for k in ("N_MODELS", "TRAIN_IMAGES", "N_DRAWS", "REPEATS"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    data = load("MNIST", cfg["DATA_DIR"], cfg["DEVICE"])
    X, Y = data.x_train[:cfg["TRAIN_IMAGES"]], data.y_train[:cfg["TRAIN_IMAGES"]]
    seeds = [(i + 1) * P["SEED_BASE"] for i in range(cfg["N_MODELS"])]
    ts, seed = correlation.displacements(P), P["DRAW_SEED"]
    W0, _ = make_model(P["WIDTHS"], seeds[:1], "sgd", P["LR"], cfg["DEVICE"])
    correlation.measure(W0, data, ACT, ts, 1, 200, 1, seed)  # warm-up: forward-mode AD loads once
    rows = {"train_batched": [], "train_single": [], "metric_batched": [], "metric_single": []}
    for r in range(cfg["REPEATS"]):
        Wb, ob = make_model(P["WIDTHS"], seeds, "sgd", P["LR"], cfg["DEVICE"])
        Ws, os_ = make_model(P["WIDTHS"], seeds[:1], "sgd", P["LR"], cfg["DEVICE"])
        tb, lb = _timed(lambda: train_epoch(Wb, ob, X, Y, ACT, 20))
        ts1, ls = _timed(lambda: train_epoch(Ws, os_, X, Y, ACT, 20))
        assert torch.allclose(lb[:1], ls, rtol=1e-4), (lb[0], ls)
        rows["train_batched"].append(tb)
        rows["train_single"].append(ts1)
        mb_t, mb = _timed(lambda: correlation.measure(Wb, data, ACT, ts, cfg["N_DRAWS"], 200, P["CHUNK"], seed))
        ms_t, ms = _timed(lambda: correlation.measure([w[:1] for w in Wb], data, ACT, ts, cfg["N_DRAWS"], 200, 1,
                                                      seed))
        for m in correlation.METRICS:
            assert torch.allclose(mb[m][:1], ms[m], rtol=1e-4), m
        rows["metric_batched"].append(mb_t)
        rows["metric_single"].append(ms_t)
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()))
    med = {k: float(np.median(v)) for k, v in rows.items()}
    K = cfg["N_MODELS"]
    n_epoch = cfg["TRAIN_IMAGES"] / 20
    print(f"training, per model-epoch of {cfg['TRAIN_IMAGES']} images ({n_epoch:.0f} steps): "
          f"batched {1e3 * med['train_batched'] / K:.2f} ms, one at a time {1e3 * med['train_single']:.2f} ms; "
          f"ratio {K * med['train_single'] / med['train_batched']:.1f}x")
    print(f"metrics ({cfg['N_DRAWS']} draws), per model: batched {1e3 * med['metric_batched'] / K:.1f} ms, "
          f"one at a time {1e3 * med['metric_single']:.1f} ms; "
          f"ratio {K * med['metric_single'] / med['metric_batched']:.1f}x")
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
          f"training {train_h:.2f} h + metrics {metric_h:.2f} h (from {cfg['ESTIMATE_STEPS']} steps and 1 draw)")
    return {"train": train_h, "metrics": metric_h}


if __name__ == "__main__":
    run(main, globals())
