"""The batched training engine: K models that share the data order train as one, with one
torch.optim optimizer over weights (K, out, in); batches are index slices of preloaded tensors."""
import torch

from lib.models import init_mlp, loss_fn
from lib.optim import apply_strategy, check_strategy, first_moments, make_optimizer
from lib.teleport import random_teleport, teleport


def make_model(widths, seeds, optimizer, lr, device="cpu"):
    """Leaf weight tensors of len(seeds) MLPs and their optimizer."""
    W = [w.requires_grad_() for w in init_mlp(widths, seeds, device)]
    return W, make_optimizer(optimizer, W, lr)


def train_epoch(W, opt, X, Y, act, batch_size, loss="ce", before_batch=None):
    """One epoch over (X, Y) in fixed sequential order, batches X[i*b:(i+1)*b]. Calls
    before_batch(i) before batch i (to teleport there). Returns the mean batch loss per model
    (K,), kept on the device."""
    n = -(-X.shape[0] // batch_size)
    total = torch.zeros(W[0].shape[0], device=W[0].device)
    for i in range(n):
        if before_batch is not None:
            before_batch(i)
        sl = slice(i * batch_size, (i + 1) * batch_size)
        opt.zero_grad(set_to_none=True)
        losses = loss_fn(W, X[sl], Y[sl], act, loss)
        losses.sum().backward()
        opt.step()
        total += losses.detach()
    return total / n


def teleport_model(W, opt, X, Y, act, strategy="reset", random_norms=None, generator=None, **kw):
    """Teleport the trained weights W in place and handle the optimizer state by `strategy`.
    random_norms given: a random teleport of those algebra norms instead of the optimised one.
    kw go to `teleport` (objective, action, steps, lr, ...). Returns the teleport record."""
    check_strategy(strategy)
    tangents = None
    if strategy == "transport":
        bufs = first_moments(opt, W)
        tangents = [bufs] if all(b is not None for b in bufs) else None
    if random_norms is None:
        new, rec, tangents = teleport(W, X, Y, act, tangents=tangents, **kw)
    else:
        keep = {k: kw[k] for k in ("heldout", "loss") if k in kw}
        new, rec, tangents = random_teleport(W, X, Y, act, kw["action"], random_norms, generator,
                                             tangents=tangents, **keep)
    with torch.no_grad():
        for w, v in zip(W, new):
            w.copy_(v)
    apply_strategy(opt, W, strategy, tangents[0] if tangents else None)
    return rec
