"""Hub revisions (config validation and the local path; nothing downloads) and credentials kept out
of everything clpipe logs, uploads or prints."""

from pathlib import Path

import pytest

from cl_core.base_model import load_tokenizer
from pipelines.config import ConfigError, DataPolicy, load_config, parse_config
from pipelines.credentials import without_credentials
from pipelines.data.hub import LOCAL, is_hub_model
from pipelines.data.tasks import prepare_task
from pipelines.tracking import flatten

TASK = {"name": "a", "data": {"synthetic": {"n_train": 16, "n_test": 8}}, "labels": ["w1", "w2"]}


def test_credentials_are_stripped_from_every_uri_in_a_text_or_a_config():
    uri = "https://alice:s3cr%40t@mlflow.example.org:5000/api?api_token=abc&experiment=1"
    assert without_credentials(uri) == "https://mlflow.example.org:5000/api?api_token=***&experiment=1"
    assert without_credentials(f"MLflow at {uri} is down") == \
        "MLflow at https://mlflow.example.org:5000/api?api_token=***&experiment=1 is down"
    config = {"mlflow": {"tracking_uri": "http://bob:pw@host/"}, "ray": {"address": "ray://u@head:10001"},
              "tasks": [{"name": "a"}], "training": {"lr": 0.01}}
    assert without_credentials(config) == {"mlflow": {"tracking_uri": "http://host/"},
                                           "ray": {"address": "ray://head:10001"}, "tasks": [{"name": "a"}],
                                           "training": {"lr": 0.01}}
    assert flatten(config)["mlflow.tracking_uri"] == "http://host/"  # the parent run's params
    assert without_credentials("sqlite:////runs/mlflow.db") == "sqlite:////runs/mlflow.db"


def test_revision_is_validated_and_part_of_a_hub_models_identity(tmp_path):
    with pytest.raises(ConfigError, match="model.revision: only a hub model"):
        parse_config({"tasks": [TASK], "model": {"kind": "tiny", "revision": "main"}})
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ConfigError, match="model.revision: .* is a local directory"):
        parse_config({"tasks": [TASK], "model": {"kind": "hf", "path": str(tmp_path), "revision": "v1"}})
    with pytest.raises(ConfigError, match="revision: String should have at least 1 character"):
        parse_config({"tasks": [{**TASK, "data": {"hub": {"dataset": "x/y", "revision": ""}}}]})
    hub = {"kind": "hf", "path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    ids = {parse_config({"tasks": [TASK], "model": {**hub, **r}}).run_id for r in ({}, {"revision": "v1"}, {"revision": "v2"})}
    assert len(ids) == 3
    assert is_hub_model("hf", hub["path"]) and not is_hub_model("hf", str(tmp_path)) and not is_hub_model("tiny", None)
    # A config without a revision keeps the run id it had before the field existed.
    assert load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml").run_id == "tiny-0991274715"


def test_local_data_records_that_it_has_no_hub_commit(tmp_path):
    cfg = parse_config({"tasks": [TASK]})
    summary = prepare_task(cfg.tasks[0], 0, load_tokenizer(cfg.model), cfg.model.source, 32, 0, DataPolicy(),
                           tmp_path, 4)
    assert summary["revision"] == LOCAL and summary["splits"]["train"]["rows"] == 16
