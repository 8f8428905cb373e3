"""Continual-learning measures and strip rate, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cl_core.metrics import (
    StripRate,
    average_accuracy,
    backward_transfer,
    bootstrap_matrices,
    cl_summary,
    forgetting,
    forward_transfer,
    learning_gain,
    paired_difference,
    strip_rate,
)

NAN = np.nan

# Stage 1 improves task 0 (0.80 -> 0.88) before stage 2 drops it, so forgetting (measured from
# the best) and BwT (measured from the task's own stage) disagree.
R3 = np.array(
    [
        [0.80, NAN, NAN],
        [0.88, 0.90, NAN],
        [0.60, 0.85, 0.75],
    ]
)
BASELINE3 = np.array([0.10, 0.20, 0.30])
# Each task before its training, on the bank the previous task left (task 0 has none: never read).
BEFORE3 = np.array([NAN, 0.25, 0.20])


def test_average_accuracy_is_mean_of_last_row() -> None:
    # (0.60 + 0.85 + 0.75) / 3 = 2.20 / 3
    assert average_accuracy(R3) == pytest.approx(2.20 / 3)


def test_backward_transfer_compares_last_row_with_diagonal() -> None:
    # ((0.60 - 0.80) + (0.85 - 0.90)) / 2 = (-0.20 - 0.05) / 2
    assert backward_transfer(R3) == pytest.approx(-0.125)


def test_forward_transfer_is_gems_accuracy_before_training_over_the_untrained_bank() -> None:
    # ((0.25 - 0.20) + (0.20 - 0.30)) / 2 = (0.05 - 0.10) / 2; task 0 is not counted
    assert forward_transfer(BEFORE3, BASELINE3) == pytest.approx(-0.025)


def test_learning_gain_compares_diagonal_with_untrained_bank() -> None:
    # ((0.90 - 0.20) + (0.75 - 0.30)) / 2 = (0.70 + 0.45) / 2; task 0 is not counted
    assert learning_gain(R3, BASELINE3) == pytest.approx(0.575)


def test_forward_transfer_refuses_a_task_not_evaluated_before_its_training() -> None:
    with pytest.raises(ValueError, match="before must be finite"):
        forward_transfer(np.array([NAN, NAN, 0.2]), BASELINE3)


def test_forgetting_measures_drop_from_best_earlier_accuracy() -> None:
    # task 0: max(0.80, 0.88) - 0.60 = 0.28; task 1: max(0.90) - 0.85 = 0.05
    # (0.28 + 0.05) / 2 = 0.165
    assert forgetting(R3) == pytest.approx(0.165)


def test_cl_summary_gathers_the_five_measures() -> None:
    assert cl_summary(R3, BASELINE3, BEFORE3) == pytest.approx(
        {"AA": 2.20 / 3, "BwT": -0.125, "FwT": -0.025, "forgetting": 0.165, "learning_gain": 0.575}
    )


def test_cells_above_the_diagonal_are_never_read() -> None:
    filled = R3.copy()
    filled[np.triu_indices(3, k=1)] = 1.0  # higher than any evaluated accuracy
    assert cl_summary(filled, BASELINE3, BEFORE3) == cl_summary(R3, BASELINE3, BEFORE3)


def test_measures_work_in_points_as_well_as_fractions() -> None:
    assert cl_summary(R3 * 100, BASELINE3 * 100, BEFORE3 * 100) == pytest.approx(
        {"AA": 220 / 3, "BwT": -12.5, "FwT": -2.5, "forgetting": 16.5, "learning_gain": 57.5}
    )


def test_single_task_has_no_transfer_or_forgetting() -> None:
    assert cl_summary(np.array([[0.7]]), np.array([0.1]), np.array([NAN])) == {
        "AA": pytest.approx(0.7),
        "BwT": 0.0,
        "FwT": 0.0,
        "forgetting": 0.0,
        "learning_gain": 0.0,
    }


@pytest.mark.parametrize(
    "matrix",
    [np.zeros((2, 3)), np.zeros(3), np.zeros((0, 0))],
    ids=["not-square", "one-dimensional", "empty"],
)
def test_matrix_of_wrong_shape_is_refused(matrix: np.ndarray) -> None:
    with pytest.raises(ValueError, match="R must be"):
        average_accuracy(matrix)


@pytest.mark.parametrize("cell", [(1, 1), (2, 0)], ids=["diagonal", "below-diagonal"])
def test_unevaluated_cell_in_lower_triangle_is_refused(cell: tuple[int, int]) -> None:
    broken = R3.copy()
    broken[cell] = NAN
    with pytest.raises(ValueError, match=rf"R has NaN.*R\[{cell[0]}, {cell[1]}\]"):
        cl_summary(broken, BASELINE3, BEFORE3)


def test_baseline_of_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="baseline must have shape"):
        learning_gain(R3, np.array([0.1, 0.2]))


def test_baseline_with_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="baseline must be finite"):
        forward_transfer(BEFORE3, np.array([0.1, NAN, 0.3]))


# Ten samples, four classes; class 3 never occurs as a true label, so it gets no strip rate.
# Columns 0, 1 and 2 are read as scores for labels 0, 1 and 2; rows sum to 1.
STRIP_PROBS = np.array(
    [
        [0.9, 0.05, 0.05, 0.0],  # 0  label 0
        [0.8, 0.1, 0.05, 0.05],  # 1  label 0
        [0.6, 0.1, 0.1, 0.2],  # 2  label 0
        [0.3, 0.1, 0.6, 0.0],  # 3  label 0
        [0.8, 0.2, 0.0, 0.0],  # 4  label 1
        [0.1, 0.7, 0.1, 0.1],  # 5  label 1
        [0.1, 0.5, 0.4, 0.0],  # 6  label 1
        [0.6, 0.1, 0.3, 0.0],  # 7  label 2
        [0.1, 0.6, 0.3, 0.0],  # 8  label 2
        [0.1, 0.05, 0.25, 0.6],  # 9  label 2
    ]
)
STRIP_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_strip_rate_by_hand_at_target_075() -> None:
    # Label 0 (4 samples), thresholds on column 0, from the top:
    #   0.9: {0}            1 correct of 1 decided, precision 1.00, recall 1/4  kept
    #   0.8: + {1, 4} tied  2 of 3 = 0.67 (a tie lets sample 4 in with sample 1)
    #   0.6: + {2, 7}       3 of 5 = 0.60;   0.3: 4 of 6;   0.1: 4 of 10
    #   -> 0.25. Breaking the tie at 0.8 would wrongly give 2 of 2 and recall 0.5.
    # Label 1 (3 samples), column 1:
    #   0.7: {5}            1 of 1 = 1.00, recall 1/3  kept
    #   0.6: + {8}          1 of 2 = 0.50
    #   0.5: + {6}          2 of 3 = 0.67
    #   0.2: + {4}          3 of 4 = 0.75, recall 3/3  kept (precision recovers)
    #   0.1: 3 of 8;   0.05: 3 of 10
    #   -> 1.0, from 0.2: neither the first nor the lowest threshold.
    # Label 2 (3 samples), column 2: 0.6 -> 0 of 1, 0.4 -> 0 of 2, 0.3 -> 2 of 4,
    #   0.25 -> 3 of 5 = 0.60, then lower: never 0.75 -> 0.0.
    result = strip_rate(STRIP_PROBS, STRIP_LABELS, target_precision=0.75)
    assert result.per_label == pytest.approx({0: 0.25, 1: 1.0, 2: 0.0})
    assert result.macro == pytest.approx((0.25 + 1.0 + 0.0) / 3)


def test_strip_rate_by_hand_at_default_target() -> None:
    # At 0.9 only the thresholds with precision 1.00 above survive:
    # label 0 keeps 0.9 (recall 1/4), label 1 keeps 0.7 (recall 1/3), label 2 nothing.
    result = strip_rate(STRIP_PROBS, STRIP_LABELS)
    assert isinstance(result, StripRate)
    assert result.per_label == pytest.approx({0: 0.25, 1: 1 / 3, 2: 0.0})
    assert result.macro == pytest.approx((0.25 + 1 / 3) / 3)


def test_strip_rate_with_every_score_tied() -> None:
    # One threshold decides all three samples: label 0 is right 2 of 3 times, label 1 once.
    probs = np.full((3, 2), 0.5)
    result = strip_rate(probs, np.array([0, 0, 1]), target_precision=0.6)
    assert result.per_label == pytest.approx({0: 1.0, 1: 0.0})


def _strip_rate_by_brute_force(
    probs: np.ndarray, labels: np.ndarray, target: float
) -> dict[int, float]:
    """The definition read literally: try every distinct score as a threshold."""
    rates: dict[int, float] = {}
    for label in np.unique(labels):
        best = 0.0
        for threshold in np.unique(probs[:, label]):
            decided = probs[:, label] >= threshold
            correct = np.sum(decided & (labels == label))
            if correct / decided.sum() >= target:
                best = max(best, correct / np.sum(labels == label))
        rates[int(label)] = float(best)
    return rates


def test_strip_rate_agrees_with_the_definition_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + 2.0 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 1)  # coarse values, so many thresholds are shared
    for target in (0.5, 0.8, 0.9, 1.0):
        result = strip_rate(probs, labels, target_precision=target)
        assert result.per_label == pytest.approx(
            _strip_rate_by_brute_force(probs, labels, target)
        )


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.zeros(3), np.array([0, 1, 0]), "probs must be"),
        (np.zeros((0, 2)), np.array([], dtype=int), "probs must be"),
        (np.full((2, 2), NAN), np.array([0, 1]), "probs must be finite"),
        (np.zeros((3, 2)), np.array([0, 1]), "labels must have shape"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "labels must be integers"),
        (np.zeros((2, 2)), np.array([0, 2]), "labels must lie in"),
        (np.zeros((2, 2)), np.array([-1, 0]), "labels must lie in"),
    ],
    ids=[
        "probs-1d",
        "probs-empty",
        "probs-nan",
        "size-mismatch",
        "float-labels",
        "label-too-large",
        "label-negative",
    ],
)
def test_strip_rate_refuses_bad_inputs(
    probs: np.ndarray, labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        strip_rate(probs, labels)


@pytest.mark.parametrize("target", [0.0, 1.5])
def test_strip_rate_refuses_target_outside_unit_interval(target: float) -> None:
    with pytest.raises(ValueError, match="target_precision"):
        strip_rate(STRIP_PROBS, STRIP_LABELS, target_precision=target)


def _correct(rng, accuracies, n):
    """correct[i][j] drawn with accuracy accuracies[i][j] on n examples (lower triangle)."""
    return [[(rng.random(n) < accuracies[i][j]).astype(int) for j in range(i + 1)] for i in range(len(accuracies))]


def test_bootstrap_matrices_resample_around_the_observed_accuracy():
    rng = np.random.default_rng(0)
    correct = _correct(rng, [[0.8], [0.6, 0.9]], 200)
    draws = bootstrap_matrices(correct, draws=500)
    assert draws.shape == (500, 2, 2) and np.isnan(draws[:, 0, 1]).all()
    for i, j in ((0, 0), (1, 0), (1, 1)):
        observed = correct[i][j].mean()
        assert abs(draws[:, i, j].mean() - observed) < 0.01
        assert 0.01 < draws[:, i, j].std() < 0.05  # about sqrt(p(1-p)/200)
    with pytest.raises(ValueError, match=r"correct\[1\]\[0\] has 3 examples, correct\[0\]\[0\] has 200"):
        bootstrap_matrices([[correct[0][0]], [np.ones(3, dtype=int), correct[1][1]]])


def test_paired_difference_finds_a_planted_difference_and_none_where_there_is_none():
    rng = np.random.default_rng(1)
    base = _correct(rng, [[0.7], [0.5, 0.8], [0.5, 0.6, 0.8]], 300)
    same = paired_difference(base, base, average_accuracy)
    assert same == (0.0, 0.0, 0.0)
    # Plant: run a answers 60 more examples of task 0 correctly after the last stage: +20 points
    # on one of three tasks, +6.7 points of AA and +10 of BwT.
    better = [[c.copy() for c in row] for row in base]
    wrong = np.flatnonzero(better[2][0] == 0)[:60]
    better[2][0][wrong] = 1
    d, low, high = paired_difference(better, base, average_accuracy)
    assert d == pytest.approx(20 / 3 / 100) and low <= d <= high and low > 0
    d, low, high = paired_difference(better, base, backward_transfer)
    assert d == pytest.approx(0.1) and low <= d <= high and low > 0
    # Unpaired noise of the same size is not a difference: two draws of the same accuracies.
    other = _correct(np.random.default_rng(2), [[0.7], [0.5, 0.8], [0.5, 0.6, 0.8]], 300)
    d, low, high = paired_difference(other, base, average_accuracy)
    assert low < 0 < high
