"""MLPs without biases as lists of weight matrices with a leading *model* dimension.

Weights: W[j] has shape (K, d_{j+1}, d_j) for K independent models; K = 1 is the ordinary
case. Data come in rows, X: (B, d_0), shared by all K models. The paper writes layers in
column form, h_j = sigma(W_j h_{j-1}) with h: (d, B); `hidden_columns` returns that form for
the group actions, while the forward pass stays in row form so training needs no transpose.
"""
from dataclasses import dataclass

import math
import torch
import torch.nn.functional as F

from lib.config import UsageError


@dataclass(frozen=True)
class Activation:
    """Elementwise LeakyReLU with negative `slope` (slope 0 is ReLU)."""
    slope: float = 0.1

    def __call__(self, x):
        return F.leaky_relu(x, self.slope) if self.slope else torch.relu(x)

    def inverse(self, y):
        """sigma^{-1}, needed by the action of eq. (54); exists only for slope > 0."""
        if not self.slope:
            raise UsageError("the action of eq. (54) needs an invertible activation: use LeakyReLU (slope > 0)")
        return torch.where(y > 0, y, y / self.slope)

    def derivative(self, x):
        """sigma'(x), defined almost everywhere."""
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, self.slope))


ACTIVATIONS = {"leaky_relu": Activation(0.1), "relu": Activation(0.0)}


def activation(name):
    """Activation by name: 'leaky_relu' (slope 0.1, the paper's) or 'relu'."""
    if name not in ACTIVATIONS:
        raise UsageError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def init_mlp(widths, seeds, device="cpu", dtype=torch.float32):
    """Weights of len(seeds) MLPs with layer widths d_0..d_L, as torch.nn.Linear initialises:
    uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), model k drawn from torch.manual_seed(seeds[k]).
    Returns [W_1..W_L], W_j: (K, d_j, d_{j-1}); a batched model equals K separately made ones."""
    per_model = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        per_model.append([(2 * torch.rand(o, i, generator=gen, dtype=dtype) - 1) / math.sqrt(i)
                          for i, o in zip(widths[:-1], widths[1:])])
    return [torch.stack(ws).to(device) for ws in zip(*per_model)]


def forward(W, X, act):
    """Network output f(X) in rows: X: (B, d_0) or (K, B, d_0) -> (K, B, d_L). A shared X goes
    through the first layer of all K models as one GEMM, X @ [W_1^(1); ...; W_1^(K)]^T, instead
    of a batched matmul that would copy X K times (same values, several times faster for large K)."""
    if X.dim() == 2:
        K, d_out, d_in = W[0].shape
        h = (X @ W[0].reshape(K * d_out, d_in).T).view(X.shape[0], K, d_out).transpose(0, 1)
    else:
        h = torch.matmul(X, W[0].mT)
    for w in W[1:]:
        h = torch.matmul(act(h), w.mT)
    return h


def hidden_columns(W, X, act):
    """Inputs to every layer in the paper's column form: [h_0 = X^T, h_1, ..., h_{L-1}],
    h_j: (K, d_j, B) with h_j = sigma(W_j h_{j-1})."""
    K = W[0].shape[0]
    h = X.mT.expand(K, -1, -1) if X.dim() == 2 else X.mT
    hs = [h]
    for w in W[:-1]:
        h = act(w @ h)
        hs.append(h)
    return hs


def losses_per_model(out, Y, loss="ce"):
    """Per-model loss (K,): 'ce' = mean cross-entropy, Y: (B,) labels;
    'mse' = 0.5 * ||Y - f(X)||_F^2 summed over the batch, Y: (B, d_L)."""
    if loss == "ce":
        K, B, C = out.shape
        return F.cross_entropy(out.reshape(K * B, C), Y.repeat(K), reduction="none").view(K, B).mean(1)
    if loss == "mse":
        return 0.5 * (out - Y).pow(2).sum((1, 2))
    raise UsageError(f"unknown loss {loss!r}; known: ce, mse")


def loss_fn(W, X, Y, act, loss="ce"):
    """L(W) per model, shape (K,)."""
    return losses_per_model(forward(W, X, act), Y, loss)


@torch.no_grad()
def loss_and_grads(W, X, Y, act, loss="ce"):
    """Per-model losses (K,) and their gradients dL_k/dW_j (K, d_j, d_{j-1}) by the chain rule
    written out (backpropagation without autograd's graph: the training loop's hot path, about
    1.5x faster at batch 20; equal to autograd, tested). With z_j = W_j h_{j-1}, h_j = sigma(z_j):
    dL/dW_j = delta_j h_{j-1}^T, delta_{j-1} = (W_j^T delta_j) * sigma'(z_{j-1}), and
    delta_L = (softmax(z_L) - onehot(Y)) / B for 'ce', z_L - Y for 'mse' (in rows: transposed)."""
    K, L = W[0].shape[0], len(W)
    h, hs, masks = forward(W[:1], X, act), [X], []
    for w in W[1:]:
        m = act.derivative(h)  # sigma'(z) in h's dtype: LeakyReLU is z * sigma'(z)
        h = h * m
        masks.append(m)
        hs.append(h)
        h = torch.matmul(h, w.mT)
    if loss == "ce":
        B, rows = h.shape[1], torch.arange(h.shape[1], device=h.device)
        delta = torch.log_softmax(h, -1)
        losses = -delta[:, rows, Y].mean(1)
        delta = delta.exp_()
        delta[:, rows, Y] -= 1
        delta /= B
    else:
        losses, delta = losses_per_model(h, Y, loss), h - Y
    grads = [None] * L
    for j in range(L - 1, 0, -1):
        grads[j] = delta.mT @ hs[j]
        delta = (delta @ W[j]).mul_(masks[j - 1])
    if X.dim() == 2:  # shared input: (K d_1, B) @ (B, d_0) as one GEMM
        B, d1 = delta.shape[1], delta.shape[2]
        grads[0] = (delta.transpose(0, 1).reshape(B, K * d1).T @ X).view(K, d1, X.shape[1])
    else:
        grads[0] = delta.mT @ X
    return losses, grads


@torch.no_grad()
def evaluate(W, X, Y, act, loss="ce", chunk=10000):
    """Mean loss and accuracy (in %, nan for regression) per model over a whole set, no grad."""
    K, n = W[0].shape[0], X.shape[0]
    tot, correct = (torch.zeros(K, dtype=W[0].dtype, device=X.device) for _ in range(2))  # the models' dtype
    for i in range(0, n, chunk):
        out = forward(W, X[i:i + chunk], act)
        b = out.shape[1]
        tot += losses_per_model(out, Y[i:i + chunk], loss) * (b if loss == "ce" else 1)
        if loss == "ce":
            correct += (out.argmax(-1) == Y[i:i + chunk]).sum(1)
    acc = 100 * correct / n if loss == "ce" else torch.full((K,), float("nan"))
    return (tot / n if loss == "ce" else tot), acc
