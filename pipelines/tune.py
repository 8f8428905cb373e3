"""`clpipe tune run.yaml search.yaml`: a Ray Tune search over run-config fields.

Each trial is a whole task sequence run by the same `Driver` as `clpipe run`, under its own run id
(`<name>-trial-<hash of its params>-<config hash>`, in `storage/trials/`), so it has its own durable
ledger: a trial restarted after a crash continues from its last done stage. The trial reports to
Tune after each task (`stage` = number of tasks learned so far, the ASHA time attribute), so ASHA
can stop a poor trial after its first tasks.

Layout under `--storage DIR`:
    DIR/mlflow.db, DIR/mlartifacts   one MLflow store: a `clpipe.kind=search` run with every
                                     trial's sequence run nested under it (`clpipe ui --storage DIR`)
    DIR/trials/<trial run id>/       each trial's run folder (ledger, banks, report), as `clpipe run`
    DIR/tune/<search id>/            Tune's experiment state; rerunning the command restores it
    DIR/<search id>/best.yaml        the best finished trial's run config (`clpipe run` takes it)
    DIR/<search id>/trials.csv       one row per trial: params, AA, BwT, score, state

The search file (every field but `space` optional):

    space:                               # dotted run-config path → one domain
      method.params.adv_weight: {grid: [0.0, 0.1]}
      training.lr: {loguniform: [1.0e-4, 1.0e-2]}
      bank.rank: {choice: [4, 8]}        # also {uniform: [lo, hi]}, {randint: [lo, hi]} (hi excluded)
    search: grid                         # grid | random | optuna
    num_samples: 1                       # random/optuna: trials; grid: must be 1
    metric: AA                           # AA (final AA) | weighted: AA + bwt_weight · BwT
    mode: max
    scheduler: none                      # asha | none; asha uses grace_period, reduction_factor
    max_concurrent_trials: 2             # default: as many as the CPUs hold (see below)
    resources_per_trial: 0               # CPUs held by each trial's driver thread (it mostly waits)
    trial_workers: 1                     # ray.num_workers of every trial
    trial_cpus_per_worker: 0.5           # ray.cpus_per_worker of every trial

CPUs per trial. Tune reserves a placement group per trial: its driver (`resources_per_trial`)
and one bundle of `trial_cpus_per_worker` where the trial's prepare/bank/evaluate Ray tasks run
(Tune captures a trial's child tasks into its group and refuses those that do not fit). Ray Train
V2 places the trial's training workers in a group of their own, outside it, while a train stage
runs. So a trial needs resources_per_trial + (1 + trial_workers) × trial_cpus_per_worker CPUs:
1.0 with the defaults, so two trials run at once on 2 CPUs (with resources_per_trial 0.5, one).
More concurrent trials than the CPUs hold would deadlock (trials holding the CPUs their workers
wait for), so max_concurrent_trials is capped to what fits.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipelines.config import ConfigError, RunConfig, Strict, _format_error, parse_config

SEARCH_KIND = "search"
GRID_CHECKS_MAX = 256  # full grid combinations validated before the search starts


# -- the search file ---------------------------------------------------------------------------------
class Domain(Strict):
    """One searched field: exactly one of the keys."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None
    randint: list[int] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform, randint"
                             + (f" (got {', '.join(given)})" if given else ""))
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice"):
            if not values:
                raise ValueError(f"{kind}: empty list; give at least one value")
        else:
            if len(values) != 2:
                raise ValueError(f"{kind}: give [low, high], got {values}")
            lo, hi = values
            if not lo < hi:
                raise ValueError(f"{kind}: low {lo} must be below high {hi}")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: low {lo} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that every sample lies between or among: each is tried on the run config."""
        v = getattr(self, self.kind)
        return list(v) if self.kind in ("grid", "choice") else [v[0], v[1] - 1] if self.kind == "randint" else list(v)

    def to_tune(self):
        from ray import tune

        v = getattr(self, self.kind)
        if self.kind == "grid":
            return tune.grid_search(list(v))
        if self.kind == "choice":
            return tune.choice(list(v))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*v)


class SearchConfig(Strict):
    space: dict[str, Domain] = Field(min_length=1)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0)
    metric: Literal["AA", "weighted"] = "AA"
    bwt_weight: float | None = None
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "none"
    grace_period: int | None = Field(None, gt=0)
    reduction_factor: float | None = Field(None, gt=1)
    max_concurrent_trials: int | None = Field(None, gt=0)
    resources_per_trial: float = Field(0.0, ge=0)
    trial_workers: int = Field(1, gt=0)
    trial_cpus_per_worker: float = Field(0.5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        kinds = {path: d.kind for path, d in self.space.items()}
        if self.search == "grid":
            other = {p: k for p, k in kinds.items() if k != "grid"}
            if other:
                path, kind = next(iter(other.items()))
                raise ValueError(f"search: grid needs {{grid: [...]}} for every path; space.{path} is {kind} "
                                 f"(use search: random or optuna)")
            if self.num_samples != 1:
                raise ValueError("num_samples: a grid is run once (num_samples: 1); its trials are deterministic")
        if self.search == "optuna":
            grids = [p for p, k in kinds.items() if k == "grid"]
            if grids:
                raise ValueError(f"search: optuna cannot search a grid; space.{grids[0]}: use choice instead")
        if self.metric == "AA" and self.bwt_weight is not None:
            raise ValueError("bwt_weight: only used with metric: weighted")
        if self.scheduler != "asha" and (self.grace_period is not None or self.reduction_factor is not None):
            raise ValueError("grace_period/reduction_factor: only used with scheduler: asha")
        for path in self.space:
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"space.{path}: not a dotted run-config path such as training.lr")
            top = path.split(".")[0]
            if top == "name":
                raise ValueError("space.name: clpipe tune names each trial itself (<name>-trial-<params hash>)")
            if top == "mlflow":
                raise ValueError(f"space.{path}: mlflow.* does not change a run's results; nothing to search")
            if top == "ray":
                raise ValueError(f"space.{path}: set the trials' Ray resources with trial_workers and "
                                 f"trial_cpus_per_worker (they decide how many trials fit at once)")
        return self

    @property
    def weight(self) -> float:
        return (1.0 if self.bwt_weight is None else self.bwt_weight) if self.metric == "weighted" else 0.0

    def per_trial_cpus(self) -> float:
        return self.resources_per_trial + (1 + self.trial_workers) * self.trial_cpus_per_worker

    def identity(self) -> dict:
        """What shapes the trials (not how many run at once: a rerun with another limit resumes)."""
        return self.model_dump(mode="json", exclude={"max_concurrent_trials"})


def check_path(path: str) -> None:
    """The dotted path against the run config's schema: each part a field of its section (free-form
    sections such as method.params are left to the config check), digits index lists."""
    from pydantic import BaseModel

    node: Any = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if node is None:
            raise ConfigError(f"{'.'.join(parts[:i])}: is a value, not a section; {path} does not exist")
        if node == "list":
            node = list_item
            if not part.isdigit():
                raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a list; index it with a number")
            continue
        if node == "free":
            return
        if part not in node.model_fields:
            raise ConfigError(f"{where}: unknown field; {'.'.join(parts[:i]) or 'the run config'} has "
                              f"{', '.join(node.model_fields)}")
        node, list_item = _section(node.model_fields[part].annotation, BaseModel)


def _section(annotation, base_model) -> tuple[Any, Any]:
    """A field's type as a path step: (model class | "list" | "free" | None for a value, list item model)."""
    import types
    import typing

    def is_model(a):
        return isinstance(a, type) and issubclass(a, base_model)

    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if is_model(annotation):
        return annotation, None
    if origin is list and args and is_model(args[0]):
        return "list", args[0]
    if origin is dict or annotation is dict:
        return "free", None
    if origin in (typing.Union, types.UnionType):
        for a in args:
            step = _section(a, base_model)
            if step[0] is not None:
                return step
    return None, None


def set_path(data: dict, path: str, value: Any) -> None:
    """data[a][b][c] = value for path "a.b.c"; missing sections are created (the run config's schema
    then says whether they exist); digits index lists (`tasks.1.max_train_examples`)."""
    parts = path.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: no item {part} (the list has {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{where}: is a value ({node!r}), not a section")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{where}: is a value ({node!r}), not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{path}: no item {last} (the list has {len(node)})")
        node[int(last)] = value
    else:
        node[last] = value


def apply_params(base: dict, params: dict[str, Any]) -> dict:
    data = copy.deepcopy(base)
    for path, value in params.items():
        set_path(data, path, value)
    return data


def validate_search(search_data: Any, base_data: dict, search_source: str = "<search>",
                    run_source: str = "<run>", base_dir: Path | None = None) -> SearchConfig:
    """The search file, checked against the run config before any compute: every value a trial can
    get is applied to the run config and parsed; errors name the search path."""
    if not isinstance(search_data, dict):
        raise ConfigError(f"{search_source}: expected a mapping at the top level")
    try:
        search = SearchConfig.model_validate(search_data)
    except ValidationError as e:
        raise ConfigError(_format_error(search_source, e)) from None
    base_dir = base_dir or Path.cwd()
    base_cfg = parse_config(copy.deepcopy(base_data), run_source, base_dir)
    for path, domain in search.space.items():
        try:
            check_path(path)
        except ConfigError as e:
            raise ConfigError(f"{search_source}: space.{path}: not a field of the run config: {e}") from None
        for value in domain.probe_values():
            try:
                parse_config(apply_params(base_data, {path: value}), f"{run_source} with {path}={value!r}",
                                  base_dir)
            except ConfigError as e:
                raise ConfigError(f"{search_source}: space.{path}: value {value!r} does not fit the run config: "
                                  f"{e}") from None
    if search.search == "grid":  # the trials themselves, when there are not too many
        combos = _grid_combinations(search)
        for params in combos[:GRID_CHECKS_MAX]:
            try:
                parse_config(_trial_data(base_data, base_cfg.name, params, search), run_source, base_dir)
            except ConfigError as e:
                raise ConfigError(f"{search_source}: the trial {params} does not fit the run config: {e}") from None
    n_tasks = len(base_cfg.tasks)
    if search.scheduler == "asha" and (search.grace_period or 1) >= n_tasks:
        raise ConfigError(f"{search_source}: grace_period: {search.grace_period or 1} is not below the number of "
                          f"tasks ({n_tasks}); ASHA could never stop a trial early")
    return search


def _grid_combinations(search: SearchConfig) -> list[dict]:
    combos: list[dict] = [{}]
    for path, domain in search.space.items():
        combos = [{**c, path: v} for c in combos for v in domain.grid]
    return combos


def load_search(path: Path, run_path: Path) -> tuple[SearchConfig, dict, RunConfig]:
    """(search, the run config's raw dict, the parsed run config); ConfigError on any problem."""
    from pipelines.config import load_config, read_yaml_mapping

    base_cfg = load_config(run_path)
    base_data = yaml.safe_load(Path(run_path).read_text())
    path = Path(path)
    data = read_yaml_mapping(path, "search")
    search = validate_search(data, base_data, str(path), str(run_path), Path(run_path).resolve().parent)
    return search, base_data, base_cfg


def plan_concurrency(search: SearchConfig, cluster_cpus: float) -> int:
    """How many trials may run at once without starving their workers of CPUs."""
    need = search.per_trial_cpus()
    fits = int(math.floor(cluster_cpus / need + 1e-9))
    if fits < 1:
        raise ConfigError(f"resources_per_trial + (1 + trial_workers) × trial_cpus_per_worker = "
                          f"{search.resources_per_trial:g} + {1 + search.trial_workers} × "
                          f"{search.trial_cpus_per_worker:g} = {need:g} CPUs per trial; the cluster has "
                          f"{cluster_cpus:g}")
    if search.max_concurrent_trials is None:
        return fits
    if search.max_concurrent_trials > fits:
        print(f"[clpipe] max_concurrent_trials {search.max_concurrent_trials} lowered to {fits}: each trial needs "
              f"{need:g} CPUs and the cluster has {cluster_cpus:g}", file=sys.stderr)
    return min(search.max_concurrent_trials, fits)


def search_id(base_cfg: RunConfig, search: SearchConfig) -> str:
    payload = json.dumps({"run": base_cfg.identity_hash(), "search": search.identity()}, sort_keys=True)
    return f"{base_cfg.name}-search-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _trial_data(base_data: dict, base_name: str, params: dict, search: SearchConfig | dict) -> dict:
    s = search if isinstance(search, dict) else {"trial_workers": search.trial_workers,
                                                  "trial_cpus_per_worker": search.trial_cpus_per_worker}
    data = copy.deepcopy(base_data)
    data["name"] = f"{base_name}-trial-{params_hash(params)}"
    ray_section = data.get("ray") or {}
    data["ray"] = {**ray_section, "num_workers": s["trial_workers"], "cpus_per_worker": s["trial_cpus_per_worker"]}
    return apply_params(data, params)


def trial_config(ctx: dict, params: dict) -> RunConfig:
    data = _trial_data(ctx["base_data"], ctx["base_name"], params, ctx)
    data.setdefault("mlflow", {})
    data["mlflow"] = {**(data["mlflow"] or {}), "tracking_uri": ctx["tracking_uri"]}
    return parse_config(data, ctx["run_source"], Path(ctx["base_dir"]))


# -- one trial (runs in a Tune trial actor) --------------------------------------------------------
def _partial_scores(rows: dict[int, list[float]], t: int, weight: float) -> dict[str, float]:
    from cl_core.metrics import average_accuracy, backward_transfer
    from pipelines.report import accuracy_matrix

    R = accuracy_matrix([rows[i] for i in range(t + 1)], t + 1)
    aa, bwt = average_accuracy(R), backward_transfer(R)
    return {"AA_so_far": aa, "BwT_so_far": bwt, "score": aa + weight * bwt}


def run_trial(params: dict, ctx: dict) -> None:
    """A Tune function trainable: one task sequence through the Driver, one report per task."""
    from ray import tune

    from pipelines.driver import Driver
    from pipelines.tracking import Tracker

    cfg = trial_config(ctx, params)
    n = len(cfg.tasks)
    trials_dir = Path(ctx["storage"]) / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    try:
        log = open(Path(tune.get_context().get_trial_dir()) / "driver.log", "a", buffering=1)
    except Exception:  # no trial dir (called outside Tune): log to stderr
        log = sys.stderr

    def progress(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=log, flush=True)

    # Nest the trial's sequence run under the search run: create it (as the Driver would, by its
    # tags) and tag its parent; the Driver then finds it and logs into it.
    tracker = Tracker(ctx["tracking_uri"], cfg.mlflow.experiment, trials_dir)
    sequence_run = tracker.parent_run(cfg.run_id, cfg.model_dump())
    for key, value in {"mlflow.parentRunId": ctx["search_run"], "clpipe.search_id": ctx["search_id"],
                       "clpipe.trial_params": json.dumps(params, sort_keys=True, default=str)}.items():
        tracker.client.set_tag(sequence_run, key, value)

    rows: dict[int, list[float]] = {}

    def on_evaluated(t: int, row: dict) -> None:
        rows[t] = row["rows"]["oracle"]["accuracy"]
        if t < n - 1:  # the last one is reported once the run's report and MLflow runs are written
            tune.report({"stage": t + 1, "task": t, "tasks": n, "run_id": cfg.run_id,
                         **_partial_scores(rows, t, ctx["weight"])})

    # Two trials with the same params (random/optuna can draw them) share one run folder: one at a time.
    (trials_dir / cfg.run_id).mkdir(exist_ok=True)
    with open(trials_dir / cfg.run_id / ".trial.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # ASHA decides on each task's row before the trial trains the next task.
        result = Driver(cfg, trials_dir, progress, on_evaluated=on_evaluated, overlap_eval=False).run()
    final = result.summary["oracle"]
    tune.report({"stage": n, "task": n - 1, "tasks": n, "run_id": cfg.run_id,
                 **_partial_scores(rows, n - 1, ctx["weight"]),
                 "AA": final["AA"], "BwT": final["BwT"], "FwT": final["FwT"], "forgetting": final["forgetting"]})


def trial_dirname(trial) -> str:
    return trial.trial_id


def _progress_callback_class():
    from ray.tune import Callback

    class TrialProgress(Callback):
        """One line per trial event on the console (Tune's own output is turned off)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"[tune] {trial.trial_id} started   {_short(trial.config)}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(f"[tune] {trial.trial_id} stage {result.get('stage')}/{result.get('tasks')}  "
                  f"AA so far {result.get('AA_so_far', float('nan')):5.1f}  score {result.get('score', float('nan')):5.1f}",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            early = r.get("stage") is not None and r.get("stage") < r.get("tasks", 0)
            print(f"[tune] {trial.trial_id} {'stopped early at stage ' + str(r.get('stage')) if early else 'finished'}",
                  flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[tune] {trial.trial_id} ERROR (see {trial.path}/error.txt)", flush=True)

    return TrialProgress


def _short(params: dict) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in params.items())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- the search ------------------------------------------------------------------------------------
def _search_run(tracker, sid: str, search: SearchConfig, base_cfg: RunConfig) -> str:
    from mlflow.entities import Param

    tags = {"clpipe.kind": SEARCH_KIND, "clpipe.search_id": sid}
    existing = tracker._find(tags)
    if existing:
        tracker.client.update_run(existing, status="RUNNING")
        return existing
    run = tracker.client.create_run(tracker.experiment_id, run_name=sid,
                                    tags={**tags, "clpipe.base_run_id": base_cfg.run_id})
    params = {f"space.{p}": json.dumps(d.model_dump(exclude_none=True)) for p, d in search.space.items()}
    params.update({k: str(v) for k, v in search.identity().items() if k != "space"})
    params["base_run_id"] = base_cfg.run_id
    tracker.client.log_batch(run.info.run_id, params=[Param(k, v[:500]) for k, v in sorted(params.items())])
    return run.info.run_id


def _prewarm(ctx: dict) -> None:
    """The model and data stages once, before trials start at the same time on the shared cache
    (two concurrent `prepare`s of one task collide on the cache folder)."""
    import ray

    from pipelines import stages

    from cl_core.base_model import ModelSpec

    cfg = trial_config(ctx, {})
    opts = stages.task_options(cfg)
    cache = Path(ctx["storage"]) / "trials" / "cache"
    base = ModelSpec.model_validate(ray.get(stages.materialize.options(**opts).remote(cfg, str(cache / "models")))["spec"])
    ray.get([stages.prepare.options(**opts).remote(cfg, t, base, str(cache / "prepared")) for t in range(len(cfg.tasks))])


def _tuner(ctx: dict, search: SearchConfig, concurrency: int, experiment_dir: Path, n_tasks: int):
    from ray import tune

    # The head bundle: the trial's driver; the second: its stage tasks (see the module docstring).
    resources = tune.PlacementGroupFactory([{"CPU": search.resources_per_trial},
                                            {"CPU": search.trial_cpus_per_worker}])
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    if tune.Tuner.can_restore(str(experiment_dir)):
        print(f"resuming the search from {experiment_dir}", flush=True)
        return tune.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if search.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # max_t one past the last stage: the last report comes after the run's report is written.
        scheduler = ASHAScheduler(time_attr="stage", max_t=n_tasks + 1, grace_period=search.grace_period or 1,
                                  reduction_factor=search.reduction_factor or 2)
    if search.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            algo = OptunaSearch(seed=search.seed)  # Tune wraps it in a ConcurrencyLimiter
        except (ImportError, AssertionError) as e:
            raise ConfigError(f"search: optuna needs the optuna package (pip install optuna): {e}") from None
    else:
        from ray.tune.search import BasicVariantGenerator

        # A SearchGenerator ignores TuneConfig.max_concurrent_trials: it takes its own limit.
        algo = BasicVariantGenerator(max_concurrent=concurrency, random_state=search.seed)
    return tune.Tuner(
        trainable,
        param_space={path: d.to_tune() for path, d in search.space.items()},
        tune_config=tune.TuneConfig(metric="score", mode=search.mode, num_samples=search.num_samples,
                                    max_concurrent_trials=concurrency if search.search == "optuna" else None, search_alg=algo, scheduler=scheduler,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=experiment_dir.name, storage_path=str(experiment_dir.parent), verbose=0,
                                  callbacks=[_progress_callback_class()()],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def trial_rows(results, ctx: dict, paths: list[str], n_tasks: int) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        params = {p: (r.config or {}).get(p) for p in paths}
        stage = m.get("stage")
        state = ("ERROR" if r.error is not None else "finished" if stage == n_tasks
                 else f"stopped@{stage}" if stage else "not run")
        try:
            run_id = trial_config(ctx, params).run_id
        except ConfigError:
            run_id = m.get("run_id", "?")
        rows.append({"trial": Path(r.path).name if r.path else m.get("trial_id", "?"), "run_id": run_id, **params,
                     "stages": f"{stage or 0}/{n_tasks}", "AA": m.get("AA", m.get("AA_so_far")),
                     "BwT": m.get("BwT", m.get("BwT_so_far")), "score": m.get("score"), "state": state})
    return sorted(rows, key=lambda row: row["trial"])


def format_table(rows: list[dict], paths: list[str]) -> str:
    headers = ["trial", *paths, "stages", "AA", "BwT", "score", "state"]
    def cell(row, h):
        v = row.get(h)
        if v is None:
            return "-"
        if h in ("AA", "BwT", "score"):
            return f"{v:+.1f}" if h == "BwT" else f"{v:.1f}"
        return _fmt(v)
    table = [headers] + [[cell(r, h) for h in headers] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def pick_best(rows: list[dict], mode: str) -> dict | None:
    finished = [r for r in rows if r["state"] == "finished" and r["score"] is not None]
    if not finished:
        return None
    sign = 1 if mode == "max" else -1
    return max(finished, key=lambda r: sign * r["score"])


def _close_unfinished_runs(tracker, rows: list[dict]) -> None:
    """Trials stopped early or failed leave their sequence and stage runs RUNNING: close them."""
    for row in rows:
        if row["state"] == "finished":
            continue
        status = "FAILED" if row["state"] == "ERROR" else "KILLED"
        runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`clpipe.run_id` = '{row['run_id']}'")
        for run in runs:
            if run.info.status == "RUNNING":
                tracker.client.set_terminated(run.info.run_id, status)
            if run.data.tags.get("clpipe.kind") == "sequence":
                tracker.client.set_tag(run.info.run_id, "clpipe.tune_state", row["state"])


def run_search(config_path: Path, search_path: Path, storage: Path) -> int:
    import ray

    from pipelines.config import load_config
    from pipelines.driver import check_data, start_ray
    from pipelines.tracking import Tracker, default_tracking_uri

    wall = time.perf_counter()
    search, base_data, base_cfg = load_search(search_path, config_path)
    check_data(base_cfg)
    storage = Path(storage).resolve()
    sid = search_id(base_cfg, search)
    out_dir = storage / sid
    paths = list(search.space)
    n_tasks = len(base_cfg.tasks)
    tracking_uri = base_cfg.mlflow.tracking_uri or default_tracking_uri(storage)
    storage.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(tracking_uri, base_cfg.mlflow.experiment, storage)
    started_ray = not ray.is_initialized()
    start_ray(base_cfg)
    try:
        concurrency = plan_concurrency(search, ray.cluster_resources().get("CPU", 0))
        search_run = _search_run(tracker, sid, search, base_cfg)
        ctx = {"base_data": base_data, "base_name": base_cfg.name, "run_source": str(config_path),
               "base_dir": str(Path(config_path).resolve().parent), "storage": str(storage),
               "tracking_uri": tracking_uri, "search_run": search_run, "search_id": sid, "weight": search.weight,
               "trial_workers": search.trial_workers, "trial_cpus_per_worker": search.trial_cpus_per_worker}
        print(f"clpipe tune {sid}: {search.search} search over {', '.join(paths)}; {n_tasks} tasks per trial; "
              f"up to {concurrency} trials at once ({search.per_trial_cpus():g} CPUs each); storage {storage}",
              flush=True)
        _prewarm(ctx)
        # Tune's experiment state every second (default: adaptive, can be minutes): a killed search
        # then restores with its finished trials marked finished.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        tuner = _tuner(ctx, search, concurrency, storage / "tune" / sid, n_tasks)
        results = tuner.fit()

        rows = trial_rows(results, ctx, paths, n_tasks)
        _close_unfinished_runs(tracker, rows)
        out_dir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
        (out_dir / "trials.csv").write_text(buf.getvalue())
        print(f"\nTrials of {sid} (metric: {'AA' if search.metric == 'AA' else f'AA + {search.weight:g}·BwT'}, "
              f"{search.mode}; AA/BwT in points, of the tasks learned so far for stopped trials)")
        print(format_table(rows, paths))
        best = pick_best(rows, search.mode)
        errors = [r for r in rows if r["state"] == "ERROR"]
        if best is None:
            print("\nno trial finished; no best config", file=sys.stderr)
            tracker.finish(search_run, ok=False)
            return 1
        best_cfg = trial_config(ctx, {p: best[p] for p in paths})
        data = best_cfg.model_dump()
        data["mlflow"] = (base_cfg.mlflow.model_dump())
        header = (f"# Best trial of search {sid}: {best['trial']} ({_short({p: best[p] for p in paths})}), "
                  f"score {best['score']:.2f}, AA {best['AA']:.2f}, BwT {best['BwT']:+.2f}.\n"
                  f"# Its run folder: {storage / 'trials' / best_cfg.run_id}. ray.* is the trial's "
                  f"({best_cfg.ray.num_workers} × {best_cfg.ray.cpus_per_worker:g} CPU); changing it changes the run id.\n"
                  f"# Run it again with\n"
                  f"#   clpipe run {out_dir / 'best.yaml'} --storage DIR\n")
        (out_dir / "best.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
        load_config(out_dir / "best.yaml")  # it must load as written
        tracker.log(search_run, {"best/score": best["score"], "best/AA": best["AA"], "best/BwT": best["BwT"],
                                 "trials/finished": sum(r["state"] == "finished" for r in rows),
                                 "trials/stopped": sum(r["state"].startswith("stopped") for r in rows),
                                 "trials/errors": len(errors)})
        tracker.client.set_tag(search_run, "clpipe.best_run_id", best_cfg.run_id)
        for f in ("best.yaml", "trials.csv"):
            try:
                tracker.artifact(search_run, out_dir / f)
            except Exception as e:  # the results are on disk; MLflow is secondary
                print(f"[clpipe] warning: MLflow artifact {f}: {e}", file=sys.stderr)
        tracker.finish(search_run, ok=not errors)
        print(f"\nbest: {best['trial']} {_short({p: best[p] for p in paths})}  score {best['score']:.1f}  "
              f"AA {best['AA']:.1f}  BwT {best['BwT']:+.1f}  run {best_cfg.run_id}")
        print(f"best config: {out_dir / 'best.yaml'}\ntrials: {out_dir / 'trials.csv'}\n"
              f"MLflow: {tracking_uri} (clpipe ui --storage {storage})   wall {time.perf_counter() - wall:.0f}s")
        if errors:
            print(f"{len(errors)} trial(s) failed: {', '.join(r['trial'] for r in errors)}; rerun the same command "
                  f"to retry them", file=sys.stderr)
            return 1
        return 0
    finally:
        if started_ray:
            ray.shutdown()
