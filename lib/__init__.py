"""Shared library for the symmetry-teleportation reproduction (Zhao et al., ICLR 2024).

One idea per file: models (MLPs with a leading model dimension), actions (group actions),
metrics (gradient norms, sharpness, curvature), teleport (the teleport routine), optim
(optimizers and state strategies), train (the batched training engine), data (datasets as
preloaded tensors), config (script overrides and errors), results (JSON, figures, console).
"""
