"""`clpipe tune`: search-file validation (fast), and real searches on tiny runs (slow): a grid with
MLflow nesting and a best config, ASHA stopping a poor trial, and a killed search resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config
from pipelines.search.space import SearchConfig, params_hash, plan_concurrency, trial_config, validate_search
from pipelines.search.tune import format_table
from tests.conftest import tiny_run

REPO = Path(__file__).resolve().parents[1]
CLPIPE = [sys.executable, "-m", "pipelines.cli"]
GRID = {"method.params.experts_per_task": {"grid": [1, 2]}, "method.params.adv_weight": {"grid": [0.0, 0.1]}}


# -- fast: the search file is checked before anything starts ------------------------------------------
@pytest.mark.parametrize("search, message", [
    ({"space": GRID, "serach": "grid"}, r"serach: unknown field"),
    ({"space": {}}, r"space: .*at least 1"),
    ({"space": {"training.lr": {"choice": []}}, "search": "random"}, r"space.training.lr: choice: empty list"),
    ({"space": {"training.lr": {"grid": [0.1], "choice": [0.2]}}}, r"space.training.lr: give exactly one of"),
    ({"space": {"training.lr": {"uniform": [0.1, 0.01]}}, "search": "random"}, r"low 0.1 must be below high 0.01"),
    ({"space": {"training.lr": {"loguniform": [0, 0.1]}}, "search": "random"}, r"loguniform: low 0.0 must be > 0"),
    ({"space": GRID, "num_samples": 0}, r"num_samples: Input should be greater than 0"),
    ({"space": GRID, "num_samples": 3}, r"num_samples: a grid is run once"),
    ({"space": GRID, "max_concurrent_trials": -1}, r"max_concurrent_trials: Input should be greater than 0"),
    ({"space": GRID, "trial_workers": 0}, r"trial_workers: Input should be greater than 0"),
    ({"space": GRID, "scheduler": "hyperband"}, r"scheduler: Input should be 'asha' or 'none'"),
    ({"space": GRID, "scheduler": "asha", "grace_period": 0}, r"grace_period: Input should be greater than 0"),
    ({"space": GRID, "scheduler": "asha", "grace_period": 2}, r"grace_period: 2 is not below the number of tasks \(2\)"),
    ({"space": GRID, "grace_period": 1}, r"only used with scheduler: asha"),
    ({"space": GRID, "bwt_weight": 0.5}, r"bwt_weight: only used with metric: weighted"),
    ({"space": {"training.lr": {"uniform": [0.001, 0.01]}}}, r"search: grid needs \{grid: \[...\]\} for every path"),
    ({"space": GRID, "search": "optuna"}, r"optuna cannot search a grid"),
    # Paths and values are tried on the run config itself.
    ({"space": {"training.lrr": {"grid": [0.1]}}}, r"space.training.lrr: not a field of the run config: training.lrr: unknown field; training has epochs, lr"),
    ({"space": {"trainin.lr": {"grid": [0.1]}}}, r"space.trainin.lr: .*trainin: unknown field"),
    ({"space": {"bank.rank.low": {"grid": [1]}}}, r"space.bank.rank.low: .*bank.rank: is a value"),
    ({"space": {"bank.rank": {"grid": [4, 0]}}}, r"space.bank.rank: value 0 .*bank.rank: Input should be greater than 0"),
    ({"space": {"bank.rank": {"randint": [0, 8]}}, "search": "random"}, r"space.bank.rank: value 0 "),
    ({"space": {"method.params.nope": {"grid": [1]}}}, r"space.method.params.nope: .*method.params.nope: unknown field"),
    ({"space": {"method.params.adv_weight": {"grid": [0.1, -1.0]}}}, r"space.method.params.adv_weight: value -1.0 .*adv_weight: Input should be greater than or equal to 0"),
    ({"space": {"tasks.5.name": {"grid": ["x"]}}}, r"space.tasks.5.name: .*no item 5"),
    ({"space": {"tasks.name": {"grid": ["x"]}}}, r"space.tasks.name: .*tasks is a list; index it with a number"),
    ({"space": {"method.params.shared_experts": {"grid": [0]}}}, r"method.params.shared_experts: Input should be greater than or equal to 1"),
    ({"space": {"name": {"grid": ["a", "b"]}}}, r"space.name: clpipe tune names each trial"),
    ({"space": {"ray.num_workers": {"grid": [1, 2]}}}, r"space.ray.num_workers: set the trials' Ray resources with"),
    ({"space": {"mlflow.experiment": {"grid": ["a"]}}}, r"does not change a run's results"),
])
def test_bad_search_files_name_the_problem(search, message):
    with pytest.raises(ConfigError, match=message):
        validate_search(search, tiny_run(tasks=2), "search.yaml", "run.yaml")


def test_good_search_file_and_trial_configs():
    base = tiny_run("base", tasks=2)
    search = validate_search({"space": {**GRID, "training.lr": {"grid": [0.01]}}, "trial_cpus_per_worker": 0.25},
                             base, "s.yaml", "r.yaml")
    ctx = {"base_data": base, "base_name": "base", "run_source": "r.yaml", "base_dir": str(REPO),
           "tracking_uri": "sqlite:////nowhere/mlflow.db", "trial_workers": 1, "trial_cpus_per_worker": 0.25}
    params = {"method.params.experts_per_task": 2, "method.params.adv_weight": 0.0, "training.lr": 0.01}
    cfg = trial_config(ctx, params)
    assert cfg.name == f"base-trial-{params_hash(params)}" and cfg.run_id.startswith(cfg.name + "-")
    assert cfg.method.params == {"adv_weight": 0.0, "experts_per_task": 2, "shared_anchor": "fisher"}  # the base's, and the trial's
    assert (cfg.ray.num_workers, cfg.ray.cpus_per_worker) == (1, 0.25)
    assert trial_config(ctx, dict(reversed(params.items()))).run_id == cfg.run_id  # order does not matter
    assert trial_config(ctx, {**params, "method.params.adv_weight": 0.1}).run_id != cfg.run_id
    assert base["ray"] == {"num_workers": 2, "cpus_per_worker": 1}  # the base dict is not modified
    assert search.per_trial_cpus() == 0.5
    sampled = validate_search({"space": {"bank.rank": {"randint": [2, 9]}, "training.lr": {"loguniform": [1e-4, 1e-2]},
                                         "method.params.adv_weight": {"choice": [0.0, 0.1]}},
                               "search": "optuna", "num_samples": 6, "metric": "weighted", "bwt_weight": 0.5,
                               "scheduler": "asha"}, base, "s.yaml", "r.yaml")
    assert sampled.weight == 0.5 and sampled.space["bank.rank"].probe_values() == [2, 8]
    assert sampled.space["training.lr"].to_tune().lower == 1e-4


def test_concurrency_fits_the_cluster(capsys):
    search = SearchConfig.model_validate({"space": GRID})
    assert plan_concurrency(search, 2) == 2  # 0 + (1 + 1) × 0.5 = 1 CPU per trial
    heavy = SearchConfig.model_validate({"space": GRID, "resources_per_trial": 0.5, "max_concurrent_trials": 4})
    assert plan_concurrency(heavy, 2) == 1 and "lowered to 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"= 3 CPUs per trial; the cluster has 2"):
        plan_concurrency(SearchConfig.model_validate({"space": GRID, "trial_workers": 2, "trial_cpus_per_worker": 1}), 2)


def test_the_table_lists_every_trial_with_validation_and_test_columns():
    rows = [{"trial": "a", "x": 1, "stages": "3/3", "val_AA": 81.0, "val_BwT": -4.0, "AA": 80.0, "BwT": -5.0,
             "score": 81.0, "state": "finished"},
            {"trial": "b", "x": 2, "stages": "1/3", "val_AA": 94.0, "val_BwT": 0.0, "AA": 95.0, "BwT": 0.0,
             "score": 94.0, "state": "stopped@1"},
            {"trial": "c", "x": 3, "stages": "0/3", "val_AA": None, "val_BwT": None, "AA": None, "BwT": None,
             "score": None, "state": "ERROR"}]
    table = format_table(rows, ["x"]).splitlines()
    assert table[0].split() == ["trial", "x", "stages", "val", "AA", "val", "BwT", "score", "test", "AA", "test", "BwT",
                                "state"]
    assert table[2].split() == ["b", "2", "1/3", "94.0", "+0.0", "94.0", "95.0", "+0.0", "stopped@1"]
    assert table[3].split()[-1] == "ERROR" and len(table) == 4


def test_cli_reports_a_bad_search_file_with_exit_code_2(tmp_path, capsys):
    from pipelines.cli import main

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_run(tasks=2)))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"space": {"training.lrr": {"grid": [0.1]}}}))
    assert main(["tune", str(run), str(search), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "clpipe: error:" in err and "space.training.lrr" in err and "unknown field" in err
    assert not (tmp_path / "s").exists()  # nothing started
    assert main(["tune", str(run), str(tmp_path / "missing.yaml"), "--storage", str(tmp_path / "s")]) == 2
    assert "search file not found" in capsys.readouterr().err


# -- slow: real searches ------------------------------------------------------------------------------
def _write(tmp: Path, run: dict, search: dict) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp / "search.yaml").write_text(yaml.safe_dump(search))
    return tmp / "run.yaml", tmp / "search.yaml"


def _trials_csv(storage: Path) -> list[dict]:
    (path,) = storage.glob("*-search-*/trials.csv")
    return list(csv.DictReader(path.open()))


def _mlflow_runs(storage: Path):
    from mlflow import MlflowClient

    from pipelines.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(storage))
    return client, client.search_runs([client.get_experiment_by_name("clpipe").experiment_id])


@pytest.fixture(scope="module")
def grid_search(ray_local, tmp_path_factory):
    from pipelines.search.tune import run_search

    tmp = tmp_path_factory.mktemp("grid")
    # Two parameters, one with a single value: the grid is their product, its trials run side by side.
    space = {"method.params.experts_per_task": {"grid": [1, 2]}, "method.params.adv_weight": {"grid": [0.1]}}
    run, search = _write(tmp, tiny_run("grid", tasks=2), {"space": space, "max_concurrent_trials": 2})
    start = time.perf_counter()
    rc = run_search(run, search, tmp / "s")
    return tmp, rc, time.perf_counter() - start


@pytest.mark.slow
def test_grid_search_nests_its_trial_runs_under_one_search_run(grid_search):
    tmp, rc, _ = grid_search
    assert rc == 0
    rows = _trials_csv(tmp / "s")
    assert len(rows) == 2 and all(r["state"] == "finished" and r["stages"] == "2/2" for r in rows)
    client, runs = _mlflow_runs(tmp / "s")
    searches = [r for r in runs if r.data.tags.get("clpipe.kind") == "search"]
    assert len(searches) == 1
    search = searches[0]
    assert search.info.status == "FINISHED" and {"best/val_AA", "best/AA"} <= set(search.data.metrics)
    assert search.data.params["space.method.params.experts_per_task"] == json.dumps({"grid": [1, 2]})
    trials = [r for r in runs if r.data.tags.get("clpipe.kind") == "sequence"]
    assert len(trials) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == search.info.run_id for r in trials)
    assert all(r.info.status == "FINISHED" for r in trials)
    assert {(r.data.params["method.params.experts_per_task"], r.data.params["method.params.adv_weight"])
            for r in trials} == {("1", "0.1"), ("2", "0.1")}
    assert all({"cl/AA", "cl/BwT", "acc/task0", "acc/task1"} <= set(r.data.metrics) for r in trials)
    stage_parents = {r.data.tags["mlflow.parentRunId"] for r in runs if "clpipe.stage" in r.data.tags}
    assert stage_parents == {r.info.run_id for r in trials}  # stage runs nest under their trial's run


@pytest.mark.slow
def test_grid_search_writes_a_runnable_best_config(grid_search):
    tmp, rc, _ = grid_search
    (best_file,) = (tmp / "s").glob("*-search-*/best.yaml")
    best = load_config(best_file)
    rows = _trials_csv(tmp / "s")
    top = max(rows, key=lambda r: float(r["score"]))
    assert best.run_id == top["run_id"]
    assert all(float(r["score"]) == pytest.approx(float(r["val_AA"])) for r in rows)  # metric AA: validation AA
    assert best.method.params["experts_per_task"] == int(top["method.params.experts_per_task"])
    assert (tmp / "s" / "trials" / best.run_id / "report" / "summary.json").exists()
    out = subprocess.run(CLPIPE + ["validate", str(best_file)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "valid" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_rerun_of_a_finished_search_runs_no_trial(grid_search, capsys):
    from pipelines.search.tune import run_search

    tmp, _, _ = grid_search
    configs = sorted((tmp / "s" / "trials").glob("grid-trial-*/config.yaml"))
    before = {p: p.stat().st_mtime_ns for p in configs}
    assert len(before) == 2
    assert run_search(tmp / "run.yaml", tmp / "search.yaml", tmp / "s") == 0
    out = capsys.readouterr().out
    assert "resuming the search" in out
    assert "started with configuration" not in out  # Tune's reporter names every trial it starts
    assert {p: p.stat().st_mtime_ns for p in configs} == before  # no Driver ran again
    _, runs = _mlflow_runs(tmp / "s")
    assert sum(r.data.tags.get("clpipe.kind") == "search" for r in runs) == 1
    assert sum(r.data.tags.get("clpipe.kind") == "sequence" for r in runs) == 2


@pytest.mark.slow
def test_asha_stops_a_clearly_worse_trial_early(ray_local, tmp_path):
    from pipelines.search.tune import run_search

    # One trial at a time, the good learning rate first: ASHA has its result at stage 1 when the
    # other (lr 1e-7: the bank stays where it started) reports its stage 1.
    run, search = _write(tmp_path, tiny_run("asha", tasks=2),
                         {"space": {"training.lr": {"grid": [0.01, 1.0e-7]}}, "scheduler": "asha",
                          "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1})
    assert run_search(run, search, tmp_path / "s") == 0
    rows = {float(r["training.lr"]): r for r in _trials_csv(tmp_path / "s")}
    assert rows[0.01]["state"] == "finished" and rows[0.01]["stages"] == "2/2"
    assert rows[1e-7]["state"] == "stopped@1", rows
    assert float(rows[1e-7]["AA"]) < float(rows[0.01]["AA"])
    ledger = json.loads((tmp_path / "s" / "trials" / rows[1e-7]["run_id"] / "ledger.json").read_text())["stages"]
    assert "task0/evaluate" in ledger and "task1/evaluate" not in ledger
    assert load_config(next((tmp_path / "s").glob("*-search-*/best.yaml"))).training.lr == 0.01
    _, runs = _mlflow_runs(tmp_path / "s")
    stopped = [r for r in runs if r.data.tags.get("clpipe.run_id") == rows[1e-7]["run_id"]
               and r.data.tags.get("clpipe.kind") == "sequence"]
    assert stopped[0].info.status == "KILLED" and stopped[0].data.tags["clpipe.tune_state"] == "stopped@1"
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _terminated_trials(experiment: Path) -> set[str]:
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being replaced
        return set()
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def _planted_run(tmp_path: Path) -> dict:
    """A one-task run whose test file answers with the labels swapped: the trial that learns (high
    on validation, rows of the train file) is worse on test than one that learns nothing."""
    from cl_core.synthetic import synthetic_rows

    labels = ["w1", "w2"]
    train, test = synthetic_rows(0, labels, 100, seed=0), synthetic_rows(0, labels, 24, seed=1)
    swapped = [{**r, "label": labels[1 - labels.index(r["label"])]} for r in test]
    for name, rows in (("train", train), ("test", swapped)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tiny_run("planted", tasks=1)
    run["tasks"][0]["data"] = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    return run


@pytest.mark.slow
def test_killed_search_keeps_its_finished_trials_and_picks_on_validation_not_on_test(tmp_path):
    """The CLI killed once a trial has finished, then run again: the finished trial does not run
    again. The planted trial (lr 1e-7: better on test, worse on validation) is not picked."""
    run, search = _write(tmp_path, _planted_run(tmp_path),
                         {"space": {"training.lr": {"grid": [0.01, 1.0e-7]}}, "max_concurrent_trials": 1})
    storage = tmp_path / "s"
    cmd = CLPIPE + ["tune", str(run), str(search), "--storage", str(storage)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline, finished = time.time() + 420, set()
    try:
        while time.time() < deadline and proc.poll() is None:
            experiments = list((storage / "tune").glob("*-search-*"))
            finished = _terminated_trials(experiments[0]) if experiments else set()
            if finished:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the local Ray it started
        first_output = proc.communicate()[0]
    assert len(finished) == 1, first_output[-3000:]
    (done_id,) = finished
    trial_configs = {p: p.stat().st_mtime_ns for p in (storage / "trials").glob("planted-trial-*/config.yaml")}

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the search" in again.stdout
    assert f"{done_id} started" not in again.stdout  # the finished trial is not run again
    rows = _trials_csv(storage)
    assert len(rows) == 2 and all(r["state"] == "finished" for r in rows)
    finished_run = next(r["run_id"] for r in rows if r["trial"] == done_id)
    config = storage / "trials" / finished_run / "config.yaml"
    assert config.stat().st_mtime_ns == trial_configs[config]  # its Driver never ran again
    _, runs = _mlflow_runs(storage)
    assert sum(r.data.tags.get("clpipe.kind") == "search" for r in runs) == 1
    assert sum(r.data.tags.get("clpipe.kind") == "sequence" for r in runs) == 2
    by_lr = {float(r["training.lr"]): r for r in rows}
    learned, idle = by_lr[0.01], by_lr[1e-7]
    assert float(learned["val_AA"]) > float(idle["val_AA"]) + 20  # better on validation ...
    assert float(learned["AA"]) < float(idle["AA"]) - 20  # ... and worse on test: the planted trial is `idle`
    assert load_config(next(storage.glob("*-search-*/best.yaml"))).training.lr == 0.01
