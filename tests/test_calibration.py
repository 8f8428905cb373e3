"""Calibrated decision thresholds, the validation slice, and `clpipe predict`'s input errors
(all checked before any model loads)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from cl_core.metrics import calibrated_thresholds, decisions_at, strip_rate
from pipelines.cli import main
from pipelines.config import parse_config
from pipelines.data.tasks import _limit, load_split, split_validation
from tests.conftest import TINY, tiny_run

# Label 1's scores in descending order 0.9 0.8 0.7 0.6 0.4 with truth 1 1 0 1 0: precision
# 1/1, 2/2, 2/3, 3/4, 3/5, so at target 0.75 the lowest precise threshold is 0.6. Label 0's
# 0.6 0.4 0.3 0.2 0.1 with truth 1 0 1 0 0: precision 1/1, 1/2, 2/3, ...: only 0.6.
PROBS = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
LABELS = np.array([1, 1, 0, 1, 0])


def test_thresholds_are_the_lowest_reaching_the_target_precision():
    assert calibrated_thresholds(PROBS, LABELS, 0.75) == [0.6, 0.6]
    assert calibrated_thresholds(PROBS, LABELS, 1.0) == [0.6, 0.8]
    # A label absent from the slice gets no threshold: it is never decided.
    assert calibrated_thresholds(PROBS, np.ones(5, dtype=int), 0.75) == [None, 0.4]


def test_fixed_thresholds_on_other_samples():
    # p0 >= 0.6 decides row 1 as 0 (right); p1 >= 0.6 decides rows 0 (right) and 3 (wrong).
    probs = np.array([[0.3, 0.7], [0.65, 0.35], [0.5, 0.5], [0.2, 0.8]])
    decided = decisions_at(probs, np.array([1, 0, 1, 0]), [0.6, 0.6])
    assert decided.strip_rate.per_label == {0: 0.5, 1: 0.5}
    assert decided.precision == pytest.approx(2 / 3)
    nothing = decisions_at(probs, np.array([1, 0, 1, 0]), [None, None])
    assert nothing.strip_rate.macro == 0.0 and nothing.precision is None


def test_test_chosen_strip_rate_is_what_its_own_thresholds_decide():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=200)
    labels = np.where(rng.random(200) < 0.7, probs.argmax(1), rng.integers(0, 3, 200))
    chosen = calibrated_thresholds(probs, labels, 0.8)
    assert decisions_at(probs, labels, chosen).strip_rate == strip_rate(probs, labels, 0.8)
    assert decisions_at(probs, labels, chosen).precision >= 0.8


def _file_task(tmp_path, n: int, **extra):
    rows = [{"text": f"text {i}", "label": "ham" if i % 2 else "spam"} for i in range(n)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config({"tasks": [{"name": "a", "data": {"train": str(path), "test": str(path)},
                                   "labels": ["spam", "ham"], **extra}]}, "run.yaml", tmp_path)
    return cfg, load_split(cfg.tasks[0], "train", 0, cfg.data).rows


def test_validation_slice_comes_from_rows_beyond_max_train_examples(tmp_path):
    cfg, rows = _file_task(tmp_path, 50, max_train_examples=30)
    train, validation, source = split_validation(cfg.tasks[0], 0, rows, 64, seed=3)
    assert source == "beyond max_train_examples"
    assert train == _limit(rows, 30, 3)  # the examples trained on do not change
    assert len(validation) == 20 and not {r["text"] for r in validation} & {r["text"] for r in train}


def test_validation_slice_is_held_out_when_nothing_is_beyond(tmp_path):
    cfg, rows = _file_task(tmp_path, 50)
    train, validation, source = split_validation(cfg.tasks[0], 0, rows, 64, seed=3)
    assert source == "held out of training"
    assert (len(train), len(validation)) == (40, 10)  # at most a fifth is held out
    assert sorted(r["text"] for r in train + validation) == sorted(r["text"] for r in rows)


def test_synthetic_task_gets_fresh_validation_rows():
    cfg = parse_config(tiny_run())
    rows = load_split(cfg.tasks[0], "train", 0, cfg.data).rows
    train, validation, source = split_validation(cfg.tasks[0], 0, rows, 16, seed=0)
    assert (source, train, len(validation)) == ("generated", rows, 16)
    assert validation != load_split(cfg.tasks[0], "test", 0, cfg.data).rows[:16]


# -- clpipe predict: input errors, before the model loads -------------------------------------------
@pytest.fixture
def fake_run(tmp_path):
    """A run whose ledger has task0's bank (the bank files are never read by these tests)."""
    cfg = parse_config(tiny_run(data={"max_text_chars": 50}))
    run_dir = tmp_path / cfg.run_id
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    stages = {"model": {"outputs": {"spec": TINY.__dict__, "precision": "fp32"}},
              "task0/bank": {"outputs": {"path": str(run_dir / "banks" / "task0-task0"), "sha256": "0" * 64}},
              "task0/evaluate": {"outputs": {}}}
    (run_dir / "ledger.json").write_text(json.dumps({"config_hash": cfg.identity_hash(), "stages": stages}))
    return tmp_path, cfg.run_id


CASES = [
    ("no task", [{"text": "w1 w2"}], [], r"line 1: field 'task': missing; method moe_cl needs a task id"),
    ("unknown task", [{"text": "w1", "task": "task1"}], [],
     r"line 1: field 'task': 'task1' is not a task of bank 'task0'; its tasks: \['task0'\]"),
    ("unknown field", [{"text": "w1", "task": "task0", "colour": 1}], [], r"line 1: field 'colour': unknown"),
    ("no text", [{"task": "task0"}], [], r"line 1: field 'text': missing"),
    ("text over the limit", [{"text": "w1 " * 20}], ["--task", "task0"],
     r"line 1: field 'text': 60 characters, over the run's data.max_text_chars 50"),
    ("unknown --task", [{"text": "w1"}], ["--task", "beta"], r"--task 'beta': not a task of bank 'task0'"),
    ("bank not durable", [{"text": "w1"}], ["--bank-of", "task1"], r"--bank-of 'task1': the run has no durable bank"),
    ("empty file", [], [], r"no rows \(empty file\)"),
]


@pytest.mark.parametrize("case, rows, flags, message", CASES, ids=[c[0] for c in CASES])
def test_predict_input_error_is_named(fake_run, tmp_path, capsys, case, rows, flags, message):
    storage, run_id = fake_run
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict", run_id, "--input", str(texts), "--storage", str(storage), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_predict_unknown_run(fake_run, tmp_path, capsys):
    storage, run_id = fake_run
    assert main(["predict", "nope", "--input", str(tmp_path / "x.jsonl"), "--storage", str(storage)]) == 2
    assert f"no run 'nope' under {storage}; runs there: ['{run_id}']" in capsys.readouterr().err
