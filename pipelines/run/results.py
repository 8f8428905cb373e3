"""What a run's ledger says of its results: accuracy matrices and summaries on the test split and
on the validation slices, the report files, and the terminal printout.

Every figure is read from the ledger's evaluate stages (and the untrained baseline and the
before-training evaluations), so a run read back from its folder reports what it reported live.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from cl_core.atomic import atomic_write_text
from cl_core.metrics import cl_summary
from pipelines.config import RunConfig
from pipelines.run.ledger import BASELINE_PREFIX, LEDGER_FILE, Ledger, LedgerError, StageKey
from pipelines.credentials import without_credentials
from pipelines.run.report import accuracy_matrix, format_matrix, matrix_csv, matrix_heatmap

# Where an evaluation's outputs keep each split's rows.
SPLIT_ROWS = {"test": "rows", "validation": "validation"}


def find_run(storage: Path, run_id: str) -> Path:
    """The folder of run `run_id` under `storage`, or a LedgerError listing the runs there."""
    run_dir = Path(storage) / run_id
    if not (run_dir / LEDGER_FILE).exists():
        runs = sorted(p.parent.name for p in Path(storage).glob(f"*/{LEDGER_FILE}"))
        raise LedgerError(f"no run {run_id!r} under {storage}; runs there: {runs}")
    return run_dir


def read_run(run_dir: Path) -> tuple[RunConfig, Ledger]:
    """A run folder's resolved config and its ledger."""
    cfg = RunConfig.model_validate(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
    ledger = Ledger.read(run_dir)
    cfg._recorded_identity = ledger.config_hash  # its files (a DeepSpeed JSON, a model) may be elsewhere now
    return cfg, ledger


def latest_bank(cfg: RunConfig, ledger: Ledger) -> int | None:
    """The last task whose bank is durable and evaluated (its decision thresholds stored), or None."""
    ready = [t for t in range(len(cfg.tasks))
             if ledger.done(StageKey("bank", t)) and ledger.done(StageKey("evaluate", t))]
    return ready[-1] if ready else None


@dataclass
class SplitResults:
    """The first k tasks on one split: per mode, the evaluate rows, accuracy matrices (points),
    summaries, and accuracies before training (NaN for task 0); the untrained baseline."""

    rows: list[dict]
    baseline: np.ndarray
    matrices: dict[str, np.ndarray]
    summary: dict[str, dict[str, float]]
    before: dict[str, np.ndarray]


def baseline_outputs(ledger: Ledger) -> list[dict]:
    """The done untrained-baseline evaluations, in task order (one per time tasks were appended)."""
    return sorted(ledger.by_prefix(BASELINE_PREFIX).values(), key=lambda out: out.get("first", 0))


def baseline_covered(ledger: Ledger) -> int:
    """How many tasks (from the first) have an untrained baseline."""
    return sum(len(out["rows"]["oracle"]["accuracy"]) for out in baseline_outputs(ledger))


def results_so_far(ledger: Ledger, k: int, split: str = "test") -> SplitResults | None:
    """The first k tasks' results on `split` (test or validation); None where a task has no
    validation slice."""
    key = SPLIT_ROWS[split]
    rows = [ledger.outputs(StageKey("evaluate", t))[key] for t in range(k)]
    base = [a for out in baseline_outputs(ledger) for a in out[key]["oracle"]["accuracy"]][:k]
    if None in base:
        return None
    base = np.array(base) * 100
    before_rows = [ledger.outputs(StageKey("before", t))[key] for t in range(1, k)]
    before = {mode: np.array([np.nan] + [100 * row[mode]["accuracy"] for row in before_rows]) for mode in rows[-1]}
    matrices = {mode: accuracy_matrix([row[mode]["accuracy"] for row in rows], k) for mode in rows[-1]}
    summary = {mode: cl_summary(R, base, before[mode]) for mode, R in matrices.items()}
    return SplitResults(rows, base, matrices, summary, before)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    tasks: list[str]
    precision: str  # what training.precision resolved to (cl_core.precision)
    matrices: dict[str, np.ndarray]  # mode → R[stage, task] (NaN above the diagonal), test split
    baseline: np.ndarray
    summary: dict[str, dict[str, float]]  # mode → AA/BwT/FwT/forgetting/learning_gain, test split
    strip: dict[str, list[float]]  # mode → final strip rate per task, thresholds chosen on the test split
    tracking_uri: str
    wall_s: float  # this invocation's
    compute_s: float
    busy_s: float  # the whole run's, across reruns: see Ledger.busy_seconds
    stage_seconds: dict[str, float] = field(default_factory=dict)
    strip_calibrated: dict[str, list[float]] = field(default_factory=dict)  # thresholds from validation slices
    steps_per_task: list[int] = field(default_factory=list)  # optimizer steps of each task's training
    # The same on the validation slices (what every choice reads); empty where a task has no slice.
    val_matrices: dict[str, np.ndarray] = field(default_factory=dict)
    val_summary: dict[str, dict[str, float]] = field(default_factory=dict)


def write_report(run_dir: Path, run_id: str, names: list[str], precision: str, test: SplitResults,
                 validation: SplitResults | None, steps_per_task: list[int]) -> dict:
    """`report/`: the accuracy matrix (CSV, heatmap) and `summary.json`; returns the summary."""
    last = test.rows[-1]
    report_dir = run_dir / "report"
    report_dir.mkdir(exist_ok=True)
    matrix_csv(test.matrices["oracle"], names, report_dir / "accuracy_matrix.csv")
    matrix_heatmap(test.matrices["oracle"], names, report_dir / "accuracy_matrix.png", f"{run_id}: accuracy (%)")
    summary = {"run_id": run_id, "tasks": names, "precision": precision, "summary": test.summary,
               "strip_rate": {m: [100 * s for s in row["strip_rate"]] for m, row in last.items()},
               "strip_rate_calibrated": {m: [100 * s for s in row["strip_rate_calibrated"]] for m, row in last.items()},
               "matrices": {m: R.tolist() for m, R in test.matrices.items()}, "baseline": test.baseline.tolist(),
               "before_training": {m: [None] + b[1:].tolist() for m, b in test.before.items()},
               "steps_per_task": steps_per_task,
               "validation": {"summary": validation.summary if validation else {},
                              "matrices": {m: R.tolist() for m, R in validation.matrices.items()} if validation else {}}}
    atomic_write_text(report_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


def print_result(result: RunResult, out=sys.stdout) -> None:
    for mode, R in result.matrices.items():
        print(f"\nAccuracy matrix ({mode} task id), rows: after training each task", file=out)
        print(format_matrix(R, result.tasks, result.baseline, scale=1.0), file=out)
        s = result.summary[mode]
        print(f"AA {s['AA']:.1f}  BwT {s['BwT']:+.1f}  FwT {s['FwT']:+.1f}  learning gain {s['learning_gain']:+.1f}  "
              f"forgetting {s['forgetting']:.1f}  "
              f"strip rate {np.mean(result.strip_calibrated[mode]):.1f} (thresholds from the validation slices; upper "
              f"bound with thresholds chosen on the test split {np.mean(result.strip[mode]):.1f})", file=out)
        if mode in result.val_summary:
            v = result.val_summary[mode]
            print(f"validation: AA {v['AA']:.1f}  BwT {v['BwT']:+.1f}  FwT {v['FwT']:+.1f}  "
                  f"forgetting {v['forgetting']:.1f}", file=out)
    print(f"\nPrecision: {result.precision}\nRun folder: {result.run_dir}\nMLflow store: {without_credentials(result.tracking_uri)}  "
          f"(clpipe ui --storage {result.run_dir.parent})", file=out)
