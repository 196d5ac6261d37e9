"""lib.report's per-arm summaries over runs that did not diverge (diverged_arms, paired_stats,
cut_diverged, diverged_note, cell, mean_std_cell, record_mean, move_drift) and lib.plots'
branch_panels, as the sharpness/curvature script uses them."""
import math

import numpy as np
import pytest

from lib.plots import branch_panels, save_figure
from lib.report import (cell, cut_diverged, diverged_arms, diverged_note, mean_std_cell, move_drift, paired_stats,
                        record_mean)

NAN = float("nan")


def test_diverged_arms_takes_the_first_epoch_of_any_curve():
    curves = {"baseline": {"train_loss": [[1.0, 0.5, 0.4], [1.0, 2e6, NAN]], "test_loss": [[1.0, 0.6, 0.5], [1, 1, 1]]},
              "arm": {"train_loss": [[1.0, 0.5, 0.4], [1.0, 0.5, None]],  # None (strict JSON's nan) counts
                      "test_loss": [[1.0, NAN, 0.5], [1.0, 0.5, 0.5]]}}
    assert diverged_arms(curves) == {"baseline": [None, 2], "arm": [2, 3]}
    assert diverged_arms(curves, keys=("test_loss",)) == {"baseline": [None, None], "arm": [2, None]}


def test_paired_stats_are_over_the_seeds_where_neither_diverged():
    values, base = [1.0, 2.0, 4.0, 8.0], [0.5, 1.0, 1.0, NAN]
    mean, std, n = paired_stats(values, base, [None, None, 3, None], [None, None, None, None])
    assert (mean, n) == (0.75, 2) and std == pytest.approx(0.25)  # runs 1-2; run 4's baseline is not finite
    assert paired_stats(values, base, [None, 1, None, None], [1, None, None, None])[2] == 1
    assert all(math.isnan(v) for v in paired_stats(values, base, [1] * 4, [None] * 4)[:2])


def test_cut_diverged_blanks_each_run_from_its_epoch_on_and_leaves_the_input_alone():
    curves = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    c = cut_diverged(curves, [None, 2])
    assert c[0].tolist() == [1.0, 2.0, 3.0] and c[1, 0] == 4.0 and np.isnan(c[1, 1:]).all()
    assert curves[1] == [4.0, 5.0, 6.0]


def test_diverged_note_names_the_runs_and_is_empty_without_any():
    assert diverged_note({"a": [None, None], "b": [None, 3, 1]}) == "b run 2 at epoch 3, run 3 at epoch 1"
    assert diverged_note({"a": [None]}) == ""


def test_cells_never_print_a_non_finite_number():
    assert cell(0.123456, ".4f") == "0.1235" and cell(-0.001, "+.2e") == "-1.00e-03" and cell(12345.0) == "1.234e+04"
    assert cell(NAN) == cell(None) == cell(math.inf) == "-"
    assert mean_std_cell(-0.0021, 0.0011, "+.4f") == "-0.0021 ± 0.0011"  # the std without the sign
    assert mean_std_cell(90.2, 0.47, ".2f") == "90.20 ± 0.47" and mean_std_cell(NAN, NAN) == "- ± -"
    assert mean_std_cell(1.0, 0.5, ".1f", ".3f") == "1.0 ± 0.500"


def test_record_mean_and_move_drift_over_the_kept_models():
    tele = [{"loss_before": [1.0, 1.0, 1.0], "loss_after": [1.1, 1.3, NAN],
             "objective_before": [2.0, 2.0, 2.0], "objective_after": [2.5, 3.0, 9.0]},
            {"loss_before": [1.0, 1.0, 1.0], "loss_after": [1.1, 1.1, 1.0], "error": "pinv failed"}]  # no objective
    keep = [True, True, False]
    assert record_mean(tele, "loss_after", keep, "loss_before") == pytest.approx(0.15)
    assert record_mean(tele, "objective_after", keep, "objective_before") == pytest.approx(0.75)
    assert move_drift(tele, keep) == pytest.approx((0.15, 0.75))
    drift, dobj = move_drift([{"drift": [0.2, 0.4, 0.6]}], keep)
    assert drift == pytest.approx(0.3) and math.isnan(dobj)
    assert move_drift([], keep)[0] == 0.0 and move_drift([{}, {}], keep)[0] == 0.0  # no move: no drift
    assert math.isnan(move_drift([], [False, False])[0])  # no model left
    assert math.isnan(record_mean(tele, "objective_after", [False] * 3, "objective_before"))


def test_branch_panels_draws_every_arm_and_counts_the_diverged_runs(tmp_path):
    rng = np.random.default_rng(0)
    curve = lambda: (1 + rng.random((3, 6))).tolist()  # noqa: E731
    curves = {a: {"test_loss": curve(), "train_loss": curve()} for a in ("baseline", "up", "down")}
    curves["down"]["train_loss"][2][4] = NAN
    at = diverged_arms(curves)
    arms = [("missing", "not drawn", "k", ""), ("down", "teleport (down)", "g", "v"), ("up", "teleport (up)", "r", ""),
            ("baseline", "baseline", "b", "")]
    fig, (left, right) = branch_panels(curves, at, arms, branch=3)
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert labels == ["baseline", "teleport (up)", "teleport (down) (1 of 3 diverged)", "test loss", "train loss"]
    assert right.get_ylabel() == "loss minus baseline, same seed" and left.get_xlim()[1] > 6
    # the baseline from epoch 1 on the left; the other arms and every difference from the branch (epoch 3) on
    assert min(min(line.get_xdata(), default=99) for line in left.get_lines()) == 1
    assert min(min(line.get_xdata(), default=99) for line in right.get_lines()) == 3
    assert save_figure(fig, str(tmp_path / "f.png")) and (tmp_path / "f.png").stat().st_size > 10000
