"""One driver per run: a second driver is refused, naming the holder, before it writes anything; a
dead holder's lease passes to the next driver with no cleanup."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.run.lease import LEASE_FILE, LeaseHeld, RunLease, run_lease

REPO = Path(__file__).resolve().parents[1]


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run's lease and keeps it until killed."""
    code = (f"from pipelines.run.lease import RunLease; import time; RunLease({str(run_dir)!r}).acquire(); "
            f"print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_naming_the_holder_and_a_dead_holders_lease_passes_on(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(LeaseHeld, match=rf"being driven by pid {holder.pid} on host {socket.gethostname()}"):
            RunLease(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs
        holder.wait()
    assert (tmp_path / "run" / LEASE_FILE).exists()  # the dead holder's file is still there...
    with run_lease(tmp_path / "run") as lease:  # ...and its lease is free
        assert json.loads(lease.path.read_text())["pid"] == os.getpid()
        with pytest.raises(LeaseHeld):  # held: another open of the file in this process is refused too
            RunLease(tmp_path / "run").acquire()
    RunLease(tmp_path / "run").acquire()  # released on leaving the block


def test_clpipe_run_while_another_driver_holds_the_run_exits_2_and_touches_nothing(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text((REPO / "configs" / "tiny.yaml").read_text())
    run_dir = tmp_path / "runs" / load_config(config).run_id
    run_dir.mkdir(parents=True)
    (run_dir / "ledger.json").write_text("written by the first driver")
    holder = _holder(run_dir)
    try:
        assert main(["run", str(config), "--storage", str(tmp_path / "runs")]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"clpipe: error: run {run_dir.name} is being driven by pid {holder.pid}" in err
    assert sorted(p.name for p in run_dir.iterdir()) == [LEASE_FILE, "ledger.json"]
    assert (run_dir / "ledger.json").read_text() == "written by the first driver"
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_a_file_system_without_locks_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    from pipelines.run.ledger import LedgerError

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LedgerError, match=r"driver.lease: the file system refuses a lock \(No locks available\)"):
        RunLease(tmp_path).acquire()
