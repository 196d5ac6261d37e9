"""Speed of one epoch of the Figure-5 protocol (5 seeds, 784-16-10-10 MLP, batch 20, AdaGrad),
several ways in one run, interleaved (the machine's speed drifts; others share the CPU), after
one untimed round of each (first-call costs and the torch.compile stay out of the timing):

  textbook  a torch.utils.data DataLoader over a TensorDataset of the same preloaded tensors,
            one nn.Module model at a time (the usual research loop; reading every image
            through torchvision's dataset and ToTensor, as most research code does, costs more);
  per-seed  lib's engine on preloaded tensors, one model (K=1) at a time;
  batched   lib's engine, the 5 seeds as one batched model (K=5);
  compiled  the batched engine with its training step through torch.compile (COMPILE).

All start from the same weights and see the same images in the same order, so their per-seed
epoch losses agree (checked and printed). Also times one teleport moment of the protocol (8
batches of 200, 10 steps, all seeds; lib.arms.ArmHook with the teleport arm) against one batched
training epoch.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py            # the bundled 4,000-image MNIST subset
    python benchmarks/bench_training.py --quick    # 1,000 images, no compile

CPU runtime: about a minute on the 4,000-image subset (2 cores). Measured there (median of 3
interleaved repeats, load average 0.5, one thread) with the earlier textbook loop, which read
the images through torchvision's MNIST dataset and ToTensor: textbook 0.276 s, per-seed 0.059 s,
batched 0.0165 s, compiled 0.0102 s per seed-epoch: the batched engine was 16.7x faster than that
loop, and torch.compile makes it 1.6x faster per seed-epoch still, with losses equal to 3e-7.
The TensorDataset loop skips the per-image conversion, so the speed-ups over it are smaller: on
the bundled subset at a load average of 4 (every way slower than above), textbook 0.228 s,
per-seed 0.162 s, batched 0.042 s per seed-epoch (5.4x), losses again equal to 3.5e-7.
The eager engine (lib.models.loss_and_grads: hand-written backpropagation, fused torch.optim)
spends ~0.42 ms per batched step, mostly the per-kernel overhead of ~30 small ops; torch.compile
fuses them (compiled once per shape, ~20 s, before the timing). One teleport moment = 0.6 of a
50,000-image epoch.

Outputs: OUT_DIR/bench_training.json (the resolved config, the environment, the median seconds
per way and the per-seed epoch losses); OUT_DIR defaults to runs/bench (git-ignored), never the
committed results/. The numbers are also printed.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.actions import GLAction  # noqa: E402
from lib.arms import Arm, ArmHook, Moments  # noqa: E402
from lib.config import check_choice, check_positive, run  # noqa: E402
from lib.data import load  # noqa: E402
from lib.io import environment, relative, save_json  # noqa: E402
from lib.models import Activation, init_mlp  # noqa: E402
from lib.optim import make_optimizer  # noqa: E402
from lib.teleport import make_objective  # noqa: E402
from lib.train import make_model, train_epoch  # noqa: E402

# ---- config -----------------------------------------------------------------------------------
DATASET = "MNIST"          # MNIST or FashionMNIST (lib.data.load, as the training scripts)
N_RUNS = 5                 # seeds (r+1)*54321
TRAIN_SIZE = 50000         # seeded training subset, as teleport_optimization.py
BATCH_SIZE = 20            # mini-batch size
OPTIMIZER = "adagrad"      # sgd, momentum, adagrad, rmsprop, adam
LR = 1e-2                  # learning rate
REPEATS = 3                # interleaved repeats; medians are reported
COMPILE = True             # also time the torch.compile'd engine (~20 s to compile, before the timing)
DATA_DIR = "data"          # datasets in torchvision's layout (--data-dir); MNIST falls back to the bundled subset
OUT_DIR = "runs/bench"     # bench_training.json goes here (git-ignored by default)
# ------------------------------------------------------------------------------------------------
QUICK_SETTINGS = {"REPEATS": 1, "N_RUNS": 2, "TRAIN_SIZE": 1000, "COMPILE": False}
WIDTHS = [784, 16, 10, 10]
ACT = Activation(0.1)


def textbook_epoch(cfg, data, W0):
    """One epoch per seed the usual way: a DataLoader over a TensorDataset of the training
    images (the tensors lib.data.load returns, in the same order as the engine sees them)."""
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=cfg["BATCH_SIZE"], shuffle=False)
    losses = []
    for k in range(W0[0].shape[0]):
        layers = []
        for j, w in enumerate(W0):
            lin = torch.nn.Linear(w.shape[2], w.shape[1], bias=False)
            lin.weight.data.copy_(w[k])
            layers += [lin] + ([torch.nn.LeakyReLU(ACT.slope)] if j < len(W0) - 1 else [])
        model = torch.nn.Sequential(torch.nn.Flatten(), *layers)
        opt = make_optimizer(cfg["OPTIMIZER"], model.parameters(), cfg["LR"])
        crit, total, n = torch.nn.CrossEntropyLoss(), 0.0, 0
        for x, y in loader:
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        losses.append(total / n)
    return losses


def copy_model(cfg, W0, rows):
    W, opt = make_model(WIDTHS, [0] * len(rows), cfg["OPTIMIZER"], cfg["LR"])
    with torch.no_grad():
        for w, w0 in zip(W, W0):
            w.copy_(w0[rows])
    return W, opt


def engine_epoch(cfg, W0, data, batched, compile=False):
    """One epoch of lib's engine: all seeds as one model, or one model (K=1) at a time;
    compile=True: the training step through torch.compile (compiled once, before timing)."""
    groups = [list(range(W0[0].shape[0]))] if batched else [[k] for k in range(W0[0].shape[0])]
    losses = []
    for g in groups:
        W, opt = copy_model(cfg, W0, g)
        losses += train_epoch(W, opt, data.x_train, data.y_train, ACT, cfg["BATCH_SIZE"], compile=compile).tolist()
    return losses


def teleport_moment(cfg, W0, data):
    """The protocol's teleport moment: 8 teleports on batches of 200, 10 steps, all seeds, the
    optimizer state reset after each (teleport_optimization.py's teleport arm)."""
    W, opt = copy_model(cfg, W0, list(range(W0[0].shape[0])))
    tele = dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=10, lr=5e-2, stop_above=100.0)
    arm = Arm("teleport", "teleport", "reset", teleport=tele)
    hook = ArmHook(W, opt, data, ACT, [arm], Moments((0,), 8, 200, 0))
    for i in range(8):
        hook(0, i)


def main(cfg):
    check_choice("dataset", cfg["DATASET"], ("MNIST", "FashionMNIST"))
    check_positive("lr", cfg["LR"])
    check_positive("repeats", cfg["REPEATS"], allow_zero=False)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    data = load(cfg["DATASET"], cfg["DATA_DIR"], "cpu", cfg["TRAIN_SIZE"], 0)
    W0 = init_mlp(WIDTHS, [(r + 1) * 54321 for r in range(cfg["N_RUNS"])])
    ways = {"textbook": lambda: textbook_epoch(cfg, data, W0),
            "per-seed": lambda: engine_epoch(cfg, W0, data, batched=False),
            "batched": lambda: engine_epoch(cfg, W0, data, batched=True),
            "compiled": lambda: engine_epoch(cfg, W0, data, batched=True, compile=True),
            "teleport": lambda: teleport_moment(cfg, W0, data)}
    if not cfg["COMPILE"]:
        del ways["compiled"]
    for f in ways.values():  # one untimed round: one-off costs (first kernels, the compile) stay out of the timing
        f()
    times, losses = {k: [] for k in ways}, {}
    for _ in range(cfg["REPEATS"]):
        for name, f in ways.items():  # interleaved
            t0 = time.perf_counter()
            losses[name] = f()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    K, n = cfg["N_RUNS"], len(data.y_train)
    print(f"{data.label}: {n} training images, {K} seeds, {cfg['OPTIMIZER']}, batch {cfg['BATCH_SIZE']}, "
          f"threads {torch.get_num_threads()}, median of {cfg['REPEATS']} interleaved repeats")
    engines = [w for w in ("textbook", "per-seed", "batched", "compiled") if w in ways]
    for name in engines:
        print(f"{name:>9}: {med[name]:8.3f} s per epoch of {K} seeds, {med[name] / K:7.4f} s per seed-epoch, "
              f"speed-up vs textbook {med['textbook'] / med[name]:6.1f}x")
    if "compiled" in med:
        print(f"torch.compile: {med['batched'] / med['compiled']:.1f}x faster per seed-epoch than the batched "
              f"eager engine")
    print(f" teleport: {med['teleport']:8.3f} s per teleport moment (8 x 200 images, 10 steps, {K} seeds) = "
          f"{med['teleport'] / med['batched']:.2f} of one batched epoch on {n} images "
          f"({med['teleport'] / med['batched'] * n / 50000:.3f} of a 50,000-image epoch)")
    gap = max(abs(a - b) for name in engines[1:] for a, b in zip(losses[name], losses["textbook"]))
    print(f"per-seed epoch losses: textbook {np.round(losses['textbook'], 5).tolist()}; "
          f"max |difference| of the others: {gap:.2e}")
    path = save_json(os.path.join(cfg["OUT_DIR"], "bench_training.json"),
                     {"config": {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])},
                      "environment": environment(), "seconds_per_epoch_median": med,
                      "epoch_losses": {k: v for k, v in losses.items() if k != "teleport"}, "max_loss_gap": gap})
    print(f"wrote {path}")
    return med, losses


if __name__ == "__main__":
    run(main, globals())
