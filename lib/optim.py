"""torch.optim optimizers by name, and what happens to their state after a teleport
(Appendix F.1 compares the strategies for momentum)."""
import torch

from lib.config import UsageError

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adam": (torch.optim.Adam, {}),
}
STRATEGIES = ("reset", "keep", "transport")
FIRST_MOMENTS = ("momentum_buffer", "exp_avg")  # buffers that live in the tangent space


def make_optimizer(name, params, lr):
    """An unchanged torch.optim optimizer: 'sgd', 'momentum' (SGD, momentum 0.9), 'adagrad',
    'rmsprop' or 'adam' with learning rate lr >= 0; other hyperparameters torch's defaults."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if not lr >= 0:
        raise UsageError(f"learning rate must be >= 0, got {lr}")
    cls, kw = OPTIMIZERS[name]
    params = list(params)
    # torch's fused kernels: the same update in one kernel per tensor group, about 2x fewer
    # launches per step (Adagrad's is CPU-only, RMSprop has none)
    fused = cls is not torch.optim.RMSprop and (cls is not torch.optim.Adagrad
                                                 or all(p.device.type == "cpu" for p in params))
    return cls(params, lr=lr, **kw, **({"fused": True} if fused else {}))


def check_strategy(strategy):
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown optimizer-state strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def first_moments(optimizer, params):
    """The momentum-like buffers of each parameter (None where there are none yet)."""
    return [next((optimizer.state[p][k] for k in FIRST_MOMENTS if k in optimizer.state[p]), None)
            for p in params]


def reset_state(optimizer):
    """Fresh state, as a newly built optimizer of the same kind (what the authors' code does)."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    fresh = type(optimizer)([p for g in optimizer.param_groups for p in g["params"]], **group)
    optimizer.state = fresh.state


def apply_strategy(optimizer, params, strategy, transported=None):
    """After the weights were teleported in place: 'reset' the state, 'keep' it, or
    'transport' it: first-moment buffers replaced by their push-forward under the action
    (`transported`, from `teleport(..., tangents=...)`), second moments kept."""
    check_strategy(strategy)
    if strategy == "reset":
        reset_state(optimizer)
    elif strategy == "transport" and transported is not None:
        for p, buf in zip(params, transported):
            key = next((k for k in FIRST_MOMENTS if k in optimizer.state[p]), None)
            if key is not None:
                optimizer.state[p][key] = buf
