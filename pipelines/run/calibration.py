"""Decision thresholds: per task and label, chosen at each evaluate stage on the task's calibration
slice (see `pipelines.data.tasks.split_calibration`), stored beside the bank as `thresholds.json`.

A prediction is *decided* (needs no person) when its label's probability reaches the label's
threshold: the lowest one whose precision reached `eval.target_precision` on the slice. A label
without one (the slice never reached the precision, or lacked the label) is never decided.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cl_core.atomic import atomic_write_text
from cl_core.metrics import calibrated_thresholds
from cl_core.training import predict_probs
from pipelines.config import RunConfig
from pipelines.data.tasks import load_prepared

THRESHOLDS_FILE = "thresholds.json"


def task_thresholds(stage, cfg: RunConfig, task: int, data_path: str, mode: str) -> list[float | None]:
    """One threshold (or None) per label of `task`, in label order, from its calibration slice."""
    examples = load_prepared(data_path, "calibration")
    if not examples:
        return [None] * len(cfg.tasks[task].verbalizers)
    probs = predict_probs(stage.model, stage.objective, stage.method, examples, cfg.eval.batch_size, mode)
    labels = np.array([ex["label"] for ex in examples])
    return calibrated_thresholds(probs.numpy().astype(np.float64), labels, cfg.eval.target_precision)


def save_thresholds(bank_dir: Path, cfg: RunConfig, data_paths: list[str],
                    chosen: dict[str, list[list[float | None]]]) -> None:
    """`chosen[mode][task]`: the thresholds of every task evaluated with this bank, per task-id mode."""
    calibration = {}
    for t in range(len(next(iter(chosen.values())))):
        summary = json.loads((Path(data_paths[t]) / "summary.json").read_text())
        calibration[cfg.tasks[t].name] = {"rows": summary["splits"]["calibration"]["rows"],
                                          "source": summary["calibration_source"]}
    modes = {mode: {cfg.tasks[t].name: dict(zip(cfg.tasks[t].verbalizers, per_task))
                    for t, per_task in enumerate(per_mode)} for mode, per_mode in chosen.items()}
    payload = {"target_precision": cfg.eval.target_precision, "calibration": calibration, "thresholds": modes}
    atomic_write_text(Path(bank_dir) / THRESHOLDS_FILE, json.dumps(payload, indent=2))


def load_thresholds(bank_dir: Path) -> dict | None:
    """The stored thresholds of a bank, or None before its evaluate stage wrote them."""
    path = Path(bank_dir) / THRESHOLDS_FILE
    return json.loads(path.read_text()) if path.exists() else None
