"""The stages of one task. prepare, bank and evaluate are Ray tasks; train is a Ray Train run.

Each is a function of (config, task index, upstream outputs) that writes its outputs atomically
and returns a small dict for the ledger, including `compute_s`, the seconds spent on the stage's
own work (so the driver can tell compute from orchestration overhead). The config and the base
model spec arrive as the driver validated them (pickled by Ray), not re-parsed from dicts.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file

from cl_core.atomic import atomic_write_bytes, atomic_write_text
from cl_core.bank import BankError, load_bank, sha256_file
from cl_core.base_model import ModelSpec, load_tokenizer
from cl_core.precision import base_settings, resolve_precision
from cl_core.training import evaluate_task, plan_task, predict_probs, score_probs, task_loss_fn
from pipelines.assembly import build_stage, materialize_base_model
from pipelines.run.calibration import save_thresholds, validation_scores
from pipelines.config import RunConfig
from pipelines.data.hub import LOCAL, hub_commit, is_hub_model
from pipelines.data.tasks import load_prepared, prepare_task
from pipelines.run.progress import StageProgress

# Ray Train reports block for a health-check interval each; a short one keeps a report cheap (docs/running.md).
# A train stage's workers wait for the previous task's evaluation to free its CPUs/GPUs: give them
# longer than Ray Train's 60 s before it calls the start-up stuck and starts over.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900"}


def _threads() -> int:
    """Use the CPUs Ray gave this task (it sets OMP_NUM_THREADS to 1 otherwise)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads


def _device(cfg: RunConfig) -> torch.device:
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def task_options(cfg: RunConfig, evaluation: bool = False) -> dict:
    """Resources of a prepare/bank/evaluate task: those of one training worker; an evaluation also
    the custom resources of `ray.evaluate_resources` (which pins it to the nodes that have them)."""
    options = {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": 1 if cfg.ray.use_gpu else 0, "max_retries": 1}
    return {**options, "resources": cfg.ray.evaluate_resources} if evaluation else options


def _spent(start: float) -> dict:
    """What every stage task reports of its run: its own compute seconds and the Ray node it ran on."""
    return {"compute_s": time.perf_counter() - start, "node_id": ray.get_runtime_context().get_node_id()}


@ray.remote
def materialize(cfg: RunConfig, cache_root: str) -> dict:
    """The base model every stage loads, and the run's precision, resolved here, where the work
    runs (a GPU worker's resources under `ray.use_gpu`). The ledger keeps both, so a resumed run
    computes in the precision it started in."""
    start = time.perf_counter()
    device = _device(cfg)
    precision = resolve_precision(cfg.training.precision, device)
    spec = materialize_base_model(cfg, Path(cache_root)).model_copy(update=base_settings(precision, device))
    revision = LOCAL
    if is_hub_model(spec.kind, spec.path):  # every stage loads the commit the revision names now
        revision = hub_commit(spec.path, spec.revision, "model")
        spec = spec.model_copy(update={"revision": revision})
    return {"spec": spec.model_dump(), "precision": precision, "revision": revision,
            **_spent(start)}


@ray.remote
def prepare(cfg: RunConfig, task: int, base: ModelSpec, cache_root: str) -> dict:
    start = time.perf_counter()
    summary = prepare_task(cfg.tasks[task], task, load_tokenizer(base), base.source, cfg.training.max_length,
                           cfg.training.seed, cfg.data, Path(cache_root), cfg.eval.validation_examples)
    metrics = {f"data/{split}_{key}": float(v["rows"] if key == "rows" else sum(v["skipped"].values()))
               for split, v in summary["splits"].items() for key in ("rows", "skipped")}
    return {**summary, "metrics": metrics, **_spent(start)}


def train_run_name(cfg: RunConfig, task: int) -> str:
    """The Ray Train run (its folder under the storage path) of task `task`'s train stage."""
    return f"{cfg.run_id}-task{task}"


def train(cfg: RunConfig, task: int, base: ModelSpec, data_paths: list[str], parent_bank: str | None,
          storage_path: Path, tensors_file: Path, tracking: dict | None, progress: str | None = None) -> dict:
    """A Ray Train run of the stage's DeepSpeed loop. Rerunning with the same name and storage
    resumes it from its latest checkpoint; FailureConfig restarts crashed workers from there.

    Ray writes checkpoints without fsync: the final bank tensors are copied durably (atomic write)
    to `tensors_file`, and their sha256 goes in the ledger for the bank stage to check."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.run.worker import BANK_TENSORS, train_loop

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run_config": cfg, "task": task, "base_model": base,
                           "data": data_paths, "parent_bank": parent_bank, "mlflow": tracking, "progress": progress,
                           "threads": cfg.ray.cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=TrainRunConfig(name=train_run_name(cfg, task), storage_path=str(storage_path),
                                  failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    path = Path(result.checkpoint.path)
    if not (path / BANK_TENSORS).exists():
        raise RuntimeError(f"train stage of task {task}: final checkpoint {path} has no {BANK_TENSORS}")
    tensors = (path / BANK_TENSORS).read_bytes()
    atomic_write_bytes(tensors_file, tensors)
    return {"checkpoint": str(path), "tensors": str(tensors_file),
            "tensors_sha256": hashlib.sha256(tensors).hexdigest(), "steps": result.metrics["steps"],
            "final_loss": result.metrics["loss"], "resumed_from": result.metrics["resumed_from"],
            "partitioned_params": result.metrics["partitioned_params"],
            "compute_s": result.metrics["compute_s"], "node_id": result.metrics.get("node_id")}


@ray.remote
def plan(cfg: RunConfig, task: int, base: ModelSpec, parent_bank: str | None, data_path: str, out_dir: str) -> dict:
    """The method's `plan_task` (e.g. CMoE's probe) on the earlier tasks' bank → that bank plus the
    plan in its method state: the parent of the task's train and bank stages."""
    start = time.perf_counter()
    _threads()
    stage = build_stage(cfg, base, parent_bank and Path(parent_bank))
    model = stage.model
    model.to(_device(cfg))
    examples = load_prepared(data_path, "train")

    def batches():
        size = cfg.training.batch_size
        for s in range(0, len(examples), size):
            yield stage.objective.collate(examples[s:s + size])

    extras = set(model.extras)
    model.eval()
    torch.manual_seed(cfg.training.seed * 1000 + task)
    plan_task(model, stage.objective, stage.method, task, batches)
    for name in set(model.extras) - extras:  # what the objective added for the probe (a head) is not kept
        del model.extras[name]
        del model.extra_specs[name]
    manifest = model.save(Path(out_dir), parent=parent_bank,
                          extra={"task": task, "method": cfg.method.name, "plan": True})
    load_bank(Path(out_dir), model.identity)
    return {"path": out_dir, "sha256": manifest["files"]["bank.safetensors"]["sha256"],
            **_spent(start)}


@ray.remote
def bank(cfg: RunConfig, task: int, base: ModelSpec, parent_bank: str | None, tensors: str, data_path: str,
         out_dir: str) -> dict:
    """The trained tensors + the method's after-task work (Fisher, memories) → a verified bank."""
    start = time.perf_counter()
    _threads()
    stage = build_stage(cfg, base, parent_bank and Path(parent_bank), setup_task=task)
    model = stage.model
    model.load_bank_state_dict(load_file(tensors))
    model.tasks = [t.name for t in cfg.tasks[: task + 1]]
    examples = load_prepared(data_path, "train")

    def batches():
        size = cfg.training.batch_size
        for s in range(0, len(examples), size):
            yield stage.objective.collate(examples[s:s + size])

    model.eval()
    stage.method.after_task(model, task, batches, task_loss_fn(model, stage.objective, stage.method))
    manifest = model.save(Path(out_dir), parent=parent_bank, extra={"task": task, "method": cfg.method.name})
    load_bank(Path(out_dir), model.identity)  # read back and verify before the ledger says done
    return {"path": out_dir, "sha256": manifest["files"]["bank.safetensors"]["sha256"],
            **_spent(start)}


def eval_modes(cfg: RunConfig, method) -> list[str]:
    """The task-id modes a bank is evaluated in: `eval.task_id`, inferred only where the method routes without."""
    modes = ["oracle", "inferred"] if cfg.eval.task_id == "both" else [cfg.eval.task_id]
    return modes if method.routable else ["oracle"]


@ray.remote
def evaluate_before(cfg: RunConfig, task: int, base: ModelSpec, bank_dir: str, data_path: str, out_file: str) -> dict:
    """Task `task` before its training, for FwT as GEM defines it: the bank the earlier tasks left
    (`bank_dir`, with the task's plan where the method plans), the task set up as its train stage
    sets it up (same seed: the same fresh experts, gates and head), nothing trained; only the
    task's own test and validation splits are read. One accuracy per split and mode."""
    start = time.perf_counter()
    _threads()
    stage = build_stage(cfg, base, Path(bank_dir), setup_task=task)
    stage.model.to(_device(cfg))
    out = {split: {mode: _accuracy(stage.model, stage.objective, stage.method, cfg, load_prepared(data_path, split),
                                   mode) for mode in eval_modes(cfg, stage.method)} for split in ("test", "validation")}
    out = {"rows": out["test"], "validation": out["validation"], **_spent(start)}
    atomic_write_text(Path(out_file), json.dumps(out, indent=2))
    return {**out, "finished_at": time.time()}


def _accuracy(model, objective, method, cfg: RunConfig, examples: list[dict], mode: str) -> dict:
    """Accuracy and per-example correctness on `examples` (accuracy None for an empty validation
    slice); `method` None scores a model with an empty bank."""
    if not examples:
        return {"accuracy": None, "correct": []}
    probs = predict_probs(model, objective, method, examples, cfg.eval.batch_size, mode)
    scored = score_probs(probs, examples, cfg.eval.target_precision)
    return {"accuracy": scored["accuracy"], "correct": scored["correct"]}


@ray.remote
def evaluate(cfg: RunConfig, upto: int, base: ModelSpec, bank_dir: str, data_paths: list[str], out_file: str,
             progress: str | None = None) -> dict:
    """Accuracy and strip rate on every task 0..upto: one row of the accuracy matrix per mode, on
    the test split (`rows`) and on the validation slices (`validation`: accuracy and correctness).

    The decision thresholds are chosen on each task's validation slice and stored beside the bank
    for `clpipe predict` and `clpipe serve`; `strip_rate_calibrated` and `precision_calibrated`
    are what they decide on the test split. `strip_rate` picks its thresholds on the test split
    itself: an upper bound.
    """
    start = time.perf_counter()
    _threads()
    stage = build_stage(cfg, base, Path(bank_dir))
    stage.model.to(_device(cfg))
    modes = eval_modes(cfg, stage.method)
    rows, validation, chosen = {}, {}, {}
    tests = {t: load_prepared(data_paths[t], "test") for t in range(upto + 1)}
    meter, done = StageProgress(progress, len(modes) * sum(map(len, tests.values())), "examples"), 0
    for mode in modes:
        scored = [validation_scores(stage, cfg, t, data_paths[t], mode) for t in range(upto + 1)]
        chosen[mode] = [thresholds for thresholds, _ in scored]
        validation[mode] = validation_row([row for _, row in scored])
        results = []
        for t, examples in tests.items():
            results.append(evaluate_task(stage.model, stage.objective, stage.method, examples, cfg.eval.batch_size,
                                         mode, cfg.eval.target_precision, chosen[mode][t],
                                         on_batch=lambda n, before=done: meter.update(before + n)))
            done += len(examples)
        rows[mode] = matrix_row(results)
    save_thresholds(Path(bank_dir), cfg, data_paths, chosen)
    out = {"rows": rows, "validation": validation, **_spent(start)}
    atomic_write_text(Path(out_file), json.dumps(out, indent=2))
    return {**out, "finished_at": time.time()}  # the driver settles it later (it overlaps the next task)


def validation_row(results: list[dict]) -> dict[str, list]:
    """Per-task validation scores in order → one row of the validation accuracy matrix (None
    where a task has no slice) and the correctness behind it."""
    return {key: [r[key] for r in results] for key in ("accuracy", "correct")}


def matrix_row(results: list[dict]) -> dict[str, list]:
    """evaluate_task's results of tasks in order → one row of the accuracy matrix and its companions."""
    return {key: [r.get(key) for r in results]
            for key in ("accuracy", "strip_rate", "strip_rate_calibrated", "precision_calibrated", "correct")}


# Part of every reused untrained row's key: change it when label scoring changes what it computes.
UNTRAINED_SCORING = "lm-label-log-likelihood-2"  # 2: with the validation slice


@ray.remote
def evaluate_untrained(cfg: RunConfig, base: ModelSpec, data_paths: list[str], out_file: str, first: int = 0,
                       reuse_dir: str | None = None, progress: str | None = None) -> dict:
    """The untrained model on tasks first..n-1 (the baseline of FwT and learning gain), task id
    given; `first` > 0 for the tasks appended to a run whose earlier tasks have their baseline.

    Under the LM objective the untrained model is the base model: every expert starts with B = 0
    and adds nothing, so an empty bank answers as the untrained bank of any method and seed would.
    Each task's rows (test and validation) are then kept in `reuse_dir`, by what they depend on
    (model, prepared data, evaluation settings, device), for every later run of any method. Under the head objective the
    run's fresh heads answer (chance level): its own bank, nothing reused.
    """
    start = time.perf_counter()
    _threads()
    shared = cfg.objective == "lm" and reuse_dir is not None
    stage = None
    tests = {t: load_prepared(data_paths[t], "test") for t in range(first, len(cfg.tasks))}
    meter, done = StageProgress(progress, sum(map(len, tests.values())), "examples"), 0
    results, validation, reused = [], [], []
    for t, examples in tests.items():
        path, inputs = _kept_untrained_row(cfg, base, data_paths[t], reuse_dir) if shared else (None, None)
        kept = _read_kept(path) if path is not None else None
        if kept is not None and kept.get("inputs") == inputs:  # not a foreign file
            results.append(kept["result"])
            validation.append(kept["validation"])
            reused.append(cfg.tasks[t].name)
        else:
            if stage is None:
                stage = _untrained_stage(cfg, base)
            method = None if cfg.objective == "lm" else stage.method
            results.append(evaluate_task(stage.model, stage.objective, method, examples, cfg.eval.batch_size,
                                         "oracle", cfg.eval.target_precision,
                                         on_batch=lambda n, before=done: meter.update(before + n)))
            validation.append(_accuracy(stage.model, stage.objective, method, cfg,
                                        load_prepared(data_paths[t], "validation"), "oracle"))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({"inputs": inputs, "result": results[-1],
                                                    "validation": validation[-1]}))
        done += len(examples)
        meter.update(done)
    out = {"rows": {"oracle": matrix_row(results)}, "validation": {"oracle": validation_row(validation)},
           "first": first, "reused": reused, **_spent(start)}
    atomic_write_text(Path(out_file), json.dumps(out, indent=2))
    return {**out, "finished_at": time.time()}  # the driver settles it later (it overlaps the first training)


def _kept_untrained_row(cfg: RunConfig, base: ModelSpec, data_path: str, reuse_dir: str) -> tuple[Path, dict]:
    """Where a task's untrained row is kept, and what it depends on (stored in it, compared on reading)."""
    inputs = {"model": base.model_dump(mode="json"), "source": cfg.model.source, "device": _device(cfg).type,
              "prepared": json.loads((Path(data_path) / "summary.json").read_text())["key"],
              "batch_size": cfg.eval.batch_size, "target_precision": cfg.eval.target_precision,
              "scoring": UNTRAINED_SCORING}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return Path(reuse_dir) / f"{digest}.json", inputs


def _read_kept(path: Path) -> dict | None:
    """A kept row, or None where there is none or it does not parse (then it is computed again)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _untrained_stage(cfg: RunConfig, base: ModelSpec):
    """An empty bank (LM objective), or every task set up and nothing trained (head objective)."""
    stage = build_stage(cfg, base)
    if cfg.objective != "lm":
        for t in range(len(cfg.tasks)):
            stage.method.setup_task(stage.model, t)
            stage.objective.setup_task(stage.model, t)
    stage.model.to(_device(cfg))
    return stage


def verify_bank(path: str) -> str | None:
    """None if the bank on disk is intact, else why not."""
    try:
        load_bank(Path(path))
        return None
    except BankError as e:
        return str(e)


def verify_trained(outputs: dict) -> str | None:
    """None if a train stage's recorded tensors are on disk as the ledger's sha256 says, else why not."""
    path = Path(outputs["tensors"])
    if not path.is_file():
        return f"{path} is missing"
    if "tensors_sha256" not in outputs:  # recorded before train outputs had a digest: nothing to compare
        return None
    found = sha256_file(path)
    if found != outputs["tensors_sha256"]:
        return f"{path}: sha256 {found[:12]}, the ledger recorded {outputs['tensors_sha256'][:12]}"
    return None
