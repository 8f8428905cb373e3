"""One trial of `clpipe tune`: a whole task sequence run by the same Driver as `clpipe run`, in a
Tune trial actor, reporting to Tune after each task (`stage` = tasks learned so far, the ASHA
time attribute) so that ASHA can stop a poor trial between tasks.

Tune chooses on the validation slices only: `score` (what ASHA stops on and the best trial is
picked by) is AA (+ weight · BwT) of the validation accuracy matrix. The test split's AA and BwT
are reported beside it, never chosen on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipelines.search.space import trial_config, trial_params


def _partial_scores(rows: dict[int, dict], t: int, weight: float) -> dict[str, float]:
    """AA and BwT of the tasks learned so far on both splits, and the score, on validation only."""
    from cl_core.metrics import average_accuracy, backward_transfer
    from pipelines.run.report import accuracy_matrix

    out = {}
    for split, prefix in (("rows", ""), ("validation", "val_")):
        R = accuracy_matrix([rows[i][split]["oracle"]["accuracy"] for i in range(t + 1)], t + 1)
        out.update({f"{prefix}AA_so_far": average_accuracy(R), f"{prefix}BwT_so_far": backward_transfer(R)})
    return {**out, "score": out["val_AA_so_far"] + weight * out["val_BwT_so_far"]}


def run_trial(config: dict, ctx: dict) -> None:
    """A Tune function trainable: one task sequence through the Driver, one report per task."""
    from ray import tune

    from pipelines.run.driver import Driver
    from pipelines.tracking import Tracker

    params = trial_params(config)
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
    tracker.nest(sequence_run, ctx["search_run"], {"clpipe.search_id": ctx["search_id"],
                                                   "clpipe.trial_params": json.dumps(params, sort_keys=True, default=str)})

    rows: dict[int, dict] = {}

    def on_evaluated(t: int, row: dict) -> None:
        rows[t] = row
        if t < n - 1:  # the last one is reported once the run's report and MLflow runs are written
            tune.report({"stage": t + 1, "task": t, "tasks": n, "run_id": cfg.run_id,
                         **_partial_scores(rows, t, ctx["weight"])})

    # Two trials with the same params (random/optuna can draw them) share one run folder: the second
    # waits for the first's lease. ASHA decides on each task's row before the trial trains the next task.
    result = Driver(cfg, trials_dir, progress, on_evaluated=on_evaluated, overlap_eval=False,
                    wait_for_lease=True).run()
    final, val, scores = result.summary["oracle"], result.val_summary["oracle"], _partial_scores(rows, n - 1, ctx["weight"])
    # `final_score` only in a finished trial's last report: Tune picks the best on it (tune.best_trial).
    tune.report({"stage": n, "task": n - 1, "tasks": n, "run_id": cfg.run_id, **scores, "final_score": scores["score"],
                 "val_AA": val["AA"], "val_BwT": val["BwT"], "AA": final["AA"], "BwT": final["BwT"],
                 "FwT": final["FwT"], "forgetting": final["forgetting"]})


def trial_dirname(trial) -> str:
    return trial.trial_id
