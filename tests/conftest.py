import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


@pytest.fixture
def leaky():
    from lib.models import Activation
    return Activation(0.1)


def make_weights(widths, K=2, seed=0, dtype=torch.float64):
    from lib.models import init_mlp
    return init_mlp(widths, [seed + 10 * k for k in range(K)], dtype=dtype)


def make_batch(B, d_in, classes, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, d_in, generator=gen, dtype=dtype), torch.randint(classes, (B,), generator=gen)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module, as the scripts use on a CPU: their small MLPs are
    launch-bound, and two threads stall each other on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def usage_error(capsys, module, argv):
    """Run a script (its main through lib.config.run, with argv) that must stop on bad input:
    status 2 and exactly one line on stderr, starting 'error: '. Returns that line."""
    from lib.config import run
    with pytest.raises(SystemExit) as exc:
        run(module.main, vars(module), argv=argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def interrupted(capsys, module, argv):
    """Run a script (its main through lib.config.run, with argv) that a test interrupts with
    Ctrl-C (KeyboardInterrupt raised inside it): status 130. Returns what it wrote to stderr."""
    from lib.config import run
    with pytest.raises(SystemExit) as exc:
        run(module.main, vars(module), argv=argv)
    err = capsys.readouterr().err
    assert exc.value.code == 130, err
    return err
