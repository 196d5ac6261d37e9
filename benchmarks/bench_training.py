"""Speed of one epoch of the Figure-5 protocol (5 seeds, 784-16-10-10 MLP, batch 20, AdaGrad),
three ways in one run, interleaved (the machine's speed drifts; others share the CPU):

  textbook  torchvision MNIST with a ToTensor transform through a DataLoader, one nn.Module
            model at a time (what most research code does, the authors' included);
  per-seed  lib's engine on preloaded tensors, one model (K=1) at a time;
  batched   lib's engine, the 5 seeds as one batched model (K=5).

All three start from the same weights and see the same images in the same order, so their
per-seed epoch losses agree (checked and printed). Also times one teleport moment of the
protocol (8 batches of 200, 10 steps, all 5 seeds) against one batched training epoch.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --data-dir=../shared/data/mnist5k

CPU runtime: about a minute on the 4,000-image subset (2 cores). Measured there (median of 3
interleaved repeats, load average 0.5, one thread): textbook 0.276 s, per-seed 0.059 s, batched
0.0165 s, batched + torch.compile 0.0102 s per seed-epoch, i.e. 16.7x and 27.0x faster than the
textbook loop, with losses equal to 3e-7. The eager engine (lib.models.loss_and_grads: hand-written
backpropagation, fused torch.optim) spends ~0.42 ms per batched step, mostly the per-kernel overhead
of ~30 small ops; torch.compile fuses them (compiled once per shape, ~20 s, before the timing).
One teleport moment = 0.6 of a 50,000-image epoch.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.actions import GLAction  # noqa: E402
from lib.config import check_positive, run  # noqa: E402
from lib.data import load  # noqa: E402
from lib.models import Activation, init_mlp  # noqa: E402
from lib.optim import make_optimizer  # noqa: E402
from lib.teleport import make_objective  # noqa: E402
from lib.train import TeleportHook, make_model, train_epoch  # noqa: E402

# ---- config -----------------------------------------------------------------------------------
DATASET = "MNIST"          # torchvision dataset read by the textbook loop (MNIST layout)
N_RUNS = 5                 # seeds (r+1)*54321
TRAIN_SIZE = 50000         # seeded training subset, as teleport_optimization.py
BATCH_SIZE = 20            # mini-batch size
OPTIMIZER = "adagrad"      # sgd, momentum, adagrad, rmsprop, adam
LR = 1e-2                  # learning rate
REPEATS = 3                # interleaved repeats; medians are reported
DATA_DIR = "data"          # torchvision layout (--data-dir)
DEVICE = "cpu"             # cpu only: the textbook loop is a CPU habit
OUT_DIR = "."              # unused; accepted for symmetry with the scripts
# ------------------------------------------------------------------------------------------------
_QUICK = {"REPEATS": 1, "N_RUNS": 2}
WIDTHS = [784, 16, 10, 10]
ACT = Activation(0.1)


def textbook_epoch(cfg, W0, idx):
    """One epoch per seed the usual way: DataLoader over a torchvision dataset with ToTensor."""
    import torchvision
    from torch.utils.data import DataLoader, Subset
    ds = torchvision.datasets.MNIST(cfg["DATA_DIR"], train=True, download=False,
                                    transform=torchvision.transforms.ToTensor())
    loader = DataLoader(Subset(ds, idx.tolist()), batch_size=cfg["BATCH_SIZE"], shuffle=False)
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


def engine_epoch(cfg, W0, data, batched, compile=False):
    """One epoch of lib's engine: all seeds as one model, or one model (K=1) at a time;
    compile=True: the training step through torch.compile (compiled once, before timing)."""
    groups = [list(range(W0[0].shape[0]))] if batched else [[k] for k in range(W0[0].shape[0])]
    losses = []
    for g in groups:
        W, opt = make_model(WIDTHS, [0] * len(g), cfg["OPTIMIZER"], cfg["LR"])
        with torch.no_grad():
            for w, w0 in zip(W, W0):
                w.copy_(w0[g])
        losses += train_epoch(W, opt, data.x_train, data.y_train, ACT, cfg["BATCH_SIZE"],
                              compile=compile).tolist()
    return losses


def teleport_moment(cfg, W0, data):
    """The protocol's teleport moment: 8 teleports on batches of 200, 10 steps, all seeds."""
    W, opt = make_model(WIDTHS, [0] * W0[0].shape[0], cfg["OPTIMIZER"], cfg["LR"])
    with torch.no_grad():
        for w, w0 in zip(W, W0):
            w.copy_(w0)
    hook = TeleportHook(W, opt, data, ACT, [0], 8, 200, torch.Generator().manual_seed(0),
                        objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=10, lr=5e-2,
                        stop_above=100.0)
    for i in range(8):
        hook(0, i)


def main(cfg):
    check_positive("lr", cfg["LR"])
    check_positive("repeats", cfg["REPEATS"], allow_zero=False)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    data = load(cfg["DATASET"], cfg["DATA_DIR"], "cpu", cfg["TRAIN_SIZE"], 0)
    n_all = len(__import__("torchvision").datasets.MNIST(cfg["DATA_DIR"], train=True, download=False))
    idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:cfg["TRAIN_SIZE"]]
    W0 = init_mlp(WIDTHS, [(r + 1) * 54321 for r in range(cfg["N_RUNS"])])
    ways = {"textbook": lambda: textbook_epoch(cfg, W0, idx),
            "per-seed": lambda: engine_epoch(cfg, W0, data, batched=False),
            "batched": lambda: engine_epoch(cfg, W0, data, batched=True),
            "compiled": lambda: engine_epoch(cfg, W0, data, batched=True, compile=True),
            "teleport": lambda: teleport_moment(cfg, W0, data)}
    engine_epoch(cfg, W0, data, batched=True, compile=True)  # compile outside the timing
    times, losses = {k: [] for k in ways}, {}
    for _ in range(cfg["REPEATS"]):
        for name, f in ways.items():  # interleaved
            t0 = time.perf_counter()
            losses[name] = f()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    K, n = cfg["N_RUNS"], len(data.y_train)
    print(f"{n} training images, {K} seeds, {cfg['OPTIMIZER']}, batch {cfg['BATCH_SIZE']}, "
          f"threads {torch.get_num_threads()}, median of {cfg['REPEATS']} interleaved repeats")
    for name in ("textbook", "per-seed", "batched", "compiled"):
        print(f"{name:>9}: {med[name]:8.3f} s per epoch of {K} seeds, {med[name] / K:7.4f} s per seed-epoch, "
              f"speed-up vs textbook {med['textbook'] / med[name]:6.1f}x")
    print(f" teleport: {med['teleport']:8.3f} s per teleport moment (8 x 200 images, 10 steps, {K} seeds) = "
          f"{med['teleport'] / med['batched']:.2f} of one batched epoch on {n} images "
          f"({med['teleport'] / med['batched'] * n / 50000:.3f} of a 50,000-image epoch)")
    gap = max(abs(a - b) for name in ("per-seed", "batched", "compiled") for a, b in zip(losses[name], losses["textbook"]))
    print(f"per-seed epoch losses: textbook {np.round(losses['textbook'], 5).tolist()}; "
          f"max |difference| of the other three: {gap:.2e}")
    return med, losses


if __name__ == "__main__":
    run(main, globals(), _QUICK)
