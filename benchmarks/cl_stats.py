"""Intervals and paired verdicts for the continual-learning benchmark, from per-example correctness.

A run's correctness is ``correct[i][j]``: 0/1 per test example of task ``j`` after stage ``i``
(``j <= i``), as the evaluate stages record it. Intervals are 95% percentile bootstraps:
over test examples (``cl_core.metrics.bootstrap_matrices``: one resample of each task's examples
per draw, applied at every stage), and, where a method has several seeds, over seeds as well
(each draw also resamples the seeds, then takes each drawn seed's example draw: a two-level
bootstrap). Runs of different methods with the same seed are evaluated on the same test
examples (the test sample depends on the seed and the task only), so a comparison pairs them:
the same example indices in both runs, seed by seed. Figures are in points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from cl_core.metrics import average_accuracy, backward_transfer, bootstrap_matrices, forgetting

MEASURES: dict[str, Callable[[np.ndarray], float]] = {
    "AA": average_accuracy, "BwT": backward_transfer, "forgetting": forgetting}
DRAWS = 2000
Correct = list[list[np.ndarray]]


def encode(correct: list[list[list[int]]]) -> list[list[str]]:
    """Correctness as one "0101…" string per (stage, task) cell: compact in JSON."""
    return [["".join(str(int(c)) for c in cell) for cell in stage] for stage in correct]


def decode(cells: list[list[str]]) -> Correct:
    return [[np.frombuffer(cell.encode(), np.uint8) - ord("0") for cell in stage] for stage in cells]


def point(correct: Correct, measure: Callable) -> float:
    """The measure of the run's own accuracy matrix, in points."""
    num_tasks = len(correct)
    R = np.full((num_tasks, num_tasks), np.nan)
    for i in range(num_tasks):
        for j in range(i + 1):
            R[i, j] = np.mean(correct[i][j])
    return 100 * measure(R)


@dataclass
class RunStats:
    """One run in one task-id mode: each measure's own value and its example draws (points), and
    the test examples per task. Draws use the run's seed, so runs sharing a seed and its test
    examples share the example indices (paired)."""

    points: dict[str, float]
    draws: dict[str, np.ndarray]
    sizes: list[int]


def run_stats(correct: Correct, boot_seed: int, draws: int = DRAWS) -> RunStats:
    matrices = bootstrap_matrices(correct, draws, boot_seed)
    return RunStats(points={name: point(correct, m) for name, m in MEASURES.items()},
                    draws={name: 100 * np.array([m(R) for R in matrices]) for name, m in MEASURES.items()},
                    sizes=[len(cell) for cell in correct[-1]])


def seed_interval(per_seed: np.ndarray, rng_seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over seeds from ``per_seed`` [seeds, draws] example draws: each
    draw resamples the seeds (when there are several) and averages one example draw of each
    seed picked, taken at random (a seed picked twice gets two independent example draws)."""
    seeds, draws = per_seed.shape
    if seeds == 1:
        values = per_seed[0]
    else:
        rng = np.random.default_rng(rng_seed)
        picked = rng.integers(0, seeds, size=(draws, seeds))
        values = per_seed[picked, rng.integers(0, draws, size=(draws, seeds))].mean(1)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def summarize(runs: dict[int, RunStats], name: str) -> dict:
    """Mean over seeds and its 95% interval of one measure for one method on one sequence
    (``runs``: seed → its stats)."""
    seeds = sorted(runs)
    low, high = seed_interval(np.stack([runs[s].draws[name] for s in seeds]))
    return {"mean": float(np.mean([runs[s].points[name] for s in seeds])), "ci95": [low, high], "seeds": seeds}


def verdict(low: float, high: float) -> str:
    """For a difference a − b where higher is better."""
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def compare(runs_a: dict[int, RunStats], runs_b: dict[int, RunStats], name: str) -> dict | None:
    """Paired difference a − b of one measure over the seeds both have (None if none): the mean
    over those seeds, its 95% interval, and the verdict."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    for s in seeds:
        if runs_a[s].sizes != runs_b[s].sizes:
            raise ValueError(f"seed {s}: test examples per task differ ({runs_a[s].sizes} vs {runs_b[s].sizes}); "
                             "a paired comparison needs both runs evaluated on the same examples")
    low, high = seed_interval(np.stack([runs_a[s].draws[name] - runs_b[s].draws[name] for s in seeds]))
    difference = float(np.mean([runs_a[s].points[name] - runs_b[s].points[name] for s in seeds]))
    return {"difference": difference, "ci95": [low, high], "verdict": verdict(low, high), "seeds": seeds}


def run_key(row: dict) -> str:
    """A run's identity in the results: method, sequence, task order and seed."""
    return f"{row['method']}|{row['sequence']}|{'>'.join(row['order'])}|{row['seed']}"


def aggregate(rows: list[dict], examples: dict[str, dict], reference: str = "moe_cl",
              extra_pairs: tuple[tuple[str, str], ...] = (("ewc", "seq_lora"),), draws: int = DRAWS,
              cache: dict | None = None) -> dict:
    """Per method and sequence: means and 95% intervals of AA, BwT and forgetting, with the task id
    given and, where the method routes itself, without it; then the paired
    comparisons ``reference`` − every other method, and ``extra_pairs``, on AA and BwT (task id
    given). ``examples[run_key]`` holds each run's encoded correctness per task-id mode; ``cache``
    keeps each run's stats between calls (a run's draws never change)."""
    cache = {} if cache is None else cache
    runs: dict[tuple[str, str], dict[str, dict[int, RunStats]]] = {}
    for row in rows:
        group = runs.setdefault((row["sequence"], row["method"]), {})
        for mode, cells in examples[run_key(row)].items():
            key = (run_key(row), mode, draws)
            if key not in cache:
                cache[key] = run_stats(decode(cells), row["seed"], draws)
            group.setdefault(mode, {})[row["seed"]] = cache[key]
    methods = []
    for (sequence, method), modes in sorted(runs.items()):
        entry = {"sequence": sequence, "method": method, "seeds": sorted(modes["oracle"])}
        entry.update({name: summarize(modes["oracle"], name) for name in MEASURES})
        for name in MEASURES:
            entry[f"task_agnostic_{name}"] = summarize(modes["inferred"], name) if "inferred" in modes else None
        methods.append(entry)
    pairs = []
    for sequence in sorted({s for s, _ in runs}):
        present = sorted(m for s, m in runs if s == sequence)
        wanted = [(reference, m) for m in present if m != reference and reference in present]
        wanted += [(a, b) for a, b in extra_pairs if a in present and b in present]
        for a, b in wanted:
            for name in ("AA", "BwT"):
                result = compare(runs[sequence, a]["oracle"], runs[sequence, b]["oracle"], name)
                if result is not None:
                    pairs.append({"sequence": sequence, "a": a, "b": b, "measure": name, **result})
    return {"methods": methods, "pairs": pairs}
