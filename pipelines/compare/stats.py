"""Means, intervals and paired verdicts for continual-learning runs, from per-example correctness.

A run's correctness is ``correct[i][j]``: 0/1 per test example of task ``j`` after stage ``i``
(``j <= i``), as the evaluate stages record it. Figures are in points. Runs of different methods
with the same seed are evaluated on the same test examples (the test sample depends on the seed
and the task only), so a comparison pairs them seed by seed.

Which interval, and why (every entry names its own in ``interval``; `INTERVALS` says it in words):
- ``t_seeds``, several seeds: a 95% t-interval (df = seeds − 1) on the per-seed values of one
  method, or on the per-seed paired differences of two. A seed draws the initialisation, the
  training sample and its order, and the test sample, so the spread between seeds covers training
  noise and test sampling both. A bootstrap over two or three seeds cannot reach beyond the
  observed values and comes out too narrow; the t quantile (12.7 at two seeds, 4.3 at three) pays
  for the few seeds instead.
- ``t_orders``, the same comparison on several orders of the same tasks: a t-interval over the
  orders (df = orders − 1) of each order's mean over its seeds. The orders are the replicates the
  field reports over; seeds are nested in an order, so they are averaged first.
- ``examples``, one seed: a 95% percentile bootstrap over test examples (the same resampled
  examples in both runs of a pair). It covers test sampling only, not training noise: such a
  verdict is labelled so and never decides a goal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import stats

from cl_core.metrics import average_accuracy, backward_transfer, bootstrap_matrices, forgetting

MEASURES: dict[str, Callable[[np.ndarray], float]] = {
    "AA": average_accuracy, "BwT": backward_transfer, "forgetting": forgetting}
DRAWS = 2000
# Where each measure can lie, in points: a t-interval is cut there (AA is an accuracy; the others are
# differences of accuracies). A difference of two measures lies within ±100.
RANGES = {"AA": (0.0, 100.0), "BwT": (-100.0, 100.0), "forgetting": (-100.0, 100.0)}
INTERVALS = {
    "t_seeds": "95% t-interval over seeds (df = seeds - 1): on one method's per-seed values, or on two methods' "
               "per-seed paired differences (same seed, same test examples); covers training noise and test sampling",
    "t_orders": "95% t-interval over orders (df = orders - 1) of each order's mean over its seeds",
    "examples": "one seed: 95% percentile bootstrap over test examples (paired); covers test sampling only, "
                "not training noise, and decides no goal",
}
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
    """One run in one task-id mode: each measure's own value, the test examples per task, and (on
    demand: only a one-seed interval reads them) its bootstrap draws over test examples. The draws
    use the run's seed, so runs sharing a seed and its test examples share the example indices."""

    points: dict[str, float]
    sizes: list[int]
    correct: Correct = field(repr=False)
    boot_seed: int = 0
    n_draws: int = DRAWS

    @cached_property
    def draws(self) -> dict[str, np.ndarray]:
        matrices = bootstrap_matrices(self.correct, self.n_draws, self.boot_seed)
        return {name: 100 * np.array([m(R) for R in matrices]) for name, m in MEASURES.items()}


def run_stats(correct: Correct, boot_seed: int, draws: int = DRAWS) -> RunStats:
    return RunStats(points={name: point(correct, m) for name, m in MEASURES.items()},
                    sizes=[len(cell) for cell in correct[-1]], correct=correct, boot_seed=boot_seed, n_draws=draws)


def t_interval(values: list[float] | np.ndarray, bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float]:
    """95% t-interval of the mean of ``values`` (at least two), df = len − 1, cut to ``bounds``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least two values, got {len(values)}")
    mean, half = values.mean(), stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(max(mean - half, bounds[0])), float(min(mean + half, bounds[1]))


def example_interval(draws: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    """For a difference a − b where higher is better."""
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def summarize(runs: dict[int, RunStats], name: str) -> dict:
    """One measure of one method on one sequence (``runs``: seed → its stats): the mean over seeds,
    each seed's value, and the 95% interval (t over seeds; over test examples at one seed)."""
    seeds = sorted(runs)
    values = [runs[s].points[name] for s in seeds]
    if len(seeds) > 1:
        ci, interval = t_interval(values, RANGES[name]), "t_seeds"
    else:
        ci, interval = example_interval(runs[seeds[0]].draws[name]), "examples"
    return {"mean": float(np.mean(values)), "ci95": list(ci), "seeds": seeds, "values": values, "interval": interval}


def summarize_values(by_seed: dict[int, float | None]) -> dict | None:
    """A row figure without per-example data (validation AA, BwT) over seeds: its mean, and a
    t-interval where there are several seeds; None where any seed lacks it."""
    if not by_seed or any(v is None for v in by_seed.values()):
        return None
    seeds = sorted(by_seed)
    values = [by_seed[s] for s in seeds]
    ci = list(t_interval(values, (-100.0, 100.0))) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "ci95": ci, "seeds": seeds, "values": values,
            "interval": "t_seeds" if ci else None}


def compare(runs_a: dict[int, RunStats], runs_b: dict[int, RunStats], name: str) -> dict | None:
    """Paired difference a − b of one measure over the seeds both have (None if none): the mean
    over those seeds, each seed's difference, its 95% interval and the verdict."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    for s in seeds:
        if runs_a[s].sizes != runs_b[s].sizes:
            raise ValueError(f"seed {s}: test examples per task differ ({runs_a[s].sizes} vs {runs_b[s].sizes}); "
                             "a paired comparison needs both runs evaluated on the same examples")
    differences = [runs_a[s].points[name] - runs_b[s].points[name] for s in seeds]
    if len(seeds) > 1:
        (low, high), interval = t_interval(differences, (-100.0, 100.0)), "t_seeds"
    else:
        (low, high), interval = example_interval(runs_a[seeds[0]].draws[name] - runs_b[seeds[0]].draws[name]), "examples"
    return {"difference": float(np.mean(differences)), "ci95": [low, high], "verdict": verdict(low, high),
            "seeds": seeds, "differences": differences, "interval": interval}


def over_orders(per_order: dict[str, float]) -> dict:
    """A difference (or a mean) given per order, each the mean over that order's seeds: its mean
    over the orders, a t-interval over them, and the verdict."""
    orders = sorted(per_order)
    low, high = t_interval([per_order[o] for o in orders], (-100.0, 100.0))
    return {"difference": float(np.mean([per_order[o] for o in orders])), "ci95": [low, high],
            "verdict": verdict(low, high), "orders": orders, "per_order": [per_order[o] for o in orders],
            "interval": "t_orders"}


def run_key(row: dict) -> str:
    """A run's identity in the results: method, sequence, task order and seed."""
    return f"{row['method']}|{row['sequence']}|{'>'.join(row['order'])}|{row['seed']}"


# Beside MoE-CL against every other method: EWC's effect, and the published order's pairs.
EXTRA_PAIRS = (("ewc", "seq_lora"), ("olora", "per_task_lora"), ("per_task_lora", "seq_lora"), ("olora", "seq_lora"))


def aggregate(rows: list[dict], examples: dict[str, dict], reference: str = "moe_cl",
              extra_pairs: tuple[tuple[str, str], ...] = EXTRA_PAIRS, draws: int = DRAWS, cache: dict | None = None,
              pooled: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Per method and sequence: AA, BwT and forgetting with the task id given and, where the method
    routes itself, without it (and the paired difference between the two); validation AA and BwT
    where the rows have them. Then the paired comparisons ``reference`` − every other method and
    ``extra_pairs`` on AA and BwT (task id given), and the same pairs over the orders of each
    ``pooled`` group (name → its sequences) where every order has them. ``examples[run_key]`` holds
    each run's encoded correctness per task-id mode; ``cache`` keeps each run's stats between calls
    (a run's correctness never changes)."""
    cache = {} if cache is None else cache
    runs: dict[tuple[str, str], dict[str, dict[int, RunStats]]] = {}
    by_group: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_group.setdefault((row["sequence"], row["method"]), []).append(row)
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
        entry["task_agnostic_minus_task_id_AA"] = (compare(modes["inferred"], modes["oracle"], "AA")
                                                   if "inferred" in modes else None)
        for name in ("AA", "BwT"):
            entry[f"val_{name}"] = summarize_values({r["seed"]: r.get(f"val_{name}") for r in by_group[sequence, method]})
        methods.append(entry)
    pairs = []
    for sequence in sorted({s for s, _ in runs}):
        for a, b in wanted_pairs(sorted(m for s, m in runs if s == sequence), reference, extra_pairs):
            for name in ("AA", "BwT"):
                result = compare(runs[sequence, a]["oracle"], runs[sequence, b]["oracle"], name)
                if result is not None:
                    pairs.append({"sequence": sequence, "a": a, "b": b, "measure": name, **result})
    return {"intervals": INTERVALS, "methods": methods, "pairs": pairs,
            "pooled": pooled_pairs(pairs, methods, pooled or {}, reference, extra_pairs)}


def wanted_pairs(present: list[str], reference: str, extra_pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    wanted = [(reference, m) for m in present if m != reference and reference in present]
    return wanted + [(a, b) for a, b in extra_pairs if a in present and b in present and (a, b) not in wanted]


def pooled_pairs(pairs: list[dict], methods: list[dict], groups: dict[str, tuple[str, ...]], reference: str,
                 extra_pairs: tuple[tuple[str, str], ...]) -> list[dict]:
    """Per group of orders: each method's AA and BwT, and each pair's difference, over the orders
    (t over orders of the per-order means over seeds), where every order of the group has it."""
    out = []
    for group, sequences in groups.items():
        entries = {(e["sequence"], e["method"]): e for e in methods if e["sequence"] in sequences}
        if {s for s, _ in entries} != set(sequences) or len(sequences) < 2:
            continue
        everywhere = sorted(m for m in {m for _, m in entries} if all((s, m) in entries for s in sequences))
        for method in everywhere:
            for name in ("AA", "BwT"):
                out.append({"group": group, "method": method, "measure": name,
                            **over_orders({s: entries[s, method][name]["mean"] for s in sequences})})
        by = {(p["sequence"], p["a"], p["b"], p["measure"]): p for p in pairs}
        for a, b in wanted_pairs(everywhere, reference, extra_pairs):
            for name in ("AA", "BwT"):
                if all((s, a, b, name) in by for s in sequences):
                    out.append({"group": group, "a": a, "b": b, "measure": name,
                                **over_orders({s: by[s, a, b, name]["difference"] for s in sequences})})
    return out
