"""Speed of one meta-training trajectory of Figure 6 (learn-to-teleport/multi_layer_regression.py,
Algorithm 1: 100 steps, unrolls of 10, LSTM(update,tele) with hidden 300), two ways in one process,
interleaved trajectory by trajectory (the machine's speed drifts; others share the CPU), after one
untimed trajectory of each:

  textbook  written out here as most research code would: per meta-optimizer two stacked
            torch.nn.LSTMCell and nn.Linear heads, the gradients of the regression by
            torch.autograd.grad, g^-1 by torch.linalg.inv and X^+ by torch.linalg.pinv every step,
            the meta-loss back-propagated by autograd through the unroll, torch.optim.Adam;
  ours      _meta.trajectory with BACKPROP='manual' (the run's default): the same algorithm with the
            back-propagation through the unroll written out (_meta.Unroll), fused Adam.

Both start from the same LSTM weights (multi_layer_regression.make_nets) and train on the same
problems in the same order, each with its own Adam, so they follow the same meta-training. Their
losses agree to rounding over the first unroll (10 steps, before any Adam step): ~1e-6 in float32,
~1e-13 in float64 (CHECK_FLOAT64). After that the difference grows ~10x per Adam step, in float64
too and between our two own meta-gradient paths as well (BACKPROP manual vs autograd: 5e-14 after
the first unroll, 1e-1 after the tenth): Adam divides each gradient by its own size, so
rounding-sized gradients (the saturated gates of an LSTM reading raw gradients of ~1e4) take
lr-sized steps. The printed differences are therefore the first unroll's; the whole trajectory's
are recorded in the JSON.

    OMP_NUM_THREADS=1 python benchmarks/bench_learn_to_teleport.py
    python benchmarks/bench_learn_to_teleport.py --quick    # hidden 32, 2 trajectories

CPU runtime: under a minute (2 shared cores). Measured (one thread) at load average 2.1: textbook
0.470 and 0.513 s, ours 0.165 and 0.169 s per trajectory, 2.84x and 3.03x (CPU time 2.81x, 3.01x;
--method=update: 0.243 s against 0.077 s, 3.16x); at load 2.7-3.1: 2.4-3.05x (CPU time
2.45-2.9x): the memory-bound steps swing with what the other jobs stream. Before the
layer-by-layer LSTM backward and torch.bmm for the 20 x 20 products: 2.3-2.5x at load 1.5-4,
1.9-2.1x at load 9-11 (--method=update 2.8-3.0x); the change alone, interleaved in one process:
4-5% less CPU time per trajectory. At hidden 16 (--hidden=16, all small kernels): 0.034 s against
0.091 s. First unroll's losses equal to 1.2e-5 (float32) and 3e-14 (float64). More in the README
(Figure 6).

Outputs: OUT_DIR/bench_learn_to_teleport.json (the resolved config, the environment, seconds per
trajectory each way, their ratio, the losses and their largest relative difference); OUT_DIR
defaults to runs/bench (git-ignored), never the committed results/. The numbers are also printed.
"""
import importlib.util
import os
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lib.config import UsageError, check_choice, check_positive, resolve, run  # noqa: E402
from lib.io import environment, relative, save_json  # noqa: E402

# ---- config -----------------------------------------------------------------------------------
METHOD = "update_tele"     # update_tele (m1 and m2), update (m1) or lr_tele (m2 with the step size)
N_TRAJ = 5                 # timed trajectories per way (interleaved), after one untimed each
HIDDEN = 300               # LSTM hidden size (the paper's 300)
CHECK_FLOAT64 = True       # also run one trajectory each way in float64: losses equal to ~1e-12
THREADS = 1                # torch CPU threads (the machine is shared)
OUT_DIR = "runs/bench"     # bench_learn_to_teleport.json goes here (git-ignored by default)
# ------------------------------------------------------------------------------------------------
QUICK_SETTINGS = {"N_TRAJ": 2, "HIDDEN": 32}

_spec = importlib.util.spec_from_file_location(
    "multi_layer_regression", os.path.join(ROOT, "learn-to-teleport", "multi_layer_regression.py"))
mlr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlr)
meta = sys.modules["_meta"]  # the script put its folder on sys.path


# The textbook way
class TextbookLSTM(nn.Module):
    """Two stacked nn.LSTMCell reading the flattened gradient, linear heads on the top one."""

    def __init__(self, n_in, hidden, heads):
        super().__init__()
        self.cell1, self.cell2 = nn.LSTMCell(n_in, hidden), nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in heads.items()})

    def forward(self, x, state):
        (h1, c1), (h2, c2) = state
        h1, c1 = self.cell1(x, (h1, c1))
        h2, c2 = self.cell2(h1, (h2, c2))
        return {k: head(h2) for k, head in self.heads.items()}, ((h1, c1), (h2, c2))


def textbook_nets(nets):
    """TextbookLSTMs with the weights of the run's MetaLSTMs `nets`."""
    out = {}
    for k, net in nets.items():
        t = TextbookLSTM(net.cells[0].input_size, net.hidden, {h: m.out_features for h, m in net.heads.items()})
        t.cell1.load_state_dict(net.cells[0].state_dict())
        t.cell2.load_state_dict(net.cells[1].state_dict())
        t.heads.load_state_dict(net.heads.state_dict())
        out[k] = t.to(net.cells[0].weight_ih.dtype)
    return out


def regression_loss(W1, W2, X, Y, slope):
    """0.5 ||Y - W2 s(W1 X)||^2 in column form: X, Y (d, n)."""
    return 0.5 * (W2 @ nn.functional.leaky_relu(W1 @ X, slope) - Y).pow(2).sum()


def textbook_trajectory(method, nets, opt, W1, W2, X, Y, cfg):
    """One trajectory (K = 1) of Algorithm 1, autograd throughout. W1, W2, X, Y: (d, d) with X, Y
    in column form. Returns the STEPS losses L(w_1), ..., L(w_STEPS)."""
    d, slope, tau, losses = W1.shape[0], cfg["SLOPE"], cfg["T_NORM"], []
    eye = torch.eye(d, dtype=W1.dtype)
    states = {k: [(torch.zeros(1, net.cell1.hidden_size, dtype=W1.dtype),) * 2] * 2 for k, net in nets.items()}
    for _ in range(cfg["STEPS"] // cfg["UNROLL"]):
        W1, W2 = W1.detach(), W2.detach()
        states = {k: [tuple(s.detach() for s in hc) for hc in v] for k, v in states.items()}
        meta_loss = 0.0
        for _ in range(cfg["UNROLL"]):
            w1, w2 = W1.detach().requires_grad_(), W2.detach().requires_grad_()
            g1, g2 = torch.autograd.grad(regression_loss(w1, w2, X, Y, slope), [w1, w2])
            if "m1" in nets:
                out, states["m1"] = nets["m1"](torch.cat([g1.flatten(), g2.flatten()])[None], states["m1"])
                f = out["f"].view(2, d, d)
                W1, W2 = W1 + f[0], W2 + f[1]
            if "m2" in nets:
                out, states["m2"] = nets["m2"](torch.cat([g2.flatten(), g1.flatten()])[None], states["m2"])
                if method == "lr_tele":
                    eta = out["eta"].clamp(*cfg["STEP_CLAMP"])[0, 0]
                    W1, W2 = W1 - eta * g1, W2 - eta * g2
                T = out["T"].view(d, d)
                g = eye + T / T.norm() * tau  # eq. (54): W2 <- W2 g^-1, W1 <- s^-1(g s(W1 X)) X^+
                h = g @ nn.functional.leaky_relu(W1 @ X, slope)
                W1 = torch.where(h > 0, h, h / slope) @ torch.linalg.pinv(X)
                W2 = W2 @ torch.linalg.inv(g)
            loss = regression_loss(W1, W2, X, Y, slope)
            meta_loss = meta_loss + loss
            losses.append(loss.item())
        opt.zero_grad()
        meta_loss.backward()
        opt.step()
    return losses


# The benchmark
def run_cfg(cfg, dtype):
    """The run's resolved config with the benchmark's hidden size and dtype."""
    return {**resolve(mlr, ["--progress=False"]), "HIDDEN": cfg["HIDDEN"], "DTYPE": dtype}


def setup(cfg, dtype):
    """Both ways from the same initial weights: (run config, ours: nets and fused Adam,
    textbook: nets and torch.optim.Adam)."""
    rc = run_cfg(cfg, dtype)
    ours = mlr.make_nets(cfg["METHOD"], rc)
    book = textbook_nets(ours)
    lr = {k: rc["M1_LR"] if k == "m1" else rc["M2_LR"] for k in book}
    book_opt = torch.optim.Adam([{"params": n.parameters(), "lr": lr[k]} for k, n in book.items()])
    return rc, (ours, meta.meta_adam(ours, rc)), (book, book_opt)


def one_each(cfg, rc, ours, book, seed, times):
    """One trajectory each way on the problem of `seed`, timed (wall and this process's CPU
    time: on a shared machine the CPU time is the steadier measure); returns their losses."""
    act = mlr.Activation(rc["SLOPE"])
    t0, c0 = time.perf_counter(), time.process_time()
    W, X, Y = mlr.draw_problems([seed], rc)
    L_ours, bad = meta.trajectory(cfg["METHOD"], *ours, W, X, Y, act, rc)
    times["ours"].append(time.perf_counter() - t0)
    times["ours_cpu"].append(time.process_time() - c0)
    if bad is not None:
        raise RuntimeError(f"ours: non-finite meta-loss at step {bad}")
    t0, c0 = time.perf_counter(), time.process_time()
    W, X, Y = mlr.draw_problems([seed], rc)
    L_book = textbook_trajectory(cfg["METHOD"], *book, W[0][0], W[1][0], X[0].T, Y[0].T, rc)
    times["textbook"].append(time.perf_counter() - t0)
    times["textbook_cpu"].append(time.process_time() - c0)
    return L_ours[:, 0].tolist(), L_book


def max_rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main(cfg):
    check_positive("N_TRAJ", cfg["N_TRAJ"], allow_zero=False)
    check_positive("HIDDEN", cfg["HIDDEN"], allow_zero=False)
    check_positive("THREADS", cfg["THREADS"], allow_zero=False)
    check_choice("METHOD", cfg["METHOD"], ("update_tele", "update", "lr_tele"))
    if cfg["METHOD"] == "lr_tele":
        raise UsageError("METHOD: the textbook way here has only the clamp step of lr_tele; time update_tele or update")
    torch.set_num_threads(cfg["THREADS"])
    rc, ours, book = setup(cfg, "float32")
    seeds = [rc["TRAIN_SEED"] + i for i in range(cfg["N_TRAJ"] + 1)]
    times, losses = {k: [] for k in ("ours", "textbook", "ours_cpu", "textbook_cpu")}, []
    for i, s in enumerate(seeds):  # the first of each is untimed
        losses.append(one_each(cfg, rc, ours, book, s, times))
        print(f"trajectory {i}{' (untimed)' if i == 0 else ''}: textbook {times['textbook'][-1]:.3f} s "
              f"(CPU {times['textbook_cpu'][-1]:.3f}), ours {times['ours'][-1]:.3f} s "
              f"(CPU {times['ours_cpu'][-1]:.3f}), "
              f"ratio {times['textbook'][-1] / times['ours'][-1]:.2f}x (CPU "
              f"{times['textbook_cpu'][-1] / times['ours_cpu'][-1]:.2f}x)", flush=True)
    t = {k: float(np.median(v[1:])) for k, v in times.items()}
    res = {"config": {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"])}, "environment": environment(),
           "load_average": os.getloadavg(), "seconds_per_trajectory": t, "times": times,
           "speedup": t["textbook"] / t["ours"], "speedup_cpu": t["textbook_cpu"] / t["ours_cpu"],
           "losses_float32": losses, "max_rel_diff_first_unroll": max_rel(*(L[:rc["UNROLL"]] for L in losses[0])),
           "max_rel_diff_first_trajectory": max_rel(*losses[0])}
    if cfg["CHECK_FLOAT64"]:
        rc64, ours64, book64 = setup(cfg, "float64")
        L = one_each(cfg, rc64, ours64, book64, seeds[0], {k: [] for k in times})
        res["losses_float64"] = L
        res["max_rel_diff_float64_first_unroll"] = max_rel(*(x[:rc["UNROLL"]] for x in L))
        res["max_rel_diff_float64_first_trajectory"] = max_rel(*L)
    print(f"\nmedian s per trajectory ({cfg['METHOD']}, hidden {cfg['HIDDEN']}, {cfg['N_TRAJ']} timed, "
          f"load average {os.getloadavg()[0]:.1f}): textbook {t['textbook']:.3f}, ours {t['ours']:.3f}, "
          f"speed-up {res['speedup']:.2f}x; CPU time {t['textbook_cpu']:.3f} vs {t['ours_cpu']:.3f}, "
          f"{res['speedup_cpu']:.2f}x")
    print(f"losses of the first unroll (before any Adam step), largest relative difference: "
          f"{res['max_rel_diff_first_unroll']:.1e} in float32"
          + (f", {res['max_rel_diff_float64_first_unroll']:.1e} in float64" if cfg["CHECK_FLOAT64"] else "")
          + f"; over the first trajectory (10 Adam steps amplify rounding): {res['max_rel_diff_first_trajectory']:.1e}")
    save_json(os.path.join(cfg["OUT_DIR"], "bench_learn_to_teleport.json"), res)
    return res


if __name__ == "__main__":
    run(main, globals())
