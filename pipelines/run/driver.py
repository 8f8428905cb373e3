"""The sequence driver: the base model and every task's data, then for each task (plan →) train →
bank → evaluate, each stage recorded in the ledger once its outputs are durable; then the report.
Stages the ledger has are not run again.

Task t's evaluation runs while task t+1's training starts up (it needs only task t's bank), so
Ray Train's worker start-up overlaps it: it is pending, recorded after the next training that runs
(the untrained baseline is the first); a crash before then just runs it again.

`Driver.run` reads top to bottom as the run goes; each stage has a method that starts its work.
Everything about a run lives under `storage/<run_id>/`, where run_id = `<name>-<config hash>`:
rerunning the same command finds the ledger and goes on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from cl_core.atomic import atomic_write_text
from cl_core.base_model import ModelSpec
from pipelines.config import ConfigError, RunConfig
from pipelines.data.hub import LOCAL
from pipelines.data.tasks import load_split
from pipelines.run import stages
from pipelines.run.lease import RunLease
from pipelines.run.ledger import BASELINE_PREFIX, MODEL, Ledger, StageKey
from pipelines.run.recovery import drop_damaged_banks, forget_damaged_training, prune_train_checkpoints
from pipelines.run.progress import ProgressBoard, progress_file
from pipelines.run.report import markdown_matrix
from pipelines.run.results import RunResult, baseline_covered, results_so_far, write_report
from pipelines.run.sequence import check_extends, task_records
from pipelines.serve.mlflow_model import log_bank_model
from pipelines.credentials import without_credentials
from pipelines.tracking import Tracker, default_tracking_uri, warn

# The splits an evaluation reads: logged as its MLflow run's dataset inputs.
EVAL_SPLITS = ("validation", "test")


@dataclass
class LaunchedStage:
    """A stage that is running (or was done earlier): `Driver.settle` waits for it and records it."""

    key: StageKey
    outputs: dict | None = None  # the ledger's, when done earlier
    result: Any = None  # the work's outputs, or a Ray ObjectRef of them
    child: str | None = None
    start: float = 0.0


@dataclass
class PendingEvaluation:
    """An evaluate stage launched and not yet recorded; `task` None is the untrained baseline."""

    task: int | None
    stage: LaunchedStage


def check_data(cfg: RunConfig) -> None:
    """Read and check every task's local files before any compute (labels, fields, empty splits)."""
    for i, task in enumerate(cfg.tasks):
        if task.data.train is not None:
            for split in ("train", "test"):
                load_split(task, split, i, cfg.data)


def check_cluster(cfg: RunConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if need_cpu > resources.get("CPU", 0):
        raise ConfigError(f"ray.num_workers: {cfg.ray.num_workers} workers × {cfg.ray.cpus_per_worker:g} CPUs "
                          f"need {need_cpu:g} CPUs; the cluster has {resources.get('CPU', 0):g}")
    for name, amount in cfg.ray.evaluate_resources.items():  # else the evaluations would wait forever
        if amount > resources.get(name, 0):
            raise ConfigError(f"ray.evaluate_resources: no node has {amount:g} of {name!r} (`ray start --resources`)")
    if cfg.ray.use_gpu and cfg.ray.num_workers > resources.get("GPU", 0):
        raise ConfigError(f"ray.num_workers: {cfg.ray.num_workers} GPU workers; the cluster has "
                          f"{resources.get('GPU', 0):g} GPUs")


def start_ray(cfg: RunConfig) -> None:
    import ray

    os.environ.update(stages.RAY_ENV)
    if ray.is_initialized():
        return
    # Under `ray job submit`, RAY_ADDRESS names the cluster and the job's runtime_env applies
    # (cluster/runtime_env.yaml). Otherwise start a local Ray: a bare ray.init() would attach to
    # any `ray start` cluster recorded on this host.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Ray keeps only as many idle workers as there are free CPUs: while a train stage holds
        # every CPU it kills the stage tasks' idle worker, and the next stage pays ~5 s to start a
        # new one and import torch again. Allow one idle worker per CPU, free or not.
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": stages.RAY_ENV},
                 log_to_driver=False, _system_config={"num_workers_soft_limit": os.cpu_count() or 1})


class Driver:
    def __init__(self, cfg: RunConfig, storage: Path, progress: Callable[[str], None] = print,
                 on_evaluated: Callable[[int, dict], None] | None = None, overlap_eval: bool = True,
                 board: ProgressBoard | None = None, wait_for_lease: bool = False):
        """Checks the data, then opens the run folder (config, ledger) and its MLflow store.

        `on_evaluated(t, outputs)` is called after task t's evaluate stage (done now or earlier),
        e.g. to report a Tune trial's progress stage by stage. `overlap_eval=False` settles each
        evaluation before the next task trains (a Tune scheduler wants the row first). `board`
        shows the progress of running train and evaluate stages on the console. The driver holds
        the run folder's lease (pipelines.run.lease) until `run` returns."""
        self.cfg = cfg
        self.on_evaluated = on_evaluated
        self.overlap_eval = overlap_eval
        self.storage = Path(storage).resolve()
        self.run_dir = self.storage / cfg.run_id
        self.cache = self.storage / "cache"
        self.progress = progress
        self.board = board
        self.cfg_dict = without_credentials(cfg.model_dump())  # what config.yaml and MLflow keep
        self.tracking_failed = False
        check_data(cfg)
        # One driver per run, from here until `run` returns: a second one is refused before it
        # writes anything (or, with `wait_for_lease`, waits for the first to end).
        self.lease = RunLease(self.run_dir)
        self.lease.acquire(wait=wait_for_lease)
        try:
            self.ledger = Ledger(self.run_dir, cfg.identity_hash())
            records = task_records(cfg)  # before anything is written: a changed task changes nothing
            check_extends(self.ledger.tasks, records, cfg.run_id, self.ledger.trained_at())
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg_dict, sort_keys=False))
            if records != self.ledger.tasks:
                self.ledger.set_tasks(records)
            self.tracking_uri = cfg.mlflow.tracking_uri or default_tracking_uri(self.storage)
            self.tracker = Tracker(self.tracking_uri, cfg.mlflow.experiment, self.storage)
        except BaseException:
            self.lease.release()
            raise

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            self.lease.release()

    def _run(self) -> RunResult:
        wall = time.perf_counter()
        self._start()
        self.base = self._base_model()
        self.data = self._prepare_all()
        pending = self._launch_baselines()
        bank_dir = None
        for t in range(len(self.cfg.tasks)):
            bank_dir, pending = self._learn_task(t, bank_dir, pending)
        self._record_pending(pending, wait=True)
        return self._report(wall)

    def _start(self) -> None:
        """The MLflow parent run, Ray and its resources, and banks damaged on disk set to rebuild."""
        self.parent = self.tracker.parent_run(self.cfg.run_id, self.cfg_dict)
        start_ray(self.cfg)
        check_cluster(self.cfg)
        self.opts, self.eval_opts = stages.task_options(self.cfg), stages.task_options(self.cfg, evaluation=True)
        self.progress(f"clpipe run {self.cfg.run_id}: {len(self.cfg.tasks)} tasks, method {self.cfg.method.name}, "
                      f"storage {self.run_dir}")
        self.expected_bank_sha = drop_damaged_banks(self.cfg, self.ledger, self.run_dir, self.progress)

    def _base_model(self) -> ModelSpec:
        model = self.stage(MODEL, self._materialize)
        self.precision = model["precision"]
        self.progress(f"precision {self.precision} (training.precision: {self.cfg.training.precision})")
        self._tracked(partial(self.tracker.tag, self.parent, "clpipe.precision", self.precision))
        self._tracked(partial(self.tracker.params, self.parent, {"model.resolved_revision": model.get("revision", LOCAL)}))
        return ModelSpec.model_validate(model["spec"])  # the ledger holds it as JSON

    def _prepare_all(self) -> list[str]:
        """Every task's data first: the untrained baseline evaluates all of them."""
        prepared = [self.stage(StageKey("prepare", t), partial(self._prepare, t)) for t in range(len(self.cfg.tasks))]
        data = [p["path"] for p in prepared]
        self._tracked(partial(self.tracker.params, self.parent, {f"tasks.{task.name}.resolved_revision": p.get("revision", LOCAL)
                                                                 for task, p in zip(self.cfg.tasks, prepared)}))
        # The parent run lists every task's data too (the runs list shows the parents' datasets);
        # MLflow keeps one input per dataset and run, so a rerun adds only appended tasks' data.
        self._tracked(partial(self.tracker.datasets, self.parent, [(task, data[t], split) for t, task in
                                                                   enumerate(self.cfg.tasks)
                                                                   for split in ("train", *EVAL_SPLITS)]))
        for task, p in zip(self.cfg.tasks, prepared):
            if p["validation_source"] == "held out of training":
                self.progress(f"  {task.name}: no rows beyond max_train_examples; {p['splits']['validation']['rows']} "
                              f"training rows held out as the validation slice")
        return data

    def _launch_baselines(self) -> list[PendingEvaluation]:
        """The untrained baseline of the tasks that have none yet (all of them, or those appended),
        in flight beside the first training; the ones done earlier reconcile their MLflow runs."""
        for key in self.ledger.by_prefix(BASELINE_PREFIX):
            self.launch(key, None)
        first = baseline_covered(self.ledger)
        if first == len(self.cfg.tasks):
            return []
        return self._pending(None, self.launch(StageKey.baseline(first), partial(self._evaluate_untrained, first),
                                               self._eval_inputs(range(first, len(self.cfg.tasks)))))

    def _learn_task(self, t: int, parent_bank: str | None,
                    pending: list[PendingEvaluation]) -> tuple[str, list[PendingEvaluation]]:
        """Task t: (its plan,) its accuracy before training beside its training, its bank, and its
        evaluation launched to overlap the next task. Returns its bank and what is still pending."""
        start_bank = parent_bank  # what train and bank build on: the parent, or the parent + the plan
        if self.cfg.method.build().plans_tasks:
            start_bank = self.stage(StageKey("plan", t), partial(self._plan, t, parent_bank))["path"]
        # Task t before its training (FwT), on what the earlier tasks left: runs beside the training.
        before = t and self.launch(StageKey("before", t), partial(self._evaluate_before, t, start_bank),
                                   self._eval_inputs([t]))
        training = self.launch(StageKey("train", t), partial(self._train, t, start_bank), [(t, "train")])
        trained = self.settle(training)
        # Here, not at the end, so that a later crash cannot cost them; a training done earlier
        # overlapped nothing, so what still runs stays in flight beside the next one.
        pending = self._record_pending(pending, wait=training.result is not None)
        if before:
            self.settle(before)
        bank_dir = self._bank_of(t, start_bank, trained)
        pending += self._pending(t, self.launch(StageKey("evaluate", t), partial(self._evaluate, t, bank_dir),
                                                self._eval_inputs(range(t + 1))))
        return bank_dir, pending

    def _bank_of(self, t: int, start_bank: str | None, trained: dict) -> str:
        if forget_damaged_training(self.ledger, t, trained, self.progress):
            trained = self.stage(StageKey("train", t), partial(self._train, t, start_bank), [(t, "train")])
        built = self.stage(StageKey("bank", t), partial(self._bank, t, start_bank, trained["tensors"]))
        if self.expected_bank_sha.get(t, built["sha256"]) != built["sha256"]:
            raise RuntimeError(f"the rebuilt bank of task {t} differs from the one later stages used; "
                               f"start the run again in a new storage folder")
        prune_train_checkpoints(self.cfg, self.run_dir, t)
        return built["path"]

    # -- what each stage runs: a Ray task (ObjectRef) or, for train, the Ray Train run's outputs ---
    def _materialize(self, child: str | None):
        return stages.materialize.options(**self.opts).remote(self.cfg, str(self.cache / "models"))

    def _prepare(self, t: int, child: str | None):
        return stages.prepare.options(**self.opts).remote(self.cfg, t, self.base, str(self.cache / "prepared"))

    def _evaluate_untrained(self, first: int, child: str | None):
        key = StageKey.baseline(first)
        name = "baseline" if first == 0 else f"baseline-from-task{first}"
        return stages.evaluate_untrained.options(**self.eval_opts).remote(
            self.cfg, self.base, self.data, str(self.run_dir / "eval" / f"{name}.json"), first,
            str(self.cache / "untrained"), progress=self._progress_file(key))

    def _plan(self, t: int, parent_bank: str | None, child: str | None):
        plan_dir = str(self.run_dir / "banks" / f"task{t}-{self.cfg.tasks[t].name}.plan")
        return stages.plan.options(**self.opts).remote(self.cfg, t, self.base, parent_bank, self.data[t], plan_dir)

    def _evaluate_before(self, t: int, start_bank: str | None, child: str | None):
        return stages.evaluate_before.options(**self.eval_opts).remote(
            self.cfg, t, self.base, start_bank, self.data[t], str(self.run_dir / "eval" / f"task{t}.before.json"))

    def _train(self, t: int, start_bank: str | None, child: str | None) -> dict:
        tracking = child and {"tracking_uri": self.tracking_uri, "run_id": child}
        tensors = self.run_dir / "trained" / f"task{t}-{self.cfg.tasks[t].name}.safetensors"
        return stages.train(self.cfg, t, self.base, self.data, start_bank, self.run_dir / "ray_train", tensors,
                            tracking, self._progress_file(StageKey("train", t)))

    def _bank(self, t: int, start_bank: str | None, tensors: str, child: str | None):
        bank_dir = str(self.run_dir / "banks" / f"task{t}-{self.cfg.tasks[t].name}")
        return stages.bank.options(**self.opts).remote(self.cfg, t, self.base, start_bank, tensors, self.data[t],
                                                       bank_dir)

    def _evaluate(self, t: int, bank_dir: str, child: str | None):
        return stages.evaluate.options(**self.eval_opts).remote(
            self.cfg, t, self.base, bank_dir, self.data, str(self.run_dir / "eval" / f"task{t}.json"),
            progress=self._progress_file(StageKey("evaluate", t)))

    def _eval_inputs(self, tasks) -> list[tuple[int, str]]:
        return [(j, split) for j in tasks for split in EVAL_SPLITS]

    # -- one stage, at most once ----------------------------------------------------------------
    def stage(self, key: StageKey, work: Callable[[str | None], Any], inputs: list[tuple[int, str]] = ()) -> dict:
        """Runs `work(child MLflow run id)` unless the ledger has the stage; returns its outputs."""
        return self.settle(self.launch(key, work, inputs))

    def launch(self, key: StageKey, work: Callable[[str | None], Any] | None,
               inputs: list[tuple[int, str]] = ()) -> LaunchedStage:
        """Starts the stage: `work` returns its outputs, or a Ray ObjectRef to settle later (None:
        the stage is known to be done). `inputs`: the (task, split) pairs it reads, logged as its
        child run's dataset inputs."""
        done = self.ledger.outputs(key)
        if done is not None:
            self.progress(f"  {str(key):<22} done earlier")
            self._track_stage(key, done, self.ledger.seconds(key))  # reconciles MLflow
            return LaunchedStage(key, outputs=done)
        self.progress(f"  {str(key):<22} running")
        if self.board:
            self.board.watch(str(key))
        child = self._tracked(partial(self.tracker.stage_run, self.parent, self.cfg.run_id, str(key)))
        if child and inputs:
            self._tracked(partial(self.tracker.datasets, child, [(self.cfg.tasks[t], self.data[t], split)
                                                                 for t, split in inputs]))
        start = time.perf_counter()
        return LaunchedStage(key, result=work(child), child=child, start=start)

    def settle(self, launched: LaunchedStage) -> dict:
        """Waits for a launched stage and records it in the ledger, then MLflow (once)."""
        import ray

        if launched.outputs is not None:
            return launched.outputs
        result = launched.result
        out = ray.get(result) if isinstance(result, ray.ObjectRef) else result
        if self.board:
            self.board.unwatch(str(launched.key))
        # An overlapped stage reports when it finished: its seconds exclude waiting to be settled.
        end = out["finished_at"] - time.time() + time.perf_counter() if "finished_at" in out else time.perf_counter()
        seconds = end - launched.start
        self.ledger.mark_done(launched.key, out, seconds)
        self.progress(f"  {str(launched.key):<22} done in {seconds:.1f}s")
        self._track_stage(launched.key, out, seconds, launched.child)
        launched.outputs = self.ledger.outputs(launched.key)  # as a later rerun reads it
        return launched.outputs

    def _track_stage(self, key: StageKey, out: dict, seconds: float, child: str | None = None) -> None:
        """The stage's child run (found or created) gets its metrics and is marked finished."""
        metrics = {"stage/seconds": seconds, "stage/compute_s": out["compute_s"], **out.get("metrics", {})}
        self._tracked(partial(self._finish_child, key, child, metrics))

    def _finish_child(self, key: StageKey, child: str | None, metrics: dict) -> None:
        child = child or self.tracker.stage_run(self.parent, self.cfg.run_id, str(key))
        self.tracker.log(child, metrics)
        self.tracker.finish(child)

    def _progress_file(self, key: StageKey) -> str | None:
        """Where the stage's work writes its progress, when a board shows it."""
        return str(progress_file(self.run_dir, str(key))) if self.board else None

    def _tracked(self, call: Callable[[], Any]):
        """MLflow failures mid-run never cost training: warn, go on; a rerun reconciles the runs."""
        try:
            return call()
        except Exception as e:
            self.tracking_failed = True
            warn(f"MLflow: {e}")
            return None

    # -- evaluations recorded later ---------------------------------------------------------------
    def _pending(self, task: int | None, launched: LaunchedStage) -> list[PendingEvaluation]:
        """An evaluation to record later; without overlap it is recorded now (a Tune scheduler
        wants task t's row before task t+1 trains) and nothing is pending."""
        pending = PendingEvaluation(task, launched)
        if self.overlap_eval:
            return [pending]
        self._record(pending)
        return []

    def _record_pending(self, pending: list[PendingEvaluation], wait: bool) -> list[PendingEvaluation]:
        """Records the pending evaluations in order (waiting for them), or without `wait` those
        before the first one still running; returns the rest."""
        while pending and (wait or pending[0].stage.outputs is not None):
            self._record(pending.pop(0))
        return pending

    def _record(self, pending: PendingEvaluation) -> None:
        outputs = self.settle(pending.stage)
        if pending.task is not None:
            self._evaluated(pending.task, outputs)

    def _register_bank(self, t: int) -> None:
        """Task t's bank as an MLflow model in its evaluate stage's run, registered under the run's name."""
        evaluate_run = self.tracker.stage_run(self.parent, self.cfg.run_id, str(StageKey("evaluate", t)))
        log_bank_model(self.tracker, evaluate_run, self.run_dir, t)

    def _evaluated(self, t: int, outputs: dict) -> None:
        self._log_row(t, outputs)
        self._tracked(partial(self.tracker.describe, self.parent, self._description(t + 1)))
        self._tracked(partial(self._register_bank, t))
        if self.on_evaluated:
            self.on_evaluated(t, outputs)

    def _log_row(self, t: int, outputs: dict) -> None:
        """Task t's evaluate row as the parent run's step-t metrics, per task and split."""
        names = [task.name for task in self.cfg.tasks]
        metrics = {}
        for split, prefix in (("validation", "val/"), ("rows", "")):
            for mode, values in outputs[split].items():
                acc = f"{prefix}acc" if mode == "oracle" else f"{prefix}acc_inferred"
                metrics.update({f"{acc}/{names[j]}": 100 * a for j, a in enumerate(values["accuracy"]) if a is not None})
        oracle = outputs["rows"]["oracle"]
        metrics.update({f"strip/{names[j]}": 100 * s for j, s in enumerate(oracle["strip_rate"])})
        metrics.update({f"strip_calibrated/{names[j]}": 100 * s for j, s in enumerate(oracle["strip_rate_calibrated"])})
        self._tracked(partial(self.tracker.log, self.parent, metrics, step=t))

    def _description(self, k: int) -> str:
        """The parent run's description: the accuracy matrix and summary after k of the tasks."""
        names = [t.name for t in self.cfg.tasks]
        test, validation = results_so_far(self.ledger, k), results_so_far(self.ledger, k, "validation")
        s = test.summary["oracle"]
        val = (f" (validation: AA {validation.summary['oracle']['AA']:.1f} · "
               f"BwT {validation.summary['oracle']['BwT']:+.1f})") if validation else ""
        # The summary first: the UI shows the first lines of a description until "Show more".
        return (f"**{self.cfg.run_id}**: method `{self.cfg.method.name}`, {k} of {len(names)} tasks trained "
                f"({', '.join(names)}).\n\n**AA {s['AA']:.1f} · BwT {s['BwT']:+.1f} · FwT {s['FwT']:+.1f} · "
                f"forgetting {s['forgetting']:.1f}**{val}\n\nAccuracy (%, oracle task id); rows: after training each "
                f"task\n\n{markdown_matrix(test.matrices['oracle'], names[:k], test.baseline)}")

    # -- the report -------------------------------------------------------------------------------
    def _report(self, wall_start: float) -> RunResult:
        cfg, names = self.cfg, [t.name for t in self.cfg.tasks]
        n = len(names)
        test, validation = results_so_far(self.ledger, n), results_so_far(self.ledger, n, "validation")
        # Optimizer steps (not micro batches): the budget every method gets per task.
        steps = [self.ledger.outputs(StageKey("train", t))["steps"] // cfg.training.grad_accum for t in range(n)]
        summary = write_report(self.run_dir, cfg.run_id, names, self.precision, test, validation, steps)
        self._track_report(summary, n)
        # A rerun of a finished run only exits early once MLflow has everything.
        self.ledger.set_meta("mlflow_complete", not self.tracking_failed)
        return RunResult(run_id=cfg.run_id, run_dir=self.run_dir, tasks=names, precision=self.precision,
                         matrices=test.matrices, baseline=test.baseline, summary=test.summary,
                         strip=summary["strip_rate"], tracking_uri=self.tracking_uri,
                         wall_s=time.perf_counter() - wall_start, compute_s=self.ledger.compute_seconds(),
                         busy_s=self.ledger.busy_seconds(), stage_seconds=self.ledger.stage_seconds(),
                         strip_calibrated=summary["strip_rate_calibrated"], steps_per_task=steps,
                         val_matrices=validation.matrices if validation else {},
                         val_summary=validation.summary if validation else {})

    def _track_report(self, summary: dict, n: int) -> None:
        """The parent run gets the final figures (test and validation), the report files, the
        config and the last bank's manifest, and is marked finished."""
        key = {"oracle": "cl", "inferred": "cl_inferred"}
        metrics = {f"{key[m]}/{k}": v for m, s in summary["summary"].items() for k, v in s.items()}
        metrics.update({f"val/{key[m]}/{k}": v for m, s in summary["validation"]["summary"].items() for k, v in s.items()})
        metrics["strip/mean"] = float(np.mean(summary["strip_rate"]["oracle"]))
        metrics["strip_calibrated/mean"] = float(np.mean(summary["strip_rate_calibrated"]["oracle"]))
        self._tracked(partial(self.tracker.log, self.parent, metrics, step=n - 1))
        report_dir = self.run_dir / "report"
        for f in ("accuracy_matrix.csv", "accuracy_matrix.png", "summary.json"):
            self._tracked(partial(self.tracker.artifact, self.parent, report_dir / f, "report"))
        self._tracked(partial(self.tracker.artifact, self.parent, self.run_dir / "config.yaml"))
        last_bank = self.ledger.outputs(StageKey("bank", n - 1))["path"]
        self._tracked(partial(self.tracker.artifact, self.parent, Path(last_bank) / "manifest.json", "bank"))
        self._tracked(partial(self.tracker.finish, self.parent))
