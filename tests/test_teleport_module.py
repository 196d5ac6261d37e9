"""lib.teleport_module: symmetries read off an nn.Module, exact on fresh inputs; eq. (46) on the
teleport batch; optimizer-state strategies; unsupported layers; equal to the batched engine."""
import ast
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT
from lib.config import UsageError
from lib.teleport_module import Symmetry, teleport_module, random_teleport_module

DT = torch.float64


def seeded(build, seed=0):
    torch.manual_seed(seed)
    return build().to(DT)


def mlp():  # Linear with biases, ReLU, Dropout
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Dropout(0.3), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))


def cnn():  # conv without bias, pools, nested Sequential, AdaptiveAvgPool, Flatten into a Linear
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.LeakyReLU(0.2), nn.AvgPool2d(2)),
                         nn.Conv2d(5, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn_bn():  # conv -> BN -> ReLU, conv -> ReLU -> BN, BN1d between Linears, a BN without affine
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3), nn.ReLU(), nn.BatchNorm2d(5), nn.Conv2d(5, 3, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1),
                         nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU(), nn.Linear(6, 3))


def leaky_mlp():  # the project's MLP as an nn.Module: bias-free Linear + LeakyReLU(0.1)
    return nn.Sequential(nn.Linear(5, 8, bias=False), nn.LeakyReLU(0.1), nn.Linear(8, 6, bias=False),
                         nn.LeakyReLU(0.1), nn.Linear(6, 3, bias=False))


def batch(shape, n, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(classes, (n,), generator=g)


def outputs(model, x, modes):
    """model(x) in each mode (train-mode BN updates its running statistics, equally in both copies)."""
    out = []
    for mode in modes:
        model.train(mode == "train")
        with torch.no_grad():
            out.append(model(x))
    return out


CASES = {  # name: (builder, input shape, modes the model is compared in, mode it is teleported in)
    "mlp_bias_dropout_eval": (mlp, (6,), ["eval"], "eval"),
    "cnn_pools_flatten": (cnn, (2, 10, 10), ["eval"], "eval"),
    "bn_teleported_in_train": (cnn_bn, (2, 10, 10), ["train", "eval"], "train"),
    "bn_teleported_in_eval": (cnn_bn, (2, 10, 10), ["eval", "train"], "eval"),
}


@pytest.mark.parametrize("case", CASES)
def test_rescale_keeps_outputs_on_fresh_inputs(case):
    build, shape, modes, mode = CASES[case]
    model = seeded(build)
    if "bn" in case:  # non-trivial running statistics and affine parameters
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(batch(shape, 16, seed=7)[0] * 2 + 0.5)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    x, y = batch(shape, 20)
    fresh = batch(shape, 50, seed=2)[0]
    before = copy.deepcopy(model)
    model.train(mode == "train")
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    rep = teleport_module(model, F.cross_entropy, x, y, objective="log_grad_norm", lr=0.3, steps=3)
    for a, b in zip(outputs(before, fresh, modes), outputs(copy.deepcopy(model), fresh, modes)):
        assert (a - b).abs().max() < 1e-10
    assert all(torch.equal(b, dict(model.named_buffers())[k]) for k, b in buffers.items())  # teleport ran no BN update
    assert rep["objective_after"] > rep["objective_before"] + 1e-3  # log ||grad L||^2
    assert abs(rep["loss_after"] - rep["loss_before"]) < 1e-10
    moved = max((p - q).abs().max() for p, q in zip(model.parameters(), before.parameters()))
    assert moved > 1e-3 and rep["size"] > 1e-3 and rep["notices"] == []


def test_rescale_units_per_pattern():
    """What each layer pattern scales (the module docstring's table)."""
    units = Symmetry(seeded(cnn_bn), "rescale").parts
    ops = [[(n, axis, sign, rep) for n, axis, sign, rep in u.ops] for u in units]
    assert ops == [
        [("1.weight", 0, 1, 1), ("1.bias", 0, 1, 1), ("4.weight", 1, -1, 1)],  # conv->BN->ReLU: on the BN
        [("6.weight", 0, 1, 1), ("6.bias", 0, 1, 1), ("7.weight", 1, -1, 1)],  # conv->ReLU->BN: on the BN
        [("7.weight", 0, 1, 1), ("7.bias", 0, 1, 1), ("10.weight", 1, -1, 4)],  # Flatten: 2x2 columns each
        [("11.weight", 0, 1, 1), ("11.bias", 0, 1, 1), ("13.weight", 1, -1, 1)]]  # BN1d between Linears
    # 4 -> BN 6 and 13 -> BN(affine=False) 14: not scaled (a BN's input scale is exact only up to eps)


def test_gl46_keeps_teleport_batch_loss_when_batch_at_most_width():
    model = seeded(lambda: nn.Sequential(nn.Linear(5, 8), nn.LeakyReLU(0.1), nn.Linear(8, 7),
                                         nn.LeakyReLU(0.1), nn.Linear(7, 3)))
    x, y = batch((5,), 6)  # 6 <= widths 8, 7
    before = copy.deepcopy(model)
    rep = teleport_module(model, F.cross_entropy, x, y, group="gl", lr=0.2, steps=5)
    with torch.no_grad():
        assert (model(x) - before(x)).abs().max() < 1e-10
    assert abs(rep["loss_after"] - rep["loss_before"]) < 1e-10
    assert rep["objective_after"] > rep["objective_before"] * 1.01 and rep["units"] == 15
    assert (model[0].bias - before[0].bias).abs().max() > 1e-3  # the bias moves with g
    assert rep["size"] > 1e-2 and rep["notices"] == []


def test_gl46_says_when_the_batch_is_wider_than_a_hidden_layer():
    model = seeded(lambda: nn.Sequential(nn.Linear(5, 8), nn.LeakyReLU(0.1), nn.Linear(8, 4),
                                         nn.LeakyReLU(0.1), nn.Linear(4, 3)))
    x, y = batch((5,), 6)  # 6 > width 4
    with pytest.warns(UserWarning, match="approximate"):
        rep = teleport_module(model, F.cross_entropy, x, y, group="gl", lr=0.2, steps=3)
    assert rep["notices"] == ["batch of 6 > hidden width of 2.weight (4): eq. (46) is approximate there, "
                              "the loss moves (loss_before/after)"]


def test_unsupported_layer_gives_notice_and_keeps_function():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(7, 7)

        def forward(self, x):
            return self.lin(x) * 2

    model = seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Tanh(), nn.Linear(6, 7), nn.ReLU(),
                                         Custom(), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)))
    x, y = batch((4,), 10)
    fresh = batch((4,), 40, seed=3)[0]
    before = copy.deepcopy(model)
    with pytest.warns(UserWarning) as caught:
        rep = teleport_module(model, F.cross_entropy, x, y, lr=1.0, steps=3)
    assert len(rep["notices"]) == 2 and "2 (Tanh)" in rep["notices"][0] and "5 (Custom)" in rep["notices"][1]
    assert [str(w.message) for w in caught] == [f"teleport_module: {n}" for n in rep["notices"]]
    with torch.no_grad():
        assert (model(fresh) - before(fresh)).abs().max() < 1e-10
    same = [torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters())]
    assert same[:6] == [True] * 6  # Linear 0 (before the Tanh), Linear 3 (before Custom), Custom's Linear
    assert not all(same[6:])  # the symmetry resumed: Linear 7 -> ReLU -> Linear 9


def test_parametrised_weight_is_left_alone():
    model = seeded(mlp).eval()
    nn.utils.parametrizations.weight_norm(model[3])
    x, y = batch((6,), 10)
    fresh = batch((6,), 40, seed=3)[0]
    before = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = teleport_module(model, F.cross_entropy, x, y, lr=0.5, steps=2)
    assert any("not a plain parameter" in str(w.message) for w in caught) and len(caught) == len(rep["notices"])
    assert rep["units"] == 0 and rep["size"] == 0
    with torch.no_grad():
        assert torch.equal(model(fresh), before(fresh))


def test_a_step_to_non_finite_weights_is_not_taken():
    model, (x, y) = seeded(mlp).eval(), batch((6,), 12)
    with pytest.warns(UserWarning, match="non-finite"):
        rep = teleport_module(model, F.cross_entropy, x, y, lr=1e6, steps=5)
    assert rep["steps"] < 5 and all(torch.isfinite(p).all() for p in model.parameters())
    assert "non-finite" in rep["notices"][-1] and rep["loss_after"] == pytest.approx(rep["loss_before"], abs=1e-10)


def test_usage_errors():
    model, (x, y) = seeded(mlp), batch((6,), 4)
    for kw in ({"group": "so3"}, {"objective": "nope"}, {"objective": "curvature"}, {"state": "forget"},
               {"optimizer": torch.optim.LBFGS(model.parameters())}, {"lr": -1.0},
               {"objective": "a_norm", "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}):
        with pytest.raises(UsageError):
            teleport_module(model, F.cross_entropy, x, y, **kw)
    with pytest.raises(UsageError, match="no trainable"):
        teleport_module(copy.deepcopy(model).requires_grad_(False), F.cross_entropy, x, y)
    with pytest.raises(UsageError, match="lib.teleport.teleport"):
        teleport_module(model, F.cross_entropy, x, y, objective="curvature")  # defined for the engine only
    with pytest.raises(UsageError):
        random_teleport_module(model, 0.1, group="gl")  # gl acts through a batch


def test_random_teleport_has_the_given_size_and_keeps_outputs():
    model = seeded(cnn)
    fresh = batch((2, 10, 10), 30, seed=3)[0]
    before = copy.deepcopy(model).eval()
    rep = random_teleport_module(model.eval(), 0.7, generator=torch.Generator().manual_seed(0))
    assert rep["size"] == pytest.approx(0.7, rel=1e-12)
    with torch.no_grad():
        assert (model(fresh) - before(fresh)).abs().max() < 1e-10
    assert max((p - q).abs().max() for p, q in zip(model.parameters(), before.parameters())) > 1e-2


# ---- optimizer state ----

def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


OPTS = {"sgd_momentum": (torch.optim.SGD, {"momentum": 0.9}), "adagrad": (torch.optim.Adagrad, {}),
        "rmsprop_centered": (torch.optim.RMSprop, {"centered": True, "momentum": 0.9, "eps": 1e-30}),
        "adam": (torch.optim.Adam, {})}


def make_opt(name, params, lr):
    cls, kw = OPTS[name]
    return cls(params, lr=lr, **kw)
EXPECTED = {  # the state after one step from zero state at gradient G (lr 0: the weights stay)
    "sgd_momentum": {"momentum_buffer": lambda G: G},
    "adagrad": {"sum": lambda G: G * G},
    "rmsprop_centered": {"square_avg": lambda G: 0.01 * G * G, "grad_avg": lambda G: 0.01 * G,
                         "momentum_buffer": lambda G: G / (0.0099 * G * G).sqrt().clamp_min(1e-30)},  # scale-free
    "adam": {"exp_avg": lambda G: 0.1 * G, "exp_avg_sq": lambda G: 0.001 * G * G}}


@pytest.mark.parametrize("name", OPTS)
def test_transport_equals_state_built_at_the_new_weights(name):
    """After 'transport', the optimizer holds what one step at g.w would have built: the gradient
    at g.w (autograd) equals the transported gradient."""
    model = seeded(cnn).eval()
    x, y = batch((2, 10, 10), 16)
    opt = make_opt(name, model.parameters(), 0.0)
    _grads(model, x, y)
    opt.step()
    teleport_module(model, F.cross_entropy, x, y, lr=0.5, steps=2, optimizer=opt, state="transport")
    G = _grads(model, x, y)
    params = dict(model.named_parameters())
    for key, f in EXPECTED[name].items():
        for n, p in params.items():
            assert torch.allclose(opt.state[p][key], f(G[n]), rtol=1e-9, atol=1e-13), (key, n)


def test_transport_gl_pushes_first_moments_forward():
    """gl: the momentum is pushed forward by the derivative of w -> g.w (finite differences of
    the same random group element; one pair, so the batch input of V is x itself)."""
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(5, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3)).to(DT)  # noqa: E731
    x, y = batch((5,), 6)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    _grads(model, x, y)
    opt.step()
    m0 = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    eps, moved = 1e-6, build()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p += eps * m0[n]
    kw = {"group": "gl", "inputs": x}
    random_teleport_module(model, 0.5, generator=torch.Generator().manual_seed(3), optimizer=opt,
                           state="transport", **kw)
    random_teleport_module(moved, 0.5, generator=torch.Generator().manual_seed(3), **kw)
    for (n, p), q in zip(model.named_parameters(), moved.parameters()):
        assert torch.allclose(opt.state[p]["momentum_buffer"], (q - p).detach() / eps, atol=1e-6), n
    assert not torch.allclose(opt.state[model[2].weight]["momentum_buffer"], m0["2.weight"], atol=1e-3)


def test_transport_gl_in_teleport_module():
    """The same for the ascent: g recovered from [V' b'] = g [V b] ([V b] has full row rank),
    then the finite difference of eq. (46) with that g."""
    from lib.teleport_module import gl46
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)).to(DT)
    x, y = batch((9,), 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    _grads(model, x, y)
    opt.step()
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    m0 = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    teleport_module(model, F.cross_entropy, x, y, group="gl", lr=0.3, steps=2, optimizer=opt, state="transport")
    Vb = lambda P: torch.cat([P["0.weight"], P["0.bias"][:, None]], 1)  # noqa: E731
    g = Vb(dict(model.named_parameters())).detach() @ torch.linalg.pinv(Vb(p0))
    pair, eye, eps = Symmetry(model, "gl").parts, torch.eye(6, dtype=DT), 1e-6
    act = lambda P: gl46(P, pair, [g - eye], [x])  # noqa: E731
    assert all(torch.allclose(a, p) for a, p in zip(act(p0).values(), model.parameters()))  # g is the one applied
    fd = {n: (a - b) / eps for (n, a), b in zip(act({n: p0[n] + eps * m0[n] for n in p0}).items(), act(p0).values())}
    for n, p in model.named_parameters():
        assert torch.allclose(opt.state[p]["momentum_buffer"], fd[n], atol=1e-6), n
    assert (g - eye).norm() > 1e-2


@pytest.mark.parametrize("name", OPTS)
def test_reset_equals_fresh_optimizer_and_keep_keeps(name):
    x, y = batch((6,), 12)
    for state in ("reset", "keep"):
        model = seeded(mlp).eval()
        opt = make_opt(name, model.parameters(), 0.05)
        for _ in range(2):
            _grads(model, x, y)
            opt.step()
        kept = copy.deepcopy(opt.state_dict()["state"])
        assert len(kept) == 6
        rep = teleport_module(model, F.cross_entropy, x, y, objective="log_grad_norm", lr=0.1, steps=3,
                              optimizer=opt, state=state)
        assert rep["steps"] == 3 and not rep["notices"]
        assert rep["size"] > 1e-3
        if state == "reset":
            assert len(opt.state) == 0
            fresh_model = copy.deepcopy(model)
            fresh = make_opt(name, fresh_model.parameters(), 0.05)
            for m, o in ((model, opt), (fresh_model, fresh)):
                _grads(m, x, y)
                o.step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters()))
        else:
            now = opt.state_dict()["state"]
            assert all(torch.equal(torch.as_tensor(kept[i][k]), torch.as_tensor(now[i][k]))
                       for i in kept for k in kept[i])
            _grads(model, x, y)
            opt.step()  # training goes on with the same optimizer object
            assert all(torch.isfinite(p).all() for p in model.parameters())


def test_objectives_a_norm_log_and_sharpness_rise_and_minimize_lowers():
    model, (x, y) = seeded(mlp).eval(), batch((6,), 12)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    _grads(model, x, y)
    opt.step()
    G, A = _grads(model, x, y), [(opt.state[p]["sum"] + 1e-10).rsqrt() for p in model.parameters()]
    a_norm = sum((a * g * g).sum() for a, g in zip(A, G.values()))  # App. F.1, A = (eps + G)^(-1/2)
    rep = teleport_module(model, F.cross_entropy, x, y, steps=0, objective="a_norm", optimizer=opt, state="keep")
    assert rep["objective_before"] == pytest.approx(float(a_norm), rel=1e-12)
    for kw in ({"objective": "a_norm", "optimizer": opt, "state": "keep", "lr": 1e-3},
               {"objective": "log_grad_norm", "lr": 0.2},
               {"objective": "sharpness", "lr": 50.0, "generator": torch.Generator().manual_seed(0),
                "sharpness_ts": [0.05, 0.1, 0.15]}):
        rep = teleport_module(model, F.cross_entropy, x, y, steps=2, **kw)
        assert rep["objective_after"] > rep["objective_before"], kw["objective"]
    rep = teleport_module(model, F.cross_entropy, x, y, steps=3, lr=0.2, objective="log_grad_norm", maximize=False)
    assert rep["objective_after"] < rep["objective_before"]


# ---- the project's MLP: the same as the batched engine ----

@pytest.mark.parametrize("group", ["rescale", "gl"])
def test_equals_the_batched_engine_on_the_projects_mlp(group):
    from lib.actions import GLAction, RescaleAction
    from lib.models import Activation
    from lib.teleport import make_objective, teleport
    model, (x, y) = seeded(leaky_mlp), batch((5,), 4)
    W = [m.weight.detach().clone().unsqueeze(0) for m in model if isinstance(m, nn.Linear)]
    act, action = Activation(0.1), RescaleAction() if group == "rescale" else GLAction(46)
    W1, rec, _ = teleport(W, x, y, act, make_objective("grad_norm", act), action, steps=4, lr=0.3)
    rep = teleport_module(model, F.cross_entropy, x, y, group=group, steps=4, lr=0.3)
    for w, m in zip(W1, [m for m in model if isinstance(m, nn.Linear)]):
        assert (w[0] - m.weight).abs().max() < 1e-10
    assert max((w[0] - w0[0]).abs().max() for w, w0 in zip(W1, W)) > 1e-3
    assert rep["objective_after"] == pytest.approx(rec["objective_after"][0], rel=1e-10)
    assert rep["size"] == pytest.approx(float(torch.tensor(rec["algebra_norm"], dtype=DT).norm()), rel=1e-10)


def test_lazy_export():
    """`import lib.config` does not import torch (a subprocess); `from lib import teleport_module` gives
    the function although this module imported lib.teleport_module, the submodule of that name."""
    code = "import sys, lib, lib.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    from lib import random_teleport_module as r, teleport_module as t
    assert t is teleport_module and r is random_teleport_module


# ---- the README's example ----

def readme_block():
    """The fenced python block of README.md's section 'Teleport your own model'."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        section = fh.read().split("## Teleport your own model\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_compiles():
    code = readme_block()
    compile(code, "README.md", "exec")
    assert "from lib import teleport_module" in code and len(code.splitlines()) <= 20


@pytest.mark.slow
def test_readme_example_runs_as_written():
    """From the repository root, as `python -c`: the data notice, then the report, exact."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", readme_block()], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    report = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert report["loss_after"] == pytest.approx(report["loss_before"], rel=1e-5)
    assert report["heldout_loss_after"] == pytest.approx(report["heldout_loss_before"], rel=1e-5)
    assert report["objective_after"] > report["objective_before"] and report["steps"] == 10
    assert len(out.stderr.strip().splitlines()) <= 1  # at most the bundled-data notice
