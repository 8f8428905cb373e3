"""What a benchmark runs, in which order, and running what its results file lacks.

A plan per sequence names the methods at its first seed, those that also run at its other seeds,
and its seeds. Runs go one at a time in the plan's order; a rerun skips the finished ones (the
results file says which: `pipelines.compare.results`), so that an interrupted benchmark continues.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.compare.results import Results


@dataclass(frozen=True)
class Plan:
    """What runs on a sequence: `methods` at the first seed, `multi_seed` (of them) at the others;
    with `strongest_other`, also the strongest other non-oracle method at the first seed."""

    methods: tuple[str, ...]
    multi_seed: tuple[str, ...]
    seeds: tuple[int, ...]
    strongest_other: bool = False
    test_examples: int | None = None  # per task, below the budget's (the long sequence's)


def strongest_other(rows: list[dict], sequence: str, seed: int, plan: Plan) -> str | None:
    """The non-oracle method of the plan outside its multi-seed ones with the best AA on the sequence at `seed`."""
    candidates = [r for r in rows if r["sequence"] == sequence and r["seed"] == seed and not r["oracle"]
                  and r["method"] in plan.methods and r["method"] not in plan.multi_seed]
    return max(candidates, key=lambda r: r["AA"])["method"] if candidates else None


def planned_runs(plans: dict[str, Plan], rows: list[dict]) -> list[tuple[str, str, int]]:
    """(label, sequence, seed) in running order: every method at its sequence's first seed, sequence
    by sequence; then the multi-seed methods at the other seeds (and the strongest other baseline,
    where the plan says so, as soon as the first seed's rows name it)."""
    runs = [(label, sequence, plan.seeds[0]) for sequence, plan in plans.items() for label in plan.methods]
    for sequence, plan in plans.items():
        multi = [label for label in plan.multi_seed if label in plan.methods]
        strongest = strongest_other(rows, sequence, plan.seeds[0], plan) if plan.strongest_other else None
        runs += [(label, sequence, seed) for seed in plan.seeds[1:] for label in multi + ([strongest] if strongest else [])]
    return runs


def run_benchmark(sequences: dict[str, list[str]], plans: dict[str, Plan], results: Results,
                  run: Callable[[str, str, list[str], int], tuple[dict, dict]]) -> None:
    """Runs what `results` lacks, one at a time; `run(label, sequence, tasks, seed)` → (row, examples)."""
    for sequence, tasks in sequences.items():
        results.check_order(sequence, tasks)
    done = set()
    while True:  # the plan grows once the first seed names a sequence's strongest other baseline
        todo = [r for r in planned_runs(plans, results.rows) if r not in done]
        if not todo:
            return
        label, sequence, seed = todo[0]
        done.add(todo[0])
        tasks = sequences[sequence]
        if results.finished(label, sequence, tasks, seed):
            print(f"{label} {sequence} seed {seed}: finished earlier", flush=True)
            continue
        start = time.perf_counter()
        row, examples = run(label, sequence, tasks, seed)
        results.add(row, examples)
        print(f"{label} {sequence} seed {seed}: AA {row['AA']:.1f} BwT {row['BwT']:+.1f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
