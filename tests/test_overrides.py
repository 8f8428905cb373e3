"""`clpipe run|validate|tune CONFIG key=value ...`: dotted-path overrides set before validation."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config as load_file
from pipelines.overrides import check_path, load_config, parse_overrides, set_path
from pipelines.search.space import load_search

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_values_are_yaml_scalars_and_exponents_are_numbers():
    assert parse_overrides(["training.lr=5e-4", "training.epochs=3", "ray.address=null", "name=x1",
                            "training.precision=fp32", "tasks.0.labels=[a, b]", "ray.use_gpu=true"]) == {
        "training.lr": 0.0005, "training.epochs": 3, "ray.address": None, "name": "x1",
        "training.precision": "fp32", "tasks.0.labels": ["a", "b"], "ray.use_gpu": True}


def test_an_override_is_validated_and_changes_the_run_id_where_the_field_counts():
    base = load_config(TINY)
    assert base.run_id == load_file(TINY).run_id  # no override: the file as it is
    lr = load_config(TINY, parse_overrides(["training.lr=5e-4"]))
    assert lr.training.lr == 0.0005 and lr.run_id != base.run_id
    deep = load_config(TINY, parse_overrides(["method.params.adv_weight=0.2", "tasks.1.max_train_examples=16"]))
    assert deep.method.params["adv_weight"] == 0.2 and deep.tasks[1].max_train_examples == 16
    assert deep.tasks[0].max_train_examples is None and deep.run_id != base.run_id
    # where a run is tracked is not part of its identity
    assert load_config(TINY, parse_overrides(["mlflow.experiment=other"])).run_id == base.run_id
    with pytest.raises(ConfigError, match=r"training\.lr=-1.*training\.lr: Input should be greater than 0"):
        load_config(TINY, parse_overrides(["training.lr=-1"]))
    with pytest.raises(ConfigError, match=r"method\.params\.adv_wieght: unknown field"):
        load_config(TINY, parse_overrides(["method.params.adv_wieght=1"]))


@pytest.mark.parametrize("pair, message", [
    ("training.lrr=0.5", "override training.lrr=0.5: training.lrr: unknown field; training has epochs, lr,"),
    ("tasks.first.name=a", "tasks.first: tasks is a list; index it with a number"),
    ("training.lr.x=1", "training.lr: is a value, not a section"),
    ("lr", "'lr': an override is key=value"),
    ("=3", "'=3': an override is key=value"),
])
def test_a_bad_path_is_named_before_the_config_is_read(pair, message):
    with pytest.raises(ConfigError) as e:
        parse_overrides([pair])
    assert message in str(e.value)


def test_set_path_indexes_lists_and_refuses_a_missing_item():
    data = {"tasks": [{"name": "a"}], "training": None}
    set_path(data, "tasks.0.max_train_examples", 8)
    set_path(data, "training.lr", 0.1)
    assert data == {"tasks": [{"name": "a", "max_train_examples": 8}], "training": {"lr": 0.1}}
    with pytest.raises(ConfigError, match=r"tasks\.3: no item 3 \(the list has 1\)"):
        set_path(data, "tasks.3.name", "b")
    check_path("method.params.anything")  # free-form: left to the method's own parameter model


def test_tune_reads_the_run_config_with_the_overrides(tmp_path):
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"space": {"method.params.adv_weight": {"grid": [0.0, 0.1]}}}))
    _, base_data, base_cfg = load_search(search, TINY, parse_overrides(["training.lr=5e-4"]))
    assert base_data["training"]["lr"] == 0.0005 and base_cfg.training.lr == 0.0005
    with pytest.raises(ConfigError, match=r"training\.lr: Input should be greater than 0"):
        load_search(search, TINY, parse_overrides(["training.lr=0"]))


def clpipe(command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """As a person types it: a shell line with the installed `clpipe` script."""
    script = Path(sys.executable).parent / "clpipe"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp_path / "ray")}
    return subprocess.run(f"{shlex.quote(str(script))} {command}", shell=True, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_the_cli_from_a_shell(tmp_path):
    changed = clpipe("validate configs/tiny.yaml training.lr=0.5 --storage runs", tmp_path)
    assert changed.returncode == 0, changed.stderr
    run_id = changed.stdout.split("run id ")[1].split(";")[0]
    assert run_id == load_config(TINY, {"training.lr": 0.5}).run_id != load_file(TINY).run_id
    typo = clpipe("validate configs/tiny.yaml training.lrr=0.5", tmp_path)
    assert typo.returncode == 2
    assert "clpipe: error: override training.lrr=0.5: training.lrr: unknown field" in typo.stderr
    assert not (tmp_path / "ray").exists()  # refused before Ray started
