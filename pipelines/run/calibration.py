"""Decision thresholds: per task and label, chosen at each evaluate stage on the task's validation
slice (see `pipelines.data.tasks.split_validation`), stored beside the bank as `thresholds.json`.
The same pass scores the slice: the validation accuracy every choice of a run reads.

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
from cl_core.training import predict_probs, score_probs
from pipelines.config import RunConfig
from pipelines.data.tasks import load_prepared

THRESHOLDS_FILE = "thresholds.json"


def validation_scores(stage, cfg: RunConfig, task: int, data_path: str,
                      mode: str) -> tuple[list[float | None], dict]:
    """`task`'s decision thresholds (one per label, in label order, or None), chosen on its
    validation slice, and the slice's accuracy (None without a slice) and per-example correctness."""
    examples = load_prepared(data_path, "validation")
    if not examples:
        return [None] * len(cfg.tasks[task].verbalizers), {"accuracy": None, "correct": []}
    probs = predict_probs(stage.model, stage.objective, stage.method, examples, cfg.eval.batch_size, mode)
    labels = np.array([ex["label"] for ex in examples])
    thresholds = calibrated_thresholds(probs.numpy().astype(np.float64), labels, cfg.eval.target_precision)
    scored = score_probs(probs, examples, cfg.eval.target_precision)
    return thresholds, {"accuracy": scored["accuracy"], "correct": scored["correct"]}


def save_thresholds(bank_dir: Path, cfg: RunConfig, data_paths: list[str],
                    chosen: dict[str, list[list[float | None]]]) -> None:
    """`chosen[mode][task]`: the thresholds of every task evaluated with this bank, per task-id mode."""
    validation = {}
    for t in range(len(next(iter(chosen.values())))):
        summary = json.loads((Path(data_paths[t]) / "summary.json").read_text())
        validation[cfg.tasks[t].name] = {"rows": summary["splits"]["validation"]["rows"],
                                         "source": summary["validation_source"]}
    modes = {mode: {cfg.tasks[t].name: dict(zip(cfg.tasks[t].verbalizers, per_task))
                    for t, per_task in enumerate(per_mode)} for mode, per_mode in chosen.items()}
    payload = {"target_precision": cfg.eval.target_precision, "validation": validation, "thresholds": modes}
    atomic_write_text(Path(bank_dir) / THRESHOLDS_FILE, json.dumps(payload, indent=2))


def load_thresholds(bank_dir: Path) -> dict | None:
    """The stored thresholds of a bank, or None before its evaluate stage wrote them."""
    path = Path(bank_dir) / THRESHOLDS_FILE
    return json.loads(path.read_text()) if path.exists() else None
