"""Teleportation: gradient ascent (or descent) on Lie-algebra elements of all acted layer pairs
at once (Section 3, Algorithm 1's inner loop), and random teleportation of a given size."""
import time

import torch
from torch.func import jvp

from lib.actions import random_algebra, zero_algebra
from lib.config import UsageError
from lib.metrics import curvature, grad_norm_sq, random_directions, random_lie_elements, sharpness
from lib.models import loss_fn

OBJECTIVES = ("grad_norm", "log_grad_norm", "a_norm", "sharpness", "curvature")


def make_objective(name, act, loss="ce", precond=None, ts=None, kind="sphere", n_curves=1,
                   curvature_action=None, generator=None):
    """Objective f(W, X, Y) -> (K,) to climb: 'grad_norm' ||grad L||^2; 'log_grad_norm' its log
    (the same ascent direction, steps relative to ||grad L||^2); 'a_norm' ||grad L||_A^2
    (needs precond, App. F.1); 'sharpness' phi of eq. (4) with displacements ts and fresh random
    directions each call; 'curvature' psi of eq. (5) over n_curves fresh random curves (eq. 54)."""
    if name == "grad_norm":
        return lambda W, X, Y: grad_norm_sq(W, X, Y, act, loss)
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


def _value(objective, W, X, Y):
    W = [w.detach().requires_grad_() for w in W]
    return objective(W, X, Y).detach()


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


def _drift_record(W0, W1, X, Y, act, loss, heldout):
    rec = {"loss_before": loss_fn(W0, X, Y, act, loss), "loss_after": loss_fn(W1, X, Y, act, loss)}
    if heldout is not None:
        rec["heldout_loss_before"] = loss_fn(W0, *heldout, act, loss)
        rec["heldout_loss_after"] = loss_fn(W1, *heldout, act, loss)
    return rec


def teleport(W, X, Y, act, objective, action, steps=10, lr=5e-2, maximize=True, stop_above=None,
             heldout=None, loss="ce", tangents=None):
    """Teleport K models on batch (X, Y): `steps` steps T <- +-lr * d objective(g.W) / dT at
    T = 0, then W <- (I + T).W (or exp(T).W), all acted pairs at once. A model stops once its
    objective exceeds `stop_above` (checked before each step, as the authors).
    heldout = (X, Y) of a second batch for the loss drift; tangents = sets of lists shaped like W
    (e.g. momentum buffers) pushed forward by the action. Returns (new W, record, tangents);
    the record holds per-model lists: objective and losses before/after, steps, algebra_norm, time_s."""
    if lr < 0:
        raise UsageError(f"teleport step size must be >= 0, got {lr}")
    t0 = time.perf_counter()
    W0 = W = [w.detach() for w in W]
    K = W[0].shape[0]
    active, n_steps, G = torch.ones(K, dtype=torch.bool, device=W[0].device), torch.zeros(K), None
    before = _value(objective, W, X, Y)
    for _ in range(steps):
        Ts = zero_algebra(action, W)
        # layers outside the acted pairs come back as plain tensors: make them leaves that
        # require grad, so objectives that differentiate in W (||grad L||^2) see every layer
        obj = objective([w if w.requires_grad else w.detach().requires_grad_()
                         for w in action(W, Ts, X, act)], X, Y)
        if stop_above is not None:
            active &= obj.detach() <= stop_above
        if not active.any():
            break
        mask = active.to(W[0].dtype) * (lr if maximize else -lr)
        Ts = [g * mask.view(-1, *[1] * (g.dim() - 1)) for g in torch.autograd.grad(obj.sum(), Ts)]
        W, tangents = _apply(action, W, Ts, X, act, tangents)
        G, n_steps = _compose(action, G or [None] * len(Ts), Ts), n_steps + active.cpu()
    G = G or [torch.zeros(s, device=W[0].device) if action.name == "rescale"
              else torch.eye(s[-1], device=W[0].device).expand(s) for s in action.algebra_shapes(W)]
    with torch.no_grad():
        rec = _drift_record(W0, W, X, Y, act, loss, heldout)
    rec.update(objective_before=before, objective_after=_value(objective, W, X, Y),
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
