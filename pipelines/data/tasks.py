"""Task data: read and check rows, then format and tokenize them into a cached `datasets` dataset.

Every bad row is reported with its file, row and field, or skipped and counted when the config
says `data.on_bad_rows: skip`. Prepared data is cached by a content hash of everything that
shapes it (file bytes, tokenizer, template, labels, limits), so reruns reuse it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from cl_core.atomic import publish_dir, staging_dir
from cl_core.objectives import TaskFormat, encode_prompt
from cl_core.synthetic import synthetic_rows
from pipelines.config import DataPolicy, TaskConfig
from pipelines.data.hub import LOCAL, hub_commit

READERS = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Bad task data; the message names the file, row and field."""


@dataclass
class Rows:
    """Checked rows of one split, and how many were skipped for which reason."""

    rows: list[dict]
    skipped: Counter = field(default_factory=Counter)


def _read_jsonl(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, parsed object or the error text) per non-blank line."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.append((n, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                out.append((n, f"invalid JSON ({e.msg})"))
                continue
            out.append((n, obj if isinstance(obj, dict) else "not a JSON object"))
    return out


def _read_csv(path: Path) -> list[tuple[int, dict | str]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 ({e.reason})") from None
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
    out = []
    try:
        for row in reader:
            out.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    return out


def _read_parquet(path: Path) -> list[tuple[int, dict | str]]:
    table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    return [(i + 1, row) for i, row in enumerate(table)]


def read_file(path: Path) -> list[tuple[int, dict | str]]:
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {READERS}")
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    return _read_csv(path) if suffix == ".csv" else _read_parquet(path)


def check_rows(raw: list[tuple[int, dict | str]], task: TaskConfig, policy: DataPolicy, where: str) -> Rows:
    """Keep rows with a non-empty text and a known label; report or count the others."""
    verbalizers = task.verbalizers
    result = Rows(rows=[])
    for n, row in raw:
        problem = row if isinstance(row, str) else None
        if problem is None:
            text, label = row.get(task.text_field), row.get(task.label_field)
            if task.text_field not in row:
                problem = f"field '{task.text_field}': missing"
            elif not isinstance(text, str) or not text.strip():
                problem = f"field '{task.text_field}': empty or not a string"
            elif len(text) > policy.max_text_chars:
                problem = (f"field '{task.text_field}': {len(text)} characters, over data.max_text_chars "
                           f"{policy.max_text_chars}")
            elif task.label_field not in row:
                problem = f"field '{task.label_field}': missing"
            elif str(label) not in verbalizers:
                problem = f"field '{task.label_field}': {label!r} is not one of the task's labels {sorted(verbalizers)}"
        if problem is None:
            result.rows.append({"text": text, "label": str(label)})
        elif policy.on_bad_rows == "skip":
            result.skipped[problem.split(":")[0]] += 1
        else:
            raise DataError(f"{where}: row {n}: {problem}")
    if not result.rows:
        raise DataError(f"{where}: no usable rows (empty split)")
    return result


def load_split(task: TaskConfig, split: str, task_index: int, policy: DataPolicy, cache_dir: Path | None = None) -> Rows:
    """Checked rows of `split` ("train" or "test") from the task's source."""
    data = task.data
    if data.synthetic is not None:
        n = data.synthetic.n_train if split == "train" else data.synthetic.n_test
        seed = data.synthetic.seed + (0 if split == "train" else 1)
        return Rows(rows=synthetic_rows(task_index, list(task.verbalizers), n, seed))
    if data.hub is not None:
        name = data.hub.train_split if split == "train" else data.hub.test_split
        table = datasets.load_dataset(data.hub.dataset, data.hub.config, split=name, revision=data.hub.revision,
                                      cache_dir=None if cache_dir is None else str(cache_dir))
        raw = [(i + 1, row) for i, row in enumerate(table)]
        return check_rows(raw, task, policy, f"{data.hub.dataset}[{name}]")
    path = Path(getattr(data, split))
    if not path.exists():
        raise DataError(f"tasks.{task.name}.data.{split}: file not found: {path}")
    return check_rows(read_file(path), task, policy, str(path))


def task_format(task: TaskConfig, max_length: int) -> TaskFormat:
    return TaskFormat(name=task.name, verbalizers=tuple(task.verbalizers.values()), template=task.template,
                      max_length=max_length)


def _limit(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded sample of at most `limit` rows, in a fixed order."""
    if limit is None or len(rows) <= limit:
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:limit])]


def split_validation(task: TaskConfig, task_index: int, rows: list[dict], size: int,
                     seed: int) -> tuple[list[dict], list[dict], str]:
    """(rows to train on, a validation slice of at most `size` rows, where it came from).

    The slice is never trained on and is not the test split: rows beyond max_train_examples when
    the split has them (the rows trained on stay the same), fresh rows for a synthetic task, else
    rows held out of training (at most a fifth of them). Every choice reads it (decision
    thresholds, Tune's scores); the test split is only reported.
    """
    train = _limit(rows, task.max_train_examples, seed)
    if len(train) < len(rows):
        kept = {id(r) for r in train}
        return train, _limit([r for r in rows if id(r) not in kept], size, seed), "beyond max_train_examples"
    if task.data.synthetic is not None:
        fresh = synthetic_rows(task_index, list(task.verbalizers), size, task.data.synthetic.seed + 2)
        return train, fresh, "generated"
    held = set(random.Random(seed).sample(range(len(train)), min(size, len(train) // 5)))
    return ([r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held],
            "held out of training")


def content_hash(task: TaskConfig, task_index: int, tokenizer_id: str, max_length: int, seed: int,
                 validation_examples: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([task.model_dump(), task_index, tokenizer_id, max_length, seed, validation_examples],
                        sort_keys=True).encode())
    for split in ("train", "test"):
        path = getattr(task.data, split)
        if path is not None:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def prepare_task(task: TaskConfig, task_index: int, tokenizer, tokenizer_id: str, max_length: int, seed: int,
                 policy: DataPolicy, cache_root: Path, validation_examples: int) -> dict:
    """Tokenized train/validation/test datasets for one task under `cache_root/<hash>` (see
    `split_validation`); returns paths, counts, where the validation slice came from, and the
    hub commit the data was read at (`revision`; "local" for files and generated data)."""
    revision = LOCAL
    if task.data.hub is not None:  # pinned: the prepared data is of one commit, named in its key
        revision = hub_commit(task.data.hub.dataset, task.data.hub.revision, "dataset")
        hub = task.data.hub.model_copy(update={"revision": revision})
        task = task.model_copy(update={"data": task.data.model_copy(update={"hub": hub})})
    key = content_hash(task, task_index, tokenizer_id, max_length, seed, validation_examples)
    out = cache_root / key
    summary_file = out / "summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    fmt = task_format(task, max_length)
    labels = list(task.verbalizers)
    summary = {"key": key, "path": str(out), "splits": {}, "revision": revision}
    tmp = staging_dir(out)
    train = load_split(task, "train", task_index, policy, cache_root / "hub")
    test = load_split(task, "test", task_index, policy, cache_root / "hub")
    train_rows, validation_rows, source = split_validation(task, task_index, train.rows, validation_examples, seed)
    splits = {"train": (train_rows, train.skipped), "validation": (validation_rows, Counter()),
              "test": (_limit(test.rows, task.max_test_examples, seed), test.skipped)}
    for split, (rows, skipped) in splits.items():
        encoded = [{"prompt_ids": encode_prompt(tokenizer, fmt, r["text"]), "label": labels.index(r["label"]),
                    "task": task_index} for r in rows]
        if encoded:  # `datasets` cannot read back an empty dataset: no validation folder means no slice
            datasets.Dataset.from_list(encoded).save_to_disk(str(tmp / split))
        summary["splits"][split] = {"rows": len(encoded), "skipped": dict(skipped)}
    summary["validation_source"] = source
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    if not publish_dir(tmp, out):  # another process (a concurrent Tune trial) prepared the same task meanwhile
        return json.loads(summary_file.read_text())
    return summary


def load_prepared(path: str, split: str) -> list[dict]:
    """A prepared split's encoded rows; the validation slice may be empty (no folder)."""
    if split == "validation" and not (Path(path) / split).exists():
        return []
    return datasets.load_from_disk(str(Path(path) / split)).to_list()
