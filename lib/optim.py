"""torch.optim optimizers by name, and what happens to their state after a teleport
(Appendix F.1 compares the strategies for momentum)."""
from collections import defaultdict

import torch

from lib.config import UsageError

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adam": (torch.optim.Adam, {}),
}
# torch.optim's defaults, spelled out for the batched update (fused_update)
HYPER = {"momentum": 0.9, "adagrad_eps": 1e-10, "rmsprop_alpha": 0.99, "rmsprop_eps": 1e-8,
         "betas": (0.9, 0.999), "adam_eps": 1e-8}
BUFFERS = {"sgd": (), "momentum": ("momentum_buffer",), "adagrad": ("sum",), "rmsprop": ("square_avg",),
           "adam": ("exp_avg", "exp_avg_sq")}  # state per weight tensor, torch.optim's names
STRATEGIES = ("reset", "keep", "transport")
FIRST_MOMENTS = ("momentum_buffer", "exp_avg")  # buffers that live in the tangent space


def make_optimizer(name, params, lr, batched=False):
    """An unchanged torch.optim optimizer: 'sgd', 'momentum' (SGD, momentum 0.9), 'adagrad',
    'rmsprop' or 'adam' with learning rate lr >= 0; other hyperparameters torch's defaults.
    batched=True: a BatchedOptimizer (the same rules, a step count per model, the update fusable
    into the compiled training step) for weights (K, out, in)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if not lr >= 0:
        raise UsageError(f"learning rate must be >= 0, got {lr}")
    if batched:
        return BatchedOptimizer(params, lr=lr, name=name)
    cls, kw = OPTIMIZERS[name]
    params = list(params)
    # torch's fused kernels: the same update in one kernel per tensor group, about 2x fewer
    # launches per step (Adagrad's is CPU-only, RMSprop has none)
    fused = cls is not torch.optim.RMSprop and (cls is not torch.optim.Adagrad
                                                 or all(p.device.type == "cpu" for p in params))
    return cls(params, lr=lr, **kw, **({"fused": True} if fused else {}))


def adam_scales(lr, step, dtype):
    """Adam's bias corrections per model from its step counts t (K,) float64, already counting this
    step: (lr / (1 - b1^t), sqrt(1 - b2^t)), each (K, 1, 1) in `dtype`. Computed outside the fused
    update (inside, the compiler would redo the powers for every weight)."""
    b1, b2 = HYPER["betas"]
    return [x.to(dtype).view(-1, 1, 1) for x in (lr / (1 - b1 ** step), (1 - b2 ** step).sqrt())]


def fused_update(name, lr, w, g, bufs, scales=None):
    """One in-place update of weights w (K, out, in) by gradient g with torch.optim's rule for
    `name` and its default hyperparameters (HYPER), written out so that it runs inside the
    compiled training step. bufs: the state tensors BUFFERS[name], shaped like w; scales: Adam's
    (step size, sqrt of the second bias correction) per model (adam_scales).
    momentum: b <- 0.9 b + g, w <- w - lr b.  adagrad: s <- s + g^2, w <- w - lr g / (sqrt(s) + eps).
    rmsprop: v <- a v + (1 - a) g^2, w <- w - lr g / (sqrt(v) + eps).  adam: m <- m + (1 - b1)(g - m),
    v <- b2 v + (1 - b2) g^2, w <- w - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
    if name == "sgd":
        w.add_(g, alpha=-lr)
    elif name == "momentum":
        bufs[0].mul_(HYPER["momentum"]).add_(g)
        w.add_(bufs[0], alpha=-lr)
    elif name == "adagrad":
        bufs[0].addcmul_(g, g)
        w.addcdiv_(g, bufs[0].sqrt().add_(HYPER["adagrad_eps"]), value=-lr)
    elif name == "rmsprop":
        a = HYPER["rmsprop_alpha"]
        bufs[0].mul_(a).addcmul_(g, g, value=1 - a)
        w.addcdiv_(g, bufs[0].sqrt().add_(HYPER["rmsprop_eps"]), value=-lr)
    else:
        (b1, b2), (size, root), (m, v) = HYPER["betas"], scales, bufs
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        w.sub_(m / (v.sqrt() / root).add_(HYPER["adam_eps"]) * size)


class BatchedOptimizer:
    """torch.optim's SGD / momentum / Adagrad / RMSprop / Adam (default hyperparameters) for
    batched weights (K, out, in): the state per weight tensor under torch's names (BUFFERS),
    plus 'step' (K,), one step count per model, so that some models' state can be reset alone
    (reset_state(models=...)) for every optimizer, Adam included. step() updates from p.grad
    (fused_update); lib.train's compiled step calls fused_update itself. The state is created
    at the first step, zeros (Adagrad's at construction, as torch), and never reallocated."""

    def __init__(self, params, lr, name):
        self.param_groups = [{"params": list(params), "lr": lr, "name": name}]
        self.name, self.lr = name, lr
        self.state = defaultdict(dict)
        if name == "adagrad":
            for p in self.param_groups[0]["params"]:
                self.init_state(p)

    def init_state(self, p):
        """Zero buffers and step counts for weight p (K, ...); returns its state dict."""
        st = self.state[p]
        if not st:
            for key in BUFFERS[self.name]:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format).detach()
            st["step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
        return st

    def buffers(self, p):
        """(state tensors in BUFFERS order, step counts) of weight p, created if missing."""
        st = self.init_state(p)
        return [st[k] for k in BUFFERS[self.name]], st["step"]

    @torch.no_grad()
    def step(self):
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                bufs, step = self.buffers(p)
                step += 1
                fused_update(self.name, self.lr, p, p.grad, bufs, self.scales(p, step))

    def scales(self, p, step):
        """fused_update's `scales` for weight p after its step counts were increased."""
        return adam_scales(self.lr, step, p.dtype) if self.name == "adam" else None

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def state_dict(self):
        ps = self.param_groups[0]["params"]
        return {"name": self.name, "lr": self.lr,
                "state": {i: dict(self.state[p]) for i, p in enumerate(ps) if self.state.get(p)}}

    def load_state_dict(self, sd):
        ps = self.param_groups[0]["params"]
        self.state = defaultdict(dict)
        for i, st in sd["state"].items():
            self.state[ps[int(i)]] = {k: v.clone() for k, v in st.items()}


def check_strategy(strategy):
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown optimizer-state strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def first_moments(optimizer, params):
    """The momentum-like buffers of each parameter (None where there are none yet)."""
    return [next((optimizer.state[p][k] for k in FIRST_MOMENTS if k in optimizer.state[p]), None)
            for p in params]


STEP_FREE = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop)  # update ignores the step count


def reset_state(optimizer, models=None):
    """Fresh state, as a newly built optimizer of the same kind (what the authors' code does).
    models = a slice of the leading model dimension: reset only those models' state by zeroing
    their buffers, which equals a fresh optimizer for them where the update does not depend on
    the step count (SGD, Adagrad with lr_decay = 0 and a zero initial accumulator, RMSprop);
    Adam's bias correction does, so its models cannot be reset one by one."""
    if isinstance(optimizer, BatchedOptimizer):  # zeros for all of them or some: a fresh state
        for p in optimizer.param_groups[0]["params"]:
            for buf in optimizer.state[p].values() if optimizer.state.get(p) else ():
                buf[slice(None) if models is None else models] = 0
        return
    if models is None:
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        fresh = type(optimizer)([p for g in optimizer.param_groups for p in g["params"]], **group)
        optimizer.state = fresh.state
        return
    if not isinstance(optimizer, STEP_FREE) or optimizer.param_groups[0].get("lr_decay", 0) != 0:
        raise ValueError(f"{type(optimizer).__name__}'s update depends on its step count: reset the whole "
                         "optimizer (one arm per batched model), not some of its models")
    for state in optimizer.state.values():
        for key, buf in state.items():
            if key != "step" and torch.is_tensor(buf) and buf.dim() > 0:
                buf[models] = 0


def apply_strategy(optimizer, params, strategy, transported=None, models=None):
    """After the weights were teleported in place: 'reset' the state, 'keep' it, or
    'transport' it: first-moment buffers replaced by their push-forward under the action
    (`transported`, from `teleport(..., tangents=...)`), second moments kept. models = a slice
    of the model dimension: only those models (`transported` then holds just their buffers)."""
    check_strategy(strategy)
    if strategy == "reset":
        reset_state(optimizer, models)
    elif strategy == "transport" and transported is not None:
        for p, buf in zip(params, transported):
            key = next((k for k in FIRST_MOMENTS if k in optimizer.state[p]), None)
            if key is not None and models is None:
                optimizer.state[p][key] = buf
            elif key is not None:
                optimizer.state[p][key][models] = buf
