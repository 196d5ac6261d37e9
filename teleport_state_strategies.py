"""Figure 12 (App. F.1): what to do with the optimizer state after a teleport (SGD with momentum:
reset, keep or transport it) and which objective AdaGrad should teleport for (||grad L||^2 or
||grad L||_A^2), on a small full-batch regression problem.

    python teleport_state_strategies.py            # Figure 12, 5 repeats x 300 epochs
    python teleport_state_strategies.py --quick    # a smoke run, under a minute

Problem (App. F.1): a 5-6-7-8 MLP without biases, LeakyReLU(0.1), X in R^{5x4}, Y in R^{8x4},
weights and data uniform on [0, 1], drawn per repeat r with seed r; loss
L = ||Y - W3 s(W2 s(W1 X))||_F^2 (the squared error summed over the 4 points and 8 outputs),
full-batch training. One teleport before epoch 5: 10 gradient-ascent steps on g = I + T with the
action of eq. (46) on every layer pair, climbing ||grad L||^2 or, for AdaGrad, also
||grad L||_A^2 with A the optimizer's preconditioner. Momentum: the state after the teleport is
reset, kept, or transported (first moments pushed forward by the action); AdaGrad keeps its state.
The paper gives no base learning rates: the presets (LR) are the largest for which the baseline
does not diverge; the paper's teleport step sizes (1.2e-5 for ||grad L||^2, 7.5e-3 for
||grad L||_A^2) give non-finite weights here, so TELE_LR and ANORM_TELE_LR are the largest finite
ones of a sweep. A value given (--lr=...) applies to both optimizers.

CPU runtime (one thread of a 2-core machine): 15 s; --quick: 10 s, mostly imports and plotting.
It runs in seconds, so it keeps no progress to resume: an interrupted run is simply run again.
A teleport whose linear algebra fails (the ascent overflowed) marks its arm's repeats diverged
from the teleport on (non-finite losses, the error in the record) instead of stopping the run.
Headline: not reproduced. With 4 points and hidden widths 6, 7 the action at T = 0 is a
projection, not the identity, and it dominates each teleport (||grad L||^2 drops). Momentum:
reset is briefly ahead, all strategies end level, transport diverges; AdaGrad: the two
objectives are indistinguishable and slightly behind no teleport.

Outputs: under OUT_DIR, results/optimization/figure12.json (the resolved config and each
optimizer's, the environment, the loss curves per arm and repeat, the teleport records) and
figures/optimization/momentum_strategies.png and adagrad_objectives.png (Figure 12 a, b). They
replace the previous ones only when all are written; results made with other settings are not
replaced without --replace (--out-dir=DIR writes elsewhere).
"""
import os

import numpy as np
import torch

from lib.actions import GLAction
from lib.config import UsageError, check_positive, run, with_preset
from lib.io import check_replace, environment, experiment_dirs, load_results, relative, save_json, staged
from lib.metrics import adagrad_preconditioner, grad_norm_sq
from lib.models import Activation, loss_fn
from lib.optim import make_optimizer
from lib.plots import COLORS, save_figure
from lib.report import format_row
from lib.train import teleport_model

# ---- config (override any with --NAME=value) ------------------------------------------------
EPOCHS = 300                    # full-batch epochs
RUNS = 5                        # repeats, data and weights seeded 0..RUNS-1
TELE_EPOCH = 5                  # the single teleport, before this (0-based) epoch, < EPOCHS
TELE_STEPS = 10                 # gradient-ascent steps of that teleport
LR = None                       # base learning rate (momentum 0.9 / AdaGrad), > 0; None: the optimizer's preset
TELE_LR = None                  # teleport step size maximising ||grad L||^2, >= 0; None: the optimizer's preset
ANORM_TELE_LR = 1e-5            # AdaGrad's teleport step size maximising ||grad L||_A^2 (paper: 7.5e-3)
PLOT_ONLY = False               # redraw the figures from saved results
DEVICE = "cpu"                  # cpu, cuda or auto
OUT_DIR = "."                   # figures/ and results/ go under this folder
REPLACE = False                 # True: replace saved results made with other settings
# ---------------------------------------------------------------------------------------------

# not in the paper (see the docstring): momentum's teleport step is the largest finite of 1e-13..3e-11
PRESETS = {"OPTIMIZER": {"momentum": {"LR": 5e-4, "TELE_LR": 1e-11},
                         "adagrad": {"LR": 3.0, "TELE_LR": 1e-9}}}
QUICK_SETTINGS = {"EPOCHS": 20, "RUNS": 2}
WIDTHS = [5, 6, 7, 8]   # X in R^{5x4}, Y in R^{8x4}; W1: 6x5, W2: 7x6, W3: 8x7 (App. F.1)
N_POINTS = 4
ACT = Activation(0.1)
PALETTE = {"no teleport": COLORS["baseline"], "reset": COLORS["teleport"], "keep": COLORS["teleport-keep"],
           "transport": COLORS["teleport-transport"], "||grad L||^2": COLORS["teleport"],
           "||grad L||_A^2": COLORS["teleport-transport"]}
DASHED = ("keep", "||grad L||_A^2")  # dashed, so that the curves they nearly cover stay visible
LEGEND = {"||grad L||^2": r"max $\|\nabla L\|^2$", "||grad L||_A^2": r"max $\|\nabla L\|_A^2$"}


def problem(seeds, device):
    """Weights and data uniform on [0, 1] per repeat (App. F.1); X: (K, 4, 5), Y: (K, 4, 8) in rows."""
    Ws, Xs, Ys = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        Xs.append(torch.rand(N_POINTS, WIDTHS[0], generator=g))
        Ys.append(torch.rand(N_POINTS, WIDTHS[-1], generator=g))
        Ws.append([torch.rand(o, i, generator=g) for i, o in zip(WIDTHS[:-1], WIDTHS[1:])])
    W = [torch.stack(w).to(device).requires_grad_() for w in zip(*Ws)]
    return W, torch.stack(Xs).to(device), torch.stack(Ys).to(device)


def loss(W, X, Y):
    """||Y - W3 s(W2 s(W1 X))||_F^2 per repeat (App. F.1): lib's 'mse' is half of it (0.5 * the sum)."""
    return 2 * loss_fn(W, X, Y, ACT, "mse")


def teleport_once(cfg, W, opt, X, Y, strategy, objective, lr):
    """One teleport of all repeats, each on its own full batch (X: (K, 4, 5) works through lib's
    batched forward and action), climbing ||grad L||^2 or ||grad L||_A^2 of L = 2 * lib's 'mse',
    so ||grad L||^2 = 4 ||grad L_mse||^2 (A comes from the optimizer, which trains on L itself);
    then the optimizer-state strategy (lib.optim)."""
    A = adagrad_preconditioner(opt, W) if objective == "a_norm" else None
    obj = lambda V, x, y: 4 * grad_norm_sq(V, x, y, ACT, "mse", A)  # noqa: E731
    return teleport_model(W, opt, X, Y, ACT, strategy, objective=obj, action=GLAction(46),
                          steps=cfg["TELE_STEPS"], lr=lr, loss="mse")


def train(ocfg, optimizer, tele=None):
    """Full-batch training of the RUNS repeats (one batched model; each repeat has its own data).
    tele = dict(strategy, objective, lr): one teleport before epoch TELE_EPOCH. Returns the loss
    curve (K, epochs + 1) and the teleport record."""
    W, X, Y = problem(range(ocfg["RUNS"]), ocfg["DEVICE"])
    opt = make_optimizer(optimizer, W, ocfg["LR"])
    curve, rec = [loss(W, X, Y).detach()], None
    for epoch in range(ocfg["EPOCHS"]):
        if tele is not None and epoch == ocfg["TELE_EPOCH"]:
            try:
                rec = teleport_once(ocfg, W, opt, X, Y, **tele)
            except torch.linalg.LinAlgError as e:  # the ascent overflowed: the step size is too large here
                rec = {"error": str(e).splitlines()[0]}
                with torch.no_grad():  # the repeats count as diverged from here on
                    for w in W:
                        w.fill_(float("nan"))
                print(f"{optimizer} {tele['strategy']} {tele['objective']}: the teleport failed ({rec['error']}); "
                      f"a smaller teleport step size than {tele['lr']:g} (--tele-lr, --anorm-tele-lr) avoids it")
        opt.zero_grad(set_to_none=True)
        loss(W, X, Y).sum().backward()
        opt.step()
        curve.append(loss(W, X, Y).detach())
    return torch.stack(curve, 1).cpu().numpy(), rec


def plot(curves, path, title, tele_epoch):
    """Log loss vs epoch, mean +- std over repeats (the band's lower edge clipped at the lowest
    run so that it stays positive on the log axis). A curve that turns non-finite is drawn up to
    there and its label says from which epoch; the y range follows the finite curves."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    top = 0.0
    for name, c in curves.items():
        c = np.asarray(c, float)
        x, label = np.arange(c.shape[1]), LEGEND.get(name, name)
        bad = ~np.isfinite(c).all(0) | (c.max(0) > 1e3 * np.nanmax(c[:, 0]))
        if bad.any():
            label += f" (diverges at epoch {int(np.argmax(bad))})"
            c, x = c[:, :np.argmax(bad)], x[:np.argmax(bad)]
        else:
            top = max(top, c.max())
        mean, std = c.mean(0), c.std(0)
        ax.plot(x, mean, "--" if name in DASHED else "-", color=PALETTE.get(name), label=label, lw=1.4)
        ax.fill_between(x, np.maximum(mean - std, c.min(0)), mean + std, color=PALETTE.get(name), alpha=0.15, lw=0)
    ax.axvline(tele_epoch, color="k", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(top=2 * top if top else None)
    ax.set_xlabel(f"epoch (teleport before epoch {tele_epoch}, dotted)")
    ax.set_ylabel(r"$\|Y - f(X)\|_F^2$ (sum over 4 points, 8 outputs)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def check(cfg):
    for k in ("EPOCHS", "RUNS"):
        check_positive(k.lower(), cfg[k], allow_zero=False)
    for k in ("TELE_EPOCH", "TELE_STEPS", "ANORM_TELE_LR"):
        check_positive(k.lower(), cfg[k])
    if cfg["TELE_EPOCH"] >= cfg["EPOCHS"]:
        raise UsageError(f"tele_epoch {cfg['TELE_EPOCH']} is not below epochs = {cfg['EPOCHS']}")
    configs = {opt: with_preset(cfg, PRESETS, "OPTIMIZER", opt) for opt in ("momentum", "adagrad")}
    for opt, ocfg in configs.items():
        for k in ("LR", "TELE_LR"):
            if isinstance(ocfg[k], bool) or not isinstance(ocfg[k], (int, float)):
                raise UsageError(f"--{k.lower().replace('_', '-')}: expected a number, got {ocfg[k]!r}")
            check_positive(f"{opt} {k.lower()}", ocfg[k], allow_zero=k != "LR")
    return configs


def run_all(cfg, configs):
    """Momentum without teleport and with each state strategy; AdaGrad without teleport and with
    each objective (state kept). Returns the saved results."""
    mcfg, acfg = configs["momentum"], configs["adagrad"]
    mom, ada, recs = {}, {}, {}
    mom["no teleport"], _ = train(mcfg, "momentum")
    for strategy in ("transport", "keep", "reset"):
        mom[strategy], recs[f"momentum-{strategy}"] = train(
            mcfg, "momentum", {"strategy": strategy, "objective": "grad_norm", "lr": mcfg["TELE_LR"]})
    ada["no teleport"], _ = train(acfg, "adagrad")
    for name, obj, lr in (("||grad L||^2", "grad_norm", acfg["TELE_LR"]),
                          ("||grad L||_A^2", "a_norm", acfg["ANORM_TELE_LR"])):
        ada[name], recs[f"adagrad-{obj}"] = train(acfg, "adagrad", {"strategy": "keep", "objective": obj, "lr": lr})
    rel = lambda c: {**c, "OUT_DIR": relative(c["OUT_DIR"])}  # noqa: E731
    return {"config": rel(cfg), "configs": {k: rel(v) for k, v in configs.items()}, "environment": environment(),
            "momentum": mom, "adagrad": ada, "teleports": recs}


def check_saved(path, cfg):
    """lib.io.check_replace: results of other settings are not replaced without --replace."""
    check_replace(path, cfg)


def main(cfg):
    configs = check(cfg)
    if torch.device(cfg["DEVICE"]).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    path = os.path.join(cfg["OUT_DIR"], "results", "optimization", "figure12.json")
    if cfg["PLOT_ONLY"]:
        saved = load_results(path)
    else:
        check_saved(path, {**cfg, "OUT_DIR": relative(cfg["OUT_DIR"])})
        saved = run_all(cfg, configs)
    c = saved["config"]
    tele_epoch = c["TELE_EPOCH"]
    n = len(saved["momentum"]["no teleport"])
    problem_text = f"5-6-7-8 MLP, 4 random points; mean ± std over {n} repeats"
    with staged(cfg["OUT_DIR"]) as out:  # the outputs replace the previous ones only when all are written
        fig_dir, res_dir = experiment_dirs("optimization", out)
        if not cfg["PLOT_ONLY"]:
            save_json(os.path.join(res_dir, "figure12.json"), saved)
        plot(saved["momentum"], os.path.join(fig_dir, "momentum_strategies.png"),
             f"SGD momentum: optimizer state after the teleport\n{problem_text}", tele_epoch)
        plot(saved["adagrad"], os.path.join(fig_dir, "adagrad_objectives.png"),
             f"AdaGrad: teleport objective\n{problem_text}", tele_epoch)
    for part in ("momentum", "adagrad"):
        for name, curve in saved[part].items():
            curve = np.asarray(curve, float)
            print(format_row({"part": part, "arm": f"{name:>15}", **{
                f"loss@{e}": float(curve[:, e].mean()) for e in (tele_epoch, 20, 100, curve.shape[1] - 1)
                if e < curve.shape[1]}}))
    return saved


if __name__ == "__main__":
    run(main, globals())
