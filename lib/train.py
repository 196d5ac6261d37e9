"""The batched training engine: K models that share the data order train as one, with one
optimizer over weights (K, out, in): torch.optim's, or lib.optim.BatchedOptimizer, whose update
runs inside the compiled training step (train_step); batches are index slices of preloaded
tensors. Teleports during training come from a hook (lib.arms.ArmHook)."""
import sys

import torch

from lib.models import init_mlp, loss_and_grads
from lib.optim import (BatchedOptimizer, apply_strategy, check_strategy, first_moments, fused_update,
                       make_optimizer)
from lib.teleport import random_teleport, teleport


def make_model(widths, seeds, optimizer, lr, device="cpu", batched_optimizer=False):
    """Leaf weight tensors of len(seeds) MLPs and their optimizer (batched_optimizer=True:
    lib.optim.BatchedOptimizer, whose update train_epoch fuses into the training step)."""
    W = [w.requires_grad_() for w in init_mlp(widths, seeds, device)]
    return W, make_optimizer(optimizer, W, lr, batched=batched_optimizer)


_COMPILED = {}


def compiled_loss_and_grads(W, X, Y, act, loss="ce"):
    """loss_and_grads through torch.compile (for torch.optim optimizers): the ~30 small kernels of a
    batch-20 step fused into a few (benchmarks/bench_training.py: 1.3x the eager step per
    seed-epoch; with a BatchedOptimizer, compiled_train_step goes further), after a one-off compile
    per batch shape and K. If compiling fails (no C++ compiler, unsupported platform), it says so
    in one line and falls back to the eager function for good."""
    fn = _COMPILED.get("fn")
    if fn is None:
        fn = _COMPILED["fn"] = torch.compile(loss_and_grads, dynamic=False)
    if fn is not loss_and_grads:
        try:
            return fn([w.detach() for w in W], X, Y, act, loss)
        except Exception as e:  # noqa: BLE001 - any compiler failure: train eagerly instead
            print(f"warning: torch.compile failed ({type(e).__name__}); training eagerly", file=sys.stderr)
            _COMPILED["fn"] = loss_and_grads
    return loss_and_grads(W, X, Y, act, loss)


@torch.no_grad()
def train_step(W, bufs, scales, X, Y, act, loss, name, lr):
    """One training step of K batched models, in place: loss_and_grads, then fused_update of every
    weight tensor W[j] (K, out, in) with its optimizer state bufs[j] (lib.optim.BUFFERS[name]) and
    Adam's per-model scales (or None). Returns the losses (K,). Nothing else is written to memory
    that outlives the step: no .grad, no new optimizer state."""
    losses, grads = loss_and_grads(W, X, Y, act, loss)
    for w, g, b in zip(W, grads, bufs):
        fused_update(name, lr, w, g, b, scales)
    return losses


@torch.no_grad()
def train_steps(W, bufs, scales, X, Y, act, loss, name, lr, n):
    """n consecutive train_steps on the n equal batches of X (n b, d_0), in order; scales: one
    Adam scales per step (or None). Compiled as one graph (the loop unrolled), so that the
    per-call cost of a compiled function is paid once per n steps. Returns the summed losses (K,)."""
    b, total = X.shape[0] // n, 0
    for s in range(n):
        total = total + train_step(W, bufs, None if scales is None else scales[s], X[s * b:(s + 1) * b],
                                   Y[s * b:(s + 1) * b], act, loss, name, lr)
    return total


def step_mode(device):
    """How the training and teleport steps are compiled on `device`: 'reduce-overhead' on CUDA (a
    step captured in a CUDA graph and replayed: a batch-20 step is launch-bound), 'default'
    elsewhere (inductor's fused C++ kernels; no CUDA graphs on a CPU). The training step updates
    weights and optimizer state in place; they are not marked as static addresses (that would
    recompile for every new model), so inductor may run that step without a CUDA graph: not
    measured, no GPU here."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def compiled_train_step(W, opt, X, Y, act, loss="ce", n=1):
    """train_step (n = 1) or train_steps over n batches through torch.compile (mode
    step_mode(device)), the optimizer's update inside the compiled step (opt: BatchedOptimizer).
    Falls back to the eager step as compiled_loss_and_grads. Increments the step counts (outside:
    they are (K,) float64 bookkeeping). Returns the losses (K,), summed over the n steps."""
    bufs, steps = zip(*(opt.buffers(w) for w in W))
    scales = []
    for _ in range(n):
        for st in steps:
            st += 1
        scales.append(opt.scales(W[0], steps[0]))  # every weight of a batched model has the same step counts
    scales = None if scales[0] is None else scales
    fn_eager, mode = train_step if n == 1 else train_steps, step_mode(W[0].device)
    fn = _COMPILED.get((fn_eager.__name__, mode))
    if fn is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # optimizers x shapes
        fn = _COMPILED[(fn_eager.__name__, mode)] = torch.compile(fn_eager, dynamic=False, mode=mode)
    args = ([w.detach() for w in W], list(bufs), scales if n > 1 or scales is None else scales[0], X, Y, act, loss,
            opt.name, opt.lr) + ((n,) if n > 1 else ())
    if fn is not fn_eager:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: train eagerly instead
            print(f"warning: torch.compile failed ({type(e).__name__}); training eagerly", file=sys.stderr)
            _COMPILED[(fn_eager.__name__, mode)] = fn_eager
    return fn_eager(*args)


def eager_train_step(W, opt, X, Y, act, loss="ce"):
    """train_step without the compiler, for a BatchedOptimizer."""
    bufs, steps = zip(*(opt.buffers(w) for w in W))
    for st in steps:
        st += 1
    return train_step([w.detach() for w in W], list(bufs), opt.scales(W[0], steps[0]), X, Y, act, loss,
                      opt.name, opt.lr)


STEPS_PER_CALL = 5  # compiled steps of a BatchedOptimizer per call of the compiled function (train_steps)


def train_epoch(W, opt, X, Y, act, batch_size, loss="ce", before_batch=None, compile=False, hooked=None):
    """One epoch over (X, Y) in fixed sequential order, batches X[i*b:(i+1)*b]. Calls
    before_batch(i) before batch i (to teleport there). compile=True: the gradient step through
    torch.compile (compiled_loss_and_grads), and with a BatchedOptimizer the whole step, update
    included (compiled_train_step), STEPS_PER_CALL steps per call where before_batch does nothing:
    hooked = the number of leading batches before which it may act (None: all); after those, its
    calls for a chunk of batches are made together before the chunk.
    Returns the mean batch loss per model (K,), on the device."""
    n = -(-X.shape[0] // batch_size)
    total = torch.zeros(W[0].shape[0], dtype=W[0].dtype, device=W[0].device)  # the models' dtype
    if isinstance(opt, BatchedOptimizer):
        step, i, chunk = compiled_train_step if compile else eager_train_step, 0, STEPS_PER_CALL if compile else 1
        acts = lambda j: before_batch is not None and (hooked is None or j < hooked)  # noqa: E731 - it may act at j
        while i < n:
            whole = (i + chunk) * batch_size <= X.shape[0] and not any(acts(j) for j in range(i, i + chunk))
            c = chunk if chunk > 1 and whole else 1
            for j in range(i, i + c):  # a chunk's calls, which do nothing, are made before it
                if before_batch is not None:
                    before_batch(j)
            sl = slice(i * batch_size, (i + c) * batch_size)
            total += step(W, opt, X[sl], Y[sl], act, loss, *((c,) if c > 1 else ()))
            i += c
        return total / n
    step = compiled_loss_and_grads if compile else loss_and_grads
    for i in range(n):
        if before_batch is not None:
            before_batch(i)
        sl = slice(i * batch_size, (i + 1) * batch_size)
        losses, grads = step(W, X[sl], Y[sl], act, loss)  # = autograd of losses.sum()
        for w, g in zip(W, grads):
            w.grad = g
        opt.step()
        total += losses
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


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def warm_up(W, opt, X, Y, act, batch_size, loss="ce"):
    """Compile the training step for every batch shape of an epoch over X, leaving W and the
    optimizer state as they were (a BatchedOptimizer's step is run on copies)."""
    n = X.shape[0]
    for size in {min(batch_size, n), n % batch_size or batch_size}:
        if isinstance(opt, BatchedOptimizer):
            W2 = [w.detach().clone() for w in W]
            opt2 = BatchedOptimizer(W2, lr=opt.lr, name=opt.name)
            compiled_train_step(W2, opt2, X[:size], Y[:size], act, loss)
            if size == batch_size and n >= STEPS_PER_CALL * size:
                compiled_train_step(W2, opt2, X[:size * STEPS_PER_CALL], Y[:size * STEPS_PER_CALL], act, loss,
                                    STEPS_PER_CALL)
        else:
            compiled_loss_and_grads(W, X[:size], Y[:size], act, loss)


def fit(W, opt, data, act, epochs, batch_size, loss="ce", hook=None, desc="", progress=True,
        compile=False, resume=None, on_epoch=None):
    """Train K batched models for `epochs` epochs on data (lib.data.Data) in sequential order.
    hook(epoch, i) runs before batch i of each epoch (teleports go there, and count as training
    time); a hook with active_batches(epoch) (lib.arms.ArmHook) acts only before that many leading
    batches of the epoch, so that the others can run several compiled steps per call. Returns per-epoch curves, each a list over epochs of K values: train_loss (mean batch
    loss of the epoch), test_loss, test_acc, time_s (cumulative, evaluation excluded); and
    test_loss_init / test_acc_init before training. compile=True: the training step through
    torch.compile, compiled before the clock starts. resume: the history of a run interrupted
    after some epochs, whose W, optimizer and hook are already restored: training goes on from
    there. on_epoch(hist) after every epoch (e.g. to save progress, lib.progress)."""
    from time import perf_counter

    from tqdm import tqdm

    from lib.models import evaluate
    dev = W[0].device
    if resume is None:
        l0, a0 = evaluate(W, data.x_test, data.y_test, act, loss)
        hist = {"train_loss": [], "test_loss": [], "test_acc": [], "time_s": [],
                "test_loss_init": l0.tolist(), "test_acc_init": a0.tolist()}
    else:
        hist = {k: list(v) if k in ("train_loss", "test_loss", "test_acc", "time_s") else v
                for k, v in resume.items()}
    if compile:  # compile for every batch shape of the epoch before the clock starts
        warm_up(W, opt, data.x_train, data.y_train, act, batch_size, loss)
    elapsed = hist["time_s"][-1] if hist["time_s"] else 0.0
    bar = tqdm(range(len(hist["train_loss"]), epochs), desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True, initial=len(hist["train_loss"]), total=epochs)
    for epoch in bar:
        _sync(dev)
        t0 = perf_counter()
        tr = train_epoch(W, opt, data.x_train, data.y_train, act, batch_size, loss,
                         None if hook is None else (lambda i, e=epoch: hook(e, i)), compile,
                         getattr(hook, "active_batches", lambda e: None)(epoch))
        _sync(dev)
        elapsed += perf_counter() - t0
        te, acc = evaluate(W, data.x_test, data.y_test, act, loss)
        for k, v in (("train_loss", tr), ("test_loss", te), ("test_acc", acc)):
            hist[k].append(v.tolist())
        hist["time_s"].append(elapsed)
        bar.set_postfix(train=f"{tr.mean().item():.4f}", test=f"{te.mean().item():.4f}")
        if on_epoch is not None:
            on_epoch(hist)
    return hist

