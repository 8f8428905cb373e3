"""What a finished run holds for a comparison: its row (summary figures, validation figures, sizes,
stage seconds) and its per-example correctness, read from its result, ledger and banks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_core.bank import growth_by_owner, load_bank
from pipelines.compare.stats import encode
from pipelines.run.ledger import Ledger, StageKey


def correctness(run_dir: Path, tasks: int, mode: str = "oracle", split: str = "rows") -> list[list[list[int]]] | None:
    """correct[i][j] (j ≤ i): 0/1 per example of task j after training task i, from the evaluate
    stages (`rows`: the test split; `validation`: the validation slices); None if the run has none
    in this task-id mode or split."""
    ledger = Ledger.read(run_dir)
    rows = [ledger.outputs(StageKey("evaluate", i)).get(split) or {} for i in range(tasks)]
    if any(mode not in row for row in rows):
        return None
    return [rows[i][mode]["correct"][:i + 1] for i in range(tasks)]


def bank_size(run_dir: Path, tasks: int) -> dict:
    """The final bank's parameters (experts, routers, method modules; not method buffers), and its
    experts and their parameters per owner ("shared", or the task index: how the bank grew)."""
    manifest, _ = load_bank(Ledger.read(run_dir).outputs(StageKey("bank", tasks - 1))["path"])
    return {"trainable_params": int(sum(np.prod(shape) for key, shape in manifest["shapes"].items()
                                        if not key.startswith("state."))),
            "bank_growth": growth_by_owner(manifest["structure"]["bank"], manifest["shapes"])}


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Stage key (`task3/train`, `task3/evaluate`, …) → its seconds, launch to end."""
    return {key: round(float(seconds), 2) for key, seconds in sorted(Ledger.read(run_dir).stage_seconds().items())}


def run_row(result, label: str, sequence: str, tasks: list[str], seed: int, oracle: bool) -> tuple[dict, dict]:
    """A finished run's row in a comparison (`result`: the driver's RunResult) and its encoded
    per-example correctness per task-id mode (test split). Validation AA and BwT come from the
    result's `val_summary` (issue 32's validation split); None from a pipeline without it."""
    summary, inferred = result.summary["oracle"], result.summary.get("inferred")
    val = (getattr(result, "val_summary", None) or {}).get("oracle") or {}
    examples = {mode: correctness(result.run_dir, len(tasks), mode) for mode in ("oracle", "inferred")}
    validation = correctness(result.run_dir, len(tasks), "oracle", "validation")
    row = {
        "method": label, "sequence": sequence, "order": list(tasks), "seed": seed,
        "AA": summary["AA"], "BwT": summary["BwT"], "FwT": summary["FwT"], "forgetting": summary["forgetting"],
        "val_AA": val.get("AA"), "val_BwT": val.get("BwT"),
        # Null until the pipeline reports them (learning gain beside GEM's FwT; optimizer steps).
        "learning_gain": summary.get("learning_gain"),
        "strip_rate": float(np.mean(result.strip_calibrated["oracle"])),
        "task_agnostic_AA": inferred["AA"] if inferred else None,
        "task_agnostic_BwT": inferred["BwT"] if inferred else None,
        "steps_per_task": getattr(result, "steps_per_task", None),
        "n_test": [len(cell) for cell in examples["oracle"][-1]],
        "n_val": [len(cell) for cell in validation[-1]] if validation else None,
        **bank_size(result.run_dir, len(tasks)),
        "wall_s": round(result.busy_s, 1),
        "stage_seconds": stage_seconds(result.run_dir),
        "oracle": oracle,
    }
    return row, {mode: encode(c) for mode, c in examples.items() if c is not None}
