"""A run's task sequence: what identifies each task, and the check that a rerun only appends.

A run is identified by its name and everything that shapes training except the task list
(`RunConfig.identity_hash`). Task t, and with it every stage keyed `task{t}/...`, is identified
by that plus tasks 0..t (`task_records`: each record's `fingerprint`). The ledger keeps the
records of the tasks a run has started. Rerunning with tasks appended continues the run; a
recorded task that changed (its data, labels, template, any field, or its position) or was
removed is refused before any compute, and nothing already written changes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from cl_core.bank import sha256_file
from pipelines.config import ConfigError, RunConfig, TaskConfig


class SequenceError(ConfigError):
    """The task list no longer extends what the run already started."""


def task_record(task: TaskConfig) -> dict:
    """The task's config with its data files replaced by their content hashes: moving a file does
    not change a task, editing it does."""
    config = task.model_dump(mode="json")
    for split in ("train", "test"):
        if config["data"][split] is not None:
            config["data"][split] = {"sha256": sha256_file(Path(config["data"][split]))}
    return {"name": task.name, "config": config}


def task_records(cfg: RunConfig) -> list[dict]:
    """One record per task, in order, each with the fingerprint of the run identity + tasks 0..t."""
    records, h = [], hashlib.sha256(cfg.identity_hash().encode())
    for task in cfg.tasks:
        record = task_record(task)
        h.update(json.dumps(record, sort_keys=True).encode())
        records.append({**record, "fingerprint": h.copy().hexdigest()})
    return records


def check_extends(recorded: list[dict], current: list[dict], run_id: str, trained: dict[int, float]) -> None:
    """`current` must start with `recorded`; otherwise a SequenceError naming the first task that
    differs and what changed. `trained`: task index → when its train stage finished."""
    names = [r["name"] for r in current]
    for t, old in enumerate(recorded):
        new = current[t] if t < len(current) else None
        if new is not None and new["fingerprint"] == old["fingerprint"]:
            continue
        when = f"trained {format_date(trained[t])}" if t in trained else "started, not trained yet"
        what = f"tasks[{t}] {old['name']!r} ({when})"
        if old["name"] not in names:
            problem = f"{what} was removed from the task list"
        elif names.index(old["name"]) != t:
            problem = f"{what} moved to position {names.index(old['name'])}"
        else:
            fields = sorted(k for k in set(old["config"]) | set(new["config"])
                            if old["config"].get(k) != new["config"].get(k))
            problem = f"{what} changed: {', '.join(fields)}"
        raise SequenceError(f"run {run_id}: {problem}. A run can only have tasks appended; nothing was run or "
                            f"changed. To train this sequence, give the run a new name (the config's `name`).")


def format_date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
