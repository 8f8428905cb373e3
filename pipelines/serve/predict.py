"""`clpipe predict`: classify new texts with a run's bank, as its evaluate stage does.

The base model and a bank of the run are built as the evaluate stage builds them
(`build_stage`), each text is formatted with its task's template as data preparation formats
it, and the label probabilities come from `cl_core.training.predict_probs`, the loop the
evaluate stage scores: on the same examples, in the same batches, the probabilities are equal.

A row is {"text": …, "task": …, "id": …} (task and id optional). Without a task, a method that
routes without one locates it (each text is formatted with every task's template of the bank
and the located tasks vote; ties go to the earlier task) and routes as the evaluate stage's
`inferred` mode does; a method that needs a task id refuses the row.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_core.methods import METHODS
from cl_core.base_model import ModelSpec
from cl_core.objectives import collate_prompts, encode_prompt
from cl_core.precision import base_settings
from cl_core.training import predict_probs, to_device
from pipelines.assembly import build_stage, materialize_base_model
from pipelines.run.calibration import load_thresholds
from pipelines.run.ledger import MODEL, Ledger, StageKey
from pipelines.run.results import latest_bank, read_run
from pipelines.config import RunConfig
from pipelines.data.tasks import task_format

PROGRESS_MIN_ROWS = 256  # inputs at least this long get a progress bar


class PredictError(ValueError):
    """A bad run, bank, task or input row; the message names it, and `field` the row's field at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Query:
    """One checked input row: `task` is the index in the run's tasks, None to locate it."""

    text: str
    task: int | None
    id: Any = None


def bank_task(cfg: RunConfig, ledger: Ledger, bank_of: str | None) -> int:
    """The task whose bank to use: `bank_of` (a task name) or the latest evaluated one."""
    names = [t.name for t in cfg.tasks]
    if bank_of is None:
        t = latest_bank(cfg, ledger)
        if t is None:
            raise PredictError(f"run {cfg.run_id}: no bank is durable and evaluated yet")
        return t
    if bank_of not in names:
        raise PredictError(f"--bank-of {bank_of!r}: not a task of run {cfg.run_id}; its tasks: {names}")
    t = names.index(bank_of)
    if not ledger.done(StageKey("bank", t)):
        raise PredictError(f"--bank-of {bank_of!r}: the run has no durable bank after this task yet")
    return t


def cpu_spec(model_outputs: dict) -> ModelSpec:
    """The base model as serving loads it, from the run's model stage outputs: serving computes on
    the CPU, so the base keeps the dtype it trained in, and its attention is the CPU's choice for
    that precision (a bf16 run trained on a GPU records sdpa, whose bf16 kernel on a CPU is slower
    than eager)."""
    cpu = base_settings(model_outputs["precision"], torch.device("cpu"))
    return ModelSpec(**model_outputs["spec"]).model_copy(update={"attention": cpu["attention"]})


def local_base(cfg: RunConfig, run_dir: Path, spec: ModelSpec) -> ModelSpec:
    """The run's base model where the run folder is now. A GGUF model was materialized into the
    storage's cache (pipelines.assembly.materialize_base_model); a run folder moved without that
    cache materializes it again into the cache beside it, from the configured model."""
    if spec.kind != "hf" or not Path(spec.path).is_absolute() or Path(spec.path).exists():
        return spec  # a hub id, or the base is where the ledger says
    try:
        found = materialize_base_model(cfg, run_dir.parent / "cache" / "models")
    except (OSError, ModuleNotFoundError, ValueError) as e:
        raise PredictError(f"run {cfg.run_id}: its base model {spec.path} is missing (a run folder moved without "
                           f"the storage's cache/models/), and the configured model {cfg.model.source} cannot be "
                           f"read here to materialize it again ({e}): copy that folder beside the run folder") from None
    if not Path(found.path).exists():  # a local model directory that is not here
        raise PredictError(f"run {cfg.run_id}: its base model {spec.path} is missing: copy it to that path")
    return found.model_copy(update={"dtype": spec.dtype, "attention": spec.attention})


class Predictor:
    """A run's base model + one of its banks, with the bank's decision thresholds.

    Rows are checked (`parse`) before the model loads, on first use of `stage`.
    """

    def __init__(self, run_dir: Path, bank_of: str | None = None):
        run_dir = Path(run_dir)
        cfg, ledger = read_run(run_dir)
        if not ledger.done(MODEL):
            raise PredictError(f"run {cfg.run_id}: its base model stage has not run yet")
        t = bank_task(cfg, ledger, bank_of)
        bank = ledger.outputs(StageKey("bank", t))
        base = local_base(cfg, run_dir, cpu_spec(ledger.outputs(MODEL)))
        self._setup(cfg, base, t, Path(bank["path"]), bank["sha256"])
        self.run_dir = run_dir

    @classmethod
    def of_bank(cls, cfg: RunConfig, base: ModelSpec, bank_task: int, bank_dir: Path, bank_sha256: str) -> Predictor:
        """The predictor of one bank outside its run folder (e.g. the bank an MLflow model carries)."""
        predictor = cls.__new__(cls)
        predictor._setup(cfg, base, bank_task, Path(bank_dir), bank_sha256)
        predictor.run_dir = None
        return predictor

    def _setup(self, cfg: RunConfig, base: ModelSpec, bank_task: int, bank_dir: Path, bank_sha256: str) -> None:
        self.cfg, self.base = cfg, base
        self.bank_task, self.bank_dir, self.bank_sha256 = bank_task, bank_dir, bank_sha256
        self.routable = METHODS[self.cfg.method.name].method.routable
        self.tasks = [t.name for t in self.cfg.tasks[: self.bank_task + 1]]
        self.formats = [task_format(t, self.cfg.training.max_length) for t in self.cfg.tasks]
        self.labels = [list(t.verbalizers) for t in self.cfg.tasks]
        self.thresholds = load_thresholds(self.bank_dir)
        self.fields = {"text", "task", "id"} | {f for t in self.cfg.tasks for f in (t.text_field, t.label_field)}

    @cached_property
    def stage(self):
        """Model, objective, method and tokenizer as the evaluate stage builds them; the base model
        in the dtype of the run's own spec, i.e. the one it trained in."""
        return build_stage(self.cfg, self.base, self.bank_dir)

    def describe(self) -> dict:
        return {"run": self.cfg.run_id, "bank": str(self.bank_dir), "bank_sha256": self.bank_sha256,
                "bank_after_task": self.tasks[-1], "tasks": self.tasks, "method": self.cfg.method.name,
                "thresholds": self.thresholds is not None}

    # -- input ---------------------------------------------------------------------------------
    def parse(self, row: Any, where: str, default_task: str | None = None) -> Query:
        """A checked row, or a PredictError naming `where` and the field."""
        if not isinstance(row, dict):
            raise PredictError(f"{where}: expected a JSON object with 'text' (and 'task'), got {type(row).__name__}")
        unknown = sorted(set(row) - self.fields)
        if unknown:
            raise PredictError(f"{where}: field {unknown[0]!r}: unknown; expected 'text', 'task', 'id'", unknown[0])
        name = row.get("task", default_task)
        if name is not None and name not in self.tasks:
            raise PredictError(f"{where}: field 'task': {name!r} is not a task of bank {self.tasks[-1]!r}; "
                               f"its tasks: {self.tasks}", "task")
        task = None if name is None else self.tasks.index(name)
        text_field = "text" if "text" in row or task is None else self.cfg.tasks[task].text_field
        text = row.get(text_field)
        if text is None:
            raise PredictError(f"{where}: field '{text_field}': missing", text_field)
        if not isinstance(text, str) or not text.strip():
            raise PredictError(f"{where}: field '{text_field}': empty or not a string", text_field)
        if len(text) > self.cfg.data.max_text_chars:
            raise PredictError(f"{where}: field '{text_field}': {len(text)} characters, over the run's "
                               f"data.max_text_chars {self.cfg.data.max_text_chars}", text_field)
        if task is None and not self.locates:
            need = "needs a task id" if not self.routable else "cannot tell the tasks of its bank apart"
            raise PredictError(f"{where}: field 'task': missing; method {self.cfg.method.name} {need} "
                               f"(one of {self.tasks}; --task sets it for every row)", "task")
        return Query(text=text, task=task, id=row.get("id"))

    def example(self, text: str, task: int) -> dict:
        """An encoded example as data preparation makes it; label -1: unknown."""
        return {"prompt_ids": encode_prompt(self.stage.tokenizer, self.formats[task], text), "label": -1,
                "task": task}

    # -- compute -------------------------------------------------------------------------------
    @cached_property
    def locates(self) -> bool:
        """Rows without a task can be answered: the method routes without a task id, and the bank
        has one task or the method tells tasks apart (seq_lora and seta route without one but
        name no task: their `infer_task_ids` gives -1)."""
        return self.routable and (len(self.tasks) == 1 or bool((self._votes(["probe"]) >= 0).all()))

    @torch.no_grad()
    def _votes(self, texts: list[str]) -> np.ndarray:
        """[n, tasks of the bank]: the task located for each text formatted with each task's template."""
        model, method = self.stage.model, self.stage.method
        device = next(model.parameters()).device
        size = self.cfg.eval.batch_size
        votes = []
        for t in range(len(self.tasks)):
            examples = [self.example(text, t) for text in texts]
            votes.append(torch.cat([method.infer_task_ids(model, to_device(collate_prompts(
                examples[s:s + size], self.stage.objective.pad_id), device)).cpu()
                for s in range(0, len(examples), size)]))
        return torch.stack(votes, 1).numpy()

    def locate(self, texts: list[str]) -> list[int]:
        """The task of each text: the most located one over the bank's templates (ties: the earlier)."""
        if len(self.tasks) == 1:
            return [0] * len(texts)
        return [int(np.bincount(row, minlength=len(self.tasks)).argmax()) for row in self._votes(texts)]

    def predict(self, queries: list[Query], progress: bool = False) -> list[dict]:
        """One answer per query, in order: label, every label's probability, task, decided."""
        if not queries:
            return []
        missing = [i for i, q in enumerate(queries) if q.task is None]
        located = dict(zip(missing, self.locate([queries[i].text for i in missing]))) if missing else {}
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[(located.get(i, q.task), "inferred" if i in located else "oracle")].append(i)
        answers: list[dict | None] = [None] * len(queries)
        size = self.cfg.eval.batch_size
        from tqdm import tqdm

        with tqdm(total=len(queries), unit="text", disable=not progress or len(queries) < PROGRESS_MIN_ROWS) as bar:
            for (task, mode), indices in groups.items():
                examples = [self.example(queries[i].text, task) for i in indices]
                for s in range(0, len(examples), size):
                    probs = predict_probs(self.stage.model, self.stage.objective, self.stage.method,
                                          examples[s:s + size], size, mode)
                    for i, p in zip(indices[s:s + size], probs.tolist()):
                        answers[i] = self.answer(queries[i], task, mode, p)
                    bar.update(len(probs))
        return answers

    def answer(self, query: Query, task: int, mode: str, probs: list[float]) -> dict:
        labels = self.labels[task]
        best = int(np.argmax(probs))
        out = {"label": labels[best], "probs": dict(zip(labels, probs)), "task": self.tasks[task],
               "decided": self.decided(task, mode, labels[best], probs[best])}
        return out if query.id is None else {"id": query.id, **out}

    def decided(self, task: int, mode: str, label: str, prob: float) -> bool:
        """The label's probability reaches its calibrated threshold (located rows use the `inferred`
        mode's thresholds where the run chose them, else the task-id ones); never without thresholds."""
        if self.thresholds is None:
            return False
        by_mode = self.thresholds["thresholds"]
        threshold = by_mode.get(mode, by_mode["oracle"])[self.tasks[task]][label]
        return threshold is not None and prob >= threshold


def read_queries(predictor: Predictor, path: Path, default_task: str | None) -> list[Query]:
    """Every row of a JSONL/CSV/Parquet file, checked before any compute."""
    from pipelines.data.tasks import DataError, read_file

    if not path.is_file():
        raise PredictError(f"--input {path}: file not found")
    try:
        rows = read_file(path)
    except DataError as e:
        raise PredictError(str(e)) from None
    if not rows:
        raise PredictError(f"--input {path}: no rows (empty file)")
    queries = []
    for n, row in rows:
        if isinstance(row, str):
            raise PredictError(f"{path}: line {n}: {row}")
        queries.append(predictor.parse(row, f"{path}: line {n}", default_task))
    return queries
