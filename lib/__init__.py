"""Shared library for the symmetry-teleportation reproduction (Zhao et al., ICLR 2024).

One idea per file: models (MLPs with a leading model dimension), actions (group actions),
metrics (gradient norms, sharpness, curvature), hessian (top eigenvalue, trace, adaptive
sharpness), teleport (the teleport routine of the batched engine), teleport_module (teleporting an
ordinary nn.Module and its torch.optim optimizer), optim (optimizers and state strategies), train
(the batched training engine), arms (control arms), data (datasets as preloaded tensors),
quadratic (Section 3's quadratics), config (script overrides and errors), io (JSON and atomic
writes), progress (resumable runs), stats (correlations), plots and report (figures, console
rows, tables).

`from lib import teleport_module, random_teleport_module` gives the two functions; it imports
lib.teleport_module (and torch) only when asked (PEP 562), so `import lib.config` stays free of
torch. `lib.teleport_module` names the function even after the submodule of the same name was
imported (as `from lib.teleport_module import teleport_module` in an __init__ would leave it);
`from lib.teleport_module import Symmetry` reaches the submodule's other names (`import
lib.teleport_module as m` gives the function, as with any package that exports a function under
its module's name).
"""
import sys
import types

_LAZY = {"teleport_module": "lib.teleport_module", "random_teleport_module": "lib.teleport_module"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lib' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing lib.teleport_module binds the submodule as lib.teleport_module: keep the function
        if name in _LAZY and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
