"""Landscape metrics: gradient norms, sharpness phi (eq. 4) and curvature psi (eq. 5).

Every metric takes weights W (list of (K, out, in)) and returns one value per model, (K,),
differentiable in W so that teleportation can climb or descend it.
"""
import torch
from torch.func import jvp

from lib.actions import GLAction
from lib.config import UsageError
from lib.models import forward, loss_fn, losses_per_model
from lib.optim import HYPER


def grad_norm_sq(W, X, Y, act, loss="ce", precond=None):
    """||grad_W L||^2 per model (the teleport objective of Section 5.1), or with
    precond = A (a list like W) the AdaGrad-weighted ||grad L||_A^2 = sum A * (grad L)^2 of
    Appendix F.1, A = (eps + diag(G))^{-1/2}. Differentiable (create_graph)."""
    grads = torch.autograd.grad(loss_fn(W, X, Y, act, loss).sum(), W, create_graph=True)
    if precond is None:
        return sum(g.pow(2).flatten(1).sum(1) for g in grads)
    return sum((a * g.pow(2)).flatten(1).sum(1) for a, g in zip(precond, grads))


def adagrad_preconditioner(optimizer, params):
    """A = (eps + G)^{-1/2} (App. F.1) from the accumulated squared gradients G of a
    torch.optim.Adagrad or of lib.optim's batched AdaGrad (whose eps is HYPER['adagrad_eps'])."""
    eps = optimizer.param_groups[0].get("eps", HYPER["adagrad_eps"])
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


def _dot(a, b):
    """Per-model inner product of two weight-shaped tensors (..., out, in) -> (...)."""
    return (a * b).sum((-2, -1))


def _kappa(n1, n2, dot):
    """eq. (47) from |g'|^2, |g''|^2 and g'.g''."""
    return (n1 * n2 - dot.pow(2)).clamp_min(0).sqrt() / n1.pow(1.5)


def kappa(d1, d2):
    """Curvature of a curve from gamma' and gamma'' (lists of (..., out, in)), eq. (47):
    kappa = sqrt(|g'|^2 |g''|^2 - (g'.g'')^2) / |g'|^3, per leading index, e.g. (K,)."""
    return _kappa(sum(_dot(a, a) for a in d1), sum(_dot(b, b) for b in d2), sum(_dot(a, b) for a, b in zip(d1, d2)))


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


def _columns(W, X):
    """z_0 = W_0 h_0 for G batches at once, X: (G, B, d_0) -> (G, K, d_1, B): one GEMM
    (K d_1, d_0) @ (d_0, G B) shared by the K models."""
    (K, d1, d0), (G, B) = W[0].shape, X.shape[:2]
    return (W[0].reshape(K * d1, d0) @ X.reshape(G * B, d0).T).view(K, d1, G, B).permute(2, 0, 1, 3)


def _ce_columns(out, Y):
    """Mean cross-entropy over the batch with the classes along dim -2, out: (G, ..., C, B),
    Y: (G, B) -> (G, ...): log-sum-exp across rows and the target logit through a one-hot mask
    (several times faster than log_softmax and gather over 10 classes in the last dim)."""
    onehot = torch.nn.functional.one_hot(Y, out.shape[-2]).mT.to(out.dtype)
    onehot = onehot.view(Y.shape[0], *[1] * (out.dim() - 3), *onehot.shape[1:])
    m = out.amax(-2, keepdim=True)
    lse = (out - m).exp_().sum(-2).log_() + m.squeeze(-2)
    return (lse - (out * onehot).sum(-2)).mean(-1)


def sharpness_draws(W, X, Y, act, ts, dirs):
    """phi of eq. (4) for G draws at once (cross-entropy), and L(w) on the same batches:
    W: list of (K, out, in); X: (G, B, d_0), Y: (G, B); ts: (n,); dirs: list of (G, n, out, in).
    Returns ((G, K) phi, (G, K) loss). In column form (h: (..., d, B)); the first layer is
    linear in the weights, (W_0 + t D) h_0 = W_0 h_0 + t D h_0, so it costs K + n products."""
    G, n = X.shape[0], len(ts)
    t = torch.as_tensor(ts, dtype=X.dtype, device=X.device).view(1, n, 1, 1, 1)
    z0 = _columns(W, X)  # (G, K, d_1, B)
    zd = (dirs[0].flatten(1, 2) @ X.mT).view(G, n, 1, *z0.shape[2:])
    h, h0 = act(z0.unsqueeze(1) + t * zd), act(z0)  # (G, n, K, d_1, B), (G, K, d_1, B)
    for j, (w, d) in enumerate(zip(W[1:], dirs[1:])):
        h, h0 = (w + t * d.unsqueeze(2)) @ h, w @ h0
        if j < len(W) - 2:
            h, h0 = act(h), act(h0)
    return _ce_columns(h, Y).mean(1), _ce_columns(h0, Y)


def curvatures_eq54(W, X, act, Ms):
    """psi's curvature (eq. 47) of gamma(t) = exp(t M).w under eq. (54) on all pairs, for G
    draws at once, under both conventions of `curve_derivatives`, from the closed forms of eqs.
    (57) and (60) (exact for a piecewise-linear sigma, whose inverse has sigma^-1'' = 0 a.e.).
    Layer m is A_m(t) B_{m-1}(t): A_m = sigma^-1(e^{tM_m} sigma(W_m h_m)) h_m^+ (the V of pair
    m; A_m = W_m for the last layer), B_{m-1} = e^{-tM_{m-1}} (the U of pair m-1; I for m = 0):
    g' = A' + A B', exact g'' = A'' + 2 A'B' + A B'', the authors' g'' = A'' + A B''. Layer 0
    enters only through inner products, N h_0^+ (N h_0^+)^T = (N Q)(N Q)^T with Q = U S^+ from
    X = U S V^T (h_0 = X^T, the same for all models), so its (K, d_1, d_0) derivatives are never
    formed. W: list of (K, out, in); X: (G, B, d_0); Ms: list of (G, d, d). Returns two (G, K)."""
    L, zs, hs = len(W), [_columns(W, X)], [X.mT.unsqueeze(1)]  # z_m = W_m h_m, h_0 = X^T
    for w in W[1:-1]:
        hs.append(act(zs[-1]))
        zs.append(w @ hs[-1])
    U, S, _ = torch.linalg.svd(X, full_matrices=False)  # pinv's cut-off: max(B, d_0) eps S_max
    S_inv = torch.where(S > S[..., :1] * max(X.shape[-2:]) * torch.finfo(X.dtype).eps, 1 / S, 0)
    M, s, ds = Ms[0].unsqueeze(1), act(zs[0]), act.derivative(zs[0])
    N = torch.cat([M @ s / ds, M @ (M @ s) / ds], -2)  # (G, K, 2 d_1, B): A'_0, A''_0 before h_0^+
    R = (N.flatten(1, 2) @ (U * S_inv.unsqueeze(-2))).unflatten(1, (N.shape[1], 2, -1))
    n1, n2, dot = (_dot(R[:, :, i], R[:, :, j]) for i, j in ((0, 0), (1, 1), (0, 1)))
    n2e, dote = n2, dot  # the exact convention: layers >= 1 add the cross term 2 A'B'
    for m in range(1, L):
        P = Ms[m - 1].unsqueeze(1)  # B' = -M, B'' = M^2
        if m < L - 1:  # A', A'' (eqs. 57, 60): (M^i sigma(z) / sigma'(z)) h^+; A(0) = W h h^+
            M, s, ds, hp = Ms[m].unsqueeze(1), act(zs[m]), act.derivative(zs[m]), torch.linalg.pinv(hs[m])
            a1, a2, a0 = (M @ s / ds) @ hp, (M @ (M @ s) / ds) @ hp, W[m] @ hs[m] @ hp
            g1, g2, c = a1 - a0 @ P, a2 + a0 @ P @ P, -2 * a1 @ P
        else:
            g1, g2, c = -W[m] @ P, W[m] @ P @ P, 0
        n1, n2, dot = n1 + _dot(g1, g1), n2 + _dot(g2, g2), dot + _dot(g1, g2)
        n2e, dote = n2e + _dot(g2 + c, g2 + c), dote + _dot(g1, g2 + c)
    return _kappa(n1, n2e, dote), _kappa(n1, n2, dot)
