"""What a run costs: the disk its folder keeps per task, and its stage seconds by task index.

Stage seconds come from the run's ledger (`outputs.stage_seconds`, keys like `task3/train`): a
stage's seconds run from its launch to its end, so stages that overlap (task t's evaluation runs
while task t+1's training starts) each count their whole span.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# Evaluation stages: the untrained baseline, each task before its training (FwT), each task's evaluation.
EVALUATION_KINDS = ("evaluate", "before")
TASK_STAGE = re.compile(r"task(\d+)/(\w+)$")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def storage_figures(run_dir: Path, tasks: int) -> dict:
    """Bytes per finished task: the whole run folder, its banks, the train stages' durable outputs
    (kept so that a damaged bank is rebuilt without retraining), its evaluation rows; and whether the
    folder keeps at most 1.2 × its bank and train-output bytes plus its evaluation bytes."""
    per_task = {"storage_per_task_bytes": folder_bytes(run_dir) // tasks,
                "bank_bytes_per_task": folder_bytes(run_dir / "banks") // tasks,
                "trained_bytes_per_task": folder_bytes(run_dir / "trained") // tasks,
                "eval_bytes_per_task": folder_bytes(run_dir / "eval") // tasks}
    target = 1.2 * (per_task["bank_bytes_per_task"] + per_task["trained_bytes_per_task"]) + per_task["eval_bytes_per_task"]
    return {**per_task, "storage_target_met": per_task["storage_per_task_bytes"] <= target}


def is_evaluation(key: str) -> bool:
    match = TASK_STAGE.match(key)
    return key.startswith("baseline/") or (match is not None and match.group(2) in EVALUATION_KINDS)


def by_task(seconds: dict[str, float]) -> list[dict[str, float]]:
    """Per task index, its stages' seconds by kind (train, evaluate, before, prepare, bank)."""
    tasks: dict[int, dict[str, float]] = {}
    for key, value in seconds.items():
        if match := TASK_STAGE.match(key):
            tasks.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return [tasks.get(t, {}) for t in range(max(tasks) + 1)] if tasks else []


def evaluation_share(seconds: dict[str, float]) -> float:
    """The fraction of all stage seconds that evaluation stages take."""
    total = sum(seconds.values())
    return sum(v for k, v in seconds.items() if is_evaluation(k)) / total if total else float("nan")


def growth(values: list[float]) -> float:
    """Least-squares slope of a per-task figure against the task index (seconds per task index)."""
    if len(values) < 2:
        return float("nan")
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def evaluated_examples(tasks: int, test_examples: int) -> int:
    """Test examples one run of `tasks` tasks scores in one task-id mode: every task untrained, each
    task from the second before its training (GEM's FwT), and every task so far after each
    training; so a run's evaluation grows with the square of its length."""
    return test_examples * (tasks + (tasks - 1) + tasks * (tasks + 1) // 2)


def scaled_wall(wall: float, tasks: float, scored: float, tasks_here: int, scored_here: int) -> tuple[float, float]:
    """Bounds on the wall time of a run of `tasks_here` tasks scoring `scored_here` examples, from
    a measured run's: scaled by tasks trained (as if training dominated) and by examples scored (as
    if evaluation did); the run's cost lies between the two."""
    low, high = sorted((wall * tasks_here / tasks, wall * scored_here / scored))
    return low, high
