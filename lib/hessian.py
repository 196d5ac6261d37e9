"""Curvature of the loss beyond the paper: the top Hessian eigenvalue, the Hessian trace and
adaptive (scale-invariant) sharpness, the measures a reader expects next to phi (eq. 4) and
psi (eq. 5). Not in the paper, so no equation numbers: the references are given per function.

Every function takes the weights of K independent models, W[j]: (K, d_{j+1}, d_j), one batch
X: (B, d_0), Y: (B,) labels ('ce') or (B, d_L) targets ('mse'), and returns a (K,) tensor. The
models share no weights, so the Hessian of the summed loss sum_k L_k is block-diagonal over
models: one Hessian-vector product (HVP) of the sum with a stacked vector (v_1, ..., v_K) gives
every H_k v_k at once, and every inner product and norm below is taken per model.
"""
import math

import torch

from lib.models import loss_and_grads, loss_fn


def _flat(V):
    """A list shaped like W -> (K, P), P = parameters per model."""
    return torch.cat([v.flatten(1) for v in V], 1)


def _unflat(v, W):
    """(K, P) -> a list shaped like W."""
    out, i = [], 0
    for w in W:
        n = w[0].numel()
        out.append(v[:, i:i + n].view_as(w))
        i += n
    return out


def hvp_fn(W, X, Y, act, loss="ce"):
    """The Hessian-vector product v -> H v per model, v and H v: (K, P), H_k the Hessian of L_k
    in the flattened weights of model k. The gradient's graph is built once (double backward)
    and reused for every product."""
    W = [w.detach().requires_grad_() for w in W]
    grads = torch.autograd.grad(loss_fn(W, X, Y, act, loss).sum(), W, create_graph=True)

    def hvp(v):
        hv = torch.autograd.grad(grads, W, _unflat(v, W), retain_graph=True, allow_unused=True)
        return _flat([torch.zeros_like(w) if h is None else h for w, h in zip(W, hv)])
    return hvp


def _randn(K, P, W, generator):
    return torch.randn(K, P, generator=generator, dtype=W[0].dtype).to(W[0].device)


def top_eigenvalue(W, X, Y, act, loss="ce", iters=20, generator=None, tol=1e-7):
    """Largest (algebraic) eigenvalue of each model's Hessian, (K,), by the Lanczos method with
    full reorthogonalisation (Golub and Van Loan, Matrix Computations, Sec. 10.1) on HVPs, from
    a Gaussian start vector per model: at most min(iters, P) HVPs; stops early when every
    model's top Ritz value moved by <= tol relative in the last step. The Ritz value is a lower
    bound that converges fast: on a 5-4-3 MLP it equals eigvalsh of autograd's Hessian to 1e-6
    relative after 20 steps (tests/test_hessian.py), and exactly once m = P; on 784-16-10-10
    MNIST minima (500 images, float64) 10 steps agree with 100 to 1e-10. Unlike power iteration
    it finds the largest eigenvalue, not the largest in magnitude. Memory: m vectors of (K, P).
    A Krylov space that closes early (beta = 0) continues with a random vector orthogonal to it."""
    hvp, K, P = hvp_fn(W, X, Y, act, loss), W[0].shape[0], sum(w[0].numel() for w in W)
    Q, alpha, beta = [], [], []
    q = _randn(K, P, W, generator)
    q, top = q / q.norm(dim=1, keepdim=True), None
    for i in range(min(iters, P)):
        Q.append(q)
        z = hvp(q)
        alpha.append((q * z).sum(1))
        B = torch.stack(Q)  # (m, K, P)
        for _ in range(2):  # full reorthogonalisation, twice (Kahan: twice is enough)
            z = z - torch.einsum("mk,mkp->kp", torch.einsum("mkp,kp->mk", B, z), B)
        T = torch.diag_embed(torch.stack(alpha, 1))
        if beta:
            off = torch.diag_embed(torch.stack(beta, 1), offset=1)
            T = T + off + off.mT
        prev, top = top, torch.linalg.eigvalsh(T)[:, -1]
        if prev is not None and ((top - prev).abs() <= tol * top.abs()).all():
            break
        b = z.norm(dim=1)
        closed = b <= 1e-10 * torch.stack(alpha, 1).abs().amax(1).clamp_min(1e-300)
        if closed.any():  # restart inside the orthogonal complement, decoupled (beta = 0)
            r = _randn(K, P, W, generator)
            for _ in range(2):
                r = r - torch.einsum("mk,mkp->kp", torch.einsum("mkp,kp->mk", B, r), B)
            z = torch.where(closed[:, None], r / r.norm(dim=1, keepdim=True), z)
            b = torch.where(closed, torch.zeros_like(b), b)
            q = z / torch.where(closed, torch.ones_like(b), b)[:, None]
        else:
            q = z / b[:, None]
        beta.append(b)
    return top.detach()


def hessian_trace(W, X, Y, act, loss="ce", samples=100, generator=None, return_se=False):
    """tr(H_k) per model, (K,), by Hutchinson's estimator (Hutchinson 1990): the mean over
    `samples` Rademacher vectors v (entries +-1, drawn per model) of v^T H v, which is unbiased
    with variance 2 (||H||_F^2 - sum_i H_ii^2) per sample, so exact for a diagonal H. With
    return_se: also its standard error, the sample standard deviation / sqrt(samples), (K,).
    On 784-16-10-10 MNIST minima one sample's standard deviation is ~35% of the trace: 20
    samples give ~8%, 200 ~2.5%."""
    hvp, K, P = hvp_fn(W, X, Y, act, loss), W[0].shape[0], sum(w[0].numel() for w in W)
    vals = []
    for _ in range(samples):
        v = (2 * torch.randint(0, 2, (K, P), generator=generator) - 1).to(W[0])
        vals.append((v * hvp(v)).sum(1).detach())
    vals = torch.stack(vals)
    mean = vals.mean(0)
    if not return_se:
        return mean
    se = vals.std(0) / math.sqrt(samples) if samples > 1 else torch.full_like(mean, float("nan"))
    return mean, se


def _per_model_norm(u):
    return u.norm(dim=1, keepdim=True)


def adaptive_sharpness(W, X, Y, act, rho, loss="ce", kind="worst", steps=10, generator=None, eta=None,
                       samples=10):
    """Adaptive (scale-invariant) sharpness per model, (K,): L(w + delta) - L(w) with the
    perturbation scaled elementwise by the weights, delta = |w| * u (ASAM, Kwon et al. 2021;
    Andriushchenko et al. 2023, with c = |w|, no bias term: our MLPs have none). It is unchanged
    by any elementwise rescaling of the weights that leaves the function unchanged, e.g. the
    positive rescaling of (Leaky)ReLU neurons (lib.actions.RescaleAction).
    kind='worst': max over ||u||_2 <= rho (per model, all layers) by projected normalised
    gradient ascent in u, `steps` steps of length eta (default rho) from a random u of norm rho;
    the largest loss met on the way. A lower bound of the maximum; at a minimum of a quadratic
    it converges to rho^2 / 2 * lambda_max(D H D), D = diag(|w|); on 784-16-10-10 MNIST minima
    (rho 0.05) 10 steps agree with 100 to 3e-5 relative.
    kind='average': the mean over `samples` draws u ~ N(0, rho^2 I) (Andriushchenko et al.'s
    average-case sharpness), whose expectation at a minimum of a quadratic is
    rho^2 / 2 * tr(D H D). Mind the scales: here every weight moves by ~rho of itself,
    ||u|| ~ rho sqrt(P), while the worst case moves all weights together by rho (P = 12,810:
    113x further), so the two kinds want different rho."""
    W = [w.detach() for w in W]
    K, P = W[0].shape[0], sum(w[0].numel() for w in W)
    c, base = _flat(W).abs(), loss_fn(W, X, Y, act, loss)
    at = lambda u: _unflat(_flat(W) + c * u, W)  # noqa: E731 - w + |w| * u, shaped like W
    if kind == "average":
        return torch.stack([loss_fn(at(rho * _randn(K, P, W, generator)), X, Y, act, loss)
                            for _ in range(samples)]).mean(0) - base
    if kind != "worst":
        raise ValueError(f"unknown adaptive sharpness kind {kind!r}; known: worst, average")
    eta = rho if eta is None else eta
    u = _randn(K, P, W, generator)
    u = rho * u / _per_model_norm(u).clamp_min(1e-300)
    best = None
    for s in range(steps + 1):
        value, grads = loss_and_grads(at(u), X, Y, act, loss)
        best = value if best is None else torch.maximum(best, value)
        if s == steps:
            break
        g = c * _flat(grads)  # d L(w + |w| u) / du
        u = u + eta * g / _per_model_norm(g).clamp_min(1e-300)
        u = u * (rho / _per_model_norm(u).clamp_min(1e-300)).clamp(max=1.0)
    return best - base
