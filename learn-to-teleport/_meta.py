"""The meta-optimizer machinery of multi_layer_regression.py (Figure 6, Section 5.2, Algorithm 1):
the LSTMs, one learned step (update f_t, then teleport g_t = I + T_t by eq. 54) and the meta-training
loop by truncated back-propagation. Functions read the script's resolved config `cfg`; weights
W = [W1, W2] are (K, d, d) each, data X, Y (K, n, d) in lib's row form; `nets` maps "m1" (update)
and/or "m2" (teleport) to a MetaLSTM.

Two ways to the meta-gradient, the same algorithm (equal to rounding, tested in float64):
BACKPROP='autograd' runs `update` (the MetaLSTM modules, lib's GLAction) under torch autograd, the
reference; BACKPROP='manual' (the default, ~6x faster per trajectory on a CPU) runs `Unroll`: the
LSTM steps and the eq. (54) teleports without a graph, then the back-propagation through the unroll
written out. It rests on one fact of Algorithm 1: the gradients enter the LSTMs as constants, so
the meta-loss depends on the LSTMs only through their outputs (f_t, T_t, eta_t). Back-propagation
therefore splits in two: first through the weight chain w_{t+1} = g_t.(w_t + f_t) (20 x 20
matrices, by hand), giving dmeta/d(outputs) per step; then through the LSTMs in time, with the
weight gradients of all steps of the unroll as one matrix product per weight. The data's X^+ is
computed once per trajectory (GLAction recomputes it every step), and Adam is torch's fused one.
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


# The manual meta-gradient (BACKPROP='manual'): the same steps as `update`, no autograd graph
def lstm_weights(net):
    """A MetaLSTM's weights as plain tensors for one unroll (Adam moves them only between
    unrolls): per layer (W_ih (4H, n_in), W_hh (4H, H), b_ih + b_hh (4H,)), per head (W, b)."""
    layers = [(c.weight_ih.detach(), c.weight_hh.detach(), (c.bias_ih + c.bias_hh).detach()) for c in net.cells]
    return layers, {k: (h.weight.detach(), h.bias.detach()) for k, h in net.heads.items()}


def lstm_step(weights, x, state, tape=None):
    """MetaLSTM.forward without autograd (torch.nn.LSTMCell's equations, gates i, f, g, o):
    c' = f c + i g, h' = o tanh(c'). x: (K, n_in), state (h, c): (2, K, H) each ->
    ({head: (K, out)}, new state). With a list `tape`, appends per layer what `lstm_backward`
    needs: the input, h, the gate derivatives M (K, 4, H) with dgates = M dc' for i, f, g and
    M dh' for o, f, and o (1 - tanh(c')^2)."""
    layers, heads = weights
    new_h, new_c, rec = [], [], []
    for (W_ih, W_hh, b), h, c in zip(layers, *state):
        K, H = h.shape
        a = torch.addmm(b, x, W_ih.T).addmm_(h, W_hh.T).view(K, 4, H)
        g = a[:, 2].tanh()
        a = a.sigmoid_()
        a[:, 2] = g
        i, f, o = a[:, 0], a[:, 1], a[:, 3]
        c_new = torch.addcmul(f * c, i, g)
        tc = c_new.tanh()
        h_new = o * tc
        if tape is not None:
            M = a * (1 - a)  # sigmoid' = s (1 - s); for g: tanh' = 1 - g^2
            M[:, 2] = 1 - g * g
            M *= torch.stack([g, c, i, tc], 1)  # dc'/di = g, dc'/df = c, dc'/dg = i; dh'/do = tanh(c')
            rec.append((x, h, M, f, o * (1 - tc * tc)))
        new_h.append(h_new)
        new_c.append(c_new)
        x = h_new
    if tape is not None:
        tape.append((rec, x))
    return {k: torch.addmm(b, x, W.T) for k, (W, b) in heads.items()}, (torch.stack(new_h), torch.stack(new_c))


def lstm_backward(net, weights, tape, d_out):
    """Back-propagation through the steps of `tape` (lstm_step) with the gradients d_out[t]
    {head: (K, out)} of the meta-loss w.r.t. each step's outputs; the state before the first step
    is a constant (truncated back-propagation). Writes the gradients into the parameters' .grad:
    each weight's summed over the steps as one product (steps*K, 4H)^T (steps*K, n_in)."""
    layers, heads = weights
    n, (rec0, top0) = len(tape), tape[0]
    K, H = top0.shape
    dh = [torch.zeros(K, H, dtype=top0.dtype, device=top0.device) for _ in layers]
    dc = [torch.zeros_like(dh[0]) for _ in layers]
    dG = [[None] * n for _ in layers]
    for t in range(n - 1, -1, -1):
        rec, top = tape[t]
        below = dh[-1]
        for k, dy in d_out[t].items():
            below = torch.addmm(below, dy, heads[k][0])
        for j in range(len(layers) - 1, -1, -1):
            _, h, M, f, q = rec[j]
            d = below if j == len(layers) - 1 else below + dh[j]
            dc_j = torch.addcmul(dc[j], d, q)  # through h' = o tanh(c'), plus c' of the next step
            G = M * dc_j.unsqueeze(1)
            G[:, 3] = M[:, 3] * d
            G = G.view(K, 4 * H)
            dG[j][t], dc[j] = G, dc_j * f
            dh[j] = G @ layers[j][1]
            if j:
                below = G @ layers[j][0]
    for j, cell in enumerate(net.cells):
        G = torch.cat(dG[j])
        x = torch.cat([tape[t][0][j][0] for t in range(n)])
        h = torch.cat([tape[t][0][j][1] for t in range(n)])
        cell.weight_ih.grad, cell.weight_hh.grad = G.T @ x, G.T @ h
        cell.bias_ih.grad = G.sum(0)
        cell.bias_hh.grad = cell.bias_ih.grad.clone()
    top = torch.cat([tape[t][1] for t in range(n)])
    for k, head in net.heads.items():
        dy = torch.cat([d_out[t][k] for t in range(n)])
        head.weight.grad, head.bias.grad = dy.T @ top, dy.sum(0)


class Unroll:
    """UNROLL steps of Algorithm 1 (as `update`, for every method but GD) recorded for
    `backward`. W: [W1, W2] (K, d, d) at the unroll's start (constants), grads their gradients,
    states the LSTM states, X (K, n, d) the data and Xp = pinv(X^T) (K, n, d), computed once per
    trajectory."""

    def __init__(self, method, nets, W, grads, states, X, Xp, act, cfg):
        self.method, self.nets, self.act, self.cfg, self.Xp = method, nets, act, cfg, Xp
        self.weights = {k: lstm_weights(net) for k, net in nets.items()}
        self.tapes, self.steps = {k: [] for k in nets}, []
        self.W, self.grads, self.states, self.h0 = W, grads, states, X.mT

    def step(self):
        """One step from the current W; returns the new weights (the caller computes their loss
        and gradients and hands them on with `record`)."""
        W, grads, K, cfg = self.W, self.grads, self.W[0].shape[0], self.cfg
        rec, new_states = {"W": W, "grads": grads}, dict(self.states)
        if "m1" in self.nets:  # m1 reads (grad W1, grad W2), m2 (grad W2, grad W1), as `update`
            out, new_states["m1"] = lstm_step(self.weights["m1"], torch.cat([g.flatten(1) for g in grads], 1),
                                              self.states["m1"], self.tapes["m1"])
            f = out["f"].view(K, 2, *W[0].shape[1:])
            W = [W[0] + f[:, 0], W[1] + f[:, 1]]
        if "m2" in self.nets:
            out, new_states["m2"] = lstm_step(self.weights["m2"], torch.cat([g.flatten(1) for g in grads[::-1]], 1),
                                              self.states["m2"], self.tapes["m2"])
            if self.method == "lr_tele":
                lo, hi = cfg["STEP_CLAMP"]
                rec["eta_raw"] = e = out["eta"].view(K)
                eta = e.clamp(lo, hi) if cfg["ETA_PARAM"] == "clamp" else lo + (hi - lo) * torch.sigmoid(e)
                W = [w - eta.view(K, 1, 1) * g for w, g in zip(W, grads)]
            rec["U"] = W
            W = self.teleport(W, out["T"], rec)
        self.states = new_states
        self.steps.append(rec)
        return W

    def record(self, W, grads):
        """The new weights' gradients: the next step's LSTM input and, / K, the gradient of its
        term mean_k L_k(w_{t+1}) of the meta-loss."""
        self.steps[-1]["dL"] = grads
        self.W, self.grads = W, grads

    def teleport(self, U, T_raw, rec):
        """learned_teleport: W2 <- U2 g^-1, W1 <- s^-1(g s(U1 X^T)) X^+ with g = I + T,
        T = T_NORM T_raw / |T_raw| (the authors' W2 (I - T) with INVERSE='neumann')."""
        K, d = U[0].shape[:2]
        r = T_raw.view(K, d, d)
        nr = r.flatten(1).norm(dim=1).clamp_min(1e-30).view(K, 1, 1)
        T = r / nr * self.cfg["T_NORM"]
        g = torch.eye(d, dtype=T.dtype, device=T.device) + T
        g_inv = torch.linalg.inv(g) if self.cfg["INVERSE"] == "exact" else 2 * torch.eye(d, dtype=T.dtype) - g
        z = U[0] @ self.h0
        a = self.act(z)
        b = g @ a
        rec.update(r=r, nr=nr, g=g, g_inv=g_inv, z=z, a=a, b=b)
        return [self.act.inverse(b) @ self.Xp, U[1] @ g_inv]

    def backward(self):
        """d(meta-loss)/d(LSTM parameters) into their .grad, meta-loss = sum_t mean_k L_k(w_{t+1}):
        through the weight chain from the last step back (dA: the gradient w.r.t. w_{t+1}), the
        output gradients of every step collected, then `lstm_backward`."""
        cfg, K, slope = self.cfg, self.W[0].shape[0], self.act.slope
        dA, d_out = [torch.zeros_like(w) for w in self.W], {k: [None] * len(self.steps) for k in self.nets}
        for t in range(len(self.steps) - 1, -1, -1):
            s = self.steps[t]
            dA = [a + g / K for a, g in zip(dA, s["dL"])]
            if "m2" in self.nets:
                g, g_inv, U = s["g"], s["g_inv"], s["U"]
                dV = dA[0] @ self.Xp.mT
                dV = torch.where(s["b"] > 0, dV, dV / slope)  # through s^-1(b) X^+
                dz = (g.mT @ dV) * self.act.derivative(s["z"])
                dU = [dz @ self.h0.mT, dA[1] @ g_inv.mT]
                d_ginv = U[1].mT @ dA[1]
                dT = dV @ s["a"].mT + (-g_inv.mT @ d_ginv @ g_inv.mT if cfg["INVERSE"] == "exact" else -d_ginv)
                rhat = s["r"] / s["nr"]  # through T = T_NORM r / |r|
                dr = (dT - rhat * (rhat * dT).sum((1, 2), keepdim=True)) * (cfg["T_NORM"] / s["nr"])
                d_out["m2"][t] = {"T": dr.flatten(1)}
                if self.method == "lr_tele":
                    lo, hi = cfg["STEP_CLAMP"]
                    e = s["eta_raw"]
                    d_eta = -sum((u * g_).sum((1, 2)) for u, g_ in zip(dU, s["grads"]))
                    d_eta = d_eta * (((e >= lo) & (e <= hi)).to(e.dtype) if cfg["ETA_PARAM"] == "clamp"
                                     else (hi - lo) * torch.sigmoid(e) * (1 - torch.sigmoid(e)))
                    d_out["m2"][t]["eta"] = d_eta.view(K, 1)
                dA = dU
            if "m1" in self.nets:
                d_out["m1"][t] = {"f": torch.cat([a.flatten(1) for a in dA], 1)}
        for k, net in self.nets.items():
            lstm_backward(net, self.weights[k], self.tapes[k], d_out[k])


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
    manual = cfg["BACKPROP"] == "manual"
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": cfg["M1_LR"] if k == "m1" else cfg["M2_LR"]}
                            for k, net in nets.items()], fused=manual or None)  # per parameter: one Adam per LSTM
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
        Xp = torch.linalg.pinv(X.mT) if manual else None  # X^+ of eq. (54), once per trajectory
        for _ in range(cfg["STEPS"] // cfg["UNROLL"]):
            W = [w.detach() for w in W]
            states = {k: tuple(s.detach() for s in v) for k, v in states.items()}
            grads, meta = loss_and_grads(W, X, Y, act, "mse")[1], 0.0
            with torch.set_grad_enabled(not manual):
                unroll = Unroll(method, nets, W, grads, states, X, Xp, act, cfg) if manual else None
                for _ in range(cfg["UNROLL"]):
                    if manual:
                        W = unroll.step()
                        loss, grads = loss_and_grads(W, X, Y, act, "mse")
                        unroll.record(W, grads)
                    else:
                        W, states, _ = update(method, nets, W, grads, states, X, act, cfg)
                        loss, grads = loss_fn(W, X, Y, act, "mse"), loss_and_grads(W, X, Y, act, "mse")[1]
                    meta = meta + loss.mean()
                    losses.append(loss.detach())
                if not torch.isfinite(meta):
                    bad = (~torch.isfinite(torch.stack(losses))).any(1).nonzero()
                    hist["diverged"].append([b, int(bad[0]) + 1 if len(bad) else len(losses)])
                    break
                if manual:
                    states = unroll.states
                    unroll.backward()  # writes every parameter's .grad
                else:
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
