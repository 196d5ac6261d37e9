"""Speed of one teleport moment of the Figure-5 protocol (8 teleports, each 10 gradient-ascent steps of
||grad L||^2 over g = I + T with eq. (46) on all layer pairs, on 200 fresh training images; 5 seeds of
the 784-16-10-10 MLP), several ways in one run, interleaved, after one untimed round of each:

  textbook  the authors' style: one model at a time, autograd for ||grad L||^2 (create_graph) and its
            gradient in T through eq. (46) with torch.linalg.pinv (an SVD and its backward per pair
            and step);
  generic   lib.teleport.teleport's general path (all models at once, autograd through
            lib.actions.GLAction(46) and pinv): what teleport_optimization.py ran before;
  fast      lib.teleport.teleport's fast path: the ascent gradient in closed form at T = 0 (the chain
            rule through eq. (46)'s linear maps from one backward of ||grad L||^2 in (W_1 X^T, W_2,
            W_3); no autograd through a pseudo-inverse, X X^T instead of the 784-wide input),
            sigma(z)^+ = A^T (A A^T)^-1 from a float64 Cholesky factor (pinv_rows), all steps of a
            teleport without a host sync, W_1 moved once at the end, pre-activations in the paper's
            column form (units x batch: the small products' outputs are 200 wide);
  compiled  the fast path with each whole step (ascent, stop rule, move) one torch.compile graph
            (COMPILE).

All start from the same weights and teleport on the same 8 batches; the final weights and objectives
of every way (float32) are compared with the textbook way run in float64. Also: one training step of the Figure-5 engine (the
fused, compiled step of teleport_optimization.py), to put the moment against a 50,000-image epoch
(2,500 steps), and the error of pinv_rows against torch.linalg.pinv on the moment's matrices
sigma(z) (16 x 200 and 10 x 200), in float32 and float64, against a float64 pinv.

    OMP_NUM_THREADS=1 python benchmarks/bench_teleport.py     # bundled 4,000-image MNIST subset
    python benchmarks/bench_teleport.py --quick

CPU runtime: about 1-3 minutes (2 cores; the compile ~30 s of it, before the timing; seconds with a warm
inductor cache).

Outputs: OUT_DIR/bench_teleport.json (resolved config, environment, load average, median seconds per
way, ratios, agreement, pinv errors); OUT_DIR defaults to runs/bench (git-ignored). Also printed.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.actions import GLAction  # noqa: E402
from lib.config import check_choice, check_positive, run  # noqa: E402
from lib.data import load  # noqa: E402
from lib.io import environment, relative, save_json  # noqa: E402
from lib.models import Activation, forward, init_mlp  # noqa: E402
from lib.teleport import make_objective, pinv_rows, teleport  # noqa: E402
from lib.train import make_model, train_epoch  # noqa: E402

# ---- config (override any with --NAME=value) ----------------------------------------------------
DATASET = "MNIST"          # MNIST or FashionMNIST (lib.data.load)
N_RUNS = 5                 # seeds (r+1)*54321, as teleport_optimization.py
TRAIN_SIZE = 50000         # seeded training subset (all images if fewer)
TELE_BATCHES = 8           # teleports per moment
TELE_BATCH_SIZE = 200      # images per teleport
TELE_STEPS = 10            # ascent steps per teleport
TELE_LR = 5e-2             # teleport step size (momentum / RMSProp / Adam preset)
STOP_ABOVE = 100.0         # a model stops once ||grad L||^2 exceeds this
REPEATS = 3                # interleaved repeats; medians are reported
COMPILE = True             # also time the compiled fast path (compiled once, before the timing)
DATA_DIR = "data"          # datasets in torchvision's layout; MNIST falls back to the bundled subset
OUT_DIR = "runs/bench"     # bench_teleport.json goes here (git-ignored by default)
# --------------------------------------------------------------------------------------------------
QUICK_SETTINGS = {"REPEATS": 1, "N_RUNS": 2, "TRAIN_SIZE": 1000, "TELE_BATCHES": 2, "COMPILE": False}
WIDTHS = [784, 16, 10, 10]
ACT = Activation(0.1)


def textbook_action(Ws, Ts, X):
    """Eq. (46) on every pair of one model (weights (out, in)), g = I + T, with torch.linalg.pinv."""
    hs, h = [X.T], X.T
    for w in Ws[:-1]:
        h = F.leaky_relu(w @ h, ACT.slope)
        hs.append(h)
    new = list(Ws)
    for m, T in enumerate(Ts):
        g = torch.eye(T.shape[0], dtype=T.dtype) + T
        z = Ws[m] @ hs[m]
        new[m] = g @ new[m]
        new[m + 1] = new[m + 1] @ (F.leaky_relu(z, ACT.slope) @ torch.linalg.pinv(F.leaky_relu(g @ z, ACT.slope)))
    return new


def textbook_grad_norm(Ws, X, Y):
    out = X
    for j, w in enumerate(Ws):
        out = out @ w.T
        out = F.leaky_relu(out, ACT.slope) if j < len(Ws) - 1 else out
    grads = torch.autograd.grad(F.cross_entropy(out, Y), Ws, create_graph=True)
    return sum(g.pow(2).sum() for g in grads)


def textbook_moment(cfg, W0, batches):
    """The authors' way: each model alone, each teleport step by autograd through the action."""
    finals, objs = [], []
    for k in range(W0[0].shape[0]):
        Ws = [w[k].clone() for w in W0]
        for X, Y in batches:
            for _ in range(cfg["TELE_STEPS"]):
                Ts = [torch.zeros(w.shape[0], w.shape[0], dtype=w.dtype, requires_grad=True) for w in Ws[:-1]]
                obj = textbook_grad_norm([w.requires_grad_() if not w.requires_grad else w
                                          for w in textbook_action([w.detach() for w in Ws], Ts, X)], X, Y)
                if obj.item() > cfg["STOP_ABOVE"]:
                    break
                steps = torch.autograd.grad(obj, Ts)
                Ws = [w.detach() for w in textbook_action([w.detach() for w in Ws],
                                                          [cfg["TELE_LR"] * s for s in steps], X)]
        finals.append(Ws)
        objs.append(textbook_grad_norm([w.detach().requires_grad_() for w in Ws], *batches[-1]).item())
    return [torch.stack(ws) for ws in zip(*finals)], objs


def lib_moment(cfg, W0, batches, generic=False, compile=False):
    """lib.teleport.teleport on all models at once: its fast path, or (generic=True) the general path."""
    obj = make_objective("grad_norm", ACT)
    if generic:
        obj = (lambda f: lambda W, X, Y: f(W, X, Y))(obj)  # no .fast attribute: the general path
    W = [w.clone() for w in W0]
    for X, Y in batches:
        W, rec, _ = teleport(W, X, Y, ACT, obj, GLAction(46), steps=cfg["TELE_STEPS"], lr=cfg["TELE_LR"],
                             stop_above=cfg["STOP_ABOVE"], compile=compile)
    return W, rec["objective_after"]


def training_step_s(cfg, W0, data, n=200):
    """Seconds per fused, compiled training step of the N_RUNS batched models (adagrad), median of 3:
    (wall, this process's CPU time)."""
    W, opt = make_model(WIDTHS, [0] * W0[0].shape[0], "adagrad", 1e-2, batched_optimizer=True)
    X, Y = data.x_train[:n * 20], data.y_train[:n * 20]
    train_epoch(W, opt, X[:40], Y[:40], ACT, 20, compile=cfg["COMPILE"])
    times = []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        train_epoch(W, opt, X, Y, ACT, 20, compile=cfg["COMPILE"])
        times.append(((time.perf_counter() - t0) / (X.shape[0] // 20), (time.process_time() - c0) / (X.shape[0] // 20)))
    return tuple(float(x) for x in np.median(times, axis=0))


def pinv_errors(W0, batches):
    """Max relative error (Frobenius, per model) of sigma(z)^+ against a float64 pinv, for both pairs
    of every model on every batch: torch.linalg.pinv and pinv_rows, in float32 and in float64."""
    errs = {k: 0.0 for k in ("pinv float32", "pinv_rows float32", "pinv_rows float64")}
    for X, _ in batches:
        z = forward(W0[:1], X, ACT)
        for m in range(len(W0) - 1):
            A = ACT(z).mT
            ref = torch.linalg.pinv(A.double())
            rel = lambda P: ((P.double() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()  # noqa: E731
            for k, P in (("pinv float32", torch.linalg.pinv(A)), ("pinv_rows float32", pinv_rows(A)[0]),
                         ("pinv_rows float64", pinv_rows(A.double())[0])):
                errs[k] = max(errs[k], rel(P))
            z = ACT(z) @ W0[m + 1].mT
    return errs


def main(cfg):
    check_choice("dataset", cfg["DATASET"], ("MNIST", "FashionMNIST"))
    for k in ("REPEATS", "N_RUNS", "TELE_BATCHES", "TELE_BATCH_SIZE", "TELE_STEPS"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    data = load(cfg["DATASET"], cfg["DATA_DIR"], "cpu", cfg["TRAIN_SIZE"], 0)
    W0 = init_mlp(WIDTHS, [(r + 1) * 54321 for r in range(cfg["N_RUNS"])])
    gen, b = torch.Generator().manual_seed(0), cfg["TELE_BATCH_SIZE"]
    batches = [(data.x_train[i], data.y_train[i]) for i in
               (torch.randperm(len(data.y_train), generator=gen)[:b] for _ in range(cfg["TELE_BATCHES"]))]
    ways = {"textbook": lambda: textbook_moment(cfg, W0, batches),
            "generic": lambda: lib_moment(cfg, W0, batches, generic=True),
            "fast": lambda: lib_moment(cfg, W0, batches),
            "compiled": lambda: lib_moment(cfg, W0, batches, compile=True)}
    if not cfg["COMPILE"]:
        del ways["compiled"]
    for f in ways.values():  # untimed: first calls, the compile
        f()
    load_avg, times, cpu, out = os.getloadavg()[0], {k: [] for k in ways}, {k: [] for k in ways}, {}
    for _ in range(cfg["REPEATS"]):
        for name, f in ways.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out[name] = f()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    step, step_cpu = training_step_s(cfg, W0, data)
    load_avg = (load_avg + os.getloadavg()[0]) / 2
    med = {k: float(np.median(v)) for k, v in times.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}  # this process's CPU time: less hit by others' load
    epoch50k, epoch50k_cpu = step * 50000 / 20, step_cpu * 50000 / 20
    # the float64 reference: the textbook teleport in float64 (pinv's derivative exact to ~1e-13 there)
    with_dtype = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    ref_W, ref_obj = textbook_moment(cfg, [w.double() for w in W0], [tuple(map(with_dtype, b)) for b in batches])
    agree = {k: {"weights": max(((a - b.double()).norm() / a.norm()).item() for a, b in zip(ref_W, W)),
                 "objective": float(np.max(np.abs(np.subtract(o, ref_obj)) / np.abs(ref_obj)))}
             for k, (W, o) in out.items()}
    print(f"{data.label}: {cfg['N_RUNS']} seeds, {cfg['TELE_BATCHES']} teleports x {b} images x "
          f"{cfg['TELE_STEPS']} steps, threads {torch.get_num_threads()}, median of {cfg['REPEATS']}, "
          f"load average {load_avg:.1f}")
    for name in ways:
        print(f"{name:>9}: {med[name]:7.3f} s per moment, {med['textbook'] / med[name]:6.1f}x the textbook, "
              f"{med[name] / epoch50k:6.3f} of a 50,000-image epoch (CPU time: {med_cpu[name]:.3f} s, "
              f"{med_cpu['textbook'] / med_cpu[name]:.1f}x, {med_cpu[name] / epoch50k_cpu:.3f} of an epoch); vs float64: weights {agree[name]['weights']:.1e}, "
              f"objective {agree[name]['objective']:.1e} (relative)")
    print(f"training step (fused, compiled, {cfg['N_RUNS']} models): {step * 1e6:.0f} us (CPU time {step_cpu * 1e6:.0f} us)"
          f" -> a 50,000-image epoch {epoch50k:.2f} s (CPU time {epoch50k_cpu:.2f} s)")
    errs = pinv_errors(W0, batches)
    print("sigma(z)^+ vs float64 pinv, max relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    path = save_json(os.path.join(cfg["OUT_DIR"], "bench_teleport.json"),
                     {"config": {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"]), "DATA_DIR": relative(cfg["DATA_DIR"])},
                      "environment": environment(), "load_average": load_avg, "seconds_per_moment_median": med,
                      "cpu_seconds_per_moment_median": med_cpu,
                      "speedup_vs_textbook": {k: med["textbook"] / v for k, v in med.items()},
                      "training_step_s": step, "training_step_cpu_s": step_cpu, "epoch_50k_s": epoch50k,
                      "moment_over_epoch_50k": {k: v / epoch50k for k, v in med.items()},
                      "moment_over_epoch_50k_cpu": {k: v / epoch50k_cpu for k, v in med_cpu.items()},
                      "relative_error_vs_float64_textbook": agree, "pinv_relative_errors": errs})
    print(f"wrote {path}")
    return med


if __name__ == "__main__":
    run(main, globals())
