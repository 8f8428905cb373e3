"""Bad task data: each case gets an error naming the file, row and field, or is skipped and counted."""

import json

import pytest

from pipelines.config import ConfigError, DataPolicy, parse_config
from pipelines.data.tasks import DataError, load_split


def _task(tmp_path, body: bytes, suffix=".jsonl", **extra):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(body)
    cfg = parse_config({"tasks": [{"name": "a", "data": {"train": str(path), "test": str(path)},
                                   "labels": ["spam", "ham"], **extra}]}, "run.yaml", tmp_path)
    return cfg.tasks[0], path


def _jsonl(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


GOOD = {"text": "hello there", "label": "ham"}
CASES = [
    ("missing text", _jsonl(GOOD, {"label": "ham"}), ".jsonl", r"row 2: field 'text': missing"),
    ("missing label", _jsonl(GOOD, {"text": "x"}), ".jsonl", r"row 2: field 'label': missing"),
    ("unknown label", _jsonl(GOOD, {"text": "x", "label": "eggs"}), ".jsonl",
     r"row 2: field 'label': 'eggs' is not one of the task's labels \['ham', 'spam'\]"),
    ("empty text", _jsonl(GOOD, {"text": "   ", "label": "ham"}), ".jsonl", r"row 2: field 'text': empty or not a string"),
    ("non-UTF-8", _jsonl(GOOD) + b'{"text": "caf\xe9", "label": "ham"}\n', ".jsonl", r"row 2: not valid UTF-8"),
    ("broken JSON", _jsonl(GOOD) + b'{"text": "x", "label": \n', ".jsonl", r"row 2: invalid JSON"),
    ("far over max length", _jsonl(GOOD, {"text": "w " * 60_000, "label": "ham"}), ".jsonl",
     r"row 2: field 'text': 120000 characters, over data.max_text_chars 100000"),
    ("CSV broken quote", b'text,label\n"fine",ham\n"never closed,ham\n', ".csv", r"line \d+: malformed CSV"),
    ("CSV non-UTF-8", b'text,label\nok,ham\ncaf\xe9,ham\n', ".csv", r"line 3: not valid UTF-8"),
]


@pytest.mark.parametrize("case, body, suffix, message", CASES, ids=[c[0] for c in CASES])
def test_bad_row_is_named(tmp_path, case, body, suffix, message):
    task, path = _task(tmp_path, body, suffix)
    with pytest.raises(DataError, match=message) as e:
        load_split(task, "train", 0, DataPolicy())
    assert str(path) in str(e.value)


@pytest.mark.parametrize("case, body, suffix, message", [c for c in CASES if c[2] == ".jsonl"],
                         ids=[c[0] for c in CASES if c[2] == ".jsonl"])
def test_bad_row_is_skipped_and_counted(tmp_path, case, body, suffix, message):
    task, _ = _task(tmp_path, body, suffix)
    rows = load_split(task, "train", 0, DataPolicy(on_bad_rows="skip"))
    assert rows.rows == [GOOD] and sum(rows.skipped.values()) == 1


def test_empty_split(tmp_path):
    task, path = _task(tmp_path, b"\n\n")
    with pytest.raises(DataError, match=f"{path}: no usable rows"):
        load_split(task, "train", 0, DataPolicy())
    task, _ = _task(tmp_path, _jsonl({"text": "", "label": "ham"}))
    with pytest.raises(DataError, match="no usable rows"):  # skipping everything leaves nothing
        load_split(task, "train", 0, DataPolicy(on_bad_rows="skip"))


def test_csv_and_parquet_load(tmp_path):
    task, _ = _task(tmp_path, b'text,label\n"a, quoted text",spam\nplain,ham\n', ".csv")
    assert load_split(task, "train", 0, DataPolicy()).rows == [{"text": "a, quoted text", "label": "spam"},
                                                               {"text": "plain", "label": "ham"}]
    import datasets

    datasets.Dataset.from_list([GOOD, {"text": "b", "label": "spam"}]).to_parquet(str(tmp_path / "t.parquet"))
    task, _ = _task(tmp_path, (tmp_path / "t.parquet").read_bytes(), ".parquet")
    assert len(load_split(task, "train", 0, DataPolicy()).rows) == 2


def test_unsupported_file_type(tmp_path):
    task, _ = _task(tmp_path, b"x", ".txt")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_split(task, "train", 0, DataPolicy())


def test_duplicate_task_and_missing_path_fail_at_config(tmp_path):
    with pytest.raises(ConfigError, match="duplicate task name"):
        parse_config({"tasks": [{"name": "a", "data": {"synthetic": {}}, "labels": ["x", "y"]}] * 2})
    with pytest.raises(ConfigError, match="file not found"):
        parse_config({"tasks": [{"name": "a", "data": {"train": "no.jsonl", "test": "no.jsonl"}, "labels": ["x", "y"]}]},
                     "run.yaml", tmp_path)
