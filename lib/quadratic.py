"""SO(2) symmetries of two convex quadratics in the plane, and gradient descent with one teleport on
them (Section 3: Proposition 3.2, Propositions 3.5 / C.3, Theorem 3.1; course-project examples).

Both functions are f(w) = ||M w - c||^2 with w = (x, y) and (u, v) = M w - c:
    x^2 + 9y^2 : M = [[1, 0], [0, 3]], c = 0       ((u, v) = (x, 3y))
    Booth      : M = [[1, 2], [2, 1]], c = (7, 5)  ((u, v) = (x + 2y - 7, 2x + y - 5))
The level sets are circles in (u, v), so rotating (u, v) is a symmetry whose orbits are the
whole level sets:  g_theta . w = M^{-1} (R_theta (M w - c) + c),  f(g_theta . w) = f(w).
grad f = 2 M^T (M w - c), Hessian H = 2 M^T M (constant), so on a level set
||grad f||^2 = 4 z^T M M^T z ranges over [4 s_min^2 f, 4 s_max^2 f] (s = singular values of M):
it is NOT constant on a level set, which is what teleportation exploits.
For both functions M^T M has eigenvalues 9 and 1 (Hessian eigenvalues 18 and 2): Booth is
x^2 + 9y^2 rotated by 45 degrees and shifted to its minimum (1, 3).
Points w: tensors (..., 2), float64.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from lib.config import check_choice


@dataclass(frozen=True)
class Quadratic:
    """f(w) = ||M w - c||^2, with its name and the minimiser w* = M^{-1} c."""
    name: str
    M: tuple
    c: tuple

    def tensors(self):
        return torch.tensor(self.M, dtype=torch.float64), torch.tensor(self.c, dtype=torch.float64)


FUNCTIONS = {"x2_9y2": Quadratic("x2_9y2", ((1.0, 0.0), (0.0, 3.0)), (0.0, 0.0)),
             "booth": Quadratic("booth", ((1.0, 2.0), (2.0, 1.0)), (7.0, 5.0))}


def get_function(name):
    check_choice("function", name, list(FUNCTIONS))
    return FUNCTIONS[name]


def residual(q, w):
    """z = (u, v) = M w - c, shape (..., 2)."""
    M, c = q.tensors()
    return w @ M.T - c


def loss(q, w):
    """f(w) = ||M w - c||^2, shape (...)."""
    return residual(q, w).pow(2).sum(-1)


def grad(q, w):
    """grad f(w) = 2 M^T (M w - c), shape (..., 2)."""
    return 2 * residual(q, w) @ q.tensors()[0]


def hessian(q):
    """H = 2 M^T M, (2, 2), the same at every w."""
    M = q.tensors()[0]
    return 2 * M.T @ M


def rotation(theta):
    """R_theta (..., 2, 2) from a tensor of angles (...)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def so2_action(q, w, theta):
    """g_theta . w = M^{-1} (R_theta (M w - c) + c): rotation of (u, v); w (2,), theta a tensor of
    angles (...) -> (..., 2). Differentiable in theta; leaves f unchanged (level sets are circles in (u, v))."""
    M, c = q.tensors()
    z = rotation(theta) @ residual(q, w)
    return torch.linalg.solve(M, (z + c).unsqueeze(-1)).squeeze(-1)


def max_grad_norm_sq(q, w):
    """max over the orbit (= the level set) of ||grad f||^2 = 4 s_max(M)^2 f(w), shape (...)."""
    s_max = torch.linalg.matrix_norm(q.tensors()[0], ord=2)
    return 4 * s_max ** 2 * loss(q, w)


def optimal_angle(q, w):
    """Closed-form maximiser of ||grad f(g_theta . w)||^2 over theta: rotate z = M w - c onto
    +-||z|| u_1, u_1 the top left singular vector of M (top eigenvector of M M^T). Returns the
    angle (a float in (-pi/2, pi/2]) of the nearer of the two maximisers."""
    M = q.tensors()[0]
    u1 = torch.linalg.svd(M).U[:, 0]
    z = residual(q, w)
    theta = math.atan2(u1[1].item(), u1[0].item()) - math.atan2(z[1].item(), z[0].item())
    return wrap_half_turn(theta)


def wrap_half_turn(theta):
    """theta modulo pi, in (-pi/2, pi/2] (g_theta and g_{theta+pi} give the two maximisers)."""
    return theta - math.pi * math.ceil(theta / math.pi - 0.5)


def teleport_angle(q, w, lr=0.5, max_steps=500, tol=1e-13):
    """Teleport (Section 3): gradient ascent over theta, by autograd, of the squared optimality
    ratio rho(theta)^2 = ||grad f(g_theta . w)||^2 / max_orbit ||grad f||^2 (same maximiser as
    ||grad f||^2, since f is constant on the orbit; the ratio makes lr scale-free).
    Stops when |d rho^2 / d theta| < tol. Returns (theta float, steps taken, rho^2 before, after)."""
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    scale = max_grad_norm_sq(q, w)
    objective = lambda: grad(q, so2_action(q, w, theta)).pow(2).sum() / scale  # noqa: E731
    before = objective().item()
    for step in range(max_steps):
        (d,) = torch.autograd.grad(objective(), theta)
        if d.abs().item() < tol:
            break
        with torch.no_grad():
            theta += lr * d
    return theta.item(), step, before, objective().item()


def optimality_ratio(q, w):
    """||grad f(w)|| / max over w's level set of ||grad f||, shape (...): 1 where a teleport lands,
    and by Propositions 3.5 / C.3 it stays 1 along gradient descent after that one teleport
    (always < 1 off the top singular direction). 0/0 = nan at the minimiser."""
    return grad(q, w).norm(dim=-1) / max_grad_norm_sq(q, w).sqrt()


def teleport(q, w, lr=0.5, max_steps=500, tol=1e-13):
    """Teleport w (2,) to g_theta . w, theta from teleport_angle (lr, max_steps, tol: its ascent).
    Returns (the new point (2,), its record: theta by ascent and in closed form, ascent steps,
    rho^2, w and f before and after). A point whose ||grad f||^2 is not a finite float (GD had
    diverged) stays where it is, with the record {"skipped": why}."""
    if not math.isfinite(max_grad_norm_sq(q, w).item()):
        return w, {"skipped": "GD had diverged: ||grad f||^2 is not a finite float"}
    theta, n, before, after = teleport_angle(q, w, lr, max_steps, tol)
    w_new = so2_action(q, w, torch.tensor(theta, dtype=torch.float64)).detach()
    return w_new, {"theta": theta, "theta_closed_form": optimal_angle(q, w), "ascent_steps": n,
                   "ratio_sq_before": before, "ratio_sq_after": after, "w_before": w.tolist(),
                   "w_after": w_new.tolist(), "loss_before": loss(q, w).item(), "loss_after": loss(q, w_new).item()}


def descend(q, w0, lr, steps, teleport_step=None, ascent=(0.5, 500, 1e-13)):
    """Gradient descent w <- w - lr grad f from w0 = (x, y) for `steps` steps; with teleport_step,
    one teleport (teleport(q, w, *ascent)) right before that step. Returns the path (steps+1, 2),
    or (steps+2, 2) with the teleport (the point before the jump is kept), the GD step of each
    path point (numpy ints; both ends of the jump at the teleport step), and the teleport's
    record with its "step" (or None). A diverging run goes on to inf and nan: torch does not raise."""
    w, path, record = torch.tensor(w0, dtype=torch.float64), [], None
    for t in range(steps + 1):
        if t == teleport_step:
            path.append(w.clone())
            w, rec = teleport(q, w, *ascent)
            record = {"step": t, **rec}
        path.append(w.clone())
        if t < steps:
            w = w - lr * grad(q, w)
    jump = [] if record is None else [teleport_step]
    return torch.stack(path), np.array(sorted(list(range(steps + 1)) + jump)), record


def newton_check(q, w, lr):
    """Proposition 3.2 at w (2,): where ||grad f|| is maximal on the level set, g = grad f is a
    Hessian eigenvector, H g = lambda_0 g, so the GD step lr g equals the damped Newton step
    (lr lambda_0) H^{-1} g. Returns the angle between g and H g (rad), lambda_0 = g.Hg / g.g, the
    damping lr lambda_0, and ||lr g - Newton step|| / ||lr g||."""
    g, H = grad(q, w), hessian(q)
    Hg = H @ g
    angle = torch.atan2((g[0] * Hg[1] - g[1] * Hg[0]).abs(), g @ Hg).item()  # accurate near 0
    lam0 = (g @ Hg / (g @ g)).item()
    newton = lr * lam0 * torch.linalg.solve(H, g)
    return {"angle_grad_Hgrad_rad": angle, "lambda_0": lam0, "newton_step_size": lr * lam0,
            "gd_vs_newton_rel_err": ((lr * g - newton).norm() / (lr * g).norm()).item()}


def steps_to(losses, target, steps):
    """The GD step (steps: one per path point) of the first point with loss <= target, or None."""
    hit = np.nonzero(np.asarray(losses) <= target)[0]
    return int(steps[hit[0]]) if len(hit) else None
