"""The meta-optimizer machinery of multi_layer_regression.py (Figure 6, Section 5.2, Algorithm 1):
the LSTMs, one learned step (update f_t, then teleport g_t = I + T_t by eq. 54) and the meta-training
loop by truncated back-propagation. Functions read the script's resolved config `cfg`; weights
W = [W1, W2] are (K, d, d) each, data X, Y (K, n, d) in lib's row form; `nets` maps "m1" (update)
and/or "m2" (teleport) to a MetaLSTM.
"""
import time

import torch
from torch import nn
from tqdm import tqdm

from lib.actions import GLAction
from lib.models import loss_and_grads, loss_fn


class MetaLSTM(nn.Module):
    """Two stacked torch.nn.LSTMCell over the whole flattened gradient (800 numbers as one
    input vector; one time step per optimizer step), with linear heads, as the authors' lstm.py:
    a coordinate-wise LSTM would cost ~800x more per step on a CPU. (LSTMCell, not nn.LSTM: on a
    CPU nn.LSTM's one-step mkldnn backward is ~5x slower.)
    x: (K, n_in) -> {head: (K, out)}; state (h, c): (2, K, hidden) each."""

    def __init__(self, n_in, hidden, heads):
        super().__init__()
        self.hidden = hidden
        self.cells = nn.ModuleList([nn.LSTMCell(n_in, hidden), nn.LSTMCell(hidden, hidden)])
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in heads.items()})

    def forward(self, x, state):
        new = []
        for cell, h, c in zip(self.cells, *state):
            x, c = cell(x, (h, c))
            new.append((x, c))
        return {k: head(x) for k, head in self.heads.items()}, tuple(torch.stack(s) for s in zip(*new))

    def zero_state(self, K, like):
        return tuple(torch.zeros(2, K, self.hidden, dtype=like.dtype, device=like.device) for _ in "hc")


def flat_state(nets):
    """All state_dicts of a method's meta-optimizers as one flat dict of plain tensors, as saved
    in meta_opt_<method>.pt (lib.io.save_tensors, no pickle) and in the checkpoint."""
    return {f"{k}.{name}": v.detach().clone() for k, net in nets.items() for name, v in net.state_dict().items()}


def load_nets(flat, nets):
    for k, net in nets.items():
        net.load_state_dict({n[len(k) + 1:]: v for n, v in flat.items() if n.startswith(k + ".")})
    return nets


def learned_teleport(W, T, X, act, cfg):
    """Teleport by the meta-optimizer's output T (K, d*d), not by lib.teleport's gradient ascent:
    eq. (54) with g = I + T, T scaled to Frobenius norm T_NORM (Section 5.2): W2 <- W2 g^-1,
    W1 <- s^-1(g s(W1 X)) X^+ (lib.actions.GLAction(54), exact g^-1). INVERSE='neumann' puts
    I - T for g^-1 as the authors' code does: the loss then drifts by O(|T|^2). No LinAlgError on
    diverging weights: only g (|T| < 1; NaN in, NaN out) and the data X are inverted."""
    d = cfg["WIDTH"]
    T = T.view(-1, d, d)
    T = T / T.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1) * cfg["T_NORM"]
    new = GLAction(54, "first_order")(W, [T], X, act)
    if cfg["INVERSE"] == "neumann":
        new[1] = W[1] @ (torch.eye(d, dtype=T.dtype, device=T.device) - T)
    return new


def update(method, nets, W, grads, states, X, act, cfg):
    """One step of Algorithm 1 from w_t with gradients `grads` at w_t:
    gd: w - LR grad;  update: w + f_t;  update_tele: g_t.(w + f_t);  lr_tele: g_t.(w - eta_t grad).
    Returns the new weights, the new LSTM states and the step size used (K,) or None."""
    if method == "gd":
        return [w - cfg["LR"] * g for w, g in zip(W, grads)], states, None
    K, eta, new_states = W[0].shape[0], None, dict(states)
    if "m1" in nets:  # m1 reads (grad W1, grad W2), m2 reads (grad W2, grad W1), as the authors' code
        out, new_states["m1"] = nets["m1"](torch.cat([g.flatten(1) for g in grads], 1), states["m1"])
        f = out["f"].view(K, 2, *W[0].shape[1:])
        W = [W[0] + f[:, 0], W[1] + f[:, 1]]
    if "m2" in nets:
        out, new_states["m2"] = nets["m2"](torch.cat([g.flatten(1) for g in grads[::-1]], 1), states["m2"])
        if method == "lr_tele":
            lo, hi = cfg["STEP_CLAMP"]
            eta = (out["eta"].clamp(lo, hi) if cfg["ETA_PARAM"] == "clamp"
                   else lo + (hi - lo) * torch.sigmoid(out["eta"])).view(K)
            W = [w - eta.view(K, 1, 1) * g for w, g in zip(W, grads)]
        W = learned_teleport(W, out["T"], X, act, cfg)
    return W, new_states, eta


def train(method, nets, cfg, act, seeds, draw, ckpt=None, label=None, progress=False):
    """Meta-training (Section 5.2) on the problems draw(seeds[b:b + BATCH]) -> W, X, Y, one batch
    of trajectories of STEPS steps at a time; after every UNROLL steps the meta-loss
    sum_{t in unroll} mean_k L(w_{t+1}) (lib.models.loss_fn) is back-propagated through the updates
    and teleports into the LSTMs, Adam (lr M1_LR for m1, M2_LR for m2) steps, and weights and LSTM
    states are detached. The gradients enter the LSTMs as constants (no second derivatives, as in
    Andrychowicz et al. and the authors' code): lib.models.loss_and_grads makes no graph. A
    non-finite meta-loss skips the Adam step and ends that batch (hist["diverged"]: [its first
    trajectory, the first step with a non-finite loss, or the unroll's last if only the sum
    overflowed]). With a lib.progress.Checkpoint `ckpt`, LSTMs, Adam states, RNG state and history
    are saved after a batch (at most every CHECKPOINT_S s) and resumed from. `label` names the
    method in the tqdm bar (shown if `progress`) and in the checkpoint."""
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": cfg["M1_LR"] if k == "m1" else cfg["M2_LR"]}
                            for k, net in nets.items()])  # Adam acts per parameter: as one Adam per LSTM
    hist = {"mean_loss": [], "final_loss": [], "diverged": [], "batch": cfg["BATCH"], "seeds": seeds, "time_s": 0.0}
    B, start, cur, label = cfg["BATCH"], 0, ckpt and ckpt.current, label or method
    if cur and cur["unit"] == method:  # resume the interrupted training of this method
        load_nets(cur["nets"], nets)
        opt.load_state_dict(cur["opt"])
        torch.set_rng_state(cur["rng"])
        start, hist = cur["next"], cur["hist"]
    t0, spent = time.perf_counter(), hist["time_s"]
    bar = tqdm(range(start, len(seeds), B), desc=f"train {label}", disable=not progress)
    for b in bar:
        W, X, Y = draw(seeds[b:b + B], cfg)
        states, losses = {k: net.zero_state(W[0].shape[0], W[0]) for k, net in nets.items()}, []
        for _ in range(cfg["STEPS"] // cfg["UNROLL"]):
            W = [w.detach() for w in W]
            states = {k: tuple(s.detach() for s in v) for k, v in states.items()}
            grads, meta = loss_and_grads(W, X, Y, act, "mse")[1], 0.0
            for _ in range(cfg["UNROLL"]):
                W, states, _ = update(method, nets, W, grads, states, X, act, cfg)
                loss, grads = loss_fn(W, X, Y, act, "mse"), loss_and_grads(W, X, Y, act, "mse")[1]
                meta = meta + loss.mean()
                losses.append(loss.detach())
            if not torch.isfinite(meta):
                bad = (~torch.isfinite(torch.stack(losses))).any(1).nonzero()
                hist["diverged"].append([b, int(bad[0]) + 1 if len(bad) else len(losses)])
                break
            opt.zero_grad()
            meta.backward()
            opt.step()
        L = torch.stack(losses)  # (steps done, K)
        hist["mean_loss"] += L.mean(0).tolist()
        hist["final_loss"] += L[-1].tolist()
        hist["time_s"] = spent + time.perf_counter() - t0
        bar.set_postfix(final=f"{L[-1].mean().item():.3g}")
        if ckpt:
            current = {"unit": method, "next": b + B, "nets": flat_state(nets), "hist": hist,
                       "opt": opt.state_dict(), "rng": torch.get_rng_state()}
            ckpt.save({"done": ckpt.done, "current": current},
                      f"{label}, {min(b + B, len(seeds))} of {len(seeds)} trajectories")
    return hist
