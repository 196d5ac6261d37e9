"""Landscape metrics: gradient norms, sharpness phi (eq. 4) and curvature psi (eq. 5).

Every metric takes weights W (list of (K, out, in)) and returns one value per model, (K,),
differentiable in W so that teleportation can climb or descend it.
"""
import torch
from torch.func import jvp

from lib.actions import GLAction
from lib.config import UsageError
from lib.models import forward, loss_fn, losses_per_model


def grad_norm_sq(W, X, Y, act, loss="ce", precond=None):
    """||grad_W L||^2 per model (the teleport objective of Section 5.1), or with
    precond = A (a list like W) the AdaGrad-weighted ||grad L||_A^2 = sum A * (grad L)^2 of
    Appendix F.1, A = (eps + diag(G))^{-1/2}. Differentiable (create_graph)."""
    grads = torch.autograd.grad(loss_fn(W, X, Y, act, loss).sum(), W, create_graph=True)
    if precond is None:
        return sum(g.pow(2).flatten(1).sum(1) for g in grads)
    return sum((a * g.pow(2)).flatten(1).sum(1) for a, g in zip(precond, grads))


def adagrad_preconditioner(optimizer, params):
    """A = (eps + G)^{-1/2} from torch.optim.Adagrad's accumulated squared gradients G."""
    eps = optimizer.param_groups[0]["eps"]
    return [(optimizer.state[p]["sum"] + eps).rsqrt() for p in params]


def random_directions(W, n, kind="sphere", generator=None, per_model=False):
    """n random unit directions in weight space for eq. (4), as a list over layers of
    (n, out, in) tensors (shared by all K models: common random numbers) or (n, K, out, in).
    kind='sphere': uniform on the unit sphere (the paper); 'positive_orthant': torch.rand
    normalised, entries >= 0 (the authors' code)."""
    draw = {"sphere": torch.randn, "positive_orthant": torch.rand}[kind]
    shapes = [w.shape if per_model else w.shape[1:] for w in W]
    D = [draw((n, *s), generator=generator, dtype=W[0].dtype).to(W[0].device) for s in shapes]
    lead = 2 if per_model else 1  # per_model: each model's direction has unit norm
    norm = sum(d.pow(2).flatten(lead).sum(-1) for d in D).sqrt()
    return [d / norm.view(*norm.shape, 1, 1) for d in D]


def sharpness(W, X, Y, act, ts, dirs, loss="ce"):
    """phi(w, T, D), eq. (4): the mean of L(w + t_i d_i) over displacement/direction pairs.
    ts: (n,) displacements; dirs: from `random_directions` with n directions. Returns (K,).
    All n*K perturbed models go through one batched forward pass."""
    K, n = W[0].shape[0], len(ts)
    ts = torch.as_tensor(ts, dtype=W[0].dtype, device=W[0].device).view(n, 1, 1, 1)
    shared = X.dim() == 2 and dirs[0].dim() == 3 and len(W) > 1
    Wp = [(w.unsqueeze(0) + ts * (d if d.dim() == 4 else d.unsqueeze(1))).reshape(n * K, *w.shape[1:])
          for w, d in zip(W[1:] if shared else W, dirs[1:] if shared else dirs)]
    if not shared:
        return loss_fn(Wp, X, Y, act, loss).view(n, K).mean(0)
    # shared X and directions: the first layer is linear, X (w + t d)^T = X w^T + t X d^T, so it
    # costs K + n first-layer products instead of n * K (same values up to rounding)
    z = forward(W[:1], X, act).unsqueeze(0) + ts * forward(dirs[:1], X, act).unsqueeze(1)
    out = forward(Wp, act(z.reshape(n * K, *z.shape[2:])), act)
    return losses_per_model(out, Y, loss).view(n, K).mean(0)


def random_lie_elements(W, generator=None, pairs=None):
    """The authors' random Lie-algebra elements for psi: one M per layer pair, entries uniform
    on [0, 1], scaled to unit Frobenius norm; shape (n, n), shared by all models."""
    Ms = []
    for s in GLAction(54, "exp", pairs).algebra_shapes(W):
        M = torch.rand(s[1:], generator=generator, dtype=W[0].dtype).to(W[0].device)
        Ms.append(M / M.norm())
    return Ms


def _jet(W, X, act, Ms, action):
    """(gamma'(0), gamma''(0)) of gamma(t) = action(W, [t M for M in Ms]) by nested forward-mode
    autodiff through t: two lists shaped like W."""
    t0 = torch.zeros((), dtype=W[0].dtype, device=W[0].device)
    one = torch.ones_like(t0)

    def curve(t):
        return tuple(action(W, [t * M for M in Ms], X, act))

    def velocity(t):
        return jvp(curve, (t,), (one,))[1]

    d1, d2 = jvp(velocity, (t0,), (one,))
    return list(d1), list(d2)


def curve_derivatives(W, X, act, Ms, action=None, convention="exact"):
    """gamma'(0) and gamma''(0) of the curve gamma(t) = exp(t M) . w (one M per pair) under
    `action` (default eq. (54), all pairs). Returns two lists shaped like W.

    convention='exact': the derivatives of the actual curve, all pairs acted on at once (eq. 5
    with eq. 54), by nested forward-mode autodiff through t.
    convention='authors': as the authors' code computes Table 1's psi, pair by pair: the sum over
    pairs p of the derivatives of the curve with only M_p nonzero. A hidden layer is the V of
    pair m and the U of pair m-1, W_m(t) = A(t) B(t) with B(t) = exp(-t M_{m-1}) (eq. 54), so
    (AB)'' = A''B + 2A'B' + AB''; the pair sum keeps A'' and AB'' and drops the cross term
    2A'B' = -2 V'_m M_{m-1} (V' of eq. 57). gamma' is the same in both (linear in the M's)."""
    action = action or GLAction(54, "exp")
    if convention == "exact":
        return _jet(W, X, act, Ms, action)
    if convention != "authors":
        raise UsageError(f"unknown psi convention {convention!r}; known: exact, authors")
    parts = [_jet(W, X, act, [M if q == p else torch.zeros_like(M) for q, M in enumerate(Ms)], action)
             for p in range(len(Ms))]
    return [[sum(layer) for layer in zip(*(part[i] for part in parts))] for i in (0, 1)]


def kappa(d1, d2):
    """Curvature of a curve from gamma' and gamma'' (lists of (K, ...)), eq. (47):
    kappa = sqrt(|g'|^2 |g''|^2 - (g'.g'')^2) / |g'|^3, per model (K,)."""
    n1 = sum(a.pow(2).flatten(1).sum(1) for a in d1)
    n2 = sum(b.pow(2).flatten(1).sum(1) for b in d2)
    dot = sum((a * b).flatten(1).sum(1) for a, b in zip(d1, d2))
    return (n1 * n2 - dot.pow(2)).clamp_min(0).sqrt() / n1.pow(1.5)


def curvature(W, X, act, Ms, action=None, convention="exact"):
    """kappa(gamma_M, w) at t = 0 for one set of Lie-algebra elements Ms, (K,); convention:
    see `curve_derivatives`."""
    return kappa(*curve_derivatives(W, X, act, Ms, action, convention))


def psi(W, X, act, Ms_draws, action=None, convention="exact"):
    """psi(w, k), eq. (5): mean curvature over k draws of Lie-algebra elements, (K,);
    convention 'exact' or 'authors' (see `curve_derivatives`)."""
    return torch.stack([curvature(W, X, act, Ms, action, convention) for Ms in Ms_draws]).mean(0)


def curve_derivatives_closed_form(U, V, h, act, M):
    """Closed forms of eqs. (57) and (60) for one pair under eq. (54), gamma(t) = exp(tM).(U, V):
    U' = -U M, U'' = U M^2, V' = (M sigma(Vh) / sigma'(Vh)) h^+, V'' = (M^2 sigma(Vh) / sigma'(Vh)) h^+.
    Returns ([V', U'], [V'', U''])."""
    z, h_pinv = V @ h, torch.linalg.pinv(h)
    s, ds = act(z), act.derivative(z)
    return ([(M @ s / ds) @ h_pinv, -U @ M], [(M @ M @ s / ds) @ h_pinv, U @ M @ M])
