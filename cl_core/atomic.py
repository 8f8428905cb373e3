"""Durable writes: a file or a whole directory appears complete or not at all, and stays after a crash.

A file is written to a temporary name beside it, fsynced, renamed over the target, and the
directory entry fsynced. A directory is built under a temporary name, every file and folder in
it fsynced, then renamed into place in one step and its parent fsynced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path), fsync it, rename over `path`: readers see the old or the new file only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the result is an ordinary file
    try:
        write(Path(tmp))
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def staging_dir(out: Path) -> Path:
    """An empty folder beside `out` to build it in (per process, so concurrent builders never share one)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, out: Path) -> bool:
    """Make the folder built in `tmp` durable and rename it to `out` in one step.

    False if `out` already exists (another process published it meanwhile): `tmp` is removed and
    theirs is kept.
    """
    for root, dirs, files in os.walk(tmp):
        for name in files:
            _fsync_file(Path(root) / name)
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(tmp)
    try:
        os.replace(tmp, out)
    except OSError:
        if not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_dir(out.parent)
    return True
