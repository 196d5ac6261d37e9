"""Speed of one epoch of the Figure-5 protocol (5 seeds, 784-16-10-10 MLP, batch 20, AdaGrad),
several ways in one run, interleaved (the machine's speed drifts; others share the CPU), after
one untimed round of each (first-call costs and the torch.compile stay out of the timing):

  textbook  the usual research loop, as the paper authors' released code runs Figure 5: torchvision's
            dataset with transforms.ToTensor() (every image decoded per step), a
            torch.utils.data.DataLoader with a sequential sampler over the training subset, one nn.Module
            model at a time, torch.optim with its defaults, loss.item() per step (the floor of
            issue 17, "50x the textbook DataLoader loop", is against this way);
  preloaded a stricter baseline: a DataLoader over a TensorDataset of the already-preloaded
            tensors, torch.optim's fused kernels (no image decoding: what a careful
            single-model loop costs);
  per-seed  lib's engine on preloaded tensors, one model (K=1) at a time;
  batched   lib's engine, the 5 seeds as one batched model (K=5), torch.optim;
  compiled  the batched engine with its gradient step through torch.compile, torch.optim after it;
  fused     what teleport_optimization.py runs: lib.optim.BatchedOptimizer, the optimizer's update
            inside the compiled step (lib.train.compiled_train_step): one compiled call per step;
  arms      not what teleport_optimization.py runs (it trains one arm at a time, so that each arm
            has its own wall time for Figure 13): the fused step with all 6 arms of an optimizer
            (they share the data order) as one batched model of 6 x 5 models, per seed-epoch.

All start from the same weights and see the same images in the same order, so their per-seed
epoch losses agree (checked and printed). The fused step of each of the protocol's four optimizers
(authors' learning rates) is timed too, and with one teleport moment of the protocol (8 batches of
200, 10 steps, all seeds; lib.arms.ArmHook with the teleport arm; benchmarks/bench_teleport.py
compares it with a textbook teleport) gives the estimated time of the whole Figure-5 protocol on
50,000 images (4 optimizers x 40 epochs x 5 seeds, 2 arms or all 6 arms, one model per arm).

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py            # the bundled 4,000-image MNIST subset
    python benchmarks/bench_training.py --quick    # 1,000 images, no compile

CPU runtime: a few minutes on the 4,000-image subset (2 cores), most of it compiling. Measured
numbers and the load they were measured at: README.md, "Speed of the batched engine". Load matters:
every way slows down on a busy machine, the small-kernel ways most.

Outputs: OUT_DIR/bench_training.json (the resolved config, the environment, the load average, the
median seconds per way, microseconds per step, the protocol estimate and the per-seed epoch losses);
OUT_DIR defaults to runs/bench (git-ignored), never the committed results/. The numbers are also printed.
"""
import os
import sys
import tempfile
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
OPTIMIZER = "adagrad"      # momentum, adagrad, rmsprop, adam
LR = 1e-2                  # learning rate
REPEATS = 3                # interleaved repeats; medians are reported
COMPILE = True             # also time the torch.compile'd engine (~20 s to compile, before the timing)
DATA_DIR = "data"          # datasets in torchvision's layout (--data-dir); MNIST falls back to the bundled subset
OUT_DIR = "runs/bench"     # bench_training.json goes here (git-ignored by default)
# ------------------------------------------------------------------------------------------------
QUICK_SETTINGS = {"REPEATS": 1, "N_RUNS": 2, "TRAIN_SIZE": 1000, "COMPILE": False}
WIDTHS = [784, 16, 10, 10]
PROTOCOL_LRS = {"adagrad": 1e-2, "momentum": 1e-3, "rmsprop": 1e-4, "adam": 1e-4}  # the Figure-5 presets
ACT = Activation(0.1)


def torch_model(W0, k):
    """Seed k of the stacked weights W0 as an nn.Sequential of bias-free Linear layers."""
    layers = []
    for j, w in enumerate(W0):
        lin = torch.nn.Linear(w.shape[2], w.shape[1], bias=False)
        lin.weight.data.copy_(w[k])
        layers += [lin] + ([torch.nn.LeakyReLU(ACT.slope)] if j < len(W0) - 1 else [])
    return torch.nn.Sequential(torch.nn.Flatten(), *layers)


def loader_epoch(cfg, loader, W0, optimizer):
    """One epoch per seed over `loader`, one model at a time; optimizer(params) -> torch.optim."""
    losses = []
    for k in range(W0[0].shape[0]):
        model = torch_model(W0, k)
        opt = optimizer(model.parameters())
        crit, total, n = torch.nn.CrossEntropyLoss(), 0.0, 0
        for x, y in loader:
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        losses.append(total / n)
    return losses


def textbook_loader(cfg, data, tmp):
    """torchvision's dataset read through transforms.ToTensor(), the training subset lib.data.load
    draws (the same seeded permutation, so the same images in the same order), in a DataLoader with
    a sequential sampler: the authors' way of feeding Figure 5. torchvision reads only uncompressed
    IDX files: gzipped ones (the bundled subset) are unpacked into the temporary folder `tmp` first."""
    import gzip
    import shutil

    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from lib.data import BUNDLED, IDX_FILES
    root = BUNDLED if data.source == "bundled" else cfg["DATA_DIR"]
    raw, unpacked = os.path.join(root, cfg["DATASET"], "raw"), os.path.join(tmp, cfg["DATASET"], "raw")
    if not all(os.path.exists(os.path.join(raw, f)) for f in IDX_FILES):
        os.makedirs(unpacked, exist_ok=True)
        for f in IDX_FILES:
            src = os.path.join(raw, f)
            with (open(src, "rb") if os.path.exists(src) else gzip.open(src + ".gz")) as a, \
                    open(os.path.join(unpacked, f), "wb") as b:
                shutil.copyfileobj(a, b)
        root = tmp
    ds = getattr(datasets, cfg["DATASET"])(root, train=True, download=False, transform=transforms.ToTensor())
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:cfg["TRAIN_SIZE"]]
    return DataLoader(Subset(ds, idx.tolist()), batch_size=cfg["BATCH_SIZE"], shuffle=False, num_workers=0)


def textbook_epoch(cfg, loader, W0):
    """The textbook way: the ToTensor loader, torch.optim with its defaults (make_optimizer's
    hyperparameters, without its fused kernels)."""
    from lib.optim import OPTIMIZERS
    cls, kw = OPTIMIZERS[cfg["OPTIMIZER"]]
    return loader_epoch(cfg, loader, W0, lambda params: cls(params, lr=cfg["LR"], **kw))


def preloaded_epoch(cfg, data, W0):
    """The stricter baseline: a DataLoader over a TensorDataset of the preloaded tensors (in the
    same order as the engine sees them), torch.optim's fused kernels (lib.optim.make_optimizer)."""
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=cfg["BATCH_SIZE"], shuffle=False)
    return loader_epoch(cfg, loader, W0, lambda params: make_optimizer(cfg["OPTIMIZER"], params, cfg["LR"]))


def copy_model(cfg, W0, rows, fused=False, optimizer=None):
    W, opt = make_model(WIDTHS, [0] * len(rows), optimizer or cfg["OPTIMIZER"], cfg["LR"], batched_optimizer=fused)
    with torch.no_grad():
        for w, w0 in zip(W, W0):
            w.copy_(w0[rows])
    return W, opt


def engine_epoch(cfg, W0, data, batched, compile=False, fused=False, optimizer=None):
    """One epoch of lib's engine: all seeds as one model, or one model (K=1) at a time;
    compile=True: the training step through torch.compile (compiled once, before timing);
    fused=True: lib.optim.BatchedOptimizer, its update inside the (compiled) step."""
    groups = [list(range(W0[0].shape[0]))] if batched else [[k] for k in range(W0[0].shape[0])]
    losses = []
    for g in groups:
        W, opt = copy_model(cfg, W0, g, fused, optimizer)
        losses += train_epoch(W, opt, data.x_train, data.y_train, ACT, cfg["BATCH_SIZE"], compile=compile).tolist()
    return losses


def teleport_moment(cfg, W0, data):
    """The protocol's teleport moment: 8 teleports on batches of 200, 10 steps, all seeds, the
    optimizer state reset after each (teleport_optimization.py's teleport arm, its ascent step compiled
    when COMPILE)."""
    W, opt = copy_model(cfg, W0, list(range(W0[0].shape[0])), fused=True)
    tele = dict(objective=make_objective("grad_norm", ACT), action=GLAction(46), steps=10, lr=5e-2, stop_above=100.0,
                compile=cfg["COMPILE"])
    arm = Arm("teleport", "teleport", "reset", teleport=tele)
    hook = ArmHook(W, opt, data, ACT, [arm], Moments((0,), 8, 200, 0))
    for i in range(8):
        hook(0, i)


def protocol_estimate(med, cfg, n):
    """Seconds for the whole Figure-5 protocol on 50,000 images (40 epochs, N_RUNS seeds batched,
    one model per arm) from the measured epochs: per optimizer, n_arms epochs of its fused step
    scaled to 50,000 images, plus its teleport moment once per arm that teleports (the
    random-teleport arm's move is cheap and not counted). {arms: seconds} for 2 and 6 arms."""
    scale, out = 50000 / n, {}
    for arms, teleporting in ((2, 1), (6, 3)):
        out[arms] = sum(arms * 40 * med[f"fused-{o}"] * scale + teleporting * med["teleport"] for o in PROTOCOL_LRS)
    return out


def main(cfg):
    check_choice("dataset", cfg["DATASET"], ("MNIST", "FashionMNIST"))
    check_choice("optimizer", cfg["OPTIMIZER"], PROTOCOL_LRS)
    check_positive("lr", cfg["LR"])
    check_positive("repeats", cfg["REPEATS"], allow_zero=False)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    data = load(cfg["DATASET"], cfg["DATA_DIR"], "cpu", cfg["TRAIN_SIZE"], 0)
    W0 = init_mlp(WIDTHS, [(r + 1) * 54321 for r in range(cfg["N_RUNS"])])
    tmp = tempfile.TemporaryDirectory()
    loader = textbook_loader(cfg, data, tmp.name)
    W0_arms = [w.repeat(6, 1, 1) for w in W0]  # 6 arms x the seeds, arm-major, as lib.arms.branch
    ways = {"textbook": lambda: textbook_epoch(cfg, loader, W0),
            "preloaded": lambda: preloaded_epoch(cfg, data, W0),
            "per-seed": lambda: engine_epoch(cfg, W0, data, batched=False),
            "batched": lambda: engine_epoch(cfg, W0, data, batched=True),
            "compiled": lambda: engine_epoch(cfg, W0, data, batched=True, compile=True),
            "fused": lambda: engine_epoch(cfg, W0, data, batched=True, compile=cfg["COMPILE"], fused=True),
            "arms": lambda: engine_epoch(cfg, W0_arms, data, batched=True, compile=cfg["COMPILE"], fused=True),
            "teleport": lambda: teleport_moment(cfg, W0, data)}
    for o in PROTOCOL_LRS:  # the fused step of every optimizer of the protocol, for the estimate
        if o != cfg["OPTIMIZER"]:
            ways[f"fused-{o}"] = lambda o=o: engine_epoch({**cfg, "LR": PROTOCOL_LRS[o]}, W0, data, batched=True,
                                                          compile=cfg["COMPILE"], fused=True, optimizer=o)
    if not cfg["COMPILE"]:
        del ways["compiled"]
    for f in ways.values():  # one untimed round: one-off costs (first kernels, the compile) stay out of the timing
        f()
    times, cpu, losses = {k: [] for k in ways}, {k: [] for k in ways}, {}
    load_avg = os.getloadavg()[0]
    for _ in range(cfg["REPEATS"]):
        for name, f in ways.items():  # interleaved
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = f()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    load_avg = (load_avg + os.getloadavg()[0]) / 2
    med = {k: float(np.median(v)) for k, v in times.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}  # this process's CPU time: less hit by others' load
    med[f"fused-{cfg['OPTIMIZER']}"] = med["fused"]
    K, n = cfg["N_RUNS"], len(data.y_train)
    print(f"{data.label}: {n} training images, {K} seeds, {cfg['OPTIMIZER']}, batch {cfg['BATCH_SIZE']}, "
          f"threads {torch.get_num_threads()}, median of {cfg['REPEATS']} interleaved repeats, "
          f"load average {load_avg:.1f}")
    engines = [w for w in ("textbook", "preloaded", "per-seed", "batched", "compiled", "fused", "arms") if w in ways]
    models = {name: 6 * K if name == "arms" else K for name in engines}  # models trained per timed epoch
    per = {name: med[name] / models[name] * K for name in engines}  # seconds per epoch of K seed-epochs
    per_cpu = {name: med_cpu[name] / models[name] * K for name in engines}
    steps = -(-n // cfg["BATCH_SIZE"])
    for name in engines:
        print(f"{name:>9}: {per[name]:8.3f} s per epoch of {K} seeds, {per[name] / K:7.4f} s per seed-epoch, "
              f"{per[name] / steps / K * 1e6:6.1f} us per model-step, vs textbook {per['textbook'] / per[name]:5.1f}x, "
              f"vs preloaded {per['preloaded'] / per[name]:5.1f}x (CPU time: {per_cpu[name] / steps / K * 1e6:6.1f} us "
              f"per model-step, {per_cpu['textbook'] / per_cpu[name]:5.1f}x, {per_cpu['preloaded'] / per_cpu[name]:5.1f}x)")
    for o in PROTOCOL_LRS:
        print(f"fused step, {o:>8}: {med[f'fused-{o}'] / steps * 1e6:7.1f} us per step of {K} models "
              f"(CPU time {med_cpu.get(f'fused-{o}', med_cpu['fused']) / steps * 1e6:7.1f} us)")
    epoch50k, epoch50k_cpu = med["fused"] * 50000 / n, med_cpu["fused"] * 50000 / n
    print(f" teleport: {med['teleport']:8.3f} s per teleport moment (8 x 200 images, 10 steps, {K} seeds) = "
          f"{med['teleport'] / epoch50k:.3f} of one fused 50,000-image epoch ({epoch50k:.2f} s, from the step time; "
          f"CPU time {med_cpu['teleport']:.3f} s = {med_cpu['teleport'] / epoch50k_cpu:.3f} of {epoch50k_cpu:.2f} s)")
    est, est_cpu = protocol_estimate(med, cfg, n), protocol_estimate(
        {**med_cpu, f"fused-{cfg['OPTIMIZER']}": med_cpu["fused"]}, cfg, n)
    print(f"Figure-5 protocol on 50,000 images (4 optimizers x 40 epochs x {K} seeds), estimated: "
          + ", ".join(f"{a} arms {v:.0f} s (CPU time {est_cpu[a]:.0f} s)" for a, v in est.items()))
    gap = max(abs(a - b) for name in engines[1:] for a, b in zip(losses[name], losses["textbook"]))
    print(f"per-seed epoch losses: textbook {np.round(losses['textbook'], 5).tolist()}; "
          f"max |difference| of the others: {gap:.2e}")
    path = save_json(os.path.join(cfg["OUT_DIR"], "bench_training.json"),
                     {"config": {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])},
                      "environment": environment(), "load_average": load_avg, "seconds_per_epoch_median": med,
                      "cpu_seconds_per_epoch_median": med_cpu,
                      "us_per_step": {k: v / steps * 1e6 for k, v in med.items() if k != "teleport"},
                      "us_per_model_step": {k: v / steps / K * 1e6 for k, v in per.items()},
                      "speedup_vs_textbook": {k: per["textbook"] / v for k, v in per.items()},
                      "speedup_vs_preloaded": {k: per["preloaded"] / v for k, v in per.items()},
                      "protocol_estimate_s_50k": {f"{a} arms": v for a, v in est.items()},
                      "protocol_estimate_cpu_s_50k": {f"{a} arms": v for a, v in est_cpu.items()},
                      "epoch_losses": {k: v for k, v in losses.items() if k != "teleport"}, "max_loss_gap": gap})
    print(f"wrote {path}")
    return med, losses


if __name__ == "__main__":
    run(main, globals())
