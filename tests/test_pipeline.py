"""The pipeline end to end on a tiny model: Ray stages, DeepSpeed ZeRO, MLflow, durable resume."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from cluster.local import free_ports, kill_process_trees
from pipelines.compare.cost import storage_figures
from pipelines.config import ConfigError, parse_config
from pipelines.run.driver import Driver, check_cluster
from pipelines.run.ledger import Ledger, StageKey
from pipelines.run.progress import ProgressBoard
from pipelines.tracking import default_tracking_uri
from tests.conftest import tiny_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLPIPE = [sys.executable, "-m", "pipelines.cli"]


def _quiet(_msg):
    pass


@pytest.fixture(scope="module")
def zero2_run(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("zero2")
    cfg = parse_config(tiny_run("seq"))
    return cfg, storage, Driver(cfg, storage, _quiet).run()


def test_two_tasks_zero2_two_workers(zero2_run):
    cfg, storage, result = zero2_run
    R = result.matrices["oracle"]
    assert R.shape == (2, 2) and np.isnan(R[0, 1])
    # Each task is learned well above the untrained bank (chance is 50%).
    assert R[0, 0] >= 75 and R[1, 1] >= 75
    assert R[0, 0] > result.baseline[0] + 20
    assert set(result.summary["oracle"]) == {"AA", "BwT", "FwT", "forgetting", "learning_gain"}
    assert (result.run_dir / "report" / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    ledger = json.loads((result.run_dir / "ledger.json").read_text())["stages"]
    assert ledger["task1/train"]["outputs"]["steps"] == 6  # 48 rows / 2 ranks / batch 8 × 2 epochs
    assert result.steps_per_task == [6, 6]  # optimizer steps (grad_accum 1)
    # FwT (GEM): task 1 on task 0's bank, set up and untrained, over the untrained bank; the old
    # figure (the diagonal over the untrained bank) is the learning gain.
    before = ledger["task1/before"]["outputs"]["rows"]["oracle"]["accuracy"]
    assert set(ledger["task1/before"]["outputs"]["rows"]) == {"oracle"}  # moe_cl needs a task id
    assert "task0/before" not in ledger
    assert result.summary["oracle"]["FwT"] == pytest.approx(100 * before - result.baseline[1])
    assert result.summary["oracle"]["learning_gain"] == pytest.approx(R[1, 1] - result.baseline[1])
    summary = json.loads((result.run_dir / "report" / "summary.json").read_text())
    assert summary["before_training"]["oracle"] == [None, pytest.approx(100 * before)]
    assert summary["steps_per_task"] == [6, 6]
    # Task 0's evaluation ran while task 1's training started; it is settled (recorded) after it.
    evaluated = ledger["task0/evaluate"]
    assert evaluated["outputs"]["finished_at"] < ledger["task1/train"]["finished"] < evaluated["finished"]


def test_mlflow_has_one_parent_with_stage_children_and_keys(zero2_run):
    cfg, storage, result = zero2_run
    client = MlflowClient(default_tracking_uri(storage))
    exp = client.get_experiment_by_name("clpipe")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("clpipe.kind") == "sequence"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["clpipe.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"model", "task0/prepare", "task1/prepare", "baseline/evaluate", "task0/train",
                             "task0/bank", "task0/evaluate", "task1/before", "task1/train", "task1/bank",
                             "task1/evaluate"}
    assert {"acc/task0", "acc/task1", "cl/AA", "cl/BwT", "cl/FwT", "cl/learning_gain", "cl/forgetting",
            "strip/task0"} <= set(parent.data.metrics)
    assert parent.data.params["training.lr"] == "0.01"
    history = client.get_metric_history(parent.info.run_id, "acc/task0")
    assert sorted(m.step for m in history) == [0, 1]
    assert "train/loss" in children["task0/train"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/accuracy_matrix.csv" in artifacts


def test_rerun_of_a_finished_run_does_nothing(zero2_run):
    cfg, storage, result = zero2_run
    messages = []
    again = Driver(cfg, storage, messages.append).run()
    assert np.array_equal(again.matrices["oracle"], result.matrices["oracle"], equal_nan=True)
    stage_lines = [m for m in messages if m.startswith("  ")]
    assert stage_lines and all(m.endswith("done earlier") for m in stage_lines)
    out = subprocess.run(CLPIPE + ["run", "-", "--storage", str(storage)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "config file not found" in out.stderr


def test_zero3_partitioned_matches_zero2(ray_local, tmp_path, zero2_run):
    import shutil

    shutil.copytree(zero2_run[1], tmp_path / "s")  # the storage's cache: the untrained rows are there
    cfg = parse_config(tiny_run("seq", deepspeed={"zero_stage": 3, "persistence_threshold": 0}))
    result = Driver(cfg, tmp_path / "s", _quiet).run()
    stages = json.loads((result.run_dir / "ledger.json").read_text())["stages"]
    assert stages["task0/train"]["outputs"]["partitioned_params"] >= 2 * 3 + 2  # base MLP, attention, embeddings, head
    assert np.allclose(result.matrices["oracle"], zero2_run[2].matrices["oracle"], equal_nan=True, atol=1e-9)
    # Another run on the same model and data: the untrained model's rows are reused, not recomputed.
    assert stages["baseline/evaluate"]["outputs"]["reused"] == ["task0", "task1"]
    first = json.loads((zero2_run[2].run_dir / "ledger.json").read_text())["stages"]["baseline/evaluate"]["outputs"]
    assert first["reused"] == []
    assert np.array_equal(result.baseline, zero2_run[2].baseline)


def test_more_workers_than_the_cluster_has(ray_local):
    cfg = parse_config(tiny_run(ray={"num_workers": 5, "cpus_per_worker": 1}))
    with pytest.raises(ConfigError, match=r"ray.num_workers: 5 workers × 1 CPUs need 5 CPUs; the cluster has 2"):
        check_cluster(cfg)


def _killed_during_task1_training_then_rerun(run: dict, storage: Path) -> dict:
    """`clpipe run` of `run`, SIGKILLed with its local Ray once task 1's training has written a
    checkpoint, then run again to the end; returns the report's summary.json."""
    run_id = parse_config(run).run_id
    config = storage.parent / f"{storage.name}.yaml"
    config.write_text(yaml.safe_dump(run))
    cmd = CLPIPE + ["run", str(config), "--storage", str(storage)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    train_dir = storage / run_id / "ray_train" / f"{run_id}-task1"
    deadline = time.time() + 300
    while not list(train_dir.glob("checkpoint_2*")) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    ledger = json.loads((storage / run_id / "ledger.json").read_text())["stages"]
    assert "task1/evaluate" not in ledger  # really killed before the end
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((storage / run_id / "report" / "summary.json").read_text())


def test_bf16_mixed_under_zero3_learns_and_resumes_bit_identically_after_the_driver_is_killed(
        ray_local, tmp_path, zero2_run):
    from safetensors.torch import load_file

    run = tiny_run("bf16", training={"precision": "bf16-mixed"},
                   deepspeed={"zero_stage": 3, "persistence_threshold": 0})
    result = Driver(parse_config(run), tmp_path / "whole", _quiet).run()
    ledger = json.loads((result.run_dir / "ledger.json").read_text())["stages"]
    assert result.precision == ledger["model"]["outputs"]["precision"] == "bf16-mixed"
    assert ledger["model"]["outputs"]["spec"]["dtype"] == "bfloat16"
    assert ledger["task0/train"]["outputs"]["partitioned_params"] >= 2 * 3 + 2  # the bf16 base is partitioned
    bank = load_file(str(Path(Ledger.read(result.run_dir).outputs(StageKey("bank", 1))["path"]) / "bank.safetensors"))
    assert {t.dtype for t in bank.values() if t.is_floating_point()} == {torch.float32}  # what trains stays float32
    R, fp32 = result.matrices["oracle"], zero2_run[2].matrices["oracle"]
    assert R[0, 0] >= 75 and R[1, 1] >= 75 and np.nanmax(np.abs(R - fp32)) <= 10
    status = subprocess.run(CLPIPE + ["status", result.run_id, "--storage", str(tmp_path / "whole")],
                            cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0 and "precision bf16-mixed" in status.stdout.splitlines()[0]
    # The driver killed mid-stage (bf16 optimizer and partitioned states in the checkpoint) and
    # run again: the same matrix, every stage once in MLflow.
    summary = _killed_during_task1_training_then_rerun(run, tmp_path / "killed")
    assert summary["precision"] == "bf16-mixed"
    assert np.array_equal(np.array(summary["matrices"]["oracle"], dtype=float), R, equal_nan=True)
    assert summary["summary"]["oracle"]["FwT"] == result.summary["oracle"]["FwT"]  # task1/before ran again
    client = MlflowClient(default_tracking_uri(tmp_path / "killed"))
    runs = client.search_runs([client.get_experiment_by_name("clpipe").experiment_id])
    assert sum(r.data.tags.get("clpipe.kind") == "sequence" for r in runs) == 1
    stages = [r.data.tags.get("clpipe.stage") for r in runs if "clpipe.stage" in r.data.tags]
    assert len(stages) == len(set(stages)) == 11  # model, 2 × prepare, baseline, task1/before, 2 × (train, bank, evaluate)


def test_killed_train_worker_is_retried_from_its_checkpoint(ray_local, tmp_path):
    # 90 steps, a checkpoint every 10: the kill lands while the workers are still training.
    cfg = parse_config(tiny_run("worker", tasks=1, training={"epochs": 30, "checkpoint_every": 10}))
    killed = []

    def kill_a_worker_after_first_checkpoint():
        train_dir = tmp_path / cfg.run_id / "ray_train" / f"{cfg.run_id}-task0"
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if (train_dir / "checkpoint_manager_snapshot.json").exists():  # a checkpoint is committed
                out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
                pids = [int(l.split()[0]) for l in out.splitlines() if "RayTrainWorker" in l]
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    result = Driver(cfg, tmp_path, _quiet).run()
    killer.join(1)
    assert killed
    train = json.loads((result.run_dir / "ledger.json").read_text())["stages"]["task0/train"]["outputs"]
    assert train["resumed_from"] > 0 and train["steps"] == 90
    assert result.matrices["oracle"][0, 0] >= 75


def test_ray_job_submit_to_a_loopback_cluster(tmp_path):
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="clpipe-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Every listening port chosen free, so another Ray on this host (with its defaults) cannot collide.
    flags = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port")
    port, dashboard, *free = free_ports(2 + len(flags))
    ports = [(flag, str(p)) for flag, p in zip(flags, free)]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    try:
        start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                                "--temp-dir", temp_dir, "--disable-usage-stats", *[x for p in ports for x in p]],
                               env=env, capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(tiny_run("job", tasks=1, ray={"num_workers": 1})))
        clpipe = str(Path(sys.executable).parent / "clpipe")
        runtime_env = json.dumps({"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
        job = subprocess.run([ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                              "--runtime-env-json", runtime_env, "--",
                              clpipe, "run", str(config), "--storage", str(tmp_path / "s")],
                             env=env, capture_output=True, text=True, timeout=600)
        assert "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-2000:]
        assert "Accuracy matrix" in job.stdout
        assert list((tmp_path / "s").glob("job-*/report/summary.json"))
    finally:
        kill_process_trees([temp_dir, f":{port}"])


def test_mlflow_down_mid_run_loses_no_training_and_a_rerun_reconciles(ray_local, tmp_path, monkeypatch):
    from pipelines.tracking import Tracker

    cfg = parse_config(tiny_run("mlflowdown", tasks=1, ray={"num_workers": 1}))
    real_log = Tracker.log

    def unreachable(self, run, metrics, step=0):
        raise ConnectionError("MLflow server went away")

    monkeypatch.setattr(Tracker, "log", unreachable)
    first = Driver(cfg, tmp_path, _quiet).run()
    ledger = json.loads((first.run_dir / "ledger.json").read_text())
    assert "task0/evaluate" in ledger["stages"] and ledger["meta"]["mlflow_complete"] is False
    monkeypatch.setattr(Tracker, "log", real_log)
    second = Driver(cfg, tmp_path, _quiet).run()
    assert np.array_equal(first.matrices["oracle"], second.matrices["oracle"])
    client = MlflowClient(default_tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("clpipe").experiment_id])
    parents = [r for r in runs if r.data.tags.get("clpipe.kind") == "sequence"]
    assert len(parents) == 1 and "cl/AA" in parents[0].data.metrics
    stage_runs = [r for r in runs if "clpipe.stage" in r.data.tags]
    assert len(stage_runs) == 6 and all("stage/seconds" in r.data.metrics for r in stage_runs)
    assert json.loads((first.run_dir / "ledger.json").read_text())["meta"]["mlflow_complete"] is True


def test_ui_serves_the_store_on_loopback_and_stops_cleanly(tmp_path):
    import urllib.request

    port = free_ports(1)[0]
    ui = subprocess.Popen(CLPIPE + ["ui", "--storage", str(tmp_path), "--port", str(port)], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 240, None
        while time.time() < deadline and body is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            except OSError:
                time.sleep(0.5)
        assert body == b"OK"
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(60) == 0
    time.sleep(1)
    server_left = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--port {port}" not in server_left


def test_appending_a_task_runs_only_its_stages_and_keeps_no_dead_checkpoints(tmp_path, zero2_run):
    import shutil

    cfg, storage, result = zero2_run
    assert not list((result.run_dir / "ray_train").glob("*/checkpoint_*"))  # banks durable: checkpoints gone
    shutil.copytree(storage, tmp_path / "s")
    three = parse_config(tiny_run("seq", tasks=3))
    assert three.run_id == cfg.run_id
    messages, console = [], io.StringIO()
    board = ProgressBoard(tmp_path / "s" / cfg.run_id, console, interval=0, poll=0.1)
    try:
        extended = Driver(three, tmp_path / "s", messages.append, board=board).run()
    finally:
        board.close()
    lines = console.getvalue().splitlines()
    assert any(re.fullmatch(r"  task2/train +step [1-6]/6  loss \d+\.\d{4}  \d+ tok/s  elapsed 0:\d\d( +ETA 0:\d\d)?",
                            line) for line in lines), lines
    # the appended task's baseline runs beside its training (and is recorded after it)
    assert "baseline/evaluate-from-task2 examples 24/24" in "\n".join(" ".join(line.split()) for line in lines)
    ran = {m.split()[0] for m in messages if m.endswith("running")}
    assert ran == {"task2/prepare", "baseline/evaluate-from-task2", "task2/before", "task2/train", "task2/bank",
                   "task2/evaluate"}
    R = extended.matrices["oracle"]
    assert np.array_equal(R[:2, :2], result.matrices["oracle"], equal_nan=True) and not np.isnan(R[2]).any()
    assert np.array_equal(extended.baseline[:2], result.baseline) and len(extended.baseline) == 3
    assert not list((extended.run_dir / "ray_train").glob("*/checkpoint_*"))
    assert storage_figures(extended.run_dir, 3)["storage_target_met"]  # ≤ 1.2 × banks + evaluation rows
    client = MlflowClient(default_tracking_uri(tmp_path / "s"))
    runs = client.search_runs([client.get_experiment_by_name("clpipe").experiment_id])
    parents = [r for r in runs if r.data.tags.get("clpipe.kind") == "sequence"]
    assert len(parents) == 1 and parents[0].data.tags["clpipe.tasks"] == "task0, task1, task2"
    # model, 3 prepare, 2 baselines, task1/before and task2/before, 3 × (train, bank, evaluate)
    assert sum(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in runs) == 17
    assert client.get_experiment_by_name("clpipe").tags["mlflow.experimentKind"] == "custom_model_development"
    note = parents[0].data.tags["mlflow.note.content"]
    assert "3 of 3 tasks trained" in note and "| task2 | " in note and f"AA {extended.summary['oracle']['AA']:.1f}" in note
    stage_runs = {r.data.tags.get("clpipe.stage"): r for r in runs}
    train_input = stage_runs["task2/train"].inputs.dataset_inputs
    assert [(d.dataset.name, json.loads(d.dataset.profile)["num_rows"]) for d in train_input] == [("task2/train", 48)]
    assert len(train_input[0].dataset.digest) >= 8
    assert sorted(d.dataset.name for d in stage_runs["task2/evaluate"].inputs.dataset_inputs) == \
        sorted(f"task{t}/{split}" for t in range(3) for split in ("test", "validation"))  # both splits are read
    train2 = stage_runs["task2/train"].info.run_id
    for key in ("train/loss", "train/tokens_per_s"):  # per-step curves in the stage's child run
        assert sorted(m.step for m in client.get_metric_history(train2, key)) == [1, 2, 3, 4, 5, 6]
    status = subprocess.run(CLPIPE + ["status", cfg.run_id, "--storage", str(tmp_path / "s")], capture_output=True,
                            text=True, cwd=REPO)
    lines = [line.split() for line in status.stdout.splitlines() if line.startswith("  task")]
    assert [line[:3] for line in lines] == [["task0", "task0", "trained"], ["task1", "task1", "trained"],
                                            ["task2", "task2", "trained"]]
    assert lines[0][3] <= lines[1][3] <= lines[2][3]  # dates, in order


class _StopDriver(Exception):
    pass


def test_damaged_train_output_trains_again_from_its_checkpoint_to_the_same_matrix(tmp_path, zero2_run):
    cfg = parse_config(tiny_run("seq"))

    def stop_after_task1_training(message):
        if message.strip().startswith("task1/train") and "done in" in message:
            raise _StopDriver  # the driver dies between the train stage and the bank stage

    with pytest.raises(_StopDriver):
        Driver(cfg, tmp_path, stop_after_task1_training).run()
    ledger = Ledger.read(tmp_path / cfg.run_id)
    trained = ledger.outputs(StageKey("train", 1))
    assert not ledger.done(StageKey("bank", 1)) and Path(trained["tensors"]).parent == tmp_path / cfg.run_id / "trained"
    tensors = Path(trained["tensors"])
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)  # what a host crash can leave of an unsynced file
    messages = []
    result = Driver(cfg, tmp_path, messages.append).run()
    assert any(m.strip().startswith("train output of task 1 is damaged") for m in messages)
    again = Ledger.read(result.run_dir).outputs(StageKey("train", 1))
    # From its last checkpoint (the stage's last step): the same tensors and steps, no new compute.
    assert again["tensors_sha256"] == trained["tensors_sha256"] and again["compute_s"] == trained["compute_s"]
    assert np.array_equal(result.matrices["oracle"], zero2_run[2].matrices["oracle"], equal_nan=True)
