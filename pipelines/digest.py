"""Content digests of the files a run's identity depends on (a local model, a DeepSpeed JSON).

A run id must not depend on where the repository or the storage is mounted, so a file counts by
its content. A multi-GB model is read once per process: each file's digest is kept under its
path, size, modification time and inode, and read again only when one of them changes. As git
does with "racily clean" files, a file modified in the last seconds is not kept: a change made
within the file system's timestamp granularity would leave its modification time as it was.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from cl_core.bank import sha256_file

_FILE_DIGESTS: dict[tuple, str] = {}
RACY_S = 2.0


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, computed once per process while the file is unchanged."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key in _FILE_DIGESTS:
        return _FILE_DIGESTS[key]
    digest = sha256_file(Path(path))
    if time.time() - stat.st_mtime > RACY_S:
        _FILE_DIGESTS[key] = digest
    return digest


def tree_digest(path: Path) -> str:
    """A file's digest, or a folder's: every file under it by its path inside the folder and its
    content (hidden files and folders, e.g. `.cache`, do not count)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        inner = file.relative_to(path)
        if any(part.startswith(".") for part in inner.parts):
            continue
        h.update(f"{inner.as_posix()}\0{file_digest(file)}\n".encode())
    return h.hexdigest()
