"""MLflow tracking: one parent run per task sequence, one child run per stage.

Runs are found again by tags (`clpipe.run_id`, `clpipe.stage`), never created twice: a resumed
sequence logs into the runs it already has. Keys are the same for every method (`acc/<task>`,
`cl/AA`, `cl/BwT`, `cl/FwT`, `cl/forgetting`, `strip/<task>`, `train/loss`), so runs of
different methods compare side by side in the MLflow UI.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.config import TaskConfig
from pipelines.credentials import without_credentials

SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")
SEQUENCE, SEARCH = "sequence", "search"  # clpipe.kind of a task sequence's run and of a Tune search's run


# MLflow 3 opens an experiment in its GenAI view (traces) unless this tag says it trains models
# (the runs list, charts and comparisons); the UI's experiment-type selector sets the same tag.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION = "mlflow.note.content"  # what the UI shows and edits as a run's description


class TrackingError(RuntimeError):
    """MLflow cannot be reached or used; raised before any compute starts."""


def default_tracking_uri(storage: Path) -> str:
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested config → {"training.lr": "0.001", ...}; values that look like secrets are dropped."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif not any(m in key.upper() for m in SECRET_MARKERS):
            out[name] = without_credentials(str(value))[:500]
    return out


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """A tracking server must answer its health check now; MLflow's own client would retry for minutes."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow at {without_credentials(tracking_uri)} answered {response.status} to /health")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"MLflow at {without_credentials(tracking_uri)} is not reachable "
                            f"({without_credentials(str(e))}); start the server or set "
                            f"mlflow.tracking_uri to a reachable one (default: a sqlite store under --storage)") from None


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, storage: Path):
        self.uri = tracking_uri
        check_reachable(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                # With the local sqlite default, artifacts live next to the database.
                location = (Path(storage).resolve() / "mlartifacts").as_uri() if tracking_uri.startswith("sqlite:") else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                                   tags={EXPERIMENT_KIND: MODEL_TRAINING})
            else:
                self.experiment_id = found.experiment_id
                if EXPERIMENT_KIND not in found.tags:  # a store from before; a kind chosen in the UI stays
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        except Exception as e:
            raise TrackingError(f"MLflow at {without_credentials(tracking_uri)} is not reachable or not usable: "
                                f"{without_credentials(str(e))}") from None

    def _find(self, tags: dict[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=2)
        return runs[0].info.run_id if runs else None

    def _reopen_or_create(self, name: str, tags: dict[str, str], params: dict[str, str],
                          extra_tags: dict[str, str] | None = None) -> str:
        """The run with these tags, marked running again, or a new one with the params."""
        existing = self._find(tags)
        if existing:
            self.client.update_run(existing, status="RUNNING")
            return existing
        run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, **(extra_tags or {})})
        entries = [Param(k, v[:500]) for k, v in sorted(params.items())]
        for start in range(0, len(entries), 100):
            self.client.log_batch(run.info.run_id, params=entries[start:start + 100])
        return run.info.run_id

    def parent_run(self, run_id: str, config: dict) -> str:
        """The sequence's run. Its task list is a tag, not params: params cannot change, and a run
        can have tasks appended."""
        params = flatten({k: v for k, v in config.items() if k != "tasks"})
        run = self._reopen_or_create(run_id, {"clpipe.run_id": run_id, "clpipe.kind": SEQUENCE}, params)
        self.client.set_tag(run, "clpipe.tasks", ", ".join(t["name"] for t in config["tasks"]))
        return run

    def search_run(self, search_id: str, params: dict[str, str], base_run_id: str) -> str:
        """A Tune search's run; its trials' sequence runs nest under it (see `nest`)."""
        return self._reopen_or_create(search_id, {"clpipe.kind": SEARCH, "clpipe.search_id": search_id},
                                      {**params, "base_run_id": base_run_id}, {"clpipe.base_run_id": base_run_id})

    def nest(self, run: str, parent: str, tags: dict[str, str]) -> None:
        """Show `run` under `parent` in the MLflow UI, with extra tags."""
        for key, value in {"mlflow.parentRunId": parent, **tags}.items():
            self.client.set_tag(run, key, value)

    def tag(self, run: str, key: str, value: str) -> None:
        self.client.set_tag(run, key, value)

    def params(self, run: str, params: dict[str, str]) -> None:
        """Params learnt as the run goes (e.g. the hub commit a revision resolved to); a rerun logs the same."""
        self.client.log_batch(run, params=[Param(k, without_credentials(v)) for k, v in sorted(params.items())])

    def close_sequence(self, run_id: str, status: str, tune_state: str) -> None:
        """A sequence that will not go on (a trial stopped early or failed): its runs still RUNNING
        end with `status` (KILLED, FAILED); the sequence run is tagged with the trial's state."""
        for run in self.client.search_runs([self.experiment_id], filter_string=f"tags.`clpipe.run_id` = '{run_id}'"):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status)
            if run.data.tags.get("clpipe.kind") == SEQUENCE:
                self.client.set_tag(run.info.run_id, "clpipe.tune_state", tune_state)

    def stage_run(self, parent: str, run_id: str, stage: str) -> str:
        tags = {"clpipe.run_id": run_id, "clpipe.stage": stage}
        existing = self._find(tags)
        if existing:
            return existing
        run = self.client.create_run(self.experiment_id, run_name=f"{run_id}/{stage}",
                                     tags={**tags, "mlflow.parentRunId": parent})
        return run.info.run_id

    def log(self, run: str, metrics: dict[str, float], step: int = 0) -> None:
        self.client.log_batch(run, metrics=[Metric(k, float(v), _now_ms(), step) for k, v in metrics.items()])

    def describe(self, run: str, markdown: str) -> None:
        self.client.set_tag(run, DESCRIPTION, markdown)

    def datasets(self, run: str, inputs: list[tuple[TaskConfig, str, str]]) -> None:
        """Log prepared splits as the run's dataset inputs: (task, prepared folder, split) each, with
        name `<task>/<split>`, the source the rows came from, digest, rows and schema."""
        import datasets
        from mlflow.data.huggingface_dataset import from_huggingface
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        entries = []
        for task, prepared, split in inputs:
            if not (Path(prepared) / split).exists():  # an empty validation slice is not written
                continue
            rows = datasets.load_from_disk(str(Path(prepared) / split))
            read_from = "train" if split == "validation" else split  # the slice is rows of the train split
            if task.data.hub is not None:
                hub = task.data.hub
                source = HuggingFaceDatasetSource(path=hub.dataset, config_name=hub.config,
                                                  split=getattr(hub, f"{read_from}_split"))
            else:  # the file the rows were read from; generated rows: the prepared folder
                source = getattr(task.data, read_from) or str(Path(prepared) / split)
            # Hints about schema inference and source resolution, on every stage; the schema is
            # inferred when the entity is made, so that is inside too.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = from_huggingface(rows, source=source, name=f"{task.name}/{split}", targets="label")
                # MlflowClient.log_inputs takes entities; mlflow.log_input converts the same way, for the active run only.
                entity = dataset._to_mlflow_entity()
            context = {"train": "training", "validation": "validation"}.get(split, "evaluation")
            entries.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        self.client.log_inputs(run, datasets=entries)

    def artifact(self, run: str, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(run, str(path), folder)

    def finish(self, run: str, ok: bool = True) -> None:
        self.client.set_terminated(run, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def _now_ms() -> int:
    return int(time.time() * 1000)


def warn(message: str) -> None:
    print(f"[clpipe] warning: {without_credentials(message)}", file=sys.stderr, flush=True)
