"""Progress of long stages on the driver's console.

A stage's work (the train loop's rank 0, an evaluation) writes its progress to a small JSON file
under the run folder (`StageProgress`), replaced whole at most once a second; the driver polls
the files of the stages running (`ProgressBoard`) and shows one line per stage: step / total,
loss, tokens per second, elapsed and estimated time left for training; examples done / total for
evaluation. On a terminal the line updates in place; otherwise a plain line is printed every
`interval` seconds. Progress files are not durable state: they are removed when the stage ends.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path


def progress_file(run_dir: Path, stage: str) -> Path:
    return run_dir / "progress" / f"{stage.replace('/', '-')}.json"


class StageProgress:
    """Written by the stage's work: `update(done, **fields)` as it goes (rate-limited)."""

    def __init__(self, path: str | None, total: int, unit: str, first: int = 0, every_s: float = 1.0):
        """`first`: where this attempt starts (a resumed train stage starts mid-way), for the ETA."""
        self.path, self.total, self.unit, self.first = path and Path(path), total, unit, first
        self.started, self.last, self.every_s = time.time(), 0.0, every_s

    def update(self, done: int, **fields) -> None:
        now = time.time()
        if self.path is None or (now - self.last < self.every_s and done < self.total):
            return
        self.last = now
        state = {"done": done, "total": self.total, "unit": self.unit, "first": self.first,
                 "elapsed_s": now - self.started, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)  # a reader sees the old or the new state, never half of one


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_progress(stage: str, state: dict) -> str:
    """`task1/train  step 12/40  loss 1.234  312 tok/s  elapsed 0:42  ETA 1:38`."""
    done, total, elapsed = state["done"], state["total"], state["elapsed_s"]
    unit = "step" if state["unit"] == "step" else "examples"
    parts = [f"{stage:<22}", f"{unit} {done}/{total}"]
    if "loss" in state:
        parts.append(f"loss {state['loss']:.4f}")
    if "tokens_per_s" in state:
        parts.append(f"{state['tokens_per_s']:.0f} tok/s")
    parts.append(f"elapsed {_clock(elapsed)}")
    progressed = done - state.get("first", 0)
    if 0 < progressed and done < total:
        parts.append(f"ETA {_clock(elapsed / progressed * (total - done))}")
    return "  ".join(parts)


class ProgressBoard:
    """Shows the progress lines of the running stages (`watch`/`unwatch`) and the driver's own
    messages (`message`) on one console."""

    def __init__(self, run_dir: Path, out=None, interval: float = 30.0, poll: float = 1.0):
        self.run_dir, self.out = run_dir, out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.interval, self.poll = interval, poll
        self.watched: dict[str, tuple[float, str]] = {}  # stage → when its last plain line was printed, and it
        self.shown = ""  # the in-place line on a terminal
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="clpipe-progress")
        self.thread.start()

    def watch(self, stage: str) -> None:
        progress_file(self.run_dir, stage).unlink(missing_ok=True)  # an earlier attempt's state
        with self.lock:
            self.watched[stage] = (time.monotonic(), "")

    def unwatch(self, stage: str) -> None:
        with self.lock:
            self.watched.pop(stage, None)
        progress_file(self.run_dir, stage).unlink(missing_ok=True)

    def message(self, text: str) -> None:
        with self.lock:
            self._clear()
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        with self.lock:
            self._clear()

    def _clear(self) -> None:
        if self.tty and self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = ""

    def _states(self) -> dict[str, dict]:
        states = {}
        for stage in list(self.watched):
            try:
                states[stage] = json.loads(progress_file(self.run_dir, stage).read_text())
            except (OSError, ValueError):  # not written yet
                pass
        return states

    def _loop(self) -> None:
        while not self.stop.wait(self.poll):
            self.refresh()

    def refresh(self) -> None:
        with self.lock:
            states = self._states()
            if self.tty:
                line = " | ".join(" ".join(format_progress(s, state).split()) for s, state in states.items())
                if line and line != self.shown:
                    self.out.write("\r\x1b[K" + line[: shutil.get_terminal_size().columns - 1])
                    self.out.flush()
                    self.shown = line
                return
            now = time.monotonic()
            for stage, state in states.items():
                when, printed = self.watched.get(stage, (now, ""))
                line = "  " + format_progress(stage, state)
                if now - when >= self.interval and line != printed:
                    print(line, file=self.out, flush=True)
                    self.watched[stage] = (now, line)
