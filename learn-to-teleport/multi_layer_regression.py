"""Figure 6 (Section 5.2, Algorithm 1): meta-optimizers that learn both the local update and
the teleportation, on a two-layer regression L(W1, W2) = 0.5 ||Y - W2 s(W1 X)||^2.

    cd learn-to-teleport && python multi_layer_regression.py            # train + test + plot
    python multi_layer_regression.py --quick                             # smoke run, < 1 min
    python multi_layer_regression.py --test-only                         # reload saved LSTMs
    python multi_layer_regression.py --plot-only                         # redraw from the JSON

Four methods on 5 unseen trajectories: GD (lr 3e-4), LSTM(update), LSTM(lr,tele) and
LSTM(update,tele), w <- g_t . (w + f_t) with g_t = I + T_t acting by eq. (54).
CPU runtime (2 cores shared with ~5 other jobs): the committed run is the default (sequential,
BATCH=1): LSTM(update,tele) 700 trajectories 1452 s, LSTM(update) 600 in 719 s, LSTM(lr,tele)
30 in 5 s, i.e. ~37 min (~1 s of CPU per trajectory; 1.5-6 s wall under load). --batch=5 (5
trajectories per LSTM batch, 5x fewer Adam steps) takes ~10-25 min. --quick: ~5 s of CPU.
Headline (committed run, mean +- std of 5 test trajectories, loss after 30 steps):
LSTM(update,tele) 17.4 +- 1.0, LSTM(update) 29.8 +- 24, GD 41 +- 10; but LSTM(update,tele)
with its teleport switched off at test time gives the same 17.5 +- 1.0, so the gain sits in the
co-trained update LSTM, not in the teleports. LSTM(lr,tele) with the authors' hard clamp
collapses to the 1e-7 step (4.3e5); --eta-param=sigmoid keeps it alive (then it is GD-like).

Choices, each stated where it is made:
- m1 and m2 are *full-vector* two-layer LSTMs (two torch.nn.LSTMCell, hidden 300) that
  read the whole flattened gradient (800 numbers) as one input vector, as in the authors'
  lstm.py; a coordinate-wise LSTM would cost ~800x more per step on a CPU.
- The loss carries the factor 0.5 of the authors' code (the paper writes ||.||^2 without it);
  the GD learning rate 3e-4 was tuned with that factor.
- Adam learning rates: 1e-3 for m1, 1e-4 for m2 and for LSTM(lr,tele) (authors' code, which
  made Figure 6); the paper's text swaps them: --lr-source=paper.
- g^-1 is exact (torch.linalg.inv, lib.actions.group_element); --inverse=first_order gives the
  authors' W2 (I - T).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lib.actions import GLAction  # noqa: E402
from lib.config import UsageError, check_choice, check_positive, run  # noqa: E402
from lib.models import Activation, loss_fn  # noqa: E402
from lib.results import (BASELINE, TELEPORT, atomic_path, environment, load_json,  # noqa: E402
                         markdown_table, save_figure, save_json)

# ---------------------------------------------------------------- config
WIDTH = 20                   # d: W1, W2, X (d x n), Y all 20 x 20, entries uniform on [0, 1]
SLOPE = 0.1                  # LeakyReLU negative slope (invertible, needed by eq. 54)
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
LR_SOURCE = "code"           # Adam lrs (m1, m2): 'code' (1e-3, 1e-4), 'paper' (1e-4, 1e-3)
GD_LR = 3e-4                 # learning rate of the GD baseline (largest non-diverging)
STEP_CLAMP = (1e-7, 5e-3)    # LSTM(lr,tele): learned step size clamped to this range
ETA_INIT = 3e-4              # LSTM(lr,tele): initial step size (head bias; weights 0); None = torch's init
ETA_PARAM = "clamp"          # LSTM(lr,tele) step: 'clamp' (authors': clamp(out, *STEP_CLAMP)) or
                             # 'sigmoid' (lo + (hi - lo) sigmoid(out): same range, never a zero gradient)
INVERSE = "exact"            # W2 <- W2 g^-1: 'exact' (inverse of I + T) or 'first_order' (W2 (I - T))
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
DEVICE = "cpu"               # cpu or cuda
OUT_DIR = os.path.dirname(os.path.abspath(__file__))  # figures/ and results/ go here
PROGRESS = True              # tqdm bars
# ----------------------------------------------------------------------

_QUICK = {"STEPS": 10, "UNROLL": 5, "TEST_STEPS": 30, "HIDDEN": 16, "LR_TELE_HIDDEN": 8,
          "N_TRAIN_UPDATE_TELE": 3, "N_TRAIN_UPDATE": 3, "N_TRAIN_LR_TELE": 2, "N_TEST": 2}

META_LRS = {"code": (1e-3, 1e-4), "paper": (1e-4, 1e-3)}  # Adam lr for (m1 update, m2 teleport)
METHODS = ("gd", "lr_tele", "update", "update_tele")
LABELS = {"gd": "GD", "lr_tele": "LSTM(lr,tele)", "update": "LSTM(update)",
          "update_tele": "LSTM(update,tele)", "update_tele_off": "LSTM(update,tele), teleport off"}
CONTROL = "update_tele_off"  # control: LSTM(update,tele)'s m1 alone, its m2 switched off at test time
COLORS = {"gd": BASELINE, "lr_tele": "#2ca02c", "update": "#ff7f0e", "update_tele": TELEPORT}
N_TRAIN = {"lr_tele": "N_TRAIN_LR_TELE", "update": "N_TRAIN_UPDATE", "update_tele": "N_TRAIN_UPDATE_TELE"}
JSON_NAME = "multi_layer_regression.json"


class MetaLSTM(nn.Module):
    """Two stacked torch.nn.LSTMCell over the whole flattened gradient (one time step per
    optimizer step), with linear heads, as the authors' lstm.py. (LSTMCell, not nn.LSTM: on a
    CPU nn.LSTM's one-step mkldnn backward is ~5x slower.)
    x: (K, n_in) -> {head: (K, out)}; state (h, c): (2, K, hidden) each."""

    def __init__(self, n_in, hidden, heads):
        super().__init__()
        self.hidden = hidden
        self.cells = nn.ModuleList([nn.LSTMCell(n_in, hidden), nn.LSTMCell(hidden, hidden)])
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in heads.items()})

    def forward(self, x, state):
        hs, cs = [], []
        for cell, h, c in zip(self.cells, *state):
            x, c = cell(x, (h, c))
            hs.append(x)
            cs.append(c)
        return {k: head(x) for k, head in self.heads.items()}, (torch.stack(hs), torch.stack(cs))

    def zero_state(self, K, like):
        z = torch.zeros(2, K, self.hidden, dtype=like.dtype, device=like.device)
        return (z, z.clone())


def make_nets(method, cfg):
    """The meta-optimizers of a method: m1 (update f_t), m2 (Lie-algebra element T_t),
    or for LSTM(lr,tele) one LSTM with heads T_t and the step size (Section 5.2)."""
    d, n = cfg["WIDTH"], 2 * cfg["WIDTH"] ** 2
    torch.manual_seed(cfg["INIT_SEED"])
    nets = {}
    if method in ("update", "update_tele"):
        nets["m1"] = MetaLSTM(n, cfg["HIDDEN"], {"f": n})
    if method == "update_tele":
        nets["m2"] = MetaLSTM(n, cfg["HIDDEN"], {"T": d * d})
    if method == "lr_tele":
        nets["m2"] = MetaLSTM(n, cfg["LR_TELE_HIDDEN"], {"T": d * d, "eta": 1})
        if cfg["ETA_INIT"] is not None:
            # torch's random init puts eta at a clamp bound (5e-3 diverges, 1e-7 has no gradient
            # through the clamp); start at GD's step instead (not in the authors' code)
            lo, hi = cfg["STEP_CLAMP"]
            p = (cfg["ETA_INIT"] - lo) / (hi - lo)
            with torch.no_grad():
                nets["m2"].heads["eta"].weight.zero_()
                nets["m2"].heads["eta"].bias.fill_(cfg["ETA_INIT"] if cfg["ETA_PARAM"] == "clamp"
                                                   else float(np.log(p / (1 - p))))
    dtype = getattr(torch, cfg["DTYPE"])
    return {k: v.to(device=cfg["DEVICE"], dtype=dtype) for k, v in nets.items()}


def draw_problems(seeds, cfg):
    """Per seed: W1, W2, X, Y uniform on [0, 1], d x d (column form, samples are columns of X).
    Returns W = [W1, W2] as (K, d, d) and X, Y in lib's row form, (K, n, d)."""
    d, out = cfg["WIDTH"], []
    for s in seeds:
        gen = torch.Generator().manual_seed(int(s))
        out.append([torch.rand(d, d, generator=gen, dtype=torch.float64) for _ in range(4)])
    W1, W2, X, Y = (torch.stack(m).to(device=cfg["DEVICE"], dtype=getattr(torch, cfg["DTYPE"]))
                    for m in zip(*out))
    return [W1, W2], X.mT, Y.mT


def loss_and_grads(W, X, Y, act, create_graph=False):
    """L(w) per trajectory (K,) and its gradients dL/dW1, dL/dW2. The gradients enter the
    LSTMs as constants (no second derivatives), as in Andrychowicz et al. and the authors' code."""
    loss = loss_fn(W, X, Y, act, "mse")
    grads = torch.autograd.grad(loss.sum(), W, retain_graph=torch.is_grad_enabled() and W[0].grad_fn is not None)
    return loss, [g.detach() for g in grads]


def teleport(W, T, X, act, cfg):
    """Eq. (54) with g = I + T, T scaled to Frobenius norm T_NORM (Section 5.2):
    W2 <- W2 g^-1, W1 <- s^-1(g s(W1 X)) X^+ (lib.actions.GLAction(54); exact g^-1).
    'first_order' replaces g^-1 by I - T, as the authors' code does: the loss then drifts by O(|T|^2)."""
    d = cfg["WIDTH"]
    T = T.view(-1, d, d)
    T = T / T.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1) * cfg["T_NORM"]
    new = GLAction(54, "first_order")(W, [T], X, act)
    if cfg["INVERSE"] == "first_order":
        new[1] = W[1] @ (torch.eye(d, dtype=T.dtype, device=T.device) - T)
    return new


def update(method, nets, W, grads, states, X, act, cfg):
    """One step of Algorithm 1 from w_t with gradients `grads` at w_t:
    gd: w - lr grad;  update: w + f_t;  update_tele: g_t.(w + f_t);  lr_tele: g_t.(w - eta_t grad).
    Returns the new weights, the new LSTM states and the step size used (K,) or None."""
    g12 = torch.cat([g.flatten(1) for g in grads], 1)            # (grad W1, grad W2): input of m1
    g21 = torch.cat([g.flatten(1) for g in grads[::-1]], 1)      # (grad W2, grad W1): input of m2
    K, eta, T, new_states = W[0].shape[0], None, None, dict(states)
    if method == "gd":
        return [w - cfg["GD_LR"] * g for w, g in zip(W, grads)], states, None
    if "m1" in nets:
        out, new_states["m1"] = nets["m1"](g12, states["m1"])
        f = out["f"].view(K, 2, *W[0].shape[1:])
        W = [W[0] + f[:, 0], W[1] + f[:, 1]]
    if "m2" in nets:
        out, new_states["m2"] = nets["m2"](g21, states["m2"])
        T = out["T"]
        if method == "lr_tele":
            lo, hi = cfg["STEP_CLAMP"]
            eta = (out["eta"].clamp(lo, hi) if cfg["ETA_PARAM"] == "clamp"
                   else lo + (hi - lo) * torch.sigmoid(out["eta"])).view(K)
            W = [w - eta.view(K, 1, 1) * g for w, g in zip(W, grads)]
    if T is not None:
        W = teleport(W, T, X, act, cfg)
    return W, new_states, eta


def init_states(nets, K, like):
    return {k: net.zero_state(K, like) for k, net in nets.items()}


def train(method, nets, cfg, act, seeds):
    """Meta-training (Section 5.2): trajectories of STEPS steps; after every UNROLL steps the
    meta-loss sum_{t in unroll} mean_k L(w_{t+1}) is back-propagated into the LSTMs, Adam steps,
    and weights and LSTM states are detached. A non-finite meta-loss skips the Adam step and
    ends that batch of trajectories (counted)."""
    lr_m1, lr_m2 = META_LRS[cfg["LR_SOURCE"]]
    opts = [torch.optim.Adam(net.parameters(), lr=lr_m1 if k == "m1" else lr_m2) for k, net in nets.items()]
    hist = {"mean_loss": [], "final_loss": [], "nonfinite": 0, "batch": cfg["BATCH"], "seeds": seeds}
    B, t0 = cfg["BATCH"], time.perf_counter()
    for net in nets.values():
        net.train()
    bar = tqdm(range(0, len(seeds), B), desc=f"train {LABELS[method]}", disable=not cfg["PROGRESS"])
    for b in bar:
        W, X, Y = draw_problems(seeds[b:b + B], cfg)
        states, losses = init_states(nets, W[0].shape[0], W[0]), []
        for _ in range(cfg["STEPS"] // cfg["UNROLL"]):
            W = [w.detach().requires_grad_() for w in W]
            states = {k: tuple(s.detach() for s in v) for k, v in states.items()}
            _, grads = loss_and_grads(W, X, Y, act)
            meta = 0.0
            for _ in range(cfg["UNROLL"]):
                W, states, _ = update(method, nets, W, grads, states, X, act, cfg)
                loss, grads = loss_and_grads(W, X, Y, act)
                meta = meta + loss.mean()
                losses.append(loss.detach())
            if not torch.isfinite(meta):
                hist["nonfinite"] += 1
                break
            for opt in opts:
                opt.zero_grad()
            meta.backward()
            for opt in opts:
                opt.step()
        L = torch.stack(losses)  # (steps done, K)
        hist["mean_loss"] += L.mean(0).tolist()
        hist["final_loss"] += L[-1].tolist()
        bar.set_postfix(final=f"{L[-1].mean().item():.3g}")
    hist["time_s"] = time.perf_counter() - t0
    return hist


@torch.no_grad()
def test(method, nets, cfg, act, seeds):
    """Run each unseen trajectory alone (K = 1, so times are per trajectory) for TEST_STEPS
    steps. Returns loss (n_test, TEST_STEPS + 1) with L(w_0) first, the wall time after each
    step (gradient, LSTMs, update and teleport included) and the step sizes of LSTM(lr,tele)."""
    for net in nets.values():
        net.eval()
    out = {"loss": [], "time_s": [], "step_size": []}
    for s in seeds:
        W, X, Y = draw_problems([s], cfg)
        states = init_states(nets, 1, W[0])
        losses, times, etas, t0 = [], [0.0], [], time.perf_counter()
        for t in range(cfg["TEST_STEPS"] + 1):
            with torch.enable_grad():
                W = [w.detach().requires_grad_() for w in W]
                loss, grads = loss_and_grads(W, X, Y, act)
            losses.append(loss.item())
            if t == cfg["TEST_STEPS"]:
                break
            W, states, eta = update(method, nets, W, grads, states, X, act, cfg)
            if eta is not None:
                etas.append(eta.item())
            times.append(time.perf_counter() - t0)
        out["loss"].append(losses)
        out["time_s"].append(times)
        out["step_size"].append(etas)
    return out


def state_path(cfg, method):
    return os.path.join(cfg["OUT_DIR"], "results", f"meta_opt_{method}.pt")


def save_nets(path, nets):
    """All state_dicts of a method's meta-optimizers in one file of plain tensors (no pickle)."""
    flat = {f"{k}.{name}": v.detach().cpu() for k, net in nets.items() for name, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(flat, tmp)


def load_nets(path, nets):
    if not os.path.exists(path):
        raise UsageError(f"no saved meta-optimizer {path}; train first (without --test-only)")
    flat = torch.load(path, map_location="cpu", weights_only=True)
    for k, net in nets.items():
        net.load_state_dict({n[len(k) + 1:]: v for n, v in flat.items() if n.startswith(k + ".")})
    return nets


def table(curves, steps):
    """Mean test loss after `steps` updates, one row per method."""
    rows = []
    for m in [m for m in METHODS + (CONTROL,) if m in curves]:
        L = np.asarray(curves[m]["loss"], dtype=float)
        rows.append([LABELS[m]] + [f"{L[:, s].mean():.4g} +- {L[:, s].std():.2g}" if s < L.shape[1] else "-"
                                   for s in steps])
    return markdown_table(["method"] + [f"step {s}" for s in steps], rows)


def _mean_std(ax, x, L, m):
    """Mean over test trajectories with a +-1 std band; on the log axis the band's lower edge
    is cut at the smallest trajectory (mean - std < 0 for GD at some steps)."""
    mean, std = L.mean(0), L.std(0)
    ax.plot(x, mean, color=COLORS[m], label=LABELS[m])
    ax.fill_between(x, np.maximum(mean - std, L.min(0)), mean + std, color=COLORS[m], alpha=0.2, lw=0)


def plot(res, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig_dir, n = os.path.join(cfg["OUT_DIR"], "figures"), cfg["PLOT_STEPS"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for m in [m for m in METHODS if m in res["curves"]]:
        L = np.asarray(res["curves"][m]["loss"], dtype=float)[:, :n + 1]
        _mean_std(ax, np.arange(L.shape[1]), L, m)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="Two-layer regression, 5 test trajectories")
    ax.legend()
    save_figure(fig, os.path.join(fig_dir, "multi_layer_loss.png"))
    fig, ax = plt.subplots(figsize=(5, 4))
    for m in [m for m in METHODS if m in res["curves"]]:
        c = res["curves"][m]
        L = np.asarray(c["loss"], dtype=float)[:, :n + 1]
        _mean_std(ax, np.asarray(c["time_s"], dtype=float)[:, :n + 1].mean(0), L, m)
    ax.set(xlabel="wall-clock time (s)", ylabel="loss", yscale="log", title=f"first {n} steps, per trajectory")
    ax.legend()
    save_figure(fig, os.path.join(fig_dir, "multi_layer_loss_vs_time.png"))
    fig, ax = plt.subplots(figsize=(5, 4))
    for m, h in res.get("training", {}).items():
        y = np.asarray(h["final_loss"], dtype=float)
        ax.plot(np.arange(1, len(y) + 1), y, ".", ms=2, color=COLORS[m], label=LABELS[m])
    ax.set(xlabel="training trajectory", ylabel=f"loss after the last step", yscale="log",
           title="meta-training")
    ax.legend()
    save_figure(fig, os.path.join(fig_dir, "multi_layer_meta_training.png"))


def check(cfg):
    for name in ("WIDTH", "STEPS", "TEST_STEPS", "UNROLL", "HIDDEN", "LR_TELE_HIDDEN", "BATCH", "THREADS"):
        check_positive(name, cfg[name], allow_zero=False)
    for name in ("N_TRAIN_UPDATE_TELE", "N_TRAIN_UPDATE", "N_TRAIN_LR_TELE", "N_TEST", "PLOT_STEPS"):
        check_positive(name, cfg[name], allow_zero=False)
    check_positive("T_NORM", cfg["T_NORM"])
    check_positive("GD_LR", cfg["GD_LR"], allow_zero=False)
    check_choice("LR_SOURCE", cfg["LR_SOURCE"], META_LRS)
    check_choice("INVERSE", cfg["INVERSE"], ("exact", "first_order"))
    check_choice("ETA_PARAM", cfg["ETA_PARAM"], ("clamp", "sigmoid"))
    for m in cfg["RETRAIN"]:
        check_choice("method in RETRAIN", m, N_TRAIN)
    check_choice("DTYPE", cfg["DTYPE"], ("float32", "float64"))
    if cfg["STEPS"] % cfg["UNROLL"]:
        raise UsageError(f"STEPS ({cfg['STEPS']}) must be a multiple of UNROLL ({cfg['UNROLL']})")
    lo, hi = cfg["STEP_CLAMP"]
    if not 0 < lo < hi or (cfg["ETA_INIT"] is not None and not lo < cfg["ETA_INIT"] < hi):
        raise UsageError(f"STEP_CLAMP must be 0 < low < ETA_INIT < high, got {cfg['STEP_CLAMP']}, {cfg['ETA_INIT']}")
    n_train = max(cfg[v] for v in N_TRAIN.values())
    train_seeds = set(range(cfg["TRAIN_SEED"], cfg["TRAIN_SEED"] + n_train))
    if train_seeds & set(range(cfg["TEST_SEED"], cfg["TEST_SEED"] + cfg["N_TEST"])):
        raise UsageError("training and test seeds overlap: move TEST_SEED or TRAIN_SEED")
    if cfg["DEVICE"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no GPU is available")


def main(cfg):
    check(cfg)
    torch.set_num_threads(cfg["THREADS"])
    json_path = os.path.join(cfg["OUT_DIR"], "results", JSON_NAME)
    if cfg["PLOT_ONLY"]:
        if not os.path.exists(json_path):
            raise UsageError(f"no results to plot at {json_path}")
        res = load_json(json_path)
        plot(res, cfg)
        print(table(res["curves"], cfg["TABLE_STEPS"]))
        return res
    act = Activation(cfg["SLOPE"])
    test_seeds = [cfg["TEST_SEED"] + i for i in range(cfg["N_TEST"])]
    curves, training = {}, {}
    if cfg["TEST_ONLY"] and os.path.exists(json_path):
        training = load_json(json_path).get("training", {})
    for m in ("gd", "lr_tele", "update_tele", "update"):  # the longest trainings last but one
        nets = make_nets(m, cfg) if m != "gd" else {}
        if nets and cfg["TEST_ONLY"] and m not in cfg["RETRAIN"]:
            load_nets(state_path(cfg, m), nets)
        elif nets:
            seeds = [cfg["TRAIN_SEED"] + i for i in range(cfg[N_TRAIN[m]])]
            training[m] = train(m, nets, cfg, act, seeds)
            save_nets(state_path(cfg, m), nets)
            print(f"{LABELS[m]}: {len(seeds)} trajectories in {training[m]['time_s']:.0f} s, "
                  f"non-finite unrolls {training[m]['nonfinite']}", flush=True)
        curves[m] = test(m, nets, cfg, act, test_seeds)
        if m == "update_tele":
            curves[CONTROL] = test("update", {"m1": nets["m1"]}, cfg, act, test_seeds)
        res = {"config": cfg, "environment": environment(), "curves": curves, "training": training,
               "train_time_s": {k: h["time_s"] for k, h in training.items()},
               "table_steps": cfg["TABLE_STEPS"], "complete": all(k in curves for k in METHODS),
               "mean_test_loss": {k: np.asarray(c["loss"], dtype=float).mean(0) for k, c in curves.items()}}
        save_json(json_path, res)  # after every method, so a cut-off run keeps what it finished
    plot(load_json(json_path), cfg)
    print(table(curves, cfg["TABLE_STEPS"]))
    return res


if __name__ == "__main__":
    run(main, globals(), _QUICK)
