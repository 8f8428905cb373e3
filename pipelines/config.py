"""The run config: one YAML file, validated before anything starts, hashed for identity.

Every error names the field (`tasks[1].data.train`) and the problem, and is raised before Ray
starts or any model loads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, \
    model_validator

from cl_core.methods import METHODS, Method, MethodParams, build_method, method_params
from cl_core.base_model import ModelSpec, gguf_location, hidden_size_of
from pipelines.digest import tree_digest

# Run and task names become folder names (`<run>-<hash>/`, `banks/task<i>-<name>/`): no path
# separators, no leading dot.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class ConfigError(ValueError):
    """A run config that cannot run; the message names the file, field and problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def safe_name(value: str) -> str:
    if not re.fullmatch(SAFE_NAME, value):
        raise ValueError(f"{value!r}: use letters, digits, '_', '-' and '.' (not first), at most 100 "
                         f"characters: it names a folder")
    return value


class SyntheticData(Strict):
    """Generated word-block data for tiny models (see cl_core.synthetic)."""

    n_train: int = Field(64, gt=0, description="generated training rows")
    n_test: int = Field(32, gt=0, description="generated test rows")
    seed: int = Field(0, description="seed of the generator")


class HubData(Strict):
    """A `datasets` dataset by name (users with internet access)."""

    dataset: str = Field(description="the dataset's name on the hub")
    config: str | None = Field(None, description="its configuration, where it has several")
    train_split: str = Field("train", description="the split trained on (validation rows come from it too)")
    test_split: str = Field("test", description="the split tested on")
    revision: str | None = Field(None, min_length=1, description="a branch, tag or commit; pinned to its commit "
                                                                 "when prepared")


class TaskData(Strict):
    """Where a task's rows come from: exactly one of train+test files, `hub` or `synthetic`."""

    train: str | None = Field(None, description="training file (JSONL, CSV or Parquet), relative to the config")
    test: str | None = Field(None, description="test file, as `train`")
    hub: HubData | None = Field(None, description="a `datasets` dataset instead of files")
    synthetic: SyntheticData | None = Field(None, description="generated data instead of files (tiny models)")

    @model_validator(mode="after")
    def _one_source(self):
        sources = [s for s in ("files", "hub", "synthetic")
                   if (s == "files" and (self.train or self.test)) or (s != "files" and getattr(self, s))]
        if len(sources) != 1:
            raise ValueError("give exactly one data source: train+test files, hub, or synthetic")
        if sources == ["files"] and not (self.train and self.test):
            raise ValueError("file data needs both 'train' and 'test'")
        return self


class TaskConfig(Strict):
    """One task of the sequence, in training order."""

    name: str = Field(min_length=1, description="names its folders: letters, digits, `_`, `-`, `.` (not first)")
    data: TaskData = Field(description="where its rows come from")
    text_field: str = Field("text", description="the rows' field holding the text")
    label_field: str = Field("label", description="the rows' field holding the label")
    labels: dict[str, str] | list[str] = Field(
        description="the label values; a mapping gives the words the model answers with per value, a list "
                    "answers with the values as they are; at least 2")
    template: str = Field("{text}\nCategory (one of: {labels}):",
                          description="the prompt; must hold `{text}`, may hold `{labels}`")
    max_train_examples: int | None = Field(None, gt=0, description="train on at most this many rows (null: all); "
                                                                   "validation rows come from those beyond it")
    max_test_examples: int | None = Field(None, gt=0, description="test on at most this many rows (null: all)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        return safe_name(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if len(v) < 2:
            raise ValueError("a task needs at least 2 labels")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v):
        if "{text}" not in v:
            raise ValueError("template must contain '{text}'")
        return v

    @property
    def verbalizers(self) -> dict[str, str]:
        return {str(k): str(k) for k in self.labels} if isinstance(self.labels, list) else dict(self.labels)


class MethodConfig(Strict):
    """The continual-learning method and its parameters (see docs/methods.md)."""

    name: str = Field("moe_cl", description="a registered method (listed below)")
    # As written in the config (what the run id hashes); checked by the method's own params model.
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the method's own parameters, checked by its parameter model (below)")
    _validated: MethodParams | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; available: {sorted(METHODS)}")
        return v

    @field_validator("params")
    @classmethod
    def _typed(cls, v, info: ValidationInfo):
        if "name" in info.data:  # else the name's own error says what is wrong
            method_params(info.data["name"], v)  # a ValidationError here is reported under method.params
        return v

    @model_validator(mode="after")
    def _keep_validated(self):
        self._validated = method_params(self.name, self.params)
        return self

    def build(self, task_labels: list[Iterable[str]] | None = None) -> Method:
        return build_method(self.name, self._validated, task_labels)


class BankSection(Strict):
    """The LoRA experts of the bank."""

    rank: int = Field(8, gt=0, description="LoRA rank of every expert; at most the model's hidden size")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the delta is scaled by alpha / rank)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout on the experts' inputs")
    top_k: int | None = Field(None, gt=0, description="experts per token for a learned router (null: all); at "
                                                      "most the experts a layer holds")


class TrainingConfig(Strict):
    """Each task's train stage."""

    epochs: int = Field(1, gt=0, description="passes over the task's training rows")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(8, gt=0, description="examples per optimizer step, over all workers")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_length: int = Field(128, gt=8, description="tokens per example (prompt and answer); longer texts are cut")
    seed: int = Field(0, description="experts' initialisation, the training sample and order, the test sample")
    checkpoint_every: int = Field(50, gt=0, description="optimizer steps between Ray Train checkpoints")
    precision: Literal["auto", "fp32", "bf16-mixed"] = Field(
        "auto", description="bf16-mixed: bf16 compute, float32 trainable tensors and optimizer state; auto: "
                            "bf16-mixed where the training device has native bf16, else fp32 (cl_core.precision)")


class DeepSpeedConfig(Strict):
    """The DeepSpeed engine of each train stage."""

    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage")
    config: str | None = Field(None, description="a DeepSpeed JSON (templates in cluster/); its ZeRO section wins "
                                                 "over zero_stage; no bf16/fp16 section")
    offload: bool = Field(False, description="ZeRO offload of the optimizer state to CPU memory")
    persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3 keeps parameters under this many elements whole on every rank (null: "
                                "DeepSpeed's 1e5, which leaves a tiny model unpartitioned)")
    # The JSON's content, read when the config is loaded: workers on any node use it, and the run's
    # identity hashes it (not the path, which depends on where the repository is mounted).
    _content: dict | None = PrivateAttr(None)

    def settings(self) -> dict | None:
        """The DeepSpeed JSON's content (a copy), or None where none is given."""
        if self.config is None:
            return None
        if self._content is None:
            self._content = json.loads(Path(self.config).read_text())
        return copy.deepcopy(self._content)


class RayConfig(Strict):
    """Where and on what the stages run."""

    address: str | None = Field(None, description="a Ray cluster's address (null: $RAY_ADDRESS, which `ray job "
                                                  "submit` sets, else a local Ray started in-process)")
    num_workers: int = Field(1, gt=0, description="Ray Train workers of a train stage")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker")
    max_failures: int = Field(1, ge=0, description="restarts of a crashed train stage from its last checkpoint")
    evaluate_resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources each evaluation asks for, e.g. {node2: 0.1}: evaluations "
                                          "run on the nodes that have them; not part of the run's identity")


class MlflowConfig(Strict):
    """Where the run is tracked."""

    tracking_uri: str | None = Field(None, description="an MLflow tracking URI (null: sqlite under --storage)")
    experiment: str = Field("clpipe", description="the MLflow experiment")


class EvalConfig(Strict):
    """Each task's evaluate stage."""

    task_id: Literal["oracle", "inferred", "both"] = Field(
        "oracle", description="oracle: the true task id is given; inferred: the method locates the task (methods "
                              "that route without one); both: each")
    batch_size: int = Field(16, gt=0, description="examples per scoring batch (and per serving batch)")
    target_precision: float = Field(0.9, gt=0, le=1, description="the precision a label's decision threshold "
                                                                 "must reach (strip rate)")
    validation_examples: int = Field(
        100, ge=0, description="rows per task of the validation slice, held out of training (pipelines.data.tasks."
                               "split_validation): validation accuracy, decision thresholds and Tune's scores read "
                               "it; 0: none")


class DataPolicy(Strict):
    """What to do with bad input rows."""

    on_bad_rows: Literal["error", "skip"] = Field("error", description="error: stop naming the row; skip: drop "
                                                                      "it and log the count")
    max_text_chars: int = Field(100_000, gt=0, description="a longer text is a bad row (texts are cut to "
                                                           "training.max_length tokens anyway)")


class RunConfig(Strict):
    """A run: a base model, a task sequence and how to train and evaluate it."""

    name: str = Field("run", description="the run's name; its folder is `<name>-<config hash>`")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the frozen base model")
    tasks: list[TaskConfig] = Field(min_length=1, description="the task sequence, in training order; tasks "
                                                              "appended later continue the run")
    objective: Literal["lm", "head"] = Field(
        "lm", description="lm: the answer's words, loss on them, scored by label log-likelihood; head: a "
                          "classification head per task")
    method: MethodConfig = Field(default_factory=MethodConfig, description="the continual-learning method")
    bank: BankSection = Field(default_factory=BankSection, description="the LoRA experts")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="each task's training")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray resources")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="MLflow tracking")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    data: DataPolicy = Field(default_factory=DataPolicy, description="bad input rows")
    # The identity a run folder's ledger recorded (set by pipelines.run.results.read_run): a run read
    # back keeps its id where the files it was hashed from are gone (a folder moved to a server).
    _recorded_identity: str | None = PrivateAttr(None)
    # The model's content as first read, by its location: the id stays while the run runs.
    _model_content: tuple | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        return safe_name(v)

    @field_validator("model")
    @classmethod
    def _dtype_follows_precision(cls, model):
        # The stages load the base in the dtype and attention training.precision resolves to (see
        # materialize and cl_core.precision.base_settings).
        if model.dtype != "float32":
            raise ValueError("dtype: the base model's dtype follows training.precision (bf16-mixed stores it "
                             "in bfloat16): set that instead")
        if model.attention != "sdpa":
            raise ValueError("attention: the base model's attention follows training.precision (bf16-mixed "
                             "runs eager attention on a CPU): set that instead")
        return model

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks):
        seen = set()
        for i, t in enumerate(tasks):
            if t.name in seen:
                raise ValueError(f"tasks[{i}].name: duplicate task name {t.name!r}")
            seen.add(t.name)
        return tasks

    @model_validator(mode="after")
    def _objective_fits_method(self):
        if self.objective == "head" and METHODS[self.method.name].method.mixes_tasks:
            raise ValueError(f"objective: 'head' needs batches of one task; method {self.method.name} mixes "
                             f"tasks in a batch: use objective 'lm'")
        return self

    @model_validator(mode="after")
    def _top_k_fits(self):
        method = self.method.build()
        experts = method.experts_per_layer(len(self.tasks))
        if self.bank.top_k is not None and method.router == "learned" and experts is not None \
                and self.bank.top_k > experts:
            raise ValueError(f"bank.top_k: {self.bank.top_k} is more than the {experts} experts a layer of "
                             f"method {self.method.name} holds after {len(self.tasks)} tasks")
        return self

    @model_validator(mode="after")
    def _fits_capacity(self):
        # A method parameter `max_tasks` (MoE-CL's cap on task indices) is part of the run's identity:
        # a sequence longer than it is refused here, before any compute.
        capacity = getattr(self.method.build().params, "max_tasks", None)
        if capacity is not None and len(self.tasks) > capacity:
            raise ValueError(f"method.params.max_tasks: {self.method.name} holds at most {capacity} tasks and the "
                             f"sequence has {len(self.tasks)} (tasks[{capacity}] {self.tasks[capacity].name!r} does "
                             f"not fit); a larger max_tasks is a new run (method parameters are part of its identity)")
        return self

    def identity_hash(self) -> str:
        """Hash of everything that shapes the results except the task list, so that a run can have
        tasks appended (pipelines.run.sequence identifies each task's stages); where a run runs and is
        tracked does not count. Files count by their content (a DeepSpeed JSON parsed, a local model's
        files by their sha256), not by where the repository or the storage is mounted."""
        if self._recorded_identity is not None:
            return self._recorded_identity
        payload = self.model_dump(exclude={"ray": {"address", "evaluate_resources"}, "mlflow": True, "tasks": True})
        payload["deepspeed"]["config"] = self.deepspeed.settings()
        where = (self.model.kind, self.model.path, self.model.gguf_file)
        if self._model_content is None or self._model_content[0] != where:
            self._model_content = (where, model_content(self.model))
        payload["model"]["path"] = self._model_content[1]
        if payload["model"]["revision"] is None:  # a run without one keeps the id it had before the field
            del payload["model"]["revision"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def run_id(self) -> str:
        return f"{self.name}-{self.identity_hash()[:10]}"


def model_content(spec: ModelSpec) -> str | dict | None:
    """What identifies the base model's weights: a local directory or GGUF file by its files'
    digest, a hub id (with its `revision`) as it is written, None for the kinds without a path."""
    if spec.kind not in ("hf", "gguf") or not Path(spec.path).exists():
        return spec.path
    if spec.kind == "gguf":
        directory, name = gguf_location(spec)
        return {"sha256": tree_digest(Path(directory) / name)}
    return {"sha256": tree_digest(Path(spec.path))}


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")  # a whole-config check names its fields
    return "\n".join(lines)


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Relative data and model paths are relative to the config file; all must exist."""
    def resolve(value: str, field: str) -> str:
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else (base / path).resolve()
        if not path.exists():
            raise ConfigError(f"{field}: file not found: {path}")
        return str(path)

    for i, task in enumerate(cfg.tasks):
        for split in ("train", "test"):
            value = getattr(task.data, split)
            if value is not None:
                setattr(task.data, split, resolve(value, f"tasks[{i}].data.{split}"))
    if cfg.model.kind in ("hf", "gguf") and (base / cfg.model.path).exists():
        cfg.model.path = str((base / cfg.model.path).resolve())
    if cfg.model.kind == "hf" and cfg.model.revision is not None and Path(cfg.model.path).exists():
        raise ConfigError(f"model.revision: {cfg.model.path} is a local directory; a revision pins a hub model id")
    if cfg.model.kind == "gguf" and not Path(cfg.model.path).exists():
        raise ConfigError(f"model.path: file not found: {cfg.model.path}")
    if cfg.deepspeed.config is not None:
        cfg.deepspeed.config = resolve(cfg.deepspeed.config, "deepspeed.config")
        try:
            ds = cfg.deepspeed.settings()
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config: {cfg.deepspeed.config}: not valid JSON ({e})") from e
        for section in ("bf16", "fp16"):
            if isinstance(ds, dict) and (ds.get(section) or {}).get("enabled"):
                raise ConfigError(f"deepspeed.config: {cfg.deepspeed.config}: remove the '{section}' section; "
                                  f"set training.precision instead (DeepSpeed would cast the trainable "
                                  f"experts to 16 bits)")


def parse_config(data: dict, source: str = "<config>", base: Path | None = None) -> RunConfig:
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None
    try:
        _resolve_paths(cfg, base or Path.cwd())
        _check_model_bounds(cfg)
    except (ConfigError, ModuleNotFoundError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _check_model_bounds(cfg: RunConfig) -> None:
    """What the base model fixes, read without loading it (tiny: the config; a local HF directory:
    config.json; GGUF: the file's metadata; a hub id: nothing until the model stage loads it)."""
    hidden = hidden_size_of(cfg.model)  # smollm2: fails here if the package is missing
    if hidden is not None and cfg.bank.rank > hidden:
        raise ConfigError(f"bank.rank: {cfg.bank.rank} is more than the model's hidden size {hidden}")


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    data = read_yaml_mapping(path)
    return parse_config(data, str(path), path.parent)
