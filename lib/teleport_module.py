"""Teleport an ordinary PyTorch model: `teleport_module` and `random_teleport_module` for one
`nn.Module` and its `torch.optim` optimizer (the batched engine of lib.teleport is for the
project's own MLPs).

The symmetries are read off the model itself, a (nested) nn.Sequential of Linear, Conv2d (bias or
not), BatchNorm1d/2d, ReLU, LeakyReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout
and Identity. Linear layers are assumed to see (N, features), Conv2d and the pools (N, C, H, W).

group="rescale": g = diag(exp(a)), one a per hidden unit or channel. This is eq. (46) with a
positive diagonal g: a positively homogeneous sigma has sigma(g z) = g sigma(z), so eq. (46)'s
U sigma(z) sigma(g z)^+ is U g^{-1}, exact on every input, in train and eval mode. Per pattern:
  - Linear/Conv2d -> [ReLU, LeakyReLU, Dropout, Identity, pools, Flatten]* -> Linear/Conv2d:
    the first layer's output rows (weight[c], bias[c]) times alpha_c, the second's input columns
    weight[:, c] divided by alpha_c. A Flatten of (N, C, H, W) maps channel c to the H*W columns
    c*H*W .. (c+1)*H*W - 1 of the next Linear.
  - ... -> BatchNorm (affine) -> [the same layers]* -> Linear/Conv2d: the BN's weight[c] and
    bias[c] carry alpha_c (its normalised input is left alone, so train-mode batch statistics and
    eval-mode running statistics stay as they are); the layer before the BN is not scaled. (The
    BN's own scale invariance, absorbing a scaled conv channel into the batch statistics, is
    exact only up to BN's eps, so it is not used; no BN buffer ever changes.)
  - A BN without affine parameters, or a unit whose signal reaches a BN, is not scaled.
group="gl": eq. (46) on each pair Linear V -> LeakyReLU(slope > 0) -> Linear U: V <- g V,
U <- U sigma(z) sigma(g z)^+, z = V h + b (the bias folded in as an extra input column, so
b <- g b), g = I + T, h the input of V on the teleport batch; all pairs at once with the current
activations, as lib.actions.GLAction(46). Exact on the teleport batch when batch <= hidden width.

Any other layer (Tanh, attention, a module with its own forward, a module used twice) ends the
symmetry at it: the units before it are left alone, the symmetry resumes at the next Linear or
Conv2d, and a one-line notice names the layer (warnings.warn and report["notices"]).

Optimizer state after a teleport (App. F.1's strategies), for torch.optim SGD (momentum),
Adagrad, RMSprop, Adam (AdamW): 'reset' empties the state (a fresh optimizer's), 'keep' leaves it,
'transport' moves it with the weights. Under rescale, buffers that are running sums of gradients
(momentum_buffer of SGD, exp_avg of Adam, grad_avg of centred RMSprop) transform as gradients do,
the cotangent map: grad L(g.w) = g^{-T} grad L(w), so a scaled row is divided by alpha and a
divided column multiplied by it; sums of squared gradients (Adagrad sum, RMSprop square_avg, Adam
exp_avg_sq, max_exp_avg_sq) by alpha^{-2} and alpha^2; RMSprop's momentum_buffer holds
grad / sqrt(square_avg), which rescaling leaves unchanged, and is kept. Under gl there is no
cotangent map (the action is not linear in w, and sigma(z) sigma(gz)^+ is singular when the
action is exact), so the first moments are pushed forward as tangent vectors by the action's
derivative (torch.func.jvp, the batch inputs of each pair held fixed: lib.optim's transport) and
the second moments are kept.
"""
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from lib.config import UsageError

GROUPS = ("rescale", "gl")
OBJECTIVES = ("grad_norm", "log_grad_norm", "a_norm", "sharpness")
STATES = ("reset", "keep", "transport")
# optimizer state buffers: the power of the gradient they hold (1: first moment, 2: second, 0: neither)
MOMENTS = {torch.optim.SGD: {"momentum_buffer": 1},
           torch.optim.Adagrad: {"sum": 2},
           torch.optim.RMSprop: {"square_avg": 2, "grad_avg": 1, "momentum_buffer": 0},
           torch.optim.Adam: {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}}
SHARPNESS_TS = (1e-4, 2e-2, 1e-3)  # eq. (4)'s displacements t_i: start, stop (excluded), step

POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
KNOWN = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten) + POINTWISE + POOLS


# ---- reading the model ----

def _is(m, types):
    """m is one of `types` and runs that type's own forward (a subclass with its own is not)."""
    return any(isinstance(m, t) and type(m).forward is t.forward for t in types)


def _leaves(model, notices):
    """[(name, module)] in the order the nested nn.Sequential runs them; layers not understood
    come back as (name, None), each with a one-line notice."""
    counts, out = {}, []
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1

    def walk(prefix, m):
        if _is(m, (nn.Sequential,)):
            for n, c in m.named_children():
                walk(f"{prefix}.{n}" if prefix else n, c)
        elif _is(m, KNOWN) and counts[id(m)] == 1:
            out.append((prefix, m))
        else:
            why = "used more than once" if counts[id(m)] > 1 else "not understood"
            notices.append(f"layer {prefix or '<model>'} ({type(m).__name__}) is {why}: the symmetry "
                           "stops there (units before it are left alone) and resumes at the next Linear/Conv2d")
            out.append((prefix, None))
    walk("", model)
    return out


@dataclass
class Units:
    """One set of n hidden units scaled together: ops = [(parameter name, axis, sign, repeat)],
    the parameter multiplied by exp(sign * a) along `axis` (a repeated `repeat` times, Flatten)."""
    n: int
    ops: list
    layout: str  # what the signal is after the producer: 'channels' (N, C, ...), 'features', 'flat'


def _producer(name, m):
    """Units of a layer's outputs: Linear/Conv2d rows and bias, or an affine BN's weight and bias."""
    pre = f"{name}." if name else ""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        n, layout = (m.out_features, "features") if isinstance(m, nn.Linear) else (m.out_channels, "channels")
    elif m.affine:
        n, layout = m.num_features, "channels" if isinstance(m, nn.BatchNorm2d) else "features"
    else:
        return None
    ops = [(pre + p, 0, 1, 1) for p in ("weight", "bias") if getattr(m, p) is not None]
    return Units(n, ops, layout)


def _consume(units, name, m):
    """Close `units` at the next Linear/Conv2d (its input columns / channels divided by alpha), or
    None where the layer cannot take them (sizes or layout do not fit, grouped conv)."""
    pre = f"{name}." if name else ""
    if isinstance(m, nn.Linear) and units.layout in ("features", "flat"):
        rep, ok = divmod(m.in_features, units.n)
        if ok == 0 and (rep == 1 or units.layout == "flat"):
            return Units(units.n, units.ops + [(pre + "weight", 1, -1, rep)], units.layout)
    if isinstance(m, nn.Conv2d) and units.layout == "channels" and m.in_channels == units.n and m.groups == 1:
        return Units(units.n, units.ops + [(pre + "weight", 1, -1, 1)], units.layout)
    return None


def rescale_units(leaves):
    """The unit sets of the positive rescaling symmetry (see the module docstring), [Units]."""
    found, open_ = [], None
    for name, m in leaves:
        if m is None or isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            open_ = None if m is None else _producer(name, m)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            closed = open_ and _consume(open_, name, m)
            if closed:
                found.append(closed)
            open_ = _producer(name, m)
        elif open_ is None or _is(m, POINTWISE):
            continue
        elif _is(m, POOLS):
            open_ = open_ if open_.layout == "channels" else None
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                open_ = None
            elif open_.layout == "channels":
                open_ = Units(open_.n, open_.ops, "flat")
    return found


@dataclass
class Pair:
    """A layer pair of eq. (46): V (Linear) -> LeakyReLU(slope) -> U (Linear)."""
    v: nn.Linear
    v_weight: str
    v_bias: str  # None without bias
    u_weight: str
    slope: float


def gl_pairs(leaves, notices):
    """The pairs Linear -> LeakyReLU(slope > 0) -> Linear of eq. (46); a pair joined by another
    activation (ReLU: not invertible) gets a notice and is left alone."""
    pairs = []
    for (nv, v), (na, a), (nu, u) in zip(leaves, leaves[1:], leaves[2:]):
        if not (isinstance(v, nn.Linear) and isinstance(u, nn.Linear) and a is not None):
            continue
        pv, pu = (f"{nv}." if nv else ""), (f"{nu}." if nu else "")
        if isinstance(a, nn.LeakyReLU) and a.negative_slope > 0 and v.out_features == u.in_features:
            pairs.append(Pair(v, pv + "weight", pv + "bias" if v.bias is not None else None, pu + "weight",
                              a.negative_slope))
        elif _is(a, POINTWISE[:2]):
            notices.append(f"layers {nv} and {nu} are joined by {type(a).__name__}, which is not invertible: "
                           "group 'gl' leaves that pair alone")
    return pairs


# ---- the actions ----

def rescale(params, units, alphas):
    """g.w for g = diag(exp(a)) (eq. (46) with a positive diagonal g): for each unit set, its
    producer's rows times exp(a), its consumer's input columns times exp(-a). params: {name:
    tensor}; alphas: one a (n,) per unit set. Names missing from params are skipped, so the same
    map transforms optimizer buffers (a -> -a: gradients; a -> -2a: squared gradients)."""
    new = dict(params)
    for u, a in zip(units, alphas):
        for name, axis, sign, rep in u.ops:
            if name in new:
                s = (sign * a).exp().repeat_interleave(rep)
                new[name] = new[name] * s.view([-1 if d == axis else 1 for d in range(new[name].dim())])
    return new


def gl46(params, pairs, Ts, hs):
    """eq. (46) on every pair at once, g = I + T (T: (n, n)): V <- g V, b <- g b,
    U <- U sigma(z) sigma(g z)^+ with z = V h + b in column form (n, B); hs: the input of each V
    on the batch, (B, d_in)."""
    new, right = dict(params), {}
    for p, T, h in zip(pairs, Ts, hs):
        g = torch.eye(T.shape[0], dtype=T.dtype, device=T.device) + T
        z = params[p.v_weight] @ h.T
        if p.v_bias is not None:
            z = z + params[p.v_bias].unsqueeze(1)
            new[p.v_bias] = g @ new[p.v_bias]
        new[p.v_weight] = g @ new[p.v_weight]
        right[p.u_weight] = F.leaky_relu(z, p.slope) @ torch.linalg.pinv(F.leaky_relu(g @ z, p.slope))
    for name, r in right.items():
        new[name] = new[name] @ r
    return new


class Symmetry:
    """The group a model has: the unit sets (rescale) or pairs (gl), and the notices found."""

    def __init__(self, model, group):
        self.model, self.group, self.notices = model, group, []
        leaves = _leaves(model, self.notices)
        parts = rescale_units(leaves) if group == "rescale" else gl_pairs(leaves, self.notices)
        known = dict(model.named_parameters())
        self.parts = [p for p in parts if all(n in known for n in self._names(p))]
        if len(self.parts) < len(parts):  # e.g. a parametrised weight (weight_norm): its name is not a parameter
            self.notices.append(f"{len(parts) - len(self.parts)} unit set(s) or pair(s) left alone: "
                                "a weight or bias there is not a plain parameter")
        if not self.parts:
            self.notices.append(f"group {group!r} found nothing to act on in this model: it is left unchanged")

    def _names(self, part):
        if self.group == "rescale":
            return [op[0] for op in part.ops]
        return [n for n in (part.v_weight, part.v_bias, part.u_weight) if n is not None]

    def shapes(self):
        return [(u.n,) if self.group == "rescale" else (u.v.out_features,) * 2 for u in self.parts]

    def identity(self, like):
        """The identity's parameters: a = 0 per unit set (rescale), g = I per pair (gl)."""
        if self.group == "rescale":
            return [torch.zeros(s, dtype=like.dtype, device=like.device) for s in self.shapes()]
        return [torch.eye(s[0], dtype=like.dtype, device=like.device) for s in self.shapes()]

    def batch_inputs(self, params, buffers, inputs):
        """gl: the input of each pair's V on the batch under `params`, (B, d_in); rescale: None."""
        if self.group == "rescale":
            return None
        seen = {}
        hooks = [p.v.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
                 for i, p in enumerate(self.parts)]
        try:
            with torch.no_grad():
                _forward(self.model, params, buffers, inputs)
        finally:
            for h in hooks:
                h.remove()
        hs = [seen[i].reshape(-1, seen[i].shape[-1]) for i in range(len(self.parts))]
        wide = [f"{p.v_weight} ({p.v.out_features})" for p, h in zip(self.parts, hs) if len(h) > p.v.out_features]
        if wide and not any(line.startswith("batch of") for line in self.notices):
            self.notices.append(f"batch of {len(hs[0])} > hidden width of {', '.join(wide)}: eq. (46) is approximate "
                                "there, the loss moves (loss_before/after)")
            warnings.warn(f"teleport_module: {self.notices[-1]}", stacklevel=4)
        return hs

    def __call__(self, params, elements, hs):
        if self.group == "rescale":
            return rescale(params, self.parts, elements)
        return gl46(params, self.parts, elements, hs)

    def size(self, elements):
        """Frobenius norm of the whole Lie-algebra element: a over all units, or T over all pairs."""
        return float(sum(e.pow(2).sum() for e in elements) ** 0.5) if elements else 0.0


# ---- objectives ----

def _forward(model, params, buffers, x):
    """model(x) with `params`; the buffers are copies, so BN's running statistics never change."""
    return functional_call(model, (params, {k: b.clone() for k, b in buffers.items()}), (x,))


def _adagrad_A(optimizer, model, names):
    """A = (eps + G)^{-1/2} (App. F.1) from torch.optim.Adagrad's sums G, one per parameter."""
    if not isinstance(optimizer, torch.optim.Adagrad):
        raise UsageError(f"objective 'a_norm' needs a torch.optim.Adagrad as optimizer, got {type(optimizer).__name__}")
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            G = optimizer.state.get(p, {}).get("sum", torch.full_like(p, group["initial_accumulator_value"]))
            found[id(p)] = (G + group["eps"]).rsqrt()
    ps = dict(model.named_parameters())
    return [found.get(id(ps[n]), torch.ones_like(ps[n])) for n in names]


def make_objective(name, model, buffers, loss_fn, x, y, names, optimizer=None, ts=None, generator=None):
    """f(params) -> scalar on the batch (x, y): 'grad_norm' ||grad L||^2 over the trainable
    parameters `names` (Sec. 5.1), 'log_grad_norm' its log, 'a_norm' ||grad L||_A^2 (App. F.1),
    'sharpness' phi of eq. (4), mean_i L(w + t_i d_i), with len(ts) unit directions d_i drawn once
    here: one Gaussian vector over all trainable parameters, normalised (uniform on the sphere)."""
    if name == "sharpness":
        ts = torch.arange(*SHARPNESS_TS).tolist() if ts is None else list(ts)
        ref = [p for n, p in model.named_parameters() if n in names]
        dirs = [[torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in ref] for _ in ts]
        dirs = [[d / sum(e.pow(2).sum() for e in D).sqrt() for d in D] for D in dirs]
        return lambda P: torch.stack([loss_fn(_forward(model, {**P, **{n: P[n] + t * d for n, d in zip(names, D)}},
                                                       buffers, x), y) for t, D in zip(ts, dirs)]).mean()
    A = _adagrad_A(optimizer, model, names) if name == "a_norm" else None

    def f(P):
        grads = torch.autograd.grad(loss_fn(_forward(model, P, buffers, x), y), [P[n] for n in names],
                                    create_graph=True, allow_unused=True)
        sq = sum((g.pow(2) * (1 if A is None else a)).sum() for g, a in zip(grads, A or grads) if g is not None)
        return sq.log() if name == "log_grad_norm" else sq
    return f


# ---- optimizer state ----

def _check(group, objective, state, optimizer, steps=0, lr=0.0):
    if group not in GROUPS:
        raise UsageError(f"unknown symmetry group {group!r}; known: {', '.join(GROUPS)}")
    if objective == "curvature":
        raise UsageError("objective 'curvature' (psi, eq. 5) is defined for the eq.-(54) action on bias-free "
                         "MLPs only: use lib.teleport.teleport")
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown teleport objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if state not in STATES:
        raise UsageError(f"unknown optimizer-state strategy {state!r}; known: {', '.join(STATES)}")
    if optimizer is not None and not isinstance(optimizer, tuple(MOMENTS)):
        raise UsageError(f"optimizer {type(optimizer).__name__} is not supported; known: "
                         + ", ".join(t.__name__ for t in MOMENTS))
    if not (steps >= 0 and lr >= 0):
        raise UsageError(f"teleport steps and step size must be >= 0, got steps={steps}, lr={lr}")


def _moments(optimizer, model, power):
    """{(parameter name, key): buffer} of the optimizer's buffers that hold gradients to `power`."""
    keys = next(v for t, v in MOMENTS.items() if isinstance(optimizer, t))
    names = {id(p): n for n, p in model.named_parameters()}
    return {(names[id(p)], k): buf for p, st in optimizer.state.items() if id(p) in names
            for k, buf in st.items() if keys.get(k) == power and torch.is_tensor(buf)}


def carry_state(optimizer, model, sym, state, total, pushed=None):
    """Apply the state strategy after the teleport `total` (rescale: the summed a per unit set);
    pushed: gl's first moments already pushed forward, {(name, key): tensor}."""
    if optimizer is None or state == "keep":
        return
    if state == "reset":
        optimizer.state.clear()  # what a fresh optimizer has
        return
    if sym.group == "gl":
        firsts, byname = pushed or {}, {}
    else:
        firsts = _moments(optimizer, model, 1)
        seconds = _moments(optimizer, model, 2)
        firsts = _transform(firsts, sym, [-a for a in total])
        byname = _transform(seconds, sym, [-2 * a for a in total])
    params = dict(model.named_parameters())
    for (name, key), buf in {**firsts, **byname}.items():
        optimizer.state[params[name]][key].copy_(buf)


def _transform(bufs, sym, alphas):
    """Each buffer mapped by the rescaling with exponents `alphas` (per key, since rescale works by name)."""
    out = {}
    for key in {k for _, k in bufs}:
        mapped = rescale({n: b for (n, k), b in bufs.items() if k == key}, sym.parts, alphas)
        out.update({(n, key): b for n, b in mapped.items()})
    return out


# ---- the teleport ----

def _losses(rec, model, params0, params1, buffers, loss_fn, inputs, targets, heldout):
    with torch.no_grad():
        for tag, (x, y) in (("", (inputs, targets)), ("heldout_", heldout)):
            if loss_fn is not None and x is not None and y is not None:
                rec[f"{tag}loss_before"] = float(loss_fn(_forward(model, params0, buffers, x), y))
                rec[f"{tag}loss_after"] = float(loss_fn(_forward(model, params1, buffers, x), y))


def _write(model, params):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


def _begin(model, group):
    sym = Symmetry(model, group)
    for line in sym.notices:
        warnings.warn(f"teleport_module: {line}", stacklevel=3)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return sym, params, dict(model.named_buffers())


def teleport_module(model, loss_fn, inputs, targets, *, group="rescale", objective="grad_norm", maximize=True,
                    steps=10, lr=1e-2, optimizer=None, state="reset", heldout=None, sharpness_ts=None,
                    generator=None):
    """Teleport `model` in place on the batch (inputs, targets): `steps` steps of gradient ascent
    (descent if not maximize) on the Lie-algebra element at the identity, each followed by g.w
    (Sec. 3, Algorithm 1's inner loop); then the optimizer's state per `state`.
    loss_fn(model(inputs), targets) -> scalar; heldout: (inputs, targets) of a second batch.
    Returns a dict of floats and strings: objective_before/after, loss_before/after (and
    heldout_*), size (Frobenius norm of the total algebra element), steps, time_s, notices...
    The model's mode is used as it is: in train mode BatchNorm normalises with batch statistics
    (the teleport never updates its running statistics) and Dropout draws a new mask at every
    evaluation, so the objective is noisy; in eval mode the teleport is deterministic."""
    _check(group, objective, state, optimizer, steps, lr)
    t0 = time.perf_counter()
    sym, params, buffers = _begin(model, group)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise UsageError("the model has no trainable parameters: nothing to teleport")
    f = make_objective(objective, model, buffers, loss_fn, inputs, targets, names, optimizer, sharpness_ts, generator)
    leaf = lambda P: {n: p.detach().requires_grad_(n in names) for n, p in P.items()}  # noqa: E731
    before = float(f(leaf(params)).detach())
    pushed = _gl_moments(optimizer, model, group, state)
    params0, (params, total, pushed, taken) = params, _ascend(sym, f, leaf, params, buffers, inputs, steps,
                                                              lr if maximize else -lr, pushed)
    rec = {"group": group, "objective": objective, "state": state, "maximize": bool(maximize), "lr": float(lr),
           "steps": taken, "objective_before": before, "objective_after": float(f(leaf(params)).detach()),
           "size": sym.size(_algebra(sym, total)),
           "units": sum(s[0] for s in sym.shapes())}
    return _finish(rec, model, sym, params0, params, total, pushed, buffers, optimizer, state,
                   (loss_fn, inputs, targets, heldout), t0)


def _gl_moments(optimizer, model, group, state):
    """First moments to push forward through the ascent: only for 'transport' under 'gl' (under
    'rescale' carry_state transports them from the group element alone)."""
    return _moments(optimizer, model, 1) if optimizer is not None and state == "transport" and group == "gl" else {}


def _finish(rec, model, sym, old, new, element, pushed, buffers, optimizer, state, data, t0):
    """Complete a teleport: the losses before/after into `rec`, the new weights into the model,
    the optimizer state carried over by `state`, the notices and the wall time. Returns rec."""
    loss_fn, inputs, targets, heldout = data
    _losses(rec, model, old, new, buffers, loss_fn, inputs, targets, heldout or (None, None))
    _write(model, new)
    carry_state(optimizer, model, sym, state, element, pushed)
    rec.update(notices=list(sym.notices), time_s=time.perf_counter() - t0)
    return rec


def _ascend(sym, f, leaf, params, buffers, inputs, steps, lr, pushed):
    """`steps` steps T <- lr * d f(g.w) / dT at T = 0, w <- g.w (lr < 0: descent). A step whose
    objective or weights are not finite is not taken: the ascent stops there, with a notice.
    Returns (params, total group element, pushed first moments, steps taken)."""
    total = sym.identity(next(iter(params.values()), torch.zeros(())))
    for taken in range(steps if sym.parts else 0):
        hs = sym.batch_inputs(params, buffers, inputs)
        zero = [torch.zeros_like(t, requires_grad=True) for t in total]
        value = f(sym(leaf(params), zero, hs))
        grads = torch.autograd.grad(value, zero, allow_unused=True) if torch.isfinite(value) else None
        step = [lr * (torch.zeros_like(z) if g is None else g) for z, g in zip(zero, grads or zero)]
        new = {n: p.detach() for n, p in sym(params, step, hs).items()}
        if grads is None or not all(torch.isfinite(p).all() for p in new.values()):
            sym.notices.append(f"step {taken + 1} gave a non-finite objective or weights: stopped after "
                               f"{taken} steps (a smaller lr goes further)")
            warnings.warn(f"teleport_module: {sym.notices[-1]}", stacklevel=3)
            return params, total, pushed, taken
        pushed = _push(sym, params, step, hs, pushed)
        params, total = new, _compose(sym, total, step)
    return params, total, pushed, steps if sym.parts else 0


def _compose(sym, total, step):
    """Total group element so far: a summed (rescale), g = (I + T_s) ... (I + T_1) (gl)."""
    if sym.group == "rescale":
        return [a + s.detach() for a, s in zip(total, step)]
    return [g + s.detach() @ g for g, s in zip(total, step)]


def _algebra(sym, total):
    """The Lie-algebra element actually applied: a (rescale) or g - I (gl)."""
    if sym.group == "rescale":
        return total
    return [g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device) for g in total]


def _push(sym, params, step, hs, tangents):
    """gl's first moments pushed forward by the derivative of w -> g.w (batch inputs held fixed)."""
    if not tangents:
        return tangents
    out = {}
    for key in {k for _, k in tangents}:
        t = {n: tangents.get((n, key), torch.zeros_like(p)) for n, p in params.items()}
        _, d = jvp(lambda P: sym(P, [s.detach() for s in step], hs), (params,), (t,))
        out.update({(n, k): d[n].detach() for n, k in tangents if k == key})
    return out


def random_teleport_module(model, size, *, group="rescale", generator=None, optimizer=None, state="reset",
                           loss_fn=None, inputs=None, targets=None, heldout=None):
    """Act on `model` in place with a random group element whose Lie-algebra element has
    Frobenius norm `size` over all units (rescale: g = diag(exp(a))) or all pairs (gl: g = I + T,
    needs `inputs`), direction Gaussian; the control "random teleport of the same size" is
    random_teleport_module(model, size=report["size"]). Returns a report like teleport_module's."""
    _check(group, "grad_norm", state, optimizer)
    if group == "gl" and inputs is None:
        raise UsageError("a random 'gl' teleport acts through the batch: give inputs")
    if not size >= 0:
        raise UsageError(f"teleport size must be >= 0, got {size}")
    t0 = time.perf_counter()
    sym, params, buffers = _begin(model, group)
    p0 = next(iter(params.values()), torch.zeros(()))
    draws = [torch.randn(s, generator=generator, dtype=p0.dtype).to(p0.device) for s in sym.shapes()]
    norm = sym.size(draws)
    elements = [d * (size / norm) for d in draws] if norm > 0 else draws
    hs = sym.batch_inputs(params, buffers, inputs)
    pushed = _gl_moments(optimizer, model, group, state)
    pushed = _push(sym, params, elements, hs, pushed)
    new = {n: p.detach() for n, p in sym(params, elements, hs).items()}
    rec = {"group": group, "objective": "random", "state": state, "steps": 0, "size": sym.size(elements),
           "units": sum(s[0] for s in sym.shapes())}
    return _finish(rec, model, sym, params, new, elements, pushed, buffers, optimizer, state,
                   (loss_fn, inputs, targets, heldout), t0)
