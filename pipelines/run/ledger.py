"""The durable ledger of a run: which stages are done, with their outputs.

A stage is marked done only after its outputs are durable (the stage writes them atomically
first); the ledger itself is replaced atomically on every change, so a crash at any moment
leaves either the old or the new ledger. Rerunning the same command reads it and continues at
the first stage not done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cl_core.atomic import atomic_write_text

LEDGER_FILE = "ledger.json"


class Ledger:
    def __init__(self, run_dir: Path, config_hash: str):
        self.path = Path(run_dir) / LEDGER_FILE
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["config_hash"] != config_hash:
                raise ValueError(f"{self.path}: belongs to a run with another config "
                                 f"({self.data['config_hash'][:10]} vs {config_hash[:10]})")
        else:
            self.data = {"config_hash": config_hash, "stages": {}, "meta": {}, "tasks": []}
            self._write()

    @property
    def tasks(self) -> list[dict]:
        """The records of the tasks the run has started (pipelines.run.sequence), in order."""
        return self.data.get("tasks", [])

    def set_tasks(self, records: list[dict]) -> None:
        """Record the run's task list; the caller has checked that it only appends (check_extends)."""
        self.data["tasks"] = records
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    def outputs(self, key: str) -> dict | None:
        """The outputs of a done stage, or None."""
        entry = self.data["stages"].get(key)
        return entry["outputs"] if entry else None

    def mark_done(self, key: str, outputs: dict, seconds: float) -> None:
        self.data["stages"][key] = {"outputs": outputs, "seconds": seconds, "finished": time.time()}
        self._write()

    def forget(self, keys: list[str]) -> None:
        """Mark stages not done (their outputs failed verification): they run again."""
        for key in keys:
            self.data["stages"].pop(key, None)
        self._write()

    def set_meta(self, key: str, value) -> None:
        self.data["meta"][key] = value
        self._write()

    def busy_seconds(self) -> float:
        """Seconds during which at least one stage of the run was in flight: overlapping stages
        count once, the time between a crash and its rerun not at all (unlike a sum of stage
        seconds, or a wall clock that spans reruns)."""
        spans = []
        for entry in self.data["stages"].values():
            end = entry["outputs"].get("finished_at", entry["finished"])  # an overlapped stage's own end
            spans.append((end - entry["seconds"], end))
        busy, reach = 0.0, float("-inf")
        for start, end in sorted(spans):
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return busy
