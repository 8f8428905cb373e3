"""The durable ledger of a run: which stages are done, with their outputs.

A stage is marked done only after its outputs are durable (the stage writes them atomically
first); the ledger itself is replaced atomically on every change, so a crash at any moment
leaves either the old or the new ledger. Rerunning the same command reads it and continues at
the first stage not done.

Stages are named by `StageKey`: `model`, `baseline/evaluate[-from-task<k>]`, or
`task<t>/<step>`. Paths in a stage's outputs are stored relative to the run folder and read
back absolute, so a run folder (or the storage above it) can move and still resolve.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cl_core.atomic import atomic_write_text

LEDGER_FILE = "ledger.json"
TASK_STEPS = ("prepare", "plan", "before", "train", "bank", "evaluate")
# Output fields that hold a path: stored relative to the run folder.
PATH_FIELDS = ("path", "tensors", "checkpoint")


class LedgerError(ValueError):
    """A run folder without a ledger, or with another run's; the message names it."""


@dataclass(frozen=True)
class StageKey:
    """A stage of a run: a run-level step (`model`, `baseline/evaluate...`), or a task's step."""

    step: str
    task: int | None = None

    def __post_init__(self):
        if self.task is not None and self.step not in TASK_STEPS:
            raise ValueError(f"unknown task step {self.step!r}; steps: {TASK_STEPS}")

    def __str__(self) -> str:
        return self.step if self.task is None else f"task{self.task}/{self.step}"

    @classmethod
    def parse(cls, text: str) -> StageKey:
        match = re.fullmatch(r"task(\d+)/(\w+)", text)
        return cls(match.group(2), int(match.group(1))) if match else cls(text)

    @classmethod
    def baseline(cls, first: int) -> StageKey:
        """The untrained baseline of tasks first.. (0: all of them; k: the tasks appended at k)."""
        return cls("baseline/evaluate" if first == 0 else f"baseline/evaluate-from-task{first}")


MODEL = StageKey("model")
BASELINE_PREFIX = "baseline/evaluate"


class Ledger:
    """A run folder's ledger: created for a new run, checked against the run's identity otherwise."""

    def __init__(self, run_dir: Path, config_hash: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE
        if self.path.exists():
            self._data = json.loads(self.path.read_text())
            if self._data["config_hash"] != config_hash:
                raise LedgerError(f"{self.path}: belongs to a run with another config "
                                  f"({self._data['config_hash'][:10]} vs {config_hash[:10]})")
        else:
            self._data = {"config_hash": config_hash, "stages": {}, "meta": {}, "tasks": []}
            self._write()

    @classmethod
    def read(cls, run_dir: Path) -> Ledger:
        """The ledger of an existing run folder, for reading (predict, serve, status, reports)."""
        path = Path(run_dir) / LEDGER_FILE
        if not path.exists():
            raise LedgerError(f"{run_dir}: no {LEDGER_FILE} (not a run folder, or the run has not started)")
        return cls(Path(run_dir), json.loads(path.read_text())["config_hash"])

    @property
    def config_hash(self) -> str:
        """The identity of the run this folder belongs to (RunConfig.identity_hash)."""
        return self._data["config_hash"]

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self._data, indent=2, sort_keys=True))

    # -- the task list -------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[dict]:
        """The records of the tasks the run has started (pipelines.run.sequence), in order."""
        return self._data.get("tasks", [])

    def set_tasks(self, records: list[dict]) -> None:
        """Record the run's task list; the caller has checked that it only appends (check_extends)."""
        self._data["tasks"] = records
        self._write()

    # -- stages ----------------------------------------------------------------------------------------
    def done(self, key: StageKey) -> bool:
        return str(key) in self._data["stages"]

    def outputs(self, key: StageKey) -> dict | None:
        """The outputs of a done stage (paths absolute), or None."""
        entry = self._data["stages"].get(str(key))
        return None if entry is None else self._resolved(entry["outputs"])

    def seconds(self, key: StageKey) -> float:
        """How long the done stage took (its own span, not the wait to be recorded)."""
        return self._data["stages"][str(key)]["seconds"]

    def by_prefix(self, prefix: str) -> dict[StageKey, dict]:
        """The done stages whose key starts with `prefix`, with their outputs, in the order done."""
        return {StageKey.parse(k): self._resolved(v["outputs"]) for k, v in self._data["stages"].items()
                if k.startswith(prefix)}

    def stage_seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self._data["stages"].items()}

    def compute_seconds(self) -> float:
        """Seconds the stages spent on their own work, summed (see each stage's `compute_s`)."""
        return sum(v["outputs"].get("compute_s", 0.0) for v in self._data["stages"].values())

    def trained_at(self) -> dict[int, float]:
        """Task index → when its train stage finished."""
        return {key.task: self._data["stages"][str(key)]["finished"] for key in self.by_prefix("task")
                if key.step == "train"}

    def mark_done(self, key: StageKey, outputs: dict, seconds: float) -> None:
        self._data["stages"][str(key)] = {"outputs": self._relative(outputs), "seconds": seconds,
                                          "finished": time.time()}
        self._write()

    def forget(self, keys: list[StageKey]) -> None:
        """Mark stages not done (their outputs failed verification): they run again."""
        for key in keys:
            self._data["stages"].pop(str(key), None)
        self._write()

    # -- run-level facts -------------------------------------------------------------------------------
    def meta(self, key: str, default=None):
        return self._data["meta"].get(key, default)

    def set_meta(self, key: str, value) -> None:
        self._data["meta"][key] = value
        self._write()

    def busy_seconds(self) -> float:
        """Seconds during which at least one stage of the run was in flight: overlapping stages
        count once, the time between a crash and its rerun not at all (unlike a sum of stage
        seconds, or a wall clock that spans reruns)."""
        spans = []
        for entry in self._data["stages"].values():
            end = entry["outputs"].get("finished_at", entry["finished"])  # an overlapped stage's own end
            spans.append((end - entry["seconds"], end))
        busy, reach = 0.0, float("-inf")
        for start, end in sorted(spans):
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return busy

    # -- paths relative to the run folder ----------------------------------------------------------------
    def _relative(self, outputs: dict) -> dict:
        """Absolute paths → `./…` or `../…` from the run folder (a hub id is left as it is)."""
        def relative(path: str) -> str:
            if not os.path.isabs(path):
                return path
            rel = os.path.relpath(path, self.run_dir)
            return rel if rel.startswith("..") else f"./{rel}"
        return _map_paths(outputs, relative)

    def _resolved(self, outputs: dict) -> dict:
        def resolved(path: str) -> str:
            return os.path.normpath(self.run_dir / path) if path.startswith(("./", "../")) else path
        return _map_paths(outputs, resolved)


def _map_paths(value, convert):
    """`value` with every path field, at any depth (a model spec's `path` too), converted."""
    if isinstance(value, dict):
        return {k: convert(v) if k in PATH_FIELDS and isinstance(v, str) else _map_paths(v, convert)
                for k, v in value.items()}
    return value
