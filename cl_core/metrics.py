"""Continual-learning measures over an accuracy matrix, and the strip rate of a classifier.

The accuracy matrix ``R`` is a float array of shape [T, T]: ``R[i, j]`` is the accuracy on
task ``j`` after training stage ``i``. Entries above the diagonal (``j > i``) are NaN because
a task is not evaluated before its stage; they are never read here. The unit is whatever the
caller uses (fractions or points): every measure is a mean of differences, so it comes back
in the same unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]


def _checked_matrix(R: FloatArray) -> npt.NDArray[np.float64]:
    """Return ``R`` as float64 after checking the shape and the evaluated (lower) triangle.

    Failing here names the argument, rather than surfacing later as a NaN measure.
    """
    matrix = np.asarray(R, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square [T, T] matrix, got shape {matrix.shape}")
    rows, cols = np.tril_indices(matrix.shape[0])
    missing = np.isnan(matrix[rows, cols])
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"R has NaN on or below the diagonal, first at R[{rows[first]}, {cols[first]}]: "
            "every task must be evaluated at its own stage and every later one"
        )
    return matrix


def _checked_baseline(baseline: FloatArray, num_tasks: int) -> npt.NDArray[np.float64]:
    """Return ``baseline`` as float64 after checking it has one finite entry per task."""
    values = np.asarray(baseline, dtype=np.float64)
    if values.shape != (num_tasks,):
        raise ValueError(
            f"baseline must have shape ({num_tasks},) to match R, got {values.shape}"
        )
    if not np.isfinite(values).all():
        raise ValueError("baseline must be finite: the untrained bank is evaluated on every task")
    return values


def average_accuracy(R: FloatArray) -> float:
    """Mean accuracy over all tasks after the last stage (AA): the headline number of a run."""
    matrix = _checked_matrix(R)
    return float(matrix[-1].mean())


def backward_transfer(R: FloatArray) -> float:
    """BwT = 1/(T-1) * sum_{j<T-1} (R[T-1, j] - R[j, j]); 0.0 when T == 1.

    Negative values mean later stages cost accuracy on earlier tasks.
    """
    matrix = _checked_matrix(R)
    num_tasks = matrix.shape[0]
    if num_tasks == 1:
        return 0.0
    earlier = np.arange(num_tasks - 1)
    return float(np.mean(matrix[-1, earlier] - matrix[earlier, earlier]))


def forward_transfer(before: FloatArray, baseline: FloatArray) -> float:
    """FwT as GEM defines it (Lopez-Paz & Ranzato, 2017): 1/(T-1) * sum_{j>=1} (before[j] - baseline[j]);
    0.0 when T == 1.

    ``before[j]`` is the accuracy on task ``j`` of the bank left by task ``j-1``, with task ``j``
    set up as its training would set it up and not trained (R[j-1, j] in GEM's notation);
    ``baseline[j]`` is the untrained bank's. ``before[0]`` is not read (there is no task before
    task 0). What the earlier tasks taught that helps task ``j`` before it is trained.
    """
    values = np.asarray(before, dtype=np.float64)
    untrained = _checked_baseline(baseline, len(values))
    if len(values) == 1:
        return 0.0
    if not np.isfinite(values[1:]).all():
        raise ValueError("before must be finite from task 1 on: every task j >= 1 is evaluated before its training")
    return float(np.mean(values[1:] - untrained[1:]))


def learning_gain(R: FloatArray, baseline: FloatArray) -> float:
    """Learning gain = 1/(T-1) * sum_{j>=1} (R[j, j] - baseline[j]); 0.0 when T == 1.

    What the bank reaches on task ``j`` right after training it, over the untrained bank. It mixes
    learning the task with any transfer, so it is not forward transfer (a method with no transfer
    mechanism, such as a LoRA per task, scores high on it); see `forward_transfer`. Task 0 is left
    out, as in FwT, so that the two compare the same tasks.
    """
    matrix = _checked_matrix(R)
    num_tasks = matrix.shape[0]
    untrained = _checked_baseline(baseline, num_tasks)
    if num_tasks == 1:
        return 0.0
    later = np.arange(1, num_tasks)
    return float(np.mean(matrix[later, later] - untrained[later]))


def forgetting(R: FloatArray) -> float:
    """Forgetting = 1/(T-1) * sum_{j<T-1} (max_{i in [j, T-2]} R[i, j] - R[T-1, j]).

    It is 0.0 when T == 1. Unlike BwT it compares against the best accuracy a task ever had,
    not the one right after its own stage, so a task that improved and then dropped counts
    as forgotten.
    """
    matrix = _checked_matrix(R)
    num_tasks = matrix.shape[0]
    if num_tasks == 1:
        return 0.0
    # Hide the cells above the diagonal so the max over column j reads rows j..T-2 only.
    evaluated = np.tril(np.ones_like(matrix, dtype=bool))
    before_last = np.where(evaluated, matrix, -np.inf)[:-1, :-1]
    best_before_last = before_last.max(axis=0)
    return float(np.mean(best_before_last - matrix[-1, :-1]))


def bootstrap_matrices(correct: list[list[IntArray]], draws: int = 2000, seed: int = 0) -> npt.NDArray[np.float64]:
    """[draws, T, T] accuracy matrices (fractions) over resampled test examples.

    ``correct[i][j]`` holds 0/1 per test example of task ``j`` after stage ``i`` (``j <= i``),
    the examples in the same order at every stage. Each draw resamples every task's test
    examples once and applies the same indices at every stage, so stage-to-stage differences
    (BwT) are paired; two runs evaluated on the same examples can share the draws (same seed).
    """
    num_tasks = len(correct)
    rng = np.random.default_rng(seed)
    out = np.full((draws, num_tasks, num_tasks), np.nan)
    for j in range(num_tasks):
        n = len(correct[j][j])
        idx = rng.integers(0, n, size=(draws, n))
        for i in range(j, num_tasks):
            values = np.asarray(correct[i][j], dtype=np.float64)
            if len(values) != n:
                raise ValueError(f"correct[{i}][{j}] has {len(values)} examples, correct[{j}][{j}] has {n}")
            out[:, i, j] = values[idx].mean(1)
    return out


def paired_difference(correct_a: list[list[IntArray]], correct_b: list[list[IntArray]], measure,
                      draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``measure`` (e.g. average_accuracy) of run a minus run b, both evaluated on the same test
    examples: (the difference, and the 2.5% and 97.5% percentiles over paired bootstrap draws)."""
    def point(correct):
        num_tasks = len(correct)
        R = np.full((num_tasks, num_tasks), np.nan)
        for i in range(num_tasks):
            for j in range(i + 1):
                R[i, j] = np.mean(correct[i][j])
        return measure(R)

    a, b = bootstrap_matrices(correct_a, draws, seed), bootstrap_matrices(correct_b, draws, seed)
    diffs = np.array([measure(ra) - measure(rb) for ra, rb in zip(a, b)])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return point(correct_a) - point(correct_b), float(low), float(high)


@dataclass(frozen=True)
class StripRate:
    """Strip rate per label present in the data, and their unweighted mean."""

    per_label: dict[int, float]
    macro: float


def _label_threshold(scores: FloatArray, is_label: npt.NDArray[np.bool_], target: float) -> float | None:
    """Lowest threshold (a distinct score) whose precision for one label reaches ``target``, or None.

    Recall only grows as the threshold falls, so this is also the threshold of largest recall.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(is_label[order])
    # A threshold tau decides every sample with score >= tau, so tied scores enter together:
    # evaluate only at the last position of each run of equal scores.
    run_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    precise_enough = true_positives[run_ends] / (run_ends + 1) >= target
    if not precise_enough.any():
        return None
    return float(sorted_scores[run_ends[precise_enough][-1]])


def _label_strip_rate(scores: FloatArray, is_label: npt.NDArray[np.bool_], target: float) -> float:
    """Largest recall for one label over thresholds whose precision reaches ``target``."""
    threshold = _label_threshold(scores, is_label, target)
    return 0.0 if threshold is None else float((is_label & (scores >= threshold)).sum() / is_label.sum())


def _checked_scores(probs: FloatArray, labels: IntArray) -> tuple[npt.NDArray[np.float64], np.ndarray]:
    scores = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty [n, C] array, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("probs must be finite")
    if truth.ndim != 1 or truth.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels must have shape ({scores.shape[0]},) to match probs, got {truth.shape}"
        )
    if not np.issubdtype(truth.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {truth.dtype}")
    num_classes = scores.shape[1]
    if truth.min() < 0 or truth.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) to index the columns of probs")
    return scores, truth


def _checked_target(target_precision: float) -> None:
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must lie in (0, 1], got {target_precision}")


def strip_rate(
    probs: FloatArray, labels: IntArray, target_precision: float = 0.9
) -> StripRate:
    """Share of each label's samples that can be decided automatically at a target precision.

    For a label ``c`` present in ``labels``, a threshold ``tau`` decides as ``c`` every sample
    with ``probs[:, c] >= tau``. Among the thresholds ``tau`` taken from the distinct values of
    ``probs[:, c]``, keep those whose precision (decided samples whose true label is ``c``,
    over all decided samples) is at least ``target_precision``. The strip rate of ``c`` is the
    largest recall (decided and correct, over all samples with true label ``c``) among the
    kept thresholds, or 0.0 if none is kept. ``macro`` is the mean over the labels present.
    It says how much of the work a classifier can take off people's hands without checking.

    Chosen on the samples it is measured on, this is an upper bound of what thresholds fixed in
    advance reach (see ``calibrated_thresholds`` and ``decisions_at``).
    """
    scores, truth = _checked_scores(probs, labels)
    _checked_target(target_precision)
    per_label = {
        int(label): _label_strip_rate(scores[:, label], truth == label, target_precision)
        for label in np.unique(truth)
    }
    return StripRate(per_label=per_label, macro=float(np.mean(list(per_label.values()))))


def calibrated_thresholds(
    probs: FloatArray, labels: IntArray, target_precision: float = 0.9
) -> list[float | None]:
    """Per label (column of ``probs``), the lowest threshold reaching ``target_precision`` on these
    samples, or None where none does or the label is absent: the thresholds that ``strip_rate``
    would pick, chosen on a calibration slice so that they can be applied to other samples."""
    scores, truth = _checked_scores(probs, labels)
    _checked_target(target_precision)
    present = set(np.unique(truth).tolist())
    return [_label_threshold(scores[:, c], truth == c, target_precision) if c in present else None
            for c in range(scores.shape[1])]


@dataclass(frozen=True)
class Decisions:
    """What fixed thresholds decide on labelled samples: strip rate per label present (recall of
    the samples decided as it), its mean, and the precision of all decisions (None if none)."""

    strip_rate: StripRate
    precision: float | None


def decisions_at(probs: FloatArray, labels: IntArray, thresholds: list[float | None]) -> Decisions:
    """Strip rate and precision when label ``c`` is decided for every sample with
    ``probs[:, c] >= thresholds[c]`` (never where the threshold is None), as ``strip_rate`` decides."""
    scores, truth = _checked_scores(probs, labels)
    if len(thresholds) != scores.shape[1]:
        raise ValueError(f"thresholds must have {scores.shape[1]} entries, one per column of probs")
    decided = np.stack([scores[:, c] >= t if t is not None else np.zeros(len(truth), bool)
                        for c, t in enumerate(thresholds)], axis=1)
    correct = decided[np.arange(len(truth)), truth]
    per_label = {int(c): float(correct[truth == c].mean()) for c in np.unique(truth)}
    total = int(decided.sum())
    return Decisions(StripRate(per_label, float(np.mean(list(per_label.values())))),
                     float(correct.sum() / total) if total else None)


def cl_summary(R: FloatArray, baseline: FloatArray, before: FloatArray) -> dict[str, float]:
    """The standard measures of a run, keyed as they are logged and reported: ``before[j]`` is
    task j's accuracy before its training (see `forward_transfer`)."""
    return {
        "AA": average_accuracy(R),
        "BwT": backward_transfer(R),
        "FwT": forward_transfer(before, baseline),
        "forgetting": forgetting(R),
        "learning_gain": learning_gain(R, baseline),
    }
