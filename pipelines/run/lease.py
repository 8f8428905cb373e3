"""One driver per run folder: an exclusive lease, held for the driver's life.

The lease is an `flock` on `driver.lease` in the run folder. The kernel (or, on a shared file
system, its lock service) releases it when the holder's process ends, however it ends: a
successor takes over a dead holder's run with no cleanup. The file records who holds it (host,
pid, start time) so that a second driver's error names the holder. The file is never replaced or
removed: a lock belongs to the file's inode, and a new inode would let two holders in. See
docs/cluster.md for what the lease relies on across nodes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipelines.run.ledger import LedgerError

LEASE_FILE = "driver.lease"


class LeaseHeld(LedgerError):
    """Another live process drives this run; the message names it."""


class RunLease:
    """The lease of one run folder: `acquire` takes it (or raises LeaseHeld), `release` gives it back."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LEASE_FILE
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lease; `wait` blocks until the holder ends, else a holder raises LeaseHeld."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LeaseHeld(f"run {self.path.parent.name} is being driven by {self.holder()}; nothing was run "
                            f"or changed. Wait for it to end, or stop it: its lease ({self.path}) is released "
                            f"when that process ends, and the same command then continues the run") from None
        except OSError as e:  # e.g. Lustre mounted with `noflock`
            os.close(fd)
            raise LedgerError(f"{self.path}: the file system refuses a lock ({e.strerror}): the run folder needs "
                              f"one that supports flock (docs/cluster.md)") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """Who holds the lease, as its file records it."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return "another process (its lease file does not say which yet)"
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']} (since {started})"


@contextmanager
def run_lease(run_dir: Path, wait: bool = False) -> Iterator[RunLease]:
    lease = RunLease(run_dir)
    lease.acquire(wait)
    try:
        yield lease
    finally:
        lease.release()
