"""The meta-optimizer machinery of multi_layer_regression.py (Figure 6, Section 5.2, Algorithm 1):
the LSTMs, one learned step (update f_t, then teleport g_t = I + T_t by eq. 54) and the meta-training
loop by truncated back-propagation. Functions read the script's resolved config `cfg`; weights
W = [W1, W2] are (K, d, d) each, data X, Y (K, n, d) in lib's row form; `nets` maps "m1" (update)
and/or "m2" (teleport) to a MetaLSTM.

Two ways to the meta-gradient, the same algorithm (equal to rounding, tested in float64):
BACKPROP='autograd' runs `update` (the MetaLSTM modules, lib's GLAction) under torch autograd, the
reference; BACKPROP='manual' (the default; 2.9-3.2x faster per trajectory than a textbook
implementation on a shared CPU, benchmarks/bench_learn_to_teleport.py) runs `Unroll`: the LSTM steps
(the LSTMs of a method as one `LSTMGroup`) and the eq. (54) teleports without a graph, then the
back-propagation through the unroll written out. It rests on one fact of Algorithm 1: the gradients
enter the LSTMs as constants, so the meta-loss depends on the LSTMs only through their outputs
(f_t, T_t, eta_t). Back-propagation therefore splits in two: first through the weight chain
w_{t+1} = g_t.(w_t + f_t) (20 x 20 matrices, by hand), giving dmeta/d(outputs) per step; then
through the LSTMs layer by layer, top down: only the recurrent products with W_hh go step by step,
the heads' and each layer's input products and the weight gradients are one matrix product over all
steps of the unroll. The data's X^+ is computed once per trajectory (GLAction recomputes it every
step), g^-1 is the Neumann series to below rounding (`series_order`), the 20 x 20 products are
torch.bmm (torch.matmul's dispatch costs ~4 us more a product), the input and head weights are
stored transposed (MetaLSTM: the one-row products read that layout ~25% faster) and Adam is torch's
fused one, fed contiguous tensors (MetaAdam). What is left is memory traffic: a step streams the
LSTMs' 4.4M weights (17.6 MB in float32) through the forward products (~0.48 ms a step when they
stay in the CPU's cache; the first steps after an Adam step, which streams 7 x 17.6 MB, take up to
2.4x that) and 2 x 1.4 MB of W_hh back; the weight gradients are 88 MFLOP an unroll; the ~100 small
kernels of a step are about a fifth of the time.
"""
import time

import torch
from torch import nn
from torch.optim.adam import adam  # the functional update torch.optim.Adam runs
from tqdm import tqdm

from lib.actions import GLAction
from lib.models import loss_and_grads, loss_fn


def transposed_layout(w):
    """w (out, in) with the same values stored as its transpose (w.T contiguous): the layout in
    which a one-row product x w^T runs fastest (about 25% faster than w's own layout for the
    LSTMs' 1200 x 800 input weights when they stream from the CPU's cache)."""
    return w.T.contiguous().T


class MetaLSTM(nn.Module):
    """Two stacked torch.nn.LSTMCell over the whole flattened gradient (800 numbers as one
    input vector; one time step per optimizer step), with linear heads, as the authors' lstm.py:
    a coordinate-wise LSTM would cost ~800x more per step on a CPU. (LSTMCell, not nn.LSTM: on a
    CPU nn.LSTM's one-step mkldnn backward is ~5x slower.) The input weights and the heads'
    weights are stored transposed (transposed_layout; the same parameters and values): the
    products read them once per step, the recurrent weights are read in both directions.
    x: (K, n_in) -> {head: (K, out)}; state (h, c): (2, K, hidden) each."""

    def __init__(self, n_in, hidden, heads):
        super().__init__()
        self.hidden = hidden
        self.cells = nn.ModuleList([nn.LSTMCell(n_in, hidden), nn.LSTMCell(hidden, hidden)])
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in heads.items()})
        for m, name in [(c, "weight_ih") for c in self.cells] + [(h, "weight") for h in self.heads.values()]:
            setattr(m, name, nn.Parameter(transposed_layout(getattr(m, name).detach())))

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
class LSTMGroup:
    """MetaLSTMs `nets` (a list; equal hidden sizes) stepped together without autograd during
    one unroll (Adam moves their weights only between unrolls), each with its own weights and
    input, their gate arithmetic as one tensor (N nets, K trajectories): torch.nn.LSTMCell's
    equations, gates i, f, g, o, c' = f c + i g, h' = o tanh(c'). State (h, c): (2 layers, N, K, H)
    each. `step` records what `backward` needs."""

    def __init__(self, nets):
        self.nets, self.H, self.tape = nets, nets[0].hidden, []
        self.layers = [[(c.weight_ih.detach(), c.weight_hh.detach(), (c.bias_ih + c.bias_hh).detach())
                        for c in net.cells] for net in nets]
        self.heads = [{k: (h.weight.detach(), h.bias.detach()) for k, h in net.heads.items()} for net in nets]
        self.fwd = [[(W_ih.T, W_hh.T, b) for W_ih, W_hh, b in layers] for layers in self.layers]  # x W^T
        self.fwd_heads = [{k: (W.T, b) for k, (W, b) in heads.items()} for heads in self.heads]

    def step(self, xs, state, record=True):
        """xs: per net its input (K, n_in); state (h, c) -> ([{head: (K, out)}] per net, new state)."""
        (h0, c0), H = state, self.H
        N, K = h0.shape[1:3]
        inp, hs, cs, rec = xs, [], [], []
        for j in range(h0.shape[0]):
            a = torch.empty(N, K, 4 * H, dtype=h0.dtype, device=h0.device)
            for n, layers in enumerate(self.fwd):
                W_ih_T, W_hh_T, b = layers[j]
                torch.addmm(b, inp[n], W_ih_T, out=a[n]).addmm_(h0[j, n], W_hh_T)
            g = a[..., 2 * H:3 * H].tanh()
            a = a.sigmoid_()
            a[..., 2 * H:3 * H] = g
            c = torch.addcmul(a[..., H:2 * H] * c0[j], a[..., :H], g)
            tc = c.tanh()
            h = a[..., 3 * H:] * tc
            rec.append((inp, h0[j], c0[j], a, tc))
            hs.append(h)
            cs.append(c)
            inp = h
        if record:
            self.tape.append((rec, inp))
        outs = [{k: torch.addmm(b, inp[n], W_T) for k, (W_T, b) in heads.items()}
                for n, heads in enumerate(self.fwd_heads)]
        return outs, (torch.stack(hs), torch.stack(cs))

    def factors(self, j):
        """Layer j's gate derivatives over all recorded steps at once, (S, N, K, 4H): dgates =
        M [dc', dc', dc', dh'] (dc'/di = g, dc'/df = c, dc'/dg = i, dh'/do = tanh(c'), times
        sigmoid' = s (1 - s), tanh' = 1 - g^2); q = o (1 - tanh(c')^2), the forget gates f."""
        H = self.H
        a, c, tc = (torch.stack([r[0][j][i] for r in self.tape]) for i in (3, 2, 4))
        i, f, g, o = (a[..., k * H:(k + 1) * H] for k in range(4))
        M = a * (1 - a)
        M[..., 2 * H:3 * H] = 1 - g * g
        M *= torch.cat([g, c, i, tc], -1)
        return M, o * (1 - tc * tc), f

    def backward(self, d_out):
        """Back-propagation through the recorded steps, given the gradients d_out[t][n] {head:
        (K, out)} of the meta-loss w.r.t. each step's outputs; the state before the first step is a
        constant (truncated back-propagation). Writes the parameters' .grad. Layer by layer, top
        down: a layer's gradient w.r.t. its input at step t depends on the layers above only, so
        the heads' and each layer's input products are one product over all steps ((steps K, out)
        (out, H)) and only the recurrent product with W_hh is taken step by step; each weight's
        gradient, summed over the steps, is one product (steps K, 4H)^T (steps K, n_in)."""
        S, L, H = len(self.tape), len(self.layers[0]), self.H
        N, K = self.tape[0][1].shape[:2]
        like = self.tape[0][1]
        d_in = torch.empty(N, S * K, H, dtype=like.dtype, device=like.device)  # d(meta)/dh' from above
        for n, heads in enumerate(self.heads):
            for i, (k, (W, _)) in enumerate(heads.items()):
                dy = torch.cat([d_out[t][n][k] for t in range(S)])
                torch.mm(dy, W, out=d_in[n]) if i == 0 else d_in[n].addmm_(dy, W)
        for j in range(L - 1, -1, -1):
            M, q, f = self.factors(j)
            G = torch.empty(N, S, K, 4 * H, dtype=like.dtype, device=like.device)
            d_in = d_in.view(N, S, K, H)
            dh, dc = torch.zeros_like(like), torch.zeros_like(like)
            for t in range(S - 1, -1, -1):
                d = d_in[:, t] + dh
                dc = torch.addcmul(dc, d, q[t])
                torch.mul(M[t], torch.cat([dc, dc, dc, d], -1), out=G[:, t])
                dc = dc * f[t]
                if t:  # d(meta)/dh of step t - 1, through W_hh
                    for n, layers in enumerate(self.layers):
                        torch.mm(G[n, t], layers[j][1], out=dh[n])
            G = G.view(N, S * K, 4 * H)
            if j:  # the layer below: its output's gradient at every step at once
                d_in = torch.stack([torch.mm(G[n], layers[j][0]) for n, layers in enumerate(self.layers)])
            h = torch.stack([r[0][j][1] for r in self.tape], 1).view(N, S * K, H)
            for n, net in enumerate(self.nets):
                cell = net.cells[j]
                x = torch.cat([r[0][j][0][n] for r in self.tape])
                set_grad(cell.weight_ih, G[n].T, x)
                set_grad(cell.weight_hh, G[n].T, h[n])
                set_grad(cell.bias_ih, G[n].T)
                set_grad(cell.bias_hh, G[n].T)
        top = torch.stack([r[1] for r in self.tape], 1)
        for n, net in enumerate(self.nets):
            for k, head in net.heads.items():
                dy = torch.cat([d_out[t][n][k] for t in range(S)])
                set_grad(head.weight, dy.T, top[n].reshape(S * K, H))
                set_grad(head.bias, dy.T)


def set_grad(p, a, b=None):
    """p.grad = a @ b (or a summed over its columns), written into the .grad of the previous
    unroll when there is one: a fresh 17.6 MB of gradients every unroll costs page faults. The
    gradient takes p's layout (a transposed one: MetaLSTM): torch's fused Adam reads parameter
    and gradient as flat arrays alike, so a gradient in another layout would update wrong entries."""
    if b is None:
        if p.grad is None:
            p.grad = a.sum(1)
        else:
            torch.sum(a, 1, out=p.grad)
    elif p.is_contiguous():
        if p.grad is None:
            p.grad = a @ b
        else:
            torch.mm(a, b, out=p.grad)
    elif p.grad is None:
        p.grad = (b.T @ a.T).T
    else:
        torch.mm(b.T, a.T, out=p.grad.T)


def series_order(tau, dtype):
    """Terms n of the Neumann series (I + T)^-1 = I - T + T^2 - ... + (-T)^n for |T|_F = tau:
    the smallest n whose remainder bound tau^(n+1) / (1 - tau) is below a quarter of dtype's
    eps (float32: n = 3, float64: n = 8 at tau = 0.01); None for tau >= 0.5."""
    if tau >= 0.5:
        return None
    eps, n = torch.finfo(dtype).eps / 4, 1
    while tau ** (n + 1) / (1 - tau) > eps:
        n += 1
    return n


def inverse(T, order, eye=None):
    """(I + T)^-1 for T (K, d, d): the Neumann series to `order` by Horner's rule, I - T (I - T (...)),
    or torch.linalg.inv for order None. `eye`: I (d, d), if the caller keeps one."""
    eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device) if eye is None else eye
    if order is None:
        return torch.linalg.inv(eye + T)
    r = eye - T
    for _ in range(order - 1):
        r = torch.baddbmm(eye, T, r, alpha=-1)
    return r


class Unroll:
    """UNROLL steps of Algorithm 1 (as `update`, for every method but GD) recorded for
    `backward`. W: [W1, W2] (K, d, d) at the unroll's start (constants), grads their gradients,
    states the LSTM states, X (K, n, d) the data and Xp = pinv(X^T) (K, n, d), computed once per
    trajectory. With record=False (testing) nothing is kept for `backward`."""

    def __init__(self, method, nets, W, grads, states, X, Xp, act, cfg, record=True):
        self.method, self.nets, self.act, self.cfg, self.Xp, self.record_ = method, nets, act, cfg, Xp, record
        self.keys, self.group, self.steps = list(nets), LSTMGroup(list(nets.values())), []
        self.state = tuple(torch.stack([states[k][i] for k in self.keys], 1) for i in range(2))  # (2, N, K, H)
        self.W, self.grads, self.h0 = W, grads, X.mT
        self.order = series_order(cfg["T_NORM"], W[0].dtype) if cfg["INVERSE"] == "exact" else None
        self.eye = torch.eye(W[0].shape[1], dtype=W[0].dtype, device=W[0].device)

    @property
    def states(self):
        """The LSTM states as `update` keeps them: {net: (h, c)}, (2, K, H) each."""
        return {k: (self.state[0][:, n], self.state[1][:, n]) for n, k in enumerate(self.keys)}

    def step(self):
        """One step from the current W; returns the new weights (the caller computes their loss
        and gradients and hands them on with `record`) and the step size of lr_tele (K,) or None."""
        W, grads, K, cfg = self.W, self.grads, self.W[0].shape[0], self.cfg
        x = {"m1": torch.cat([g.flatten(1) for g in grads], 1)}  # m1 reads (grad W1, grad W2), m2 the reverse
        x["m2"] = torch.cat([x["m1"][:, grads[0][0].numel():], x["m1"][:, :grads[0][0].numel()]], 1)
        outs, self.state = self.group.step([x[k] for k in self.keys], self.state, self.record_)
        out, rec, eta = dict(zip(self.keys, outs)), {"grads": grads}, None
        if "m1" in out:
            f = out["m1"]["f"].view(K, 2, *W[0].shape[1:])
            W = [W[0] + f[:, 0], W[1] + f[:, 1]]
        if "m2" in out:
            if self.method == "lr_tele":
                lo, hi = cfg["STEP_CLAMP"]
                rec["eta_raw"] = e = out["m2"]["eta"].view(K)
                eta = e.clamp(lo, hi) if cfg["ETA_PARAM"] == "clamp" else lo + (hi - lo) * torch.sigmoid(e)
                W = [w - eta.view(K, 1, 1) * g for w, g in zip(W, grads)]
            rec["U"] = W
            W = self.teleport(W, out["m2"]["T"], rec)
        if self.record_:
            self.steps.append(rec)
        return W, eta

    def record(self, W, grads):
        """The new weights' gradients: the next step's LSTM input and, / K, the gradient of its
        term mean_k L_k(w_{t+1}) of the meta-loss."""
        if self.record_:
            self.steps[-1]["dL"] = grads
        self.W, self.grads = W, grads

    def teleport(self, U, T_raw, rec):
        """learned_teleport: W2 <- U2 g^-1, W1 <- s^-1(g s(U1 X^T)) X^+ with g = I + T,
        T = T_NORM T_raw / |T_raw|; g^-1 by the Neumann series to below rounding (`series_order`)
        with INVERSE='exact', the authors' first-order I - T with 'neumann'."""
        K, d = U[0].shape[:2]
        r = T_raw.view(K, d, d)
        nr = r.flatten(1).norm(dim=1).clamp_min(1e-30).view(K, 1, 1)
        T = r * (self.cfg["T_NORM"] / nr)
        g_inv = inverse(T, self.order, self.eye) if self.cfg["INVERSE"] == "exact" else -T + self.eye
        z = torch.bmm(U[0], self.h0)  # torch.bmm, not @: the same product, ~4 us less dispatch at 20 x 20
        a = self.act(z)
        b = torch.baddbmm(a, T, a)  # g a = a + T a
        rec.update(r=r, nr=nr, T=T, g_inv=g_inv, z=z, a=a, b=b)
        return [torch.bmm(self.act.inverse(b), self.Xp), torch.bmm(U[1], g_inv)]

    def backward(self):
        """d(meta-loss)/d(LSTM parameters) into their .grad, meta-loss = sum_t mean_k L_k(w_{t+1}):
        through the weight chain from the last step back (dA: the gradient w.r.t. w_{t+1}), the
        output gradients of every step collected, then LSTMGroup.backward."""
        cfg, K, slope = self.cfg, self.W[0].shape[0], self.act.slope
        dA, d_out = [torch.zeros_like(w) for w in self.W], [{} for _ in self.steps]
        for t in range(len(self.steps) - 1, -1, -1):
            s = self.steps[t]
            dA = [a + g / K for a, g in zip(dA, s["dL"])]
            if "m2" in self.nets:
                g_inv, U = s["g_inv"], s["U"]
                dV = torch.bmm(dA[0], self.Xp.mT)
                dV = torch.where(s["b"] > 0, dV, dV / slope)  # through s^-1(b) X^+
                dz = torch.baddbmm(dV, s["T"].mT, dV)  # g^T dV
                dz = torch.where(s["z"] > 0, dz, dz * slope)
                dU = [torch.bmm(dz, self.h0.mT), torch.bmm(dA[1], g_inv.mT)]
                d_ginv = torch.bmm(U[1].mT, dA[1])
                dT = torch.bmm(dV, s["a"].mT) - (torch.bmm(torch.bmm(g_inv.mT, d_ginv), g_inv.mT)
                                                 if cfg["INVERSE"] == "exact" else d_ginv)
                rhat = s["r"] / s["nr"]  # through T = T_NORM r / |r|
                dr = (dT - rhat * (rhat * dT).sum((1, 2), keepdim=True)) * (cfg["T_NORM"] / s["nr"])
                d_out[t]["m2"] = {"T": dr.flatten(1)}
                if self.method == "lr_tele":
                    lo, hi = cfg["STEP_CLAMP"]
                    e = s["eta_raw"]
                    d_eta = -sum((u * g_).sum((1, 2)) for u, g_ in zip(dU, s["grads"]))
                    d_eta = d_eta * (((e >= lo) & (e <= hi)).to(e.dtype) if cfg["ETA_PARAM"] == "clamp"
                                     else (hi - lo) * torch.sigmoid(e) * (1 - torch.sigmoid(e)))
                    d_out[t]["m2"]["eta"] = d_eta.view(K, 1)
                dA = dU
            if "m1" in self.nets:
                d_out[t]["m1"] = {"f": torch.cat([a.flatten(1) for a in dA], 1)}
        self.group.backward([[d[k] for k in self.keys] for d in d_out])


def regression_loss_and_grads(W, X, Y, act):
    """lib.models.loss_and_grads(W, X, Y, act, 'mse') for the two-layer regression (X, Y: (K, n, d)),
    the same operations with torch.bmm for torch.matmul (equal bitwise, tested; ~4 us less
    dispatch per product at K = 1): losses (K,) and [dL/dW1, dL/dW2] (K, d, d)."""
    z = torch.bmm(X, W[0].mT)
    m = act.derivative(z)
    h = z * m
    delta = torch.bmm(h, W[1].mT) - Y
    losses = 0.5 * delta.pow(2).sum((1, 2))
    return losses, [torch.bmm(torch.bmm(delta, W[1]).mul_(m).mT, X), torch.bmm(delta.mT, h)]


class MetaAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) whose step hands torch's fused kernel every tensor in the layout
    it is stored in: a transposed-layout weight (MetaLSTM), its gradient (set_grad) and its moments
    as their contiguous transposes (the kernel runs ~2.3x slower on non-contiguous tensors), the
    groups and tensors in reverse order. The same update (torch.optim.adam.adam, fused), state and
    state_dict as torch.optim.Adam."""

    def __init__(self, groups):
        super().__init__(groups, fused=True)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups[::-1]:
            if group["amsgrad"]:
                raise ValueError("MetaAdam: no amsgrad")
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in (p for p in group["params"] if p.grad is not None):
                st = self.state[p]
                if not st:  # as torch.optim.Adam(fused=True) initialises it
                    st.update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                              exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                flip = (lambda t: t) if p.is_contiguous() else (lambda t: t.T)  # noqa: E731
                for out, t in zip((params, grads, exp_avgs, exp_avg_sqs), (p, p.grad, st["exp_avg"], st["exp_avg_sq"])):
                    out.append(flip(t))
                steps.append(st["step"])
            (b1, b2), wd = group["betas"], group["weight_decay"]
            # last, the weights the next unroll's first step reads first: they are still in the cache (~3% faster)
            params, grads, exp_avgs, exp_avg_sqs, steps = (x[::-1] for x in (params, grads, exp_avgs, exp_avg_sqs, steps))
            adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False, beta1=b1,
                 beta2=b2, lr=group["lr"], weight_decay=wd, eps=group["eps"], maximize=group["maximize"])


def meta_adam(nets, cfg):
    """torch.optim.Adam over the LSTMs, lr M1_LR for m1 and M2_LR for m2 (Adam acts per
    parameter: as one Adam per LSTM); fused with BACKPROP='manual' (MetaAdam)."""
    groups = [{"params": net.parameters(), "lr": cfg["M1_LR"] if k == "m1" else cfg["M2_LR"]} for k, net in nets.items()]
    return MetaAdam(groups) if cfg["BACKPROP"] == "manual" else torch.optim.Adam(groups)


def trajectory(method, nets, opt, W, X, Y, act, cfg):
    """Meta-train on one batch of problems W, X, Y (K trajectories, STEPS steps): after every
    UNROLL steps the meta-loss sum_{t in unroll} mean_k L(w_{t+1}) is back-propagated through the
    updates and teleports into the LSTMs (by hand, `Unroll`, or by autograd through `update`:
    BACKPROP), `opt` steps, and weights and LSTM states are detached. Returns the losses
    (steps done, K) and, if the meta-loss turned non-finite (no Adam step, the batch ends there),
    the first step with a non-finite loss (the unroll's last if only the sum overflowed), else None."""
    manual, losses = cfg["BACKPROP"] == "manual", []
    states = {k: net.zero_state(W[0].shape[0], W[0]) for k, net in nets.items()}
    Xp = torch.linalg.pinv(X.mT) if manual else None  # X^+ of eq. (54), once per trajectory
    for _ in range(cfg["STEPS"] // cfg["UNROLL"]):
        W = [w.detach() for w in W]
        states = {k: tuple(s.detach() for s in v) for k, v in states.items()}
        grads, meta = (regression_loss_and_grads(W, X, Y, act) if manual
                       else loss_and_grads(W, X, Y, act, "mse"))[1], 0.0
        with torch.set_grad_enabled(not manual):
            unroll = Unroll(method, nets, W, grads, states, X, Xp, act, cfg) if manual else None
            for _ in range(cfg["UNROLL"]):
                if manual:
                    W = unroll.step()[0]
                    loss, grads = regression_loss_and_grads(W, X, Y, act)
                    unroll.record(W, grads)
                else:
                    W, states, _ = update(method, nets, W, grads, states, X, act, cfg)
                    loss, grads = loss_fn(W, X, Y, act, "mse"), loss_and_grads(W, X, Y, act, "mse")[1]
                meta = meta + loss.mean()
                losses.append(loss.detach())
            if not torch.isfinite(meta):
                bad = (~torch.isfinite(torch.stack(losses))).any(1).nonzero()
                return torch.stack(losses), int(bad[0]) + 1 if len(bad) else len(losses)
            if manual:
                states = unroll.states
                unroll.backward()  # writes every parameter's .grad
            else:
                opt.zero_grad()
                meta.backward()
        opt.step()
    return torch.stack(losses), None


def train(method, nets, cfg, act, seeds, draw, ckpt=None, label=None, progress=False):
    """Meta-training (Section 5.2) on the problems draw(seeds[b:b + BATCH]) -> W, X, Y, one batch
    of trajectories at a time (`trajectory`: truncated back-propagation, Adam lr M1_LR for m1,
    M2_LR for m2). The gradients enter the LSTMs as constants (no second derivatives, as in
    Andrychowicz et al. and the authors' code): lib.models.loss_and_grads makes no graph. A
    non-finite meta-loss skips the Adam step and ends that batch (hist["diverged"]: [its first
    trajectory, the first step with a non-finite loss, or the unroll's last if only the sum
    overflowed]). With a lib.progress.Checkpoint `ckpt`, LSTMs, Adam states, RNG state and history
    are saved after a batch (at most every CHECKPOINT_S s) and resumed from. `label` names the
    method in the tqdm bar (shown if `progress`) and in the checkpoint."""
    opt = meta_adam(nets, cfg)
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
        L, bad = trajectory(method, nets, opt, W, X, Y, act, cfg)  # (steps done, K)
        if bad is not None:
            hist["diverged"].append([b, bad])
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
