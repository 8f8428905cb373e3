"""Bad run configs and bad data fail before any compute, with the field and the problem named."""

import json

import pytest

from pipelines.config import ConfigError, load_config, parse_config
from pipelines.run.driver import check_data
from pipelines.data.tasks import DataError


def _task(name="a", **data):
    return {"name": name, "data": data or {"synthetic": {}}, "labels": ["w1", "w2"]}


def _write(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_good_config_hashes_stably_and_ignores_where_it_runs():
    a = parse_config({"tasks": [_task()]})
    b = parse_config({"tasks": [_task()], "ray": {"address": "ray://x:10001"}, "mlflow": {"experiment": "other"}})
    c = parse_config({"tasks": [_task()], "training": {"lr": 0.5}})
    assert a.run_id == b.run_id != c.run_id
    assert a.run_id.startswith("run-") and len(a.identity_hash()) == 64


@pytest.mark.parametrize("data, message", [
    ({"tasks": [_task()], "trainng": {}}, "trainng: unknown field"),
    ({"tasks": [_task()], "training": {"lr": 0.1, "epoch": 2}}, "training.epoch: unknown field"),
    ({"tasks": [_task(), _task()]}, "tasks[1].name: duplicate task name 'a'"),
    ({"tasks": []}, "tasks: List should have at least 1 item"),
    ({"tasks": [_task()], "deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage: Input should be less than or equal to 3"),
    ({"tasks": [_task()], "method": {"name": "magic"}}, "method.name: unknown method 'magic'"),
    ({"tasks": [{**_task(), "labels": ["only"]}]}, "tasks[0].labels: a task needs at least 2 labels"),
    ({"tasks": [{**_task(), "template": "no slot"}]}, "tasks[0].template: template must contain '{text}'"),
    ({"tasks": [_task(train="x.jsonl")]}, "tasks[0].data: file data needs both 'train' and 'test'"),
    ({"tasks": [_task()], "model": {"kind": "hf"}}, "model.path is required for kind 'hf'"),
])
def test_bad_config_names_field_and_problem(data, message):
    with pytest.raises(ConfigError) as e:
        parse_config(data, "run.yaml")
    assert message in str(e.value) and str(e.value).startswith("run.yaml: ")


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks\[0\].data.train: file not found: .*nope.jsonl"):
        parse_config({"tasks": [_task(train="nope.jsonl", test="nope.jsonl")]}, "run.yaml", tmp_path)


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("tasks: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_label_in_data_but_not_in_verbalisers(tmp_path):
    train = _write(tmp_path, [{"text": "x", "label": "w1"}, {"text": "y", "label": "w9"}])
    cfg = parse_config({"tasks": [_task(train=train, test=train)]}, "run.yaml", tmp_path)
    with pytest.raises(DataError, match=r"train.jsonl: row 2: field 'label': 'w9' is not one of the task's labels"):
        check_data(cfg)


def test_empty_task_data(tmp_path):
    train = _write(tmp_path, [])
    cfg = parse_config({"tasks": [_task(train=train, test=train)]}, "run.yaml", tmp_path)
    with pytest.raises(DataError, match="no usable rows"):
        check_data(cfg)
