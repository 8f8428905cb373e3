"""What a rerun finds damaged on disk is set to run again: a bank, a train stage's tensors; and the
state a durable bank makes dead (its train stage's Ray Train checkpoints) is removed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from pipelines.config import RunConfig
from pipelines.run import stages
from pipelines.run.ledger import Ledger, StageKey


def drop_damaged_banks(cfg: RunConfig, ledger: Ledger, run_dir: Path, progress: Callable[[str], None]) -> dict[int, str]:
    """A bank altered or truncated on disk is rebuilt from its train stage's durable tensors;
    where those are damaged too, the task trains again (deterministically, from the same parent bank).

    Returns task → the sha256 the ledger recorded for each bank set to rebuild: the bank stage is
    deterministic, so the rebuilt bank must hash the same (the driver checks it)."""
    expected = {}
    for t in range(len(cfg.tasks)):
        done = ledger.outputs(StageKey("bank", t))
        problem = done and stages.verify_bank(done["path"])
        if problem:
            retrain = stages.verify_trained(ledger.outputs(StageKey("train", t))) is not None
            progress(f"  bank of task {t} is damaged ({problem}); rebuilding it from "
                     f"{'a new training' if retrain else 'its training output'}")
            expected[t] = done["sha256"]
            ledger.forget([StageKey("train", t)] * retrain + [StageKey("bank", t)])
        elif done:
            prune_train_checkpoints(cfg, run_dir, t)  # a crash may have come between the bank and the removal
    return expected


def forget_damaged_training(ledger: Ledger, t: int, trained: dict, progress: Callable[[str], None]) -> bool:
    """Before task t's bank stage reads its train stage's tensors: True (and the train stage
    forgotten, to run again) where they are not as the ledger recorded. Ray Train resumes the
    stage from its latest checkpoint, and training is deterministic: the same tensors again."""
    damaged = not ledger.done(StageKey("bank", t)) and stages.verify_trained(trained)
    if damaged:
        progress(f"  train output of task {t} is damaged ({damaged}); training it again")
        ledger.forget([StageKey("train", t)])
    return bool(damaged)


def prune_train_checkpoints(cfg: RunConfig, run_dir: Path, t: int) -> None:
    """Task t's bank is durable: its train stage's Ray Train checkpoints are dead state."""
    shutil.rmtree(run_dir / "ray_train" / stages.train_run_name(cfg, t), ignore_errors=True)
