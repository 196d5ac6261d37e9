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


STEP_FREE = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop)  # update ignores the step count


def reset_state(optimizer, models=None):
    """Fresh state, as a newly built optimizer of the same kind (what the authors' code does).
    models = a slice of the leading model dimension: reset only those models' state by zeroing
    their buffers, which equals a fresh optimizer for them where the update does not depend on
    the step count (SGD, Adagrad with lr_decay = 0 and a zero initial accumulator, RMSprop);
    Adam's bias correction does, so its models cannot be reset one by one."""
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
