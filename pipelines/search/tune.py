"""`clpipe tune run.yaml search.yaml`: a Ray Tune search over run-config fields.

Each trial is a whole task sequence run by the same `Driver` as `clpipe run`, under its own run id
(`<name>-trial-<hash of its params>-<config hash>`, in `storage/trials/`), so it has its own durable
ledger: a trial restarted after a crash continues from its last done stage. The trial reports to
Tune after each task (`stage` = number of tasks learned so far, the ASHA time attribute), so ASHA
can stop a poor trial after its first tasks. This module runs the search; the search file and the
trials' run configs are in `pipelines/search/space.py`, one trial in `pipelines/search/trial.py`, and
every MLflow call goes through `pipelines/tracking.py`.

Layout under `--storage DIR`:
    DIR/mlflow.db, DIR/mlartifacts   one MLflow store: a `clpipe.kind=search` run with every
                                     trial's sequence run nested under it (`clpipe ui --storage DIR`)
    DIR/trials/<trial run id>/       each trial's run folder (ledger, banks, report), as `clpipe run`
    DIR/tune/<search id>/            Tune's experiment state; rerunning the command restores it
    DIR/<search id>/best.yaml        the best finished trial's run config (`clpipe run` takes it)
    DIR/<search id>/trials.csv       one row per trial: params, validation AA/BwT, score (chosen on),
                                     test AA/BwT (reported only), state

The search file (every field but `space` optional):

    space:                               # dotted run-config path → one domain
      method.params.adv_weight: {grid: [0.0, 0.1]}
      training.lr: {loguniform: [1.0e-4, 1.0e-2]}
      bank.rank: {choice: [4, 8]}        # also {uniform: [lo, hi]}, {randint: [lo, hi]} (hi excluded)
    search: grid                         # grid | random | optuna
    num_samples: 1                       # random/optuna: trials; grid: must be 1
    metric: AA                           # AA (final AA) | weighted: AA + bwt_weight · BwT, both on validation
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

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, RunConfig
from pipelines.search.space import (SearchConfig, load_search, param_space, plan_concurrency, search_id, trial_config,
                                    trial_params)
from pipelines.search.trial import run_trial, trial_dirname


def _short(params: dict) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in params.items())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- the search ------------------------------------------------------------------------------------
def _search_run(tracker, sid: str, search: SearchConfig, base_cfg: RunConfig) -> str:
    params = {f"space.{p}": json.dumps(d.model_dump(exclude_none=True)) for p, d in search.space.items()}
    params.update({k: str(v) for k, v in search.identity().items() if k != "space"})
    return tracker.search_run(sid, params, base_cfg.run_id)


def _prewarm(ctx: dict) -> None:
    """The model and data stages once, before trials start at the same time on the shared cache
    (two concurrent `prepare`s of one task collide on the cache folder)."""
    import ray

    from pipelines.run import stages

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
        param_space=param_space(search),
        tune_config=tune.TuneConfig(metric="score", mode=search.mode, num_samples=search.num_samples,
                                    max_concurrent_trials=concurrency if search.search == "optuna" else None, search_alg=algo, scheduler=scheduler,
                                    trial_dirname_creator=trial_dirname),
        # Progress is Tune's own reporter (trial started / result / completed, status tables).
        run_config=tune.RunConfig(name=experiment_dir.name, storage_path=str(experiment_dir.parent), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def trial_rows(results, ctx: dict, paths: list[str], n_tasks: int) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        flat = trial_params(r.config or {})
        params = {p: flat.get(p) for p in paths}
        stage = m.get("stage")
        state = ("ERROR" if r.error is not None else "finished" if stage == n_tasks
                 else f"stopped@{stage}" if stage else "not run")
        try:
            run_id = trial_config(ctx, params).run_id
        except ConfigError:
            run_id = m.get("run_id", "?")
        rows.append({"trial": Path(r.path).name if r.path else m.get("trial_id", "?"), "run_id": run_id, **params,
                     "stages": f"{stage or 0}/{n_tasks}",
                     **{f"{split}{measure}": m.get(f"{split}{measure}", m.get(f"{split}{measure}_so_far"))
                        for split in ("val_", "") for measure in ("AA", "BwT")},
                     "score": m.get("score"), "state": state})
    return sorted(rows, key=lambda row: row["trial"])


def format_table(rows: list[dict], paths: list[str]) -> str:
    columns = ["trial", *paths, "stages", "val_AA", "val_BwT", "score", "AA", "BwT", "state"]
    headers = [{"val_AA": "val AA", "val_BwT": "val BwT", "AA": "test AA", "BwT": "test BwT"}.get(h, h) for h in columns]

    def cell(row, h):
        v = row.get(h)
        if v is None:
            return "-"
        if h in ("val_AA", "val_BwT", "AA", "BwT", "score"):
            return f"{v:+.1f}" if h.endswith("BwT") else f"{v:.1f}"
        return _fmt(v)
    table = [headers] + [[cell(r, h) for h in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def best_trial(results, mode: str) -> str | None:
    """Tune's best trial on `final_score`, which only a finished trial reports: a trial stopped
    early never wins with its partial score. None if no trial finished."""
    try:
        return Path(results.get_best_result(metric="final_score", mode=mode, scope="last").path).name
    except RuntimeError:
        return None


def _close_unfinished_runs(tracker, rows: list[dict]) -> None:
    """Trials stopped early or failed leave their sequence and stage runs RUNNING: close them."""
    for row in rows:
        if row["state"] == "finished":
            continue
        tracker.close_sequence(row["run_id"], "FAILED" if row["state"] == "ERROR" else "KILLED", row["state"])


def run_search(config_path: Path, search_path: Path, storage: Path, overrides: dict | None = None) -> int:
    import ray

    from pipelines.config import load_config
    from pipelines.run.driver import check_data, start_ray
    from pipelines.credentials import without_credentials
    from pipelines.tracking import Tracker, default_tracking_uri

    wall = time.perf_counter()
    search, base_data, base_cfg = load_search(search_path, config_path, overrides)
    if base_cfg.eval.validation_examples == 0:
        raise ConfigError(f"{config_path}: eval.validation_examples: 0 leaves the search nothing to choose on "
                          f"(trials are scored on the validation slices, never on the test split)")
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
        print(f"\nTrials of {sid} (score: validation {'AA' if search.metric == 'AA' else f'AA + {search.weight:g}·BwT'}, "
              f"{search.mode}; test AA/BwT are reported, never chosen on; points, of the tasks learned so far for "
              f"stopped trials)")
        print(format_table(rows, paths))
        best_name = best_trial(results, search.mode)
        best = next((r for r in rows if r["trial"] == best_name), None)
        errors = [r for r in rows if r["state"] == "ERROR"]
        if best is None:
            print("\nno trial finished; no best config", file=sys.stderr)
            tracker.finish(search_run, ok=False)
            return 1
        best_cfg = trial_config(ctx, {p: best[p] for p in paths})
        data = best_cfg.model_dump()
        data["mlflow"] = (base_cfg.mlflow.model_dump())
        header = (f"# Best trial of search {sid}: {best['trial']} ({_short({p: best[p] for p in paths})}), "
                  f"score {best['score']:.2f} (validation AA {best['val_AA']:.2f}, BwT {best['val_BwT']:+.2f}); "
                  f"test AA {best['AA']:.2f}, BwT {best['BwT']:+.2f}.\n"
                  f"# Its run folder: {storage / 'trials' / best_cfg.run_id}. ray.* is the trial's "
                  f"({best_cfg.ray.num_workers} × {best_cfg.ray.cpus_per_worker:g} CPU); changing it changes the run id.\n"
                  f"# Run it again with\n"
                  f"#   clpipe run {out_dir / 'best.yaml'} --storage DIR\n")
        (out_dir / "best.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
        load_config(out_dir / "best.yaml")  # it must load as written
        tracker.log(search_run, {"best/score": best["score"], "best/val_AA": best["val_AA"],
                                 "best/val_BwT": best["val_BwT"], "best/AA": best["AA"], "best/BwT": best["BwT"],
                                 "trials/finished": sum(r["state"] == "finished" for r in rows),
                                 "trials/stopped": sum(r["state"].startswith("stopped") for r in rows),
                                 "trials/errors": len(errors)})
        tracker.tag(search_run, "clpipe.best_run_id", best_cfg.run_id)
        for f in ("best.yaml", "trials.csv"):
            try:
                tracker.artifact(search_run, out_dir / f)
            except Exception as e:  # the results are on disk; MLflow is secondary
                print(f"[clpipe] warning: MLflow artifact {f}: {e}", file=sys.stderr)
        tracker.finish(search_run, ok=not errors)
        print(f"\nbest: {best['trial']} {_short({p: best[p] for p in paths})}  score {best['score']:.1f}  "
              f"(validation AA {best['val_AA']:.1f}  BwT {best['val_BwT']:+.1f}; test AA {best['AA']:.1f}  "
              f"BwT {best['BwT']:+.1f})  run {best_cfg.run_id}")
        print(f"best config: {out_dir / 'best.yaml'}\ntrials: {out_dir / 'trials.csv'}\n"
              f"MLflow: {without_credentials(tracking_uri)} (clpipe ui --storage {storage})   wall {time.perf_counter() - wall:.0f}s")
        if errors:
            print(f"{len(errors)} trial(s) failed: {', '.join(r['trial'] for r in errors)}; rerun the same command "
                  f"to retry them", file=sys.stderr)
            return 1
        return 0
    finally:
        if started_ray:
            ray.shutdown()
