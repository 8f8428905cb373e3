"""A run can have tasks appended; a task it has started cannot change, move or go (fails before compute)."""

import json

import pytest

from pipelines.cli import main
from pipelines.config import ConfigError, parse_config
from pipelines.run.driver import Driver
from pipelines.run.sequence import SequenceError
from tests.conftest import tiny_run


def _files_task(tmp_path, name="files", text="w21 w22"):
    rows = [{"text": f"{text} {i}", "label": "w21" if i % 2 else "w22"} for i in range(8)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": name, "data": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
            "labels": ["w21", "w22"]}


def _with_tasks(run: dict, tasks: list[dict]) -> dict:
    return {**run, "tasks": tasks}


def test_run_id_ignores_the_task_list_and_fingerprints_grow_by_prefix():
    two, three = parse_config(tiny_run("s", tasks=2)), parse_config(tiny_run("s", tasks=3))
    assert two.run_id == three.run_id
    assert parse_config(tiny_run("s", tasks=2, training={"lr": 0.5})).run_id != two.run_id
    from pipelines.run.sequence import task_records
    a, b = task_records(two), task_records(three)
    assert [r["fingerprint"] for r in a] == [r["fingerprint"] for r in b[:2]]
    assert len({r["fingerprint"] for r in b}) == 3


def test_changed_moved_or_removed_task_is_refused_before_compute(tmp_path):
    storage = tmp_path / "runs"
    run = tiny_run("s", tasks=2)
    run["tasks"].append(_files_task(tmp_path))
    Driver(parse_config(run), storage, print).lease.release()  # records the 3 tasks; runs nothing
    run_dir = storage / parse_config(run).run_id
    def written():  # the run's files, not the lease's record of who last held it
        return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "driver.lease"}

    before = written()

    changed = _with_tasks(run, [*run["tasks"][:1], {**run["tasks"][1], "template": "{text} ->"}, run["tasks"][2]])
    with pytest.raises(SequenceError, match=r"tasks\[1\] 'task1' \(started, not trained yet\) changed: template\. "
                                            r".*give the run a new name"):
        Driver(parse_config(changed), storage, print)
    with pytest.raises(SequenceError, match=r"tasks\[0\] 'task0' .* moved to position 1"):
        Driver(parse_config(_with_tasks(run, [run["tasks"][1], run["tasks"][0], run["tasks"][2]])), storage, print)
    with pytest.raises(SequenceError, match=r"tasks\[2\] 'files' .* was removed"):
        Driver(parse_config(_with_tasks(run, run["tasks"][:2])), storage, print)
    _files_task(tmp_path, text="w23 w24")  # same path and fields, other rows
    with pytest.raises(SequenceError, match=r"tasks\[2\] 'files' .* changed: data"):
        Driver(parse_config(run), storage, print)
    assert written() == before  # nothing written


def test_cli_run_of_a_changed_task_exits_2_naming_it(tmp_path, capsys):
    import yaml

    run = tiny_run("s", tasks=2)
    Driver(parse_config(run), tmp_path, print).lease.release()  # records the tasks; runs nothing
    run["tasks"][0]["labels"] = ["w1", "w9"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    assert main(["run", str(config), "--storage", str(tmp_path)]) == 2
    assert "tasks[0] 'task0' (started, not trained yet) changed: labels" in capsys.readouterr().err


def test_a_sequence_longer_than_moe_cl_capacity_is_refused():
    with pytest.raises(ConfigError, match=r"method.params.max_tasks: moe_cl holds at most 2 tasks and the sequence "
                                          r"has 3 \(tasks\[2\] 'task2' does not fit\)"):
        parse_config(tiny_run("s", tasks=3, method={"name": "moe_cl", "params": {"max_tasks": 2}}))
    assert parse_config(tiny_run("s", tasks=2, method={"name": "moe_cl", "params": {"max_tasks": 2}}))
