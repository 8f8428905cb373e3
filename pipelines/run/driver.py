"""The sequence driver: the base model and every task's data, then for each task (plan →) train →
bank → evaluate, each stage recorded in the ledger once its outputs are durable; then the report.
Stages the ledger has are not run again.

Task t's evaluation runs while task t+1's training starts up (it needs only task t's bank), so
Ray Train's worker start-up overlaps it: it is pending, recorded after the next training that runs
(the untrained baseline is the first); a crash before then just runs it again.

Reads top to bottom as the run goes. Everything about a run lives under `storage/<run_id>/`,
where run_id = `<name>-<config hash>`: rerunning the same command finds the ledger and goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from cl_core.atomic import atomic_write_text
from cl_core.metrics import cl_summary
from cl_core.base_model import ModelSpec
from pipelines.run import stages
from pipelines.config import ConfigError, RunConfig
from pipelines.data.tasks import load_split
from pipelines.run.ledger import Ledger
from pipelines.run.progress import ProgressBoard, progress_file
from pipelines.run.report import accuracy_matrix, format_matrix, markdown_matrix, matrix_csv, matrix_heatmap
from pipelines.run.sequence import check_extends, task_records, trained_at
from pipelines.serve.mlflow_model import log_bank_model
from pipelines.tracking import Tracker, TrackingError, default_tracking_uri, warn


@dataclass
class LaunchedStage:
    """A stage that is running (or was done earlier): `Driver.settle` waits for it and records it."""

    key: str
    outputs: dict | None = None  # the ledger's, when done earlier
    result: Any = None  # the work's outputs, or a Ray ObjectRef of them
    child: str | None = None
    start: float = 0.0


@dataclass
class PendingEvaluation:
    """An evaluate stage launched and not yet recorded; `task` None is the untrained baseline."""

    task: int | None
    stage: LaunchedStage


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    tasks: list[str]
    precision: str  # what training.precision resolved to (cl_core.precision)
    matrices: dict[str, np.ndarray]  # mode → R[stage, task] (NaN above the diagonal)
    baseline: np.ndarray
    summary: dict[str, dict[str, float]]  # mode → AA/BwT/FwT/forgetting/learning_gain
    strip: dict[str, list[float]]  # mode → final strip rate per task, thresholds chosen on the test split
    tracking_uri: str
    wall_s: float  # this invocation's
    compute_s: float
    busy_s: float  # the whole run's, across reruns: see Ledger.busy_seconds
    stage_seconds: dict[str, float] = field(default_factory=dict)
    strip_calibrated: dict[str, list[float]] = field(default_factory=dict)  # thresholds from calibration slices
    steps_per_task: list[int] = field(default_factory=list)  # optimizer steps of each task's training


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
                 board: ProgressBoard | None = None):
        """Checks the data, then opens the run folder (config, ledger) and its MLflow store.

        `on_evaluated(t, row)` is called after task t's evaluate stage (done now or earlier),
        e.g. to report a Tune trial's progress stage by stage. `overlap_eval=False` settles each
        evaluation before the next task trains (a Tune scheduler wants the row first). `board`
        shows the progress of running train and evaluate stages on the console."""
        self.cfg = cfg
        self.on_evaluated = on_evaluated
        self.overlap_eval = overlap_eval
        self.storage = Path(storage).resolve()
        self.run_dir = self.storage / cfg.run_id
        self.progress = progress
        self.board = board
        self.cfg_dict = cfg.model_dump()
        self.expected_bank_sha: dict[int, str] = {}
        self.tracking_failed = False
        check_data(cfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.run_dir, cfg.identity_hash())
        records = task_records(cfg)  # before anything is written: a changed task changes nothing
        check_extends(self.ledger.tasks, records, cfg.run_id, trained_at(self.ledger.data["stages"], len(self.ledger.tasks)))
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg_dict, sort_keys=False))
        if records != self.ledger.tasks:
            self.ledger.set_tasks(records)
        self.tracking_uri = cfg.mlflow.tracking_uri or default_tracking_uri(self.storage)
        self.tracker = Tracker(self.tracking_uri, cfg.mlflow.experiment, self.storage)

    # -- one stage, at most once ----------------------------------------------------------------
    def stage(self, key: str, work: Callable[[str | None], Any], inputs: list[tuple[int, str]] = ()) -> dict:
        """Runs `work(child MLflow run id)` unless the ledger has the stage; returns its outputs."""
        return self.settle(self.launch(key, work, inputs))

    def launch(self, key: str, work: Callable[[str | None], Any], inputs: list[tuple[int, str]] = ()) -> LaunchedStage:
        """Starts the stage: `work` returns its outputs, or a Ray ObjectRef to settle later.
        `inputs`: the (task, split) pairs it reads, logged as its child run's dataset inputs."""
        done = self.ledger.outputs(key)
        if done is not None:
            self.progress(f"  {key:<22} done earlier")
            self._track_stage(key, done, self.ledger.data["stages"][key]["seconds"])  # reconciles MLflow
            return LaunchedStage(key, outputs=done)
        self.progress(f"  {key:<22} running")
        if self.board:
            self.board.watch(key)
        child = self._tracked(lambda: self.tracker.stage_run(self.parent, self.cfg.run_id, key))
        if child and inputs:
            self._tracked(lambda: self.tracker.datasets(child, [(self.cfg.tasks[t], self.data[t], split)
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
            self.board.unwatch(launched.key)
        # An overlapped stage reports when it finished: its seconds exclude waiting to be settled.
        end = out["finished_at"] - time.time() + time.perf_counter() if "finished_at" in out else time.perf_counter()
        seconds = end - launched.start
        self.ledger.mark_done(launched.key, out, seconds)
        self.progress(f"  {launched.key:<22} done in {seconds:.1f}s")
        self._track_stage(launched.key, out, seconds, launched.child)
        launched.outputs = out
        return out

    def _track_stage(self, key: str, out: dict, seconds: float, child: str | None = None) -> None:
        """The stage's child run (found or created) gets its metrics and is marked finished."""
        metrics = {"stage/seconds": seconds, "stage/compute_s": out["compute_s"], **out.get("metrics", {})}
        self._tracked(lambda: self._finish_child(child or self.tracker.stage_run(self.parent, self.cfg.run_id, key),
                                                 metrics))

    def _finish_child(self, child: str, metrics: dict) -> None:
        self.tracker.log(child, metrics)
        self.tracker.finish(child)

    def _progress_file(self, key: str) -> str | None:
        """Where the stage's work writes its progress, when a board shows it."""
        return str(progress_file(self.run_dir, key)) if self.board else None

    def _tracked(self, call):
        """MLflow failures mid-run never cost training: warn, go on; a rerun reconciles the runs."""
        try:
            return call()
        except Exception as e:
            self.tracking_failed = True
            warn(f"MLflow: {e}")
            return None

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg, wall = self.cfg, time.perf_counter()
        self.parent = self.tracker.parent_run(cfg.run_id, self.cfg_dict)
        start_ray(cfg)
        check_cluster(cfg)
        self.progress(f"clpipe run {cfg.run_id}: {len(cfg.tasks)} tasks, method {cfg.method.name}, "
                      f"storage {self.run_dir}")
        self._drop_damaged_banks()

        opts = stages.task_options(cfg)
        cache = self.storage / "cache"
        model = self.stage("model", lambda _: stages.materialize.options(**opts).remote(cfg, str(cache / "models")))
        base = ModelSpec.model_validate(model["spec"])  # the ledger holds it as JSON
        self.precision = model["precision"]
        self.progress(f"precision {self.precision} (training.precision: {cfg.training.precision})")
        self._tracked(lambda: self.tracker.tag(self.parent, "clpipe.precision", self.precision))
        # Every task's data first: the untrained baseline evaluates all of them.
        prepared = [self.stage(f"task{t}/prepare", lambda _, t=t: stages.prepare.options(**opts).remote(
            cfg, t, base, str(cache / "prepared"))) for t in range(len(cfg.tasks))]
        data = self.data = [p["path"] for p in prepared]
        # The parent run lists every task's data too (the runs list shows the parents' datasets);
        # MLflow keeps one input per dataset and run, so a rerun adds only appended tasks' data.
        self._tracked(lambda: self.tracker.datasets(self.parent, [(task, data[t], split) for t, task in
                                                                  enumerate(cfg.tasks) for split in ("train", "test")]))
        for task, p in zip(cfg.tasks, prepared):
            if p["calibration_source"] == "held out of training":
                self.progress(f"  {task.name}: no rows beyond max_train_examples; {p['splits']['calibration']['rows']} "
                              f"training rows held out as the calibration slice for decision thresholds")
        # Evaluations in flight, recorded once the next training has run: first the untrained
        # baseline of the tasks that have none yet (all of them, or those appended), then task t's
        # row while task t+1 trains.
        first = self._baseline_covered()
        pending: list[PendingEvaluation] = []
        for key in [k for k in self.ledger.data["stages"] if k.startswith("baseline/evaluate")]:
            self.launch(key, lambda _: None)  # done earlier (never runs): reconciles its MLflow run
        if first < len(cfg.tasks):
            key, name = ("baseline/evaluate", "baseline") if first == 0 else \
                (f"baseline/evaluate-from-task{first}", f"baseline-from-task{first}")
            pending += self._pending(None, self.launch(key, lambda _: stages.evaluate_untrained.options(**opts).remote(
                cfg, base, data, str(self.run_dir / "eval" / f"{name}.json"), first, str(cache / "untrained"),
                progress=self._progress_file(key)),
                [(j, "test") for j in range(first, len(cfg.tasks))]))

        parent_bank, plans = None, cfg.method.build().plans_tasks
        for t, task in enumerate(cfg.tasks):
            start_bank = parent_bank  # what train and bank build on: the parent, or the parent + the plan
            if plans:
                plan_dir = str(self.run_dir / "banks" / f"task{t}-{task.name}.plan")
                start_bank = self.stage(f"task{t}/plan", lambda _, t=t: stages.plan.options(**opts).remote(
                    cfg, t, base, parent_bank, data[t], plan_dir))["path"]
            # Task t before its training (FwT), on what the earlier tasks left: runs beside the training.
            before = t and self.launch(f"task{t}/before", lambda _, t=t: stages.evaluate_before.options(**opts).remote(
                cfg, t, base, start_bank, data[t], str(self.run_dir / "eval" / f"task{t}.before.json")), [(t, "test")])
            training = self.launch(f"task{t}/train", lambda child, t=t: stages.train(
                cfg, t, base, data, start_bank, self.run_dir / "ray_train",
                child and {"tracking_uri": self.tracking_uri, "run_id": child}, self._progress_file(f"task{t}/train")),
                [(t, "train")])
            trained = self.settle(training)
            # Here, not at the end, so that a later crash cannot cost them; a training done earlier
            # overlapped nothing, so what still runs stays in flight beside the next one.
            pending = self._record_pending(pending, wait=training.result is not None)
            if before:
                self.settle(before)
            bank_dir = str(self.run_dir / "banks" / f"task{t}-{task.name}")
            built = self.stage(f"task{t}/bank", lambda _, t=t: stages.bank.options(**opts).remote(
                cfg, t, base, start_bank, trained["tensors"], data[t], bank_dir))
            if self.expected_bank_sha.get(t, built["sha256"]) != built["sha256"]:
                raise RuntimeError(f"the rebuilt bank of task {t} differs from the one later stages used; "
                                   f"start the run again in a new storage folder")
            self._prune_train_checkpoints(t)
            pending += self._pending(t, self.launch(f"task{t}/evaluate", lambda _, t=t: stages.evaluate.options(
                **opts).remote(cfg, t, base, bank_dir, data, str(self.run_dir / "eval" / f"task{t}.json"),
                               progress=self._progress_file(f"task{t}/evaluate")), [(j, "test") for j in range(t + 1)]))
            parent_bank = bank_dir
        self._record_pending(pending, wait=True)
        return self._report(wall)

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
        row = self.settle(pending.stage)
        if pending.task is not None:
            self._evaluated(pending.task, row)

    def _drop_damaged_banks(self) -> None:
        """A bank altered or truncated on disk is rebuilt from its train stage's durable tensors.

        The bank stage is deterministic, so the rebuilt bank must hash as the ledger recorded;
        `run` checks that against `expected_bank_sha`.
        """
        for t in range(len(self.cfg.tasks)):
            done = self.ledger.outputs(f"task{t}/bank")
            problem = done and stages.verify_bank(done["path"])
            if problem:
                # Train checkpoints are removed once the bank is durable: then the task trains again
                # (deterministically, from the same parent bank).
                retrain = not Path(self.ledger.outputs(f"task{t}/train")["tensors"]).exists()
                self.progress(f"  bank of task {t} is damaged ({problem}); rebuilding it from "
                              f"{'a new training' if retrain else 'its training output'}")
                self.expected_bank_sha[t] = done["sha256"]
                self.ledger.forget([f"task{t}/train"] * retrain + [f"task{t}/bank"])
            elif done:
                self._prune_train_checkpoints(t)  # a crash may have come between the bank and the removal

    def _prune_train_checkpoints(self, t: int) -> None:
        """Task t's bank is durable: its train stage's Ray Train checkpoints are dead state."""
        shutil.rmtree(self.run_dir / "ray_train" / stages.train_run_name(self.cfg, t), ignore_errors=True)

    def _baseline_stages(self) -> list[dict]:
        """The done untrained-baseline evaluations, in task order (one per time tasks were appended)."""
        done = [v["outputs"] for k, v in self.ledger.data["stages"].items() if k.startswith("baseline/evaluate")]
        return sorted(done, key=lambda out: out.get("first", 0))

    def _baseline_covered(self) -> int:
        """How many tasks (from the first) have an untrained baseline."""
        return sum(len(out["rows"]["oracle"]["accuracy"]) for out in self._baseline_stages())

    def _evaluated(self, t: int, row: dict) -> None:
        self._log_row(t, row)
        self._tracked(lambda: self.tracker.describe(self.parent, self._description(t + 1)))
        # The bank as an MLflow model in the evaluate stage's run, registered under the run's name.
        self._tracked(lambda: log_bank_model(self.tracker, self.tracker.stage_run(
            self.parent, self.cfg.run_id, f"task{t}/evaluate"), self.run_dir, t))
        if self.on_evaluated:
            self.on_evaluated(t, row)

    def _log_row(self, t: int, row: dict) -> None:
        names = [task.name for task in self.cfg.tasks]
        for mode, values in row["rows"].items():
            prefix = "acc" if mode == "oracle" else "acc_inferred"
            metrics = {f"{prefix}/{names[j]}": 100 * a for j, a in enumerate(values["accuracy"])}
            if mode == "oracle":
                metrics.update({f"strip/{names[j]}": 100 * s for j, s in enumerate(values["strip_rate"])})
                metrics.update({f"strip_calibrated/{names[j]}": 100 * s
                                for j, s in enumerate(values["strip_rate_calibrated"])})
            self._tracked(lambda: self.tracker.log(self.parent, metrics, step=t))

    def _so_far(self, k: int) -> tuple[list[dict], np.ndarray, dict[str, np.ndarray], dict[str, dict], dict[str, np.ndarray]]:
        """The first k tasks' evaluate rows, baseline, accuracy matrices, summaries and accuracies
        before training (NaN for task 0), per mode."""
        rows = [self.ledger.outputs(f"task{t}/evaluate")["rows"] for t in range(k)]
        base = np.concatenate([out["rows"]["oracle"]["accuracy"] for out in self._baseline_stages()])[:k] * 100
        before_rows = [self.ledger.outputs(f"task{t}/before")["rows"] for t in range(1, k)]
        before = {mode: np.array([np.nan] + [100 * row[mode]["accuracy"] for row in before_rows]) for mode in rows[-1]}
        matrices = {mode: accuracy_matrix([row[mode]["accuracy"] for row in rows], k) for mode in rows[-1]}
        summary = {mode: cl_summary(R, base, before[mode]) for mode, R in matrices.items()}
        return rows, base, matrices, summary, before

    def _description(self, k: int) -> str:
        """The parent run's description: the accuracy matrix and summary after k of the tasks."""
        names = [t.name for t in self.cfg.tasks]
        _, base, matrices, summary, _ = self._so_far(k)
        s = summary["oracle"]
        # The summary first: the UI shows the first lines of a description until "Show more".
        return (f"**{self.cfg.run_id}**: method `{self.cfg.method.name}`, {k} of {len(names)} tasks trained "
                f"({', '.join(names)}).\n\n**AA {s['AA']:.1f} · BwT {s['BwT']:+.1f} · FwT {s['FwT']:+.1f} · "
                f"forgetting {s['forgetting']:.1f}**\n\nAccuracy (%, oracle task id); rows: after training each task\n\n"
                f"{markdown_matrix(matrices['oracle'], names[:k], base)}")

    def _report(self, wall_start: float) -> RunResult:
        cfg, names = self.cfg, [t.name for t in self.cfg.tasks]
        n = len(names)
        rows, base, matrices, summary, before = self._so_far(n)
        # Optimizer steps (not micro batches): the budget every method gets per task.
        steps_per_task = [self.ledger.outputs(f"task{t}/train")["steps"] // cfg.training.grad_accum for t in range(n)]
        strip, strip_calibrated = {}, {}
        for mode in rows[-1]:
            strip[mode] = [100 * s for s in rows[-1][mode]["strip_rate"]]
            strip_calibrated[mode] = [100 * s for s in rows[-1][mode]["strip_rate_calibrated"]]
        report_dir = self.run_dir / "report"
        report_dir.mkdir(exist_ok=True)
        matrix_csv(matrices["oracle"], names, report_dir / "accuracy_matrix.csv")
        matrix_heatmap(matrices["oracle"], names, report_dir / "accuracy_matrix.png",
                       f"{cfg.run_id}: accuracy (%)")
        result_json = {"run_id": cfg.run_id, "tasks": names, "precision": self.precision,
                       "summary": summary, "strip_rate": strip, "strip_rate_calibrated": strip_calibrated,
                       "matrices": {m: R.tolist() for m, R in matrices.items()}, "baseline": base.tolist(),
                       "before_training": {m: [None] + b[1:].tolist() for m, b in before.items()},
                       "steps_per_task": steps_per_task}
        atomic_write_text(report_dir / "summary.json", json.dumps(result_json, indent=2, default=float))
        key = {"oracle": "cl", "inferred": "cl_inferred"}
        metrics = {f"{key[m]}/{k}": v for m, s in summary.items() for k, v in s.items()}
        metrics["strip/mean"] = float(np.mean(strip["oracle"]))
        metrics["strip_calibrated/mean"] = float(np.mean(strip_calibrated["oracle"]))
        self._tracked(lambda: self.tracker.log(self.parent, metrics, step=n - 1))
        for f in ("accuracy_matrix.csv", "accuracy_matrix.png", "summary.json"):
            self._tracked(lambda f=f: self.tracker.artifact(self.parent, report_dir / f, "report"))
        self._tracked(lambda: self.tracker.artifact(self.parent, self.run_dir / "config.yaml"))
        last_bank = self.ledger.outputs(f"task{n - 1}/bank")["path"]
        self._tracked(lambda: self.tracker.artifact(self.parent, Path(last_bank) / "manifest.json", "bank"))
        self._tracked(lambda: self.tracker.finish(self.parent))
        # A rerun of a finished run only exits early once MLflow has everything.
        self.ledger.set_meta("mlflow_complete", not self.tracking_failed)
        seconds = {k: v["seconds"] for k, v in self.ledger.data["stages"].items()}
        compute = sum(v["outputs"].get("compute_s", 0.0) for v in self.ledger.data["stages"].values())
        return RunResult(run_id=cfg.run_id, run_dir=self.run_dir, tasks=names, precision=self.precision,
                         matrices=matrices, baseline=base,
                         summary=summary, strip=strip, tracking_uri=self.tracking_uri,
                         wall_s=time.perf_counter() - wall_start, compute_s=compute,
                         busy_s=self.ledger.busy_seconds(), stage_seconds=seconds,
                         strip_calibrated=strip_calibrated, steps_per_task=steps_per_task)


def print_result(result: RunResult, out=sys.stdout) -> None:
    for mode, R in result.matrices.items():
        print(f"\nAccuracy matrix ({mode} task id), rows: after training each task", file=out)
        print(format_matrix(R, result.tasks, result.baseline, scale=1.0), file=out)
        s = result.summary[mode]
        print(f"AA {s['AA']:.1f}  BwT {s['BwT']:+.1f}  FwT {s['FwT']:+.1f}  learning gain {s['learning_gain']:+.1f}  "
              f"forgetting {s['forgetting']:.1f}  "
              f"strip rate {np.mean(result.strip_calibrated[mode]):.1f} (calibrated thresholds; upper bound with "
              f"thresholds chosen on the test split {np.mean(result.strip[mode]):.1f})", file=out)
    print(f"\nPrecision: {result.precision}\nRun folder: {result.run_dir}\nMLflow store: {result.tracking_uri}  "
          f"(clpipe ui --storage {result.run_dir.parent})", file=out)
