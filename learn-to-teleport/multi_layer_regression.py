"""Figure 6 (Section 5.2, Algorithm 1): meta-optimizers that learn both the local update and
the teleportation, on a two-layer regression L(W1, W2) = 0.5 ||Y - W2 s(W1 X)||^2.

    python learn-to-teleport/multi_layer_regression.py  # --quick: < 1 min; --test-only; --plot-only

GD (--lr=3e-4) and the LSTMs of _meta.py, LSTM(update), LSTM(lr,tele), LSTM(update,tele) (w <-
g_t . (w + f_t), g_t = I + T_t by eq. 54), meta-trained on 600, 30, 700 trajectories, tested on 5
unseen ones. Committed run on a CPU (one thread, 2 cores shared with other jobs, load average
2-3): meta-training 207 s (0.22 s per LSTM(update,tele) trajectory, 0.086 s per LSTM(update) one;
the run before, at load 1.2-3, 192 s; 652 s at load 6-10; 2.8-3.0x faster per trajectory than a
textbook LSTMCell/autograd/Adam implementation at load 2: benchmarks/bench_learn_to_teleport.py).
Loss after 30 steps: LSTM(update,tele) 17.7 +- 0.8, LSTM(update) 17.7 +- 0.8, GD 41 +- 10, and
LSTM(update,tele) with its teleport switched off at test time 17.7 +- 0.9: the teleports add
nothing; the learned update does it all.
LSTM(lr,tele) sticks at the 1e-7 step under the authors' hard clamp (4.3e5); --eta-param=sigmoid
keeps it alive.
Choices (each stated again where it is made):
- each LSTM reads the whole gradient as one vector, as the authors' code (per coordinate: ~800x);
- the gradients enter the LSTMs as constants (no second derivatives), as the authors' code;
- the loss has the authors' factor 0.5 (the paper's ||.||^2 lacks it); GD's 3e-4 is tuned with it;
- Adam lrs 1e-3 (m1), 1e-4 (m2) as the authors' code, which made Figure 6 (the paper swaps them);
- g^-1 is exact (to rounding: the Neumann series to below the dtype's eps, or torch.linalg.inv with
  --backprop=autograd); --inverse=neumann gives the authors' first-order W2 (I - T);
- the meta-gradient is back-propagated by hand (_meta.Unroll, --backprop=manual: the same numbers
  as torch autograd, --backprop=autograd, to 1e-10 in float64, and faster).

Outputs: OUT_DIR/figures/multi_layer_loss.png, multi_layer_loss_vs_time.png (teleport-off control
dashed), multi_layer_meta_training.png; OUT_DIR/results/multi_layer_regression.json (config,
environment, test curves, diverged trajectories, meta-training histories), meta_opt_<method>.pt (the
LSTMs as plain tensors, for --test-only): a set, moved into place when the run completes; progress
in OUT_DIR/.progress/ (the same command resumes). OUT_DIR: learn-to-teleport/; --quick: runs/quick.
"""
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # lib/, and _meta.py beside this script
from _meta import MetaLSTM, Unroll, flat_state, load_nets, train, update  # noqa: E402
from lib.config import UsageError, check_choice, check_positive, run  # noqa: E402
from lib.io import (check_replace, environment, load_json, load_results, load_tensors, relative,  # noqa: E402
                    save_json, save_tensors, staged)
from lib.models import Activation, loss_and_grads  # noqa: E402
from lib.plots import BASELINE, TELEPORT, plot_mean_std, save_figure  # noqa: E402
from lib.progress import Checkpoint  # noqa: E402
from lib.report import diverged, finite_stats, markdown_table  # noqa: E402

# ---- config
WIDTH = 20                   # d: W1, W2, X (d x n), Y all 20 x 20, entries uniform on [0, 1]
SLOPE = 0.1                  # LeakyReLU negative slope, > 0 (invertible, needed by eq. 54)
STEPS = 100                  # steps per training trajectory
TEST_STEPS = 100             # steps per test trajectory
UNROLL = 10                  # steps per truncated back-propagation unroll (loss summed over it)
HIDDEN = 300                 # hidden size of m1 (update) and m2 (teleport), 2 LSTM layers each
LR_TELE_HIDDEN = 20          # hidden size of the LSTM(lr,tele) meta-optimizer (authors' code: 20)
N_TRAIN_UPDATE_TELE = 700    # training trajectories for LSTM(update,tele)
N_TRAIN_UPDATE = 600         # training trajectories for LSTM(update)
N_TRAIN_LR_TELE = 30         # training trajectories for LSTM(lr,tele)
N_TEST = 5                   # unseen test trajectories per method
BATCH = 1                    # trajectories per meta-optimizer batch (1 = authors' sequential training)
T_NORM = 0.01                # Frobenius norm of every Lie-algebra element T
LR = 3e-4                    # learning rate of the GD baseline (largest non-diverging with the loss's
                             # factor 0.5, which the authors' code has and the paper's ||.||^2 not)
PAPER_META_LRS = False       # Adam lrs M1_LR, M2_LR left None: False = the authors' code, which made
                             # Figure 6; True = the paper's text, which swaps them
M1_LR = None                 # Adam lr of m1, the update LSTM
M2_LR = None                 # Adam lr of m2, the teleport LSTM, and of LSTM(lr,tele)
STEP_CLAMP = (1e-7, 5e-3)    # LSTM(lr,tele): learned step size clamped to this range
ETA_INIT = 3e-4              # LSTM(lr,tele): initial step size (head bias; weights 0); None in this file: torch's init
ETA_PARAM = "clamp"          # LSTM(lr,tele) step: 'clamp' (authors': clamp(out, *STEP_CLAMP)) or
                             # 'sigmoid' (lo + (hi - lo) sigmoid(out): same range, never a zero gradient)
INVERSE = "exact"            # W2 <- W2 g^-1: 'exact' (torch.linalg.inv of g = I + T) or 'neumann' (first-
                             # order Neumann series (I + T)^-1 ~ I - T, the authors' code: W2 (I - T))
BACKPROP = "manual"          # meta-gradient: 'manual' (_meta.Unroll: back-propagation through the unroll
                             # written out, fused Adam; the fast one) or 'autograd' (torch autograd through
                             # _meta.update, the reference); the same algorithm, equal to rounding
TRAIN_SEED = 10000           # training trajectory i draws from seed TRAIN_SEED + i
TEST_SEED = 0                # test trajectory i draws from seed TEST_SEED + i (must not overlap)
INIT_SEED = 0                # torch seed for the LSTMs' initial weights
PLOT_STEPS = 30              # steps shown in the figures (Figure 6 shows 30)
TABLE_STEPS = [1, 5, 10, 20, 30]  # steps of the printed table (loss after that many updates)
TEST_ONLY = False            # load saved meta-optimizers from OUT_DIR/results instead of training
RETRAIN = []                 # with TEST_ONLY: methods to train anyway (e.g. ['lr_tele']), others loaded
PLOT_ONLY = False            # redraw the figures from the saved JSON
DTYPE = "float32"            # float32 or float64
THREADS = 1                  # torch CPU threads (the machine is shared)
DEVICE = "cpu"               # cpu, cuda, cuda:N or auto
OUT_DIR = ""                 # figures/ and results/ go here; "": beside this script (learn-to-teleport/)
PROGRESS = True              # tqdm bars
CHECKPOINT_S = 30.0          # save progress after at most this many seconds of work (0: every trajectory)
REPLACE = False              # True: replace saved results made with other settings
# ----
PRESETS = {"PAPER_META_LRS": {False: {"M1_LR": 1e-3, "M2_LR": 1e-4}, True: {"M1_LR": 1e-4, "M2_LR": 1e-3}}}
QUICK_SETTINGS = {"STEPS": 10, "UNROLL": 5, "TEST_STEPS": 30, "HIDDEN": 16, "LR_TELE_HIDDEN": 8,
                  "N_TRAIN_UPDATE_TELE": 3, "N_TRAIN_UPDATE": 3, "N_TRAIN_LR_TELE": 2, "N_TEST": 2}

METHODS = ("gd", "lr_tele", "update", "update_tele")
LABELS = {"gd": "GD", "lr_tele": "LSTM(lr,tele)", "update": "LSTM(update)",
          "update_tele": "LSTM(update,tele)", "update_tele_off": "LSTM(update,tele), teleport off"}
CONTROL = "update_tele_off"  # control: LSTM(update,tele)'s m1 alone, its m2 switched off at test time
METHOD_COLORS = {"gd": BASELINE, "lr_tele": "#2ca02c", "update": "#ff7f0e", "update_tele": TELEPORT, CONTROL: "k"}
DIVERGED = 1e3  # a test trajectory diverged at the first step its loss is not finite or above DIVERGED L(w_0)
N_TRAIN = {"lr_tele": "N_TRAIN_LR_TELE", "update": "N_TRAIN_UPDATE", "update_tele": "N_TRAIN_UPDATE_TELE"}
JSON_NAME = "multi_layer_regression.json"


def check(cfg):
    """One-line errors (lib.config.UsageError) for settings the run cannot use."""
    for name in ("WIDTH", "STEPS", "TEST_STEPS", "UNROLL", "HIDDEN", "LR_TELE_HIDDEN", "BATCH", "THREADS",
                 "N_TRAIN_UPDATE_TELE", "N_TRAIN_UPDATE", "N_TRAIN_LR_TELE", "N_TEST", "PLOT_STEPS",
                 "SLOPE", "LR", "M1_LR", "M2_LR"):
        check_positive(name, cfg[name], allow_zero=False)
    for name in ("T_NORM", "CHECKPOINT_S"):
        check_positive(name, cfg[name])
    for name, choices in (("INVERSE", ("exact", "neumann")), ("ETA_PARAM", ("clamp", "sigmoid")),
                          ("DTYPE", ("float32", "float64")), ("BACKPROP", ("manual", "autograd"))):
        check_choice(name, cfg[name], choices)
    for m in cfg["RETRAIN"]:
        check_choice("method in RETRAIN", m, N_TRAIN)
    if cfg["STEPS"] % cfg["UNROLL"]:
        raise UsageError(f"STEPS ({cfg['STEPS']}) must be a multiple of UNROLL ({cfg['UNROLL']})")
    lo, hi = cfg["STEP_CLAMP"]
    if not 0 < lo < hi or (cfg["ETA_INIT"] is not None and not lo < cfg["ETA_INIT"] < hi):
        raise UsageError(f"STEP_CLAMP must be 0 < low < ETA_INIT < high, got {cfg['STEP_CLAMP']}, {cfg['ETA_INIT']}")
    train_seeds = range(cfg["TRAIN_SEED"], cfg["TRAIN_SEED"] + max(cfg[v] for v in N_TRAIN.values()))
    if set(train_seeds) & set(range(cfg["TEST_SEED"], cfg["TEST_SEED"] + cfg["N_TEST"])):
        raise UsageError("training and test seeds overlap: move TEST_SEED or TRAIN_SEED")


def check_protocol(path, cfg):
    """lib.io.check_replace; TEST_ONLY, RETRAIN and BACKPROP are not other settings: they
    recompute the same protocol (BACKPROP: the same meta-gradient, another way)."""
    check_replace(path, cfg, ignore=("TEST_ONLY", "RETRAIN", "BACKPROP"))


# The problem and the methods
def draw_problems(seeds, cfg):
    """Per seed: W1, W2, X, Y uniform on [0, 1], d x d (column form, samples are columns of X).
    Returns W = [W1, W2] as (K, d, d) and X, Y in lib's row form, (K, n, d)."""
    d, out = cfg["WIDTH"], []
    for s in seeds:
        gen = torch.Generator().manual_seed(int(s))
        out.append([torch.rand(d, d, generator=gen, dtype=torch.float64) for _ in range(4)])
    W1, W2, X, Y = (torch.stack(m).to(device=cfg["DEVICE"], dtype=getattr(torch, cfg["DTYPE"])) for m in zip(*out))
    return [W1, W2], X.mT, Y.mT


def make_nets(method, cfg):
    """The meta-optimizers of a method (Section 5.2): m1 (update f_t) and m2 (Lie-algebra element
    T_t); for LSTM(lr,tele) one LSTM with heads T_t and the step size; none for GD."""
    d, n = cfg["WIDTH"], 2 * cfg["WIDTH"] ** 2
    heads = {"update": {"m1": {"f": n}}, "update_tele": {"m1": {"f": n}, "m2": {"T": d * d}},
             "lr_tele": {"m2": {"T": d * d, "eta": 1}}}.get(method, {})
    torch.manual_seed(cfg["INIT_SEED"])
    nets = {k: MetaLSTM(n, cfg["LR_TELE_HIDDEN" if method == "lr_tele" else "HIDDEN"], h) for k, h in heads.items()}
    if method == "lr_tele" and cfg["ETA_INIT"] is not None:
        # torch's random init puts eta at a clamp bound (5e-3 diverges, 1e-7 has no gradient
        # through the clamp); start at GD's step instead (not in the authors' code)
        lo, hi = cfg["STEP_CLAMP"]
        p = (cfg["ETA_INIT"] - lo) / (hi - lo)
        with torch.no_grad():
            nets["m2"].heads["eta"].weight.zero_()
            nets["m2"].heads["eta"].bias.fill_(cfg["ETA_INIT"] if cfg["ETA_PARAM"] == "clamp"
                                               else float(np.log(p / (1 - p))))
    return {k: v.to(device=cfg["DEVICE"], dtype=getattr(torch, cfg["DTYPE"])) for k, v in nets.items()}


# The run
@torch.no_grad()
def test(method, nets, cfg, act, seeds):
    """Run each unseen trajectory alone (K = 1, so times are per trajectory) for TEST_STEPS
    steps (BACKPROP='manual': by _meta.Unroll, else _meta.update). Returns loss (n_test,
    TEST_STEPS + 1) with L(w_0) first, the wall time after each step (gradient, LSTMs, update and
    teleport included), the step sizes of LSTM(lr,tele) and the step at which a trajectory
    diverged (then stopped; later values are NaN), or None."""
    out, n = {"loss": [], "time_s": [], "step_size": []}, cfg["TEST_STEPS"] + 1
    fast = bool(nets) and cfg["BACKPROP"] == "manual"
    for s in seeds:
        W, X, Y = draw_problems([s], cfg)
        states = {k: net.zero_state(1, W[0]) for k, net in nets.items()}
        losses, times, etas, t0 = [], [0.0], [], time.perf_counter()
        for t in range(n):
            loss, grads = loss_and_grads(W, X, Y, act, "mse")
            losses.append(loss.item())
            if t == n - 1 or not losses[-1] <= DIVERGED * losses[0]:
                break
            if fast:  # _meta.Unroll's steps (X^+ once), as the meta-training's
                if t == 0:
                    steps = Unroll(method, nets, W, grads, states, X, torch.linalg.pinv(X.mT), act, cfg, record=False)
                steps.record(W, grads)
                W, eta = steps.step()
            else:
                W, states, eta = update(method, nets, W, grads, states, X, act, cfg)
            etas += [] if eta is None else [eta.item()]
            times.append(time.perf_counter() - t0)
        nan = [float("nan")] * (n - len(losses))
        for k, v in zip(out, (losses + nan, times + nan, etas + nan if etas else [])):
            out[k].append(v)
    out["diverged_at"] = diverged_steps(out["loss"])[0]
    return out


def state_path(cfg, method):
    return os.path.join(cfg["OUT_DIR"], "results", f"meta_opt_{method}.pt")


def breakdown(final_loss, block=100, factor=10):
    """A meta-training that broke down late: (best, last) medians of the trajectories' final losses
    over blocks of `block` trajectories, if the last block's is `factor` times the best block's or
    more (the saved LSTMs are then the broken ones: it happens, Figure 6 in the README), else None."""
    f = np.asarray(final_loss, dtype=float)
    if len(f) < 2 * block:
        return None
    best = min(np.nanmedian(f[i:i + block]) for i in range(0, len(f) - block + 1, block))
    last = np.nanmedian(f[-block:])
    return (float(best), float(last)) if last >= factor * best else None


def run_method(m, cfg, act, ckpt, loaded, training):
    """One method as a unit of the run: its LSTMs meta-trained (_meta.train) or loaded with
    --test-only, then tested; for LSTM(update,tele) also the control with its teleport off."""
    nets, unit = make_nets(m, cfg), {"nets": {}, "training": training.get(m), "curves": {}}
    test_seeds = [cfg["TEST_SEED"] + i for i in range(cfg["N_TEST"])]
    if m in loaded:
        load_nets(load_tensors(state_path(cfg, m)), nets)
    elif nets:
        seeds = [cfg["TRAIN_SEED"] + i for i in range(cfg[N_TRAIN[m]])]
        unit["training"] = h = train(m, nets, cfg, act, seeds, draw_problems, ckpt, LABELS[m], cfg["PROGRESS"])
        unit["nets"] = flat_state(nets)
        print(f"{LABELS[m]}: {len(seeds)} trajectories in {h['time_s']:.0f} s, non-finite unrolls {len(h['diverged'])}",
              flush=True)
    broke = unit["training"] and breakdown(unit["training"]["final_loss"])
    if broke:
        print(f"warning: {LABELS[m]}'s meta-training broke down late: the median final loss of its last 100 "
              f"trajectories is {broke[1]:.3g}, {broke[1] / broke[0]:.0f}x that of its best 100 ({broke[0]:.3g}); "
              f"its saved LSTMs are the broken ones", file=sys.stderr, flush=True)
    unit["curves"][m] = test(m, nets, cfg, act, test_seeds)
    if m == "update_tele":
        unit["curves"][CONTROL] = test("update", {"m1": nets["m1"]}, cfg, act, test_seeds)
    return unit


# The outputs
def diverged_steps(curves):
    """Per test trajectory (losses from L(w_0)), the step at which it diverged (loss not finite
    or above DIVERGED L(w_0)), or None; and the curves as an array, NaN from that step on."""
    L = np.array(curves, dtype=float)
    at = [None if d is None else d - 1 for d in diverged(L / L[:, :1], DIVERGED)]
    for r in [r for r, a in enumerate(at) if a is not None]:
        L[r, at[r]:] = np.nan
    return at, L


def kept_mean(L):
    """Mean over the rows of L finite throughout (the trajectories that did not diverge), or NaN."""
    ok = L[np.isfinite(L).all(1)]
    return ok.mean(0) if len(ok) else np.full(L.shape[1], np.nan)


def table(curves, steps):
    """Mean test loss after `steps` updates, one row per method, over the trajectories that did
    not diverge (lib.report.finite_stats; the row says how many did)."""
    rows = []
    for m in [m for m in METHODS + (CONTROL,) if m in curves]:
        at, L = diverged_steps(curves[m]["loss"])
        keep, n_bad = [a is None for a in at], sum(a is not None for a in at)
        stats = [finite_stats(L[:, s], keep) if s < L.shape[1] else None for s in steps]
        rows.append([LABELS[m] + (f" ({n_bad} of {len(at)} diverged)" if n_bad else "")]
                    + ["-" if c is None else "diverged" if not c[2] else f"{c[0]:.4g} +- {c[1]:.2g}" for c in stats])
    return markdown_table(["method"] + [f"step {s}" for s in steps], rows)


def plot(res, cfg, out):
    """The figures of the results `res` into out/figures/. Test loss against steps and time:
    lib.plots.plot_mean_std (diverged trajectories left out and marked) with the +-1 std band's
    lower edge cut at the smallest trajectory for the log axis (mean - std < 0 for GD at some
    steps); the teleport-off control dashed, without a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig_dir, n, curves = os.path.join(out, "figures"), cfg["PLOT_STEPS"], res["curves"]
    for name, vs_time in (("multi_layer_loss.png", False), ("multi_layer_loss_vs_time.png", True)):
        fig, ax = plt.subplots(figsize=(5, 4))
        for m in [m for m in METHODS + (CONTROL,) if m in curves]:
            at, L = diverged_steps(curves[m]["loss"])
            L = L[:, :n + 1]
            L[[a is not None for a in at], -1] = np.nan  # one diverging after the steps shown: marked at the end
            t = kept_mean(np.asarray(curves[m]["time_s"], dtype=float)[:, :n + 1])
            x, c, ok = 1e3 * t if vs_time else np.arange(L.shape[1]), METHOD_COLORS[m], L[np.isfinite(L).all(1)]
            plot_mean_std(ax, x, L, LABELS[m], c, "--" if m == CONTROL else "-", shade=False,
                          lw=1.2 if m == CONTROL else 1.5, limit=np.inf)
            if len(ok) > 1 and m != CONTROL:
                mean, std = ok.mean(0), ok.std(0)
                ax.fill_between(x, np.maximum(mean - std, ok.min(0)), mean + std, color=c, alpha=0.2, lw=0)
        ax.set(xlabel="wall-clock time (ms)" if vs_time else "step", ylabel="loss", yscale="log",
               title=f"first {n} steps, per trajectory" if vs_time
               else f"Two-layer regression, {len(curves['gd']['loss'])} test trajectories")
        ax.legend(fontsize="small")
        save_figure(fig, os.path.join(fig_dir, name))
    fig, ax = plt.subplots(figsize=(5, 4))
    for m, h in res.get("training", {}).items():
        y = np.asarray(h["final_loss"], dtype=float)
        ax.plot(np.arange(1, len(y) + 1), y, ".", ms=2, color=METHOD_COLORS[m], label=LABELS[m])
    ax.set(xlabel="training trajectory", ylabel="loss after the last step", yscale="log", title="meta-training")
    ax.legend()
    save_figure(fig, os.path.join(fig_dir, "multi_layer_meta_training.png"))


def main(cfg):
    check(cfg)
    torch.set_num_threads(cfg["THREADS"])
    cfg = {**cfg, "OUT_DIR": cfg["OUT_DIR"] or HERE}
    json_path = os.path.join(cfg["OUT_DIR"], "results", JSON_NAME)
    if cfg["PLOT_ONLY"]:
        res = load_results(json_path)
        with staged(cfg["OUT_DIR"]) as out:
            plot(res, cfg, out)
        print(table(res["curves"], cfg["TABLE_STEPS"]))
        return res
    loaded = [m for m in N_TRAIN if cfg["TEST_ONLY"] and m not in cfg["RETRAIN"]]
    missing = [state_path(cfg, m) for m in loaded if not os.path.exists(state_path(cfg, m))]
    if missing:  # checked before anything is written
        raise UsageError(f"--test-only: no saved meta-optimizer {missing[0]}; train first (without --test-only)")
    check_protocol(json_path, cfg)
    previous = load_json(json_path).get("training", {}) if loaded and os.path.exists(json_path) else {}
    ckpt = Checkpoint(cfg, "multi_layer_regression" + ("-test-only" if cfg["TEST_ONLY"] else ""))
    act, units = Activation(cfg["SLOPE"]), {}
    for m in ("gd", "lr_tele", "update_tele", "update"):  # the longest trainings last but one
        units[m] = ckpt.unit(m) or ckpt.finish_unit(m, run_method(m, cfg, act, ckpt, loaded, previous))
    curves = {k: c for u in units.values() for k, c in u["curves"].items()}
    training = {m: u["training"] for m, u in units.items() if u["training"] is not None}
    res = {"config": {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"])}, "environment": environment(), "curves": curves,
           "training": training, "loaded": loaded,
           "diverged": {k: sum(a is not None for a in c["diverged_at"]) for k, c in curves.items()},
           "mean_test_loss": {k: kept_mean(diverged_steps(c["loss"])[1]) for k, c in curves.items()}}
    with staged(cfg["OUT_DIR"]) as out:
        for m, u in units.items():
            if u["nets"]:
                save_tensors(state_path({**cfg, "OUT_DIR": out}, m), u["nets"])
        save_json(os.path.join(out, "results", JSON_NAME), res)
        plot(res, cfg, out)
    ckpt.finish()
    print(table(curves, cfg["TABLE_STEPS"]))
    return res


if __name__ == "__main__":
    run(main, globals())
