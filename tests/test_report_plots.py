"""lib.report.stats_cell and lib.plots.loss_panels: table cells over the runs that did not
diverge, and loss panels with controls that survive diverged runs."""
import math

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lib.plots import COLORS, loss_panels, save_figure  # noqa: E402
from lib.report import finite_stats, stats_cell  # noqa: E402


def test_stats_cell_counts_the_runs_left_and_never_prints_a_number_of_none():
    assert stats_cell(finite_stats([1.0, 2.0, 3.0]), 3) == "2"
    assert stats_cell(finite_stats([1.0, 2.0]), 2, "{:.4f} ± {:.4f}") == "1.5000 ± 0.5000"
    two_of_three = finite_stats([1.0, 3.0, 100.0], keep=[True, True, False])
    assert stats_cell(two_of_three, 3) == "2 (2 of 3 runs)"
    assert stats_cell(two_of_three, 3, "{:.1f} ± {:.1f}") == "2.0 ± 1.0 (2 of 3 runs)"
    assert stats_cell(finite_stats([math.nan, math.inf]), 2) == "diverged"
    assert stats_cell(finite_stats([1.0, 2.0], keep=[False, False]), 2, "{:.4f} ± {:.4f}") == "diverged"


def _curves(arms, runs=3, epochs=6, seed=0):
    rng = np.random.default_rng(seed)
    decay = np.exp(-np.arange(epochs) / 3)
    return {a: {k: 0.2 + 2 * decay * rng.uniform(0.8, 1.2, (runs, 1)) for k in ("train_loss", "test_loss")}
            for a in arms}


def _lines(ax):
    return {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}


def test_loss_panels_draw_every_arm_with_bands_and_styled_controls(tmp_path):
    arms = ["baseline", "teleport", "reset-only"]
    curves = _curves(arms)
    x = {a: np.arange(1, 7) for a in arms}
    fig = loss_panels(curves, x, [("train_loss", "training loss"), ("test_loss", "test loss")],
                      {"reset-only": ("--", "o")}, "title", ylabel="cross-entropy loss")
    axes = fig.axes
    assert len(axes) == 2 and [ax.get_title() for ax in axes] == ["training loss", "test loss"]
    assert fig._suptitle.get_text() == "title" and axes[0].get_ylabel() == "cross-entropy loss"
    for ax, key in zip(axes, ("train_loss", "test_loss")):
        lines = _lines(ax)
        assert set(lines) == set(arms) and ax.get_yscale() == "log"
        np.testing.assert_allclose(lines["baseline"].get_ydata(), curves["baseline"][key].mean(0))
        assert lines["reset-only"].get_linestyle() == "--" and lines["reset-only"].get_marker() == "o"
        assert lines["teleport"].get_color() == COLORS["teleport"]
        assert len(ax.collections) == 2  # bands for baseline and teleport only, not the control
        lo, hi = ax.get_ylim()
        drawn = np.concatenate([c[key] for c in curves.values()])
        assert lo < drawn.mean(1).min() and hi > drawn.max()  # spans the values drawn
    assert axes[1].get_legend() is not None
    save_figure(fig, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_loss_panels_leave_diverged_runs_out_and_cope_when_every_run_diverged(tmp_path):
    arms = ["baseline", "teleport"]
    curves = _curves(arms)
    curves["teleport"]["train_loss"][0, 3:] = np.nan  # one run diverges at epoch 4
    x = {a: np.arange(1, 7) for a in arms}
    fig = loss_panels(curves, x, [("train_loss", "train")])
    line = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("teleport")][0]
    assert line.get_label() == "teleport (1 of 3 diverged)"
    np.testing.assert_allclose(line.get_ydata(), curves["teleport"]["train_loss"][1:].mean(0))
    assert np.isfinite(fig.axes[0].get_ylim()).all()
    for c in curves.values():
        c["train_loss"][:] = np.nan
    x = {a: np.linspace(0.5, 3.0, 6) for a in arms}  # wall times
    fig = loss_panels(curves, x, [("train_loss", "train")], integer_x=False)
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx((0.5, 3.0)) and ax.get_ylim() == pytest.approx((0.1, 10))
    assert "every run diverged" in [t.get_text() for t in ax.texts]
    save_figure(fig, str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 1000
