"""Teleportation: gradient ascent (or descent) on Lie-algebra elements of all acted layer pairs
at once (Section 3, Algorithm 1's inner loop), and random teleportation of a given size."""
import logging
import time

import torch
from torch.func import jvp

from lib.actions import GLAction, random_algebra, zero_algebra
from lib.config import UsageError
from lib.metrics import curvature, grad_norm_sq, random_directions, random_lie_elements, sharpness
from lib.models import loss_fn, losses_per_model

STEPS_PER_CALL = 2  # fast-path teleport steps per compiled call (teleport_optimization.py compiles with 2 steps)
OBJECTIVES = ("grad_norm", "log_grad_norm", "a_norm", "sharpness", "curvature")


def make_objective(name, act, loss="ce", precond=None, ts=None, kind="sphere", n_curves=1,
                   curvature_action=None, generator=None):
    """Objective f(W, X, Y) -> (K,) to climb: 'grad_norm' ||grad L||^2; 'log_grad_norm' its log
    (the same ascent direction, steps relative to ||grad L||^2); 'a_norm' ||grad L||_A^2
    (needs precond, App. F.1); 'sharpness' phi of eq. (4) with displacements ts and fresh random
    directions each call; 'curvature' psi of eq. (5) over n_curves fresh random curves (eq. 54)."""
    if name == "grad_norm":
        f = lambda W, X, Y: grad_norm_sq(W, X, Y, act, loss)  # noqa: E731
        f.fast = (act, loss)  # teleport's fast path knows this objective (grad_norm_ascent)
        return f
    if name == "log_grad_norm":
        return lambda W, X, Y: grad_norm_sq(W, X, Y, act, loss).log()
    if name == "a_norm":
        if precond is None:
            raise UsageError("objective 'a_norm' needs the optimizer's AdaGrad preconditioner")
        return lambda W, X, Y: grad_norm_sq(W, X, Y, act, loss, precond)
    if name == "sharpness":
        return lambda W, X, Y: sharpness(W, X, Y, act, ts, random_directions(W, len(ts), kind, generator), loss)
    if name == "curvature":
        return lambda W, X, Y: torch.stack([curvature(W, X, act, random_lie_elements(W, generator), curvature_action)
                                            for _ in range(n_curves)]).mean(0)
    raise UsageError(f"unknown teleport objective {name!r}; known: {', '.join(OBJECTIVES)}")


def _solve_pinv(A, rtol=None):
    """A^+ = A^T (A A^T)^{-1} for A (K, m, n), m <= n, from a Cholesky factor of the m x m Gram matrix
    in float64 (the product with A^T too: in float32 it errs by ~5e-7, and that moved eq. (46)'s
    small loss drift of a teleport by its own size; tests/test_teleport_relu_rescaling.py), and whether
    it is safe for every model (a 0-dim bool tensor, no sync): the Cholesky
    succeeded and lambda_min / lambda_max >= 1 / (tr(A A^T) tr((A A^T)^{-1})) exceeds rtol^2, so no
    singular value of A is below pinv's cut-off rtol * sigma_max (rtol = max(m, n) * eps of A's dtype)."""
    m, n = A.shape[-2:]
    rtol = max(m, n) * torch.finfo(A.dtype).eps if rtol is None else rtol
    A64 = A.detach().double()
    gram = A64 @ A64.mT
    L, info = torch.linalg.cholesky_ex(gram)
    eye = torch.eye(m, dtype=L.dtype, device=L.device)
    inv = torch.cholesky_inverse(torch.where((info == 0).view(-1, *[1] * (L.dim() - 1)), L, eye))  # failed: I, unused
    tr = lambda M: M.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    ok = (info == 0).all() & (tr(gram) * tr(inv) * rtol ** 2 < 1).all()
    return (A64.mT @ inv).to(A.dtype), ok


def pinv_rows(A, rtol=None):
    """Moore-Penrose pseudo-inverse of A (K, m, n) of full row rank m <= n by _solve_pinv (a Cholesky
    solve in float64, not an SVD of A); torch.linalg.pinv(A) where m > n or _solve_pinv is not
    safe for every model. Returns (A^+ (K, n, m) in A's dtype, True if it came from the solve)."""
    if A.shape[-2] <= A.shape[-1]:
        P, ok = _solve_pinv(A, rtol)
        if bool(ok):
            return P, True
    return torch.linalg.pinv(A.detach()), False


# The fast path works in the paper's column form: a layer's pre-activations on the batch are
# Z_j = W_j sigma(Z_{j-1}) (K, d_j, B), one column per example. Every product with a layer's small
# matrix then has the batch as its long side, the layout in which MKL's batched GEMM is fast (a
# (5, 10, 10) @ (5, 10, 200) product: 5 us; the same in rows, (5, 200, 10) @ (5, 10, 10): 15 us),
# and autograd's products in the backward follow it: the compiled ||grad L||^2 step is ~40% faster
# than in rows (benchmarks/bench_teleport.py).
def _preacts(Z0, Ws, act):
    """Pre-activations of every layer but the last, in columns: [Z_1 = W_1 X^T (given), Z_2 = W_2 sigma(Z_1), ...]."""
    Zs = [Z0]
    for w in Ws[:-1]:
        Zs.append(w @ act(Zs[-1]))
    return Zs


def _gl46_move(W, Ts, Zs, act, pairs, pinv=_solve_pinv):
    """gl46_move's formula with a given pseudo-inverse; returns (W', Z_1', all solves safe)."""
    new, right, Z0, ok = list(W), [None] * len(W), Zs[0], torch.ones((), dtype=torch.bool, device=W[0].device)
    for T, m in zip(Ts, pairs):
        g = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device) + T
        gz = g @ Zs[m]
        new[m] = g @ W[m]
        P, safe = pinv(act(gz))
        right[m + 1], ok = act(Zs[m]) @ P, ok & safe
        Z0 = gz if m == 0 else Z0
    return [w if r is None else w @ r for w, r in zip(new, right)], Z0, ok


def gl46_move(W, Ts, Zs, act, pairs):
    """Eq. (46) with g = I + T on the acted `pairs`, as lib.actions.GLAction(46) but with the
    pseudo-inverse from pinv_rows: V <- g V, U <- U sigma(z) sigma(g z)^+ with z = V h the pair's
    pre-activations of the current weights, given in columns: Zs[m] (K, n, B) (_preacts).
    W: (K, out, in); Ts: (K, n, n) per pair. Returns the new weights and the first layer's new
    pre-activations g_1 Z_1 (= W_1' X^T, kept without the input width)."""
    return _gl46_move(W, Ts, Zs, act, pairs, lambda A: (pinv_rows(A)[0], True))[:2]


def _grad_norm_cols(Z0, Ws, gram, Y, act, loss):
    """||grad_W L||^2 per model (K,) by backpropagation written out (differentiable once, in
    columns), from the first layer's pre-activations Z0 = W_1 X^T (K, d_1, B), the other layers Ws
    and the batch's Gram matrix gram = X X^T (B, B): ||dL/dW_1||^2 = tr(delta_1 X X^T delta_1^T), so
    the input width d_0 drops out. sigma' is held constant (a.e.), as in autograd's second derivative."""
    Zs = _preacts(Z0, Ws, act)
    out, B = Ws[-1] @ act(Zs[-1]), Z0.shape[-1]
    if loss == "ce":
        delta = (torch.softmax(out, -2) - torch.nn.functional.one_hot(Y, out.shape[-2]).T.to(out)) / B
    else:
        delta = out - Y.mT
    total = 0
    for j in range(len(Ws) - 1, -1, -1):
        total = total + (delta @ act(Zs[j]).mT).pow(2).sum((1, 2))
        delta = (Ws[j].mT @ delta) * act.derivative(Zs[j].detach())
    gd = (delta @ gram).detach()  # d/d delta tr(delta gram delta^T) = 2 delta gram (symmetric): one GEMM, not two
    return total + 2 * (gd * delta).sum((1, 2)) - (gd * delta.detach()).sum((1, 2))


def _ascent_objective(Ts, Z0, Ws, Zs, Aps, gram, Y, act, loss, pairs):
    """||grad L||^2 (summed over models, and per model) of the weights linear in T of
    grad_norm_ascent: W_1's pre-activations Z0 (K, d_1, B), the other layers Ws, each pair's
    pre-activations Zs[m] (K, n, B) and sigma(z)^+ Aps (K, B, n), in the order of `pairs`."""
    Wl, Z = [None, *Ws], Z0
    for T, m, Ap in zip(Ts, pairs, Aps):
        if m == 0:
            Z = Z + T @ Z
        else:
            Wl[m] = Wl[m] + T @ Wl[m]
        D = act.derivative(Zs[m]) * (T @ Zs[m])  # sigma'(z) * (T z)
        Wl[m + 1] = Wl[m + 1] - Wl[m + 1] @ (D @ Ap)
    obj = _grad_norm_cols(Z, Wl[1:], gram, Y, act, loss)
    return obj.sum(), obj


def _ascent_grads(Z0, Ws, Zs, Aps, gram, Y, act, loss, pairs):
    """_ascent_objective's value (K,) and gradients at T = 0 by the chain rule through its linear
    maps, from one backward of ||grad L||^2 in (Z0, W_2, ...) (D_0 = dF/dZ0, D_j = dF/dW_j): pair m
    moves V (= Z0 for m = 0: Z0 + T Z0; else W_m + T W_m) and U = W_{m+1} - W_{m+1} (sigma'(z) * (T z))
    sigma(z)^+, so dF/dT = D_m W_m^T (D_0 Z0^T for m = 0) - (sigma'(z) * (W_{m+1}^T D_{m+1} sigma(z)^+^T)) z^T,
    z = Zs[m] (K, n, B) in columns. No product with T = 0 and no backward through one. Aps as _ascent_objective."""
    (dZ, dW), obj = torch.func.grad_and_value(lambda Z, V: (lambda o: (o.sum(), o))(
        _grad_norm_cols(Z, V, gram, Y, act, loss)), argnums=(0, 1), has_aux=True)(Z0, list(Ws))
    D, Wl, grads = [dZ, *dW], [None, *Ws], []
    for m, Ap in zip(pairs, Aps):
        right = act.derivative(Zs[m]) * ((Wl[m + 1].mT @ D[m + 1]) @ Ap.mT)
        grads.append((D[0] - right) @ Z0.mT if m == 0 else D[m] @ Wl[m].mT - right @ Zs[m].mT)
    return obj[1], grads


def _ascent_step(W, Z0, gram, Y, act, loss, pairs):
    """One step of grad_norm_ascent before the rank check: (objective (K,), grads per pair,
    pre-activations Zs, whether every sigma(z)^+ came safely from the solve)."""
    Zs = _preacts(Z0, W[1:], act)
    Aps, oks = zip(*(_solve_pinv(act(Zs[m])) for m in pairs))
    Ts = [torch.zeros(W[m].shape[0], W[m].shape[1], W[m].shape[1], dtype=W[0].dtype, device=W[0].device)
          for m in pairs]
    grads, (_, obj) = torch.func.grad_and_value(_ascent_objective, has_aux=True)(
        Ts, Z0, W[1:], Zs, list(Aps), gram, Y, act, loss, pairs)
    return obj, grads, Zs, torch.stack(oks).all()


_COMPILED = {}


def _quiet_shim(record):
    """Drops inductor's note that an op (the Cholesky) has no C shim and goes through ATen: expected."""
    return "missing a c-shim implementation" not in record.getMessage()


def _compiled(fn, mode):
    """torch.compile of one of the fast path's steps, once per (function, mode); mode False: fn itself."""
    if not mode:
        return fn
    key = (fn.__name__, "default" if mode is True else mode)
    if key not in _COMPILED:  # default (CPU): a C++ wrapper around the kernels, not Python (~5% of a step),
        opts = {"mode": key[1]} if key[1] != "default" else {"options": {"cpp_wrapper": True}}
        logging.getLogger("torch._inductor.ir").addFilter(_quiet_shim)  # which calls the Cholesky through ATen
        _COMPILED[key] = torch.compile(fn, dynamic=False, **opts)
    return _COMPILED[key]


def grad_norm_ascent(W, Z0, gram, Y, act, loss, pairs, compile=False):
    """||grad L||^2 at W (K,) and its gradient in the algebra elements T (one (K, n, n) per acted
    pair) of eq. (46) at T = 0, without differentiating a pseudo-inverse: where sigma(z) (n x B,
    z = V h) has full row rank, d/dT [U sigma(z) sigma((I + T) z)^+] = -U (sigma'(z) * (T z)) sigma(z)^+,
    and V <- (I + T) V: to first order, all the gradient sees, the weights are linear in T.
    Z0 = W_1 X^T (K, d_1, B), gram = X X^T (_grad_norm_cols). compile: the step through
    torch.compile (True, or a mode: 'reduce-overhead' for CUDA graphs). Returns (objective,
    grads, the pre-activations Zs) or None where a pair's sigma(z) is not safely of full row rank
    (_solve_pinv; then use the generic path)."""
    if any(W[m].shape[1] > Z0.shape[-1] for m in pairs):
        return None
    with torch.no_grad():
        obj, grads, Zs, ok = _compiled(_ascent_step, compile)(W, Z0, gram, Y, act, loss, pairs)
    return (obj, list(grads), Zs) if bool(ok) else None


def _move_cols(W, Ts, Zs, P0, act, pairs):
    """gl46_move without the first layer's left factor (kept in the composed g of pair 0 and
    applied once at the end): (layers 1.. moved (K, out, in), g_1 Z_1, sigma(g_1 Z_1)^+ (pair 0's
    solve at the next step; P0 if pair 0 is not acted), every solve safe)."""
    new, Z0, ok = list(W), Zs[0], torch.ones((), dtype=torch.bool, device=W[0].device)
    for T, m in zip(Ts, pairs):
        g = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device) + T
        gz = g @ Zs[m]
        new[m] = new[m] if m == 0 else g @ new[m]
        P, safe = _solve_pinv(act(gz))
        new[m + 1], ok = new[m + 1] @ (act(Zs[m]) @ P), ok & safe
        Z0, P0 = (gz, P) if m == 0 else (Z0, P0)
    return new[1:], Z0, P0, ok


def _fast_step(W, Z0, P0, G, active, n_steps, ok, gram, Y, rate, cap, act, loss, pairs):
    """One whole step of the fast path, without a host sync (one graph under torch.compile): the
    closed-form ascent gradient (grad_norm_ascent), the models above `cap` stopped, T = rate * grad
    on the active models, the move (_move_cols), the composed g = (I + T) g per pair (G) and the
    step counts. P0 = sigma(Z0)^+ from the previous move (the same matrix: Z0 is that move's g z).
    W[0] is not moved (see _move_cols). Returns the objective (K,) and the new (W, Z0, P0, G,
    active, n_steps, ok); ok: every solve so far was safe (else the caller redoes the teleport)."""
    Zs = _preacts(Z0, W[1:], act)
    solved = [(P0, ok) if m == 0 else _solve_pinv(act(Zs[m])) for m in pairs]
    obj, grads = _ascent_grads(Z0, W[1:], Zs, [P for P, _ in solved], gram, Y, act, loss, pairs)
    active = active & (obj <= cap)
    Ts = [g * (active.to(g.dtype) * rate).view(-1, 1, 1) for g in grads]
    moved, Zn, Pn, safe = _move_cols(W, Ts, Zs, P0, act, pairs)
    keep = lambda old, new: torch.where(active.view(-1, 1, 1), new, old)  # noqa: E731
    W = [W[0], *(keep(a, b) for a, b in zip(W[1:], moved))]
    G = [(torch.eye(T.shape[-1], dtype=T.dtype, device=T.device) + T) @ g for g, T in zip(G, Ts)]
    ok = ok & safe & torch.stack([o for _, o in solved]).all()
    return obj, (W, keep(Z0, Zn), P0 if P0 is None else keep(P0, Pn), G, active, n_steps + active.to(n_steps.dtype), ok)


def _fast_steps(n, state, *args):
    """n steps of _fast_step in one call (one graph under torch.compile, per n): (the first step's
    objective (K,), the state after the n steps)."""
    first = None
    for _ in range(n):
        obj, state = _fast_step(*state, *args)
        first = obj if first is None else first
    return first, state


def _fast_teleport(W, Z0, gram, Y, act, loss, pairs, steps, rate, stop_above, compile):
    """teleport's fast path, all `steps` steps of _fast_step and one sync at the end: (new W,
    objective before (K,), composed g per pair, steps per model, the new W_1 X^T), or None where some sigma(z) is not
    safely of full row rank (then teleport takes its stepwise path, which switches to the general
    one at that step). The same steps as that stepwise path to rounding."""
    if steps < 1 or any(W[m].shape[1] > Z0.shape[-1] for m in pairs):
        return None
    K, dev, dt = W[0].shape[0], W[0].device, W[0].dtype
    with torch.no_grad():
        P0, ok = _solve_pinv(act(Z0)) if 0 in pairs else (None, torch.ones((), dtype=torch.bool, device=dev))
        G = [torch.eye(W[m].shape[1], dtype=dt, device=dev).expand(K, -1, -1).clone() for m in pairs]
        active, n_steps = torch.ones(K, dtype=torch.bool, device=dev), torch.zeros(K, dtype=dt, device=dev)
        state = (list(W), Z0, P0, G, active, n_steps, ok)
        rate, cap = (torch.tensor(float("inf") if x is None else x, dtype=dt, device=dev) for x in (rate, stop_above))
        chunk, before = _compiled(_fast_steps, compile), None
        for i in range(0, steps, STEPS_PER_CALL):
            obj, state = chunk(min(STEPS_PER_CALL, steps - i), state, gram, Y, rate, cap, act, loss, pairs)
            before = obj if before is None else before
        W, Z0, _, G, _, n_steps, ok = state
        if not bool(ok):
            return None
        W = [G[pairs.index(0)] @ W[0] if 0 in pairs else W[0], *W[1:]]
    return W, before, G, n_steps.cpu(), Z0


@torch.no_grad()
def _fast_value(W, X, Y, act, loss, gram=None):
    """||grad L||^2 per model (K,) without autograd (_grad_norm_cols); gram = X X^T if known."""
    from lib.models import forward
    return _grad_norm_cols(forward(W[:1], X, act).mT, W[1:], X @ X.T if gram is None else gram, Y, act, loss)


def _fast(objective, action, X):
    """(act, loss) where teleport's fast path applies (||grad L||^2 under eq. (46) with g = I + T
    and a batch shared by all models), else None."""
    ok = isinstance(action, GLAction) and action.eq == 46 and action.group == "first_order" and X.dim() == 2
    return getattr(objective, "fast", None) if ok else None


def _value(objective, W, X, Y):
    W = [w.detach().requires_grad_() for w in W]
    return objective(W, X, Y).detach()


def _ascent(objective, action, W, X, Y, act):
    """The objective at g = I (K,) and its gradient in the algebra elements, by autograd through the action."""
    Ts = zero_algebra(action, W)
    # layers outside the acted pairs come back as plain tensors: make them leaves that
    # require grad, so objectives that differentiate in W (||grad L||^2) see every layer
    obj = objective([w if w.requires_grad else w.detach().requires_grad_()
                     for w in action(W, Ts, X, act)], X, Y)
    return obj.detach(), list(torch.autograd.grad(obj.sum(), Ts))


def _apply(action, W, Ts, X, act, tangents):
    """g.W, and every set of tangent vectors pushed forward by the action's derivative."""
    Ts = [T.detach() for T in Ts]
    if not tangents:
        return [w.detach() for w in action(W, Ts, X, act)], tangents
    f = lambda *w: tuple(action(list(w), Ts, X, act))  # noqa: E731
    pushed = [jvp(f, tuple(W), tuple(t)) for t in tangents]
    return [w.detach() for w in pushed[0][0]], [[d.detach() for d in p[1]] for p in pushed]


def _compose(action, G, Ts):
    """Accumulate the teleport's total group element per pair: g = prod_s g_s (GL), a = sum_s a_s."""
    if action.name == "rescale":
        return [T.detach() if g is None else g + T.detach() for g, T in zip(G, Ts)]
    step = [torch.linalg.matrix_exp(T) if action.group == "exp"
            else torch.eye(T.shape[-1], dtype=T.dtype, device=T.device) + T for T in Ts]
    return [s.detach() if g is None else s.detach() @ g for g, s in zip(G, step)]


def _algebra_norm(action, G):
    """Per model and pair, the Frobenius norm of the total move: ||g - I|| (GL) or ||a|| (rescale)."""
    if action.name == "rescale":
        return torch.stack([a.flatten(1).norm(dim=1) for a in G], 1)
    return torch.stack([(g - torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)).flatten(1).norm(dim=1)
                        for g in G], 1)


def _record_cols(Zi, Zf, V0, V1, gram, Y, act, loss):
    """(loss before, loss after, ||grad L||^2 after), each (K,), of a fast-path teleport from the first
    layer's pre-activations before (Zi) and after (Zf) it (columns) and the other layers V0, V1
    (W[1:]): nothing of input width (_grad_norm_cols)."""
    out = lambda Z, V: (V[-1] @ act(_preacts(Z, V, act)[-1])).mT  # noqa: E731 - the outputs in rows
    return (losses_per_model(out(Zi, V0), Y, loss), losses_per_model(out(Zf, V1), Y, loss),
            _grad_norm_cols(Zf, V1, gram, Y, act, loss))


def _drift_record(W0, W1, X, Y, act, loss, heldout, losses=None):
    """Losses before and after on (X, Y) (given as `losses` if known) and on heldout."""
    before, after = (loss_fn(W0, X, Y, act, loss), loss_fn(W1, X, Y, act, loss)) if losses is None else losses
    rec = {"loss_before": before, "loss_after": after}
    if heldout is not None:
        rec["heldout_loss_before"] = loss_fn(W0, *heldout, act, loss)
        rec["heldout_loss_after"] = loss_fn(W1, *heldout, act, loss)
    return rec


def teleport(W, X, Y, act, objective, action, steps=10, lr=5e-2, maximize=True, stop_above=None,
             heldout=None, loss="ce", tangents=None, compile=False):
    """Teleport K models on batch (X, Y): `steps` steps T <- +-lr * d objective(g.W) / dT at
    T = 0, then W <- (I + T).W (or exp(T).W), all acted pairs at once. A model stops once its
    objective exceeds `stop_above` (checked before each step, as the authors).
    heldout = (X, Y) of a second batch for the loss drift; tangents = sets of lists shaped like W
    (e.g. momentum buffers) pushed forward by the action. Returns (new W, record, tangents);
    the record holds per-model lists: objective and losses before/after, steps, algebra_norm, time_s.
    ||grad L||^2 under eq. (46), g = I + T, without tangents: the fast path (grad_norm_ascent,
    gl46_move: no autograd through a pseudo-inverse, no second backward, nothing of input width
    per step), the same steps to rounding, while every acted sigma(z) has full row rank;
    compile=True (or a torch.compile mode): its ascent step compiled (grad_norm_ascent)."""
    if lr < 0:
        raise UsageError(f"teleport step size must be >= 0, got {lr}")
    t0 = time.perf_counter()
    W0 = W = [w.detach() for w in W]
    K = W[0].shape[0]
    active, n_steps, G = torch.ones(K, dtype=torch.bool, device=W[0].device), torch.zeros(K), None
    known = _fast(objective, action, X)  # ||grad L||^2 without autograd, else through the objective
    fast, gram = (None if tangents else known), (X @ X.T if known else None)
    if fast:  # the first layer's pre-activations, tracked without the input width, in columns
        from lib.models import forward
        Z0, pairs = forward(W[:1], X, act).mT.contiguous(), action.acted_pairs(W)
        Zi = Z0
    value = (lambda _, V, X, Y: _fast_value(V, X, Y, *known, gram)) if known else _value
    before = None if fast else value(objective, W0, X, Y)  # first, as it may draw random numbers
    done = fast and _fast_teleport(W, Z0, gram, Y, *fast, pairs, steps, lr if maximize else -lr, stop_above, compile)
    if done:
        W, before, G, n_steps, Zf = done
    for _ in range(0 if done else steps):
        res = fast and grad_norm_ascent(W, Z0, gram, Y, *fast, pairs, compile)
        fast = fast if res else None  # no full row rank: the generic path from here on
        obj, grads = res[:2] if res else _ascent(objective, action, W, X, Y, act)
        before = obj if before is None else before
        if stop_above is not None:
            active &= obj <= stop_above
        if not active.any():
            break
        mask = active.to(W[0].dtype) * (lr if maximize else -lr)
        Ts = [g * mask.view(-1, *[1] * (g.dim() - 1)) for g in grads]
        if res:  # full row rank: g = I is the identity, so a stopped model is left exactly where it is
            keep = lambda old, new: torch.where(active.view(-1, 1, 1), new, old)  # noqa: E731
            Wn, Zn, ok = _compiled(_gl46_move, compile)(W, Ts, res[2], act, pairs)
            Wn, Zn = (Wn, Zn) if bool(ok) else gl46_move(W, Ts, res[2], act, pairs)
            W, Z0 = [keep(a, b) for a, b in zip(W, Wn)], keep(Z0, Zn)
        else:
            W, tangents = _apply(action, W, Ts, X, act, tangents)
        G, n_steps = _compose(action, G or [None] * len(Ts), Ts), n_steps + active.cpu()
    before = value(objective, W0, X, Y) if before is None else before
    G = G or [torch.zeros(s, device=W[0].device) if action.name == "rescale"
              else torch.eye(s[-1], device=W[0].device).expand(s) for s in action.algebra_shapes(W)]
    with torch.no_grad():
        rows = _compiled(_record_cols, compile)(Zi, Zf, W0[1:], W[1:], gram, Y, *known) if done else None
        rec = _drift_record(W0, W, X, Y, act, loss, heldout, rows and rows[:2])
        after = rows and rows[2]  # from the tracked W_1 X^T
    rec.update(objective_before=before, objective_after=value(objective, W, X, Y) if after is None else after,
               algebra_norm=_algebra_norm(action, G), steps=n_steps)
    if W[0].is_cuda:
        torch.cuda.synchronize()
    rec = {k: v.tolist() for k, v in rec.items()}
    rec["time_s"] = time.perf_counter() - t0
    return W, rec, tangents


def random_teleport(W, X, Y, act, action, norms, generator=None, heldout=None, loss="ce", tangents=None):
    """Act with a random group element g = I + T (a = T for rescaling) whose algebra element has
    Frobenius norm `norms` (K, n_pairs) and a Gaussian direction. Returns (W, record, tangents)."""
    t0 = time.perf_counter()
    W0 = [w.detach() for w in W]
    Ts = random_algebra(action, W0, norms, generator)
    W, tangents = _apply(action, W0, Ts, X, act, tangents)
    with torch.no_grad():
        rec = {k: v.tolist() for k, v in _drift_record(W0, W, X, Y, act, loss, heldout).items()}
    rec.update(algebra_norm=torch.as_tensor(norms).tolist(), time_s=time.perf_counter() - t0)
    return W, rec, tangents
