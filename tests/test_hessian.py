"""lib.hessian against known Hessians: a linear model with squared loss, L = 0.5 ||Y - X W^T||^2,
is exactly quadratic with H = I_out (x) X^T X (rows of W in order), so its top eigenvalue,
trace and adaptive sharpness have closed forms; a small MLP against autograd's full Hessian;
batched over models equals one model at a time; adaptive sharpness is unchanged by an exact
rescaling of a ReLU network while the top eigenvalue and phi (eq. 4) are not."""
import numpy as np
import pytest
import torch

from conftest import make_batch, make_weights
from lib.actions import RescaleAction
from lib.hessian import adaptive_sharpness, hessian_trace, hvp_fn, top_eigenvalue
from lib.metrics import random_directions, sharpness
from lib.models import Activation, loss_fn

ACT = Activation(0.0)  # unused by a one-layer model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def linear_problem(K=3, n_in=4, n_out=3, B=12, at_minimum=True, seed=0, orthogonal=False):
    """W: [(K, n_out, n_in)], X: (B, n_in), Y: (B, n_out); the exact Hessian of each model,
    kron(I_out, X^T X) (P x P, P = n_out * n_in, shared by the K models)."""
    g = gen(seed)
    X = torch.randn(B, n_in, generator=g, dtype=torch.float64)
    if orthogonal:  # X^T X diagonal with distinct entries: a diagonal Hessian
        X = torch.linalg.qr(X)[0] * torch.arange(1, n_in + 1, dtype=torch.float64)
    W = [torch.randn(K, n_out, n_in, generator=g, dtype=torch.float64)]
    Y = X @ W[0][0].T if at_minimum else torch.randn(B, n_out, generator=g, dtype=torch.float64)
    if at_minimum:
        W = [W[0][:1].expand(K, -1, -1).clone()]  # every model at the minimum Y = X W^T
    return W, X, Y, torch.kron(torch.eye(n_out, dtype=torch.float64), X.T @ X)


def full_hessians(W, X, Y, act, loss):
    """Autograd's Hessian of the summed loss of the K models in all their weights at once,
    (K P, K P), cut into the K diagonal blocks (K, P, P): the Hessian of each model in its
    flattened weights. Asserts that the blocks between models are zero (the premise of
    lib.hessian: the models share nothing)."""
    K, P = W[0].shape[0], sum(w[0].numel() for w in W)

    def f(flat):
        per_model = flat.view(K, P)
        ws, i = [], 0
        for w in W:
            n = w[0].numel()
            ws.append(per_model[:, i:i + n].reshape(w.shape))
            i += n
        return loss_fn(ws, X, Y, act, loss).sum()
    x = torch.cat([w.flatten(1) for w in W], 1).flatten()
    H = torch.autograd.functional.hessian(f, x, vectorize=True).view(K, P, K, P)
    blocks = torch.stack([H[k, :, k] for k in range(K)])
    assert H.abs().sum() == pytest.approx(blocks.abs().sum().item(), rel=1e-12)
    return blocks


@pytest.fixture(scope="module")
def mlp():
    """Three 5-4-3 LeakyReLU MLPs (P = 32), a cross-entropy batch, and their exact Hessians
    (3, 32, 32), computed once for the tests that need them."""
    from lib.models import Activation
    W = make_weights([5, 4, 3], K=3, seed=1)
    X, Y = make_batch(30, 5, 3, seed=0)
    return W, X, Y, full_hessians(W, X, Y, Activation(0.1), "ce")


def test_hvp_is_the_hessian_times_the_vector_per_model():
    W, X, Y, H = linear_problem(at_minimum=False)
    v = torch.randn(3, H.shape[0], generator=gen(1), dtype=torch.float64)
    assert torch.allclose(hvp_fn(W, X, Y, ACT, "mse")(v), v @ H, atol=1e-12)


def test_top_eigenvalue_of_a_quadratic_equals_eigvalsh():
    W, X, Y, H = linear_problem(at_minimum=False)
    exact = torch.linalg.eigvalsh(H)[-1]
    got = top_eigenvalue(W, X, Y, ACT, "mse", iters=20, generator=gen(2))
    assert got.shape == (3,) and torch.allclose(got, exact.expand(3), rtol=1e-10, atol=0)


def test_top_eigenvalue_of_an_mlp_equals_autograd_hessian(leaky, mlp):
    """A 5-4-3 LeakyReLU MLP with cross-entropy, P = 32: after 20 Lanczos steps the top Ritz
    value equals the largest eigenvalue of autograd's Hessian to 1e-6 relative."""
    W, X, Y, Hs = mlp
    evs = torch.linalg.eigvalsh(Hs)
    got = top_eigenvalue(W, X, Y, leaky, iters=20, generator=gen(1), tol=0)
    for k, ev in enumerate(evs):
        assert got[k] == pytest.approx(ev[-1].item(), rel=1e-6)
    one = top_eigenvalue([w[1:2] for w in W], X, Y, leaky, iters=20, generator=gen(1), tol=0)
    assert one.item() == pytest.approx(got[1].item(), rel=1e-8)  # batched = one model at a time


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    W, X, Y, H = linear_problem(orthogonal=True)  # diagonal H: v^T H v = tr H for every +-1 vector
    assert torch.allclose(torch.diag(torch.diag(H)), H, atol=1e-12)
    got = hessian_trace(W, X, Y, ACT, "mse", samples=2, generator=gen(0))
    assert torch.allclose(got, torch.trace(H).expand(3), rtol=1e-12)
    W, X, Y, H = linear_problem(at_minimum=False)  # not diagonal: mean within 3 standard errors
    mean, se = hessian_trace(W, X, Y, ACT, "mse", samples=400, generator=gen(3), return_se=True)
    off = H - torch.diag(torch.diag(H))
    sd = torch.sqrt(2 * off.pow(2).sum())  # the per-sample standard deviation, known here
    assert ((mean - torch.trace(H)).abs() < 3 * se).all()
    assert torch.allclose(se, (sd / 20).expand(3), rtol=0.15)  # its standard error as documented


def test_worst_case_adaptive_sharpness_of_a_quadratic_at_its_minimum():
    """L(w + |w| u) - L(w) = 0.5 u^T D H D u at the minimum: max over ||u|| <= rho is
    rho^2 / 2 * lambda_max(D H D), D = diag(|w|)."""
    W, X, Y, H = linear_problem(K=2)
    W = [W[0] * torch.tensor([1.0, 0.3], dtype=torch.float64).view(2, 1, 1)]  # two different models
    Y = X @ W[0][0].T  # model 0 at the minimum
    rho = 0.05
    D = torch.diag(W[0][0].flatten().abs())
    exact = rho ** 2 / 2 * torch.linalg.eigvalsh(D @ H @ D)[-1]
    got = adaptive_sharpness([W[0][:1]], X, Y, ACT, rho, "mse", steps=100, generator=gen(0))
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)
    few = adaptive_sharpness([W[0][:1]], X, Y, ACT, rho, "mse", steps=0, generator=gen(0))
    assert few.item() < 0.9 * exact.item()  # a random start alone is not the maximum


def test_worst_case_adaptive_sharpness_with_the_gradient_term():
    """Away from the minimum L(w + |w| u) - L(w) = b^T u + 0.5 u^T A u with b = D grad L,
    A = D H D: its maximum over ||u|| <= rho lies on the sphere at u = (mu I - A)^-1 b with the
    mu > lambda_max(A) for which ||u|| = rho (the trust-region condition), found by bisection."""
    W, X, Y, H = linear_problem(K=1, at_minimum=False, seed=4)
    rho, w = 0.05, W[0][0].flatten()
    D = torch.diag(w.abs())
    grad = (W[0][0] @ X.T - Y.T) @ X  # d/dW of 0.5 ||X W^T - Y||^2
    b, A = D @ grad.flatten(), D @ H @ D
    lo, hi = torch.linalg.eigvalsh(A)[-1].item(), 1e6
    u = None
    for _ in range(200):  # ||(mu I - A)^-1 b|| decreases in mu > lambda_max(A)
        mu = (lo + hi) / 2
        u = torch.linalg.solve(mu * torch.eye(len(b), dtype=b.dtype) - A, b)
        lo, hi = (mu, hi) if u.norm() > rho else (lo, mu)
    exact = (b @ u + 0.5 * u @ A @ u).item()
    got = adaptive_sharpness(W, X, Y, ACT, rho, "mse", steps=100, generator=gen(1))
    assert got.item() == pytest.approx(exact, rel=1e-6)
    assert exact > rho * b.norm().item()  # the curvature term counts: not the first-order answer


def test_average_case_adaptive_sharpness_of_a_quadratic():
    """E over u ~ N(0, rho^2 I) of 0.5 u^T D H D u = rho^2 / 2 * tr(D H D)."""
    W, X, Y, H = linear_problem(K=1)
    rho = 0.1
    D = torch.diag(W[0][0].flatten().abs())
    exact = rho ** 2 / 2 * torch.trace(D @ H @ D)
    got = adaptive_sharpness(W, X, Y, ACT, rho, "mse", kind="average", samples=2000, generator=gen(0))
    assert got.item() == pytest.approx(exact.item(), rel=0.05)


def test_batched_over_models_equals_one_model_at_a_time(leaky, mlp):
    """Each model's value is its own: model 0 next to model 1 gives what it gives next to an
    other model 2 (the random draws of row 0 are the same; norms, steps and stopping are per
    model), and Hutchinson's estimate of model k is the mean of v_k^T H_k v_k over the drawn
    vectors with autograd's Hessian of model k alone."""
    W, X, Y, Hs = mlp
    pair = lambda k: [torch.stack([w[0], w[k]]) for w in W]  # noqa: E731
    fns = {"top": lambda U: top_eigenvalue(U, X, Y, leaky, iters=8, generator=gen(0), tol=0),
           "trace": lambda U: hessian_trace(U, X, Y, leaky, samples=4, generator=gen(0)),
           "worst": lambda U: adaptive_sharpness(U, X, Y, leaky, 0.3, steps=4, generator=gen(0)),
           "average": lambda U: adaptive_sharpness(U, X, Y, leaky, 0.3, "ce", "average", samples=4, generator=gen(0))}
    for name, f in fns.items():
        a, b = f(pair(1)), f(pair(2))
        assert a.shape == (2,) and a[0].item() == pytest.approx(b[0].item(), rel=1e-10), name
        assert abs(a[1] - b[1]) > 1e-6 * abs(a[1]), name  # the other models do differ
    g, P = gen(0), 32
    vs = [(2 * torch.randint(0, 2, (3, P), generator=g) - 1).double() for _ in range(4)]
    tr = fns["trace"](W)
    for k, H in enumerate(Hs):
        assert tr[k].item() == pytest.approx(np.mean([(v[k] @ H @ v[k]).item() for v in vs]), rel=1e-10)


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_adaptive_sharpness_survives_an_exact_rescaling_that_moves_phi_and_lambda(slope):
    act = Activation(slope)
    W = make_weights([5, 6, 4, 3], K=2, seed=3)
    X, Y = make_batch(25, 5, 3, seed=2)
    a = [2 * torch.randn(2, 6, generator=gen(7), dtype=torch.float64),
         2 * torch.randn(2, 4, generator=gen(8), dtype=torch.float64)]
    V = RescaleAction()(W, a)
    assert torch.allclose(loss_fn(V, X, Y, act), loss_fn(W, X, Y, act), rtol=1e-13)  # the same function
    for kind in ("worst", "average"):
        before = adaptive_sharpness(W, X, Y, act, 0.2, kind=kind, steps=5, generator=gen(0))
        after = adaptive_sharpness(V, X, Y, act, 0.2, kind=kind, steps=5, generator=gen(0))
        assert before.abs().min() > 1e-4 and torch.allclose(before, after, rtol=1e-9, atol=0)
    lam = [top_eigenvalue(U, X, Y, act, generator=gen(0)) for U in (W, V)]
    assert ((lam[1] - lam[0]).abs() > 0.05 * lam[0].abs()).all()
    dirs = random_directions(W, 10, generator=gen(1))
    phi = [sharpness(U, X, Y, act, [1.0] * 10, dirs) for U in (W, V)]
    assert ((phi[1] - phi[0]).abs() > 1e-2 * phi[0]).all()


def test_worst_case_keeps_the_largest_loss_met_on_the_way(leaky):
    """More ascent steps never give less (the same path, prolonged), even with steps so long
    that the ascent overshoots; the value at the random start is a lower bound."""
    W = make_weights([5, 6, 3], K=2, seed=4)
    X, Y = make_batch(20, 5, 3, seed=3)
    vals = torch.stack([adaptive_sharpness(W, X, Y, leaky, 1.0, steps=s, generator=gen(0), eta=3.0)
                        for s in range(8)])
    assert (vals[1:] >= vals[:-1]).all() and (vals[-1] > vals[0]).all()
