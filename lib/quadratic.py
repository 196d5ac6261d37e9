"""SO(2) symmetries of two convex quadratics in the plane (Section 3; course-project examples).

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
