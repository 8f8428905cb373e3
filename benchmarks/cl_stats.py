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


def example_draws(correct: Correct, measure: Callable, boot_seed: int, draws: int = DRAWS) -> np.ndarray:
    """[draws] values of the measure (points) over resampled test examples; runs with equal
    ``boot_seed`` and equal task sizes get the same example indices (paired)."""
    return 100 * np.array([measure(R) for R in bootstrap_matrices(correct, draws, boot_seed)])


def seed_interval(per_seed: np.ndarray, rng_seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over seeds from ``per_seed`` [seeds, draws] example draws: each
    draw resamples the seeds (when there are several) and averages their draws."""
    seeds, draws = per_seed.shape
    if seeds == 1:
        values = per_seed[0]
    else:
        picked = np.random.default_rng(rng_seed).integers(0, seeds, size=(draws, seeds))
        values = per_seed[picked, np.arange(draws)[:, None]].mean(1)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def summarize(runs: dict[int, Correct], measure: Callable, draws: int = DRAWS) -> dict:
    """Mean over seeds and its 95% interval for one method on one sequence (``runs``: seed → correctness)."""
    seeds = sorted(runs)
    per_seed = np.stack([example_draws(runs[s], measure, s, draws) for s in seeds])
    low, high = seed_interval(per_seed)
    return {"mean": float(np.mean([point(runs[s], measure) for s in seeds])), "ci95": [low, high], "seeds": seeds}


def verdict(low: float, high: float) -> str:
    """For a difference a − b where higher is better."""
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def compare(runs_a: dict[int, Correct], runs_b: dict[int, Correct], measure: Callable,
            draws: int = DRAWS) -> dict | None:
    """Paired difference a − b over the seeds both have (None if none): the mean over those seeds,
    its 95% interval, and the verdict."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    for s in seeds:
        sizes_a = [len(cell) for cell in runs_a[s][-1]]
        sizes_b = [len(cell) for cell in runs_b[s][-1]]
        if sizes_a != sizes_b:
            raise ValueError(f"seed {s}: test examples per task differ ({sizes_a} vs {sizes_b}); a paired "
                             "comparison needs both runs evaluated on the same examples")
    per_seed = np.stack([example_draws(runs_a[s], measure, s, draws) - example_draws(runs_b[s], measure, s, draws)
                         for s in seeds])
    low, high = seed_interval(per_seed)
    difference = float(np.mean([point(runs_a[s], measure) - point(runs_b[s], measure) for s in seeds]))
    return {"difference": difference, "ci95": [low, high], "verdict": verdict(low, high), "seeds": seeds}


def run_key(row: dict) -> str:
    """A run's identity in the results: method, sequence, task order and seed."""
    return f"{row['method']}|{row['sequence']}|{'>'.join(row['order'])}|{row['seed']}"


def aggregate(rows: list[dict], examples: dict[str, dict], reference: str = "moe_cl",
              extra_pairs: tuple[tuple[str, str], ...] = (("ewc", "seq_lora"),), draws: int = DRAWS) -> dict:
    """Per method and sequence: means and 95% intervals of AA, BwT and forgetting (task id given)
    and of AA and BwT without a task id where the method routes itself; then the paired
    comparisons ``reference`` − every other method, and ``extra_pairs``, on AA and BwT (task id
    given). ``examples[run_key]`` holds each run's encoded correctness per task-id mode."""
    runs: dict[tuple[str, str], dict[str, dict[int, Correct]]] = {}
    for row in rows:
        modes = examples[run_key(row)]
        group = runs.setdefault((row["sequence"], row["method"]), {})
        for mode, cells in modes.items():
            group.setdefault(mode, {})[row["seed"]] = decode(cells)
    methods = []
    for (sequence, method), modes in sorted(runs.items()):
        entry = {"sequence": sequence, "method": method, "seeds": sorted(modes["oracle"])}
        entry.update({name: summarize(modes["oracle"], measure, draws) for name, measure in MEASURES.items()})
        for name in ("AA", "BwT"):
            entry[f"task_agnostic_{name}"] = (summarize(modes["inferred"], MEASURES[name], draws)
                                              if "inferred" in modes else None)
        methods.append(entry)
    pairs = []
    for sequence in sorted({s for s, _ in runs}):
        present = sorted(m for s, m in runs if s == sequence)
        wanted = [(reference, m) for m in present if m != reference and reference in present]
        wanted += [(a, b) for a, b in extra_pairs if a in present and b in present]
        for a, b in wanted:
            for name in ("AA", "BwT"):
                result = compare(runs[sequence, a]["oracle"], runs[sequence, b]["oracle"], MEASURES[name], draws)
                if result is not None:
                    pairs.append({"sequence": sequence, "a": a, "b": b, "measure": name, **result})
    return {"methods": methods, "pairs": pairs}
