"""`clpipe predict` against the evaluate stage, and `clpipe serve` over real HTTP, on a tiny run."""

from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from cl_core.bank import atomic_write_text
from cl_core.metrics import calibrated_thresholds, decisions_at
from cl_core.training import predict_probs
from pipelines.run.calibration import load_thresholds
from pipelines.cli import main
from pipelines.config import parse_config
from pipelines.data.tasks import load_prepared, load_split
from pipelines.run.driver import Driver
from pipelines.run.ledger import Ledger, StageKey
from pipelines.serve.predict import Predictor
from tests.conftest import tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("serve")
    cfg = parse_config(tiny_run("serve", ray={"num_workers": 1}))
    Driver(cfg, storage, lambda _: None).run()
    return cfg, storage, storage / cfg.run_id


def _ledger(run_dir):
    return json.loads((run_dir / "ledger.json").read_text())


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_predict_equals_the_evaluate_stage(run, tmp_path):
    cfg, storage, run_dir = run
    stages = _ledger(run_dir)["stages"]
    for bank_task, bank in enumerate(cfg.tasks):
        row = stages[f"task{bank_task}/evaluate"]["outputs"]["rows"]["oracle"]
        thresholds = load_thresholds(run_dir / "banks" / f"task{bank_task}-{bank.name}")["thresholds"]["oracle"]
        for t, task in enumerate(cfg.tasks[: bank_task + 1]):
            test = load_split(task, "test", t, cfg.data).rows
            _write_rows(tmp_path / "in.jsonl", [{"text": r["text"], "task": task.name} for r in test])
            assert main(["predict", cfg.run_id, "--input", str(tmp_path / "in.jsonl"), "--bank-of", bank.name,
                         "--out", str(tmp_path / "out.jsonl"), "--storage", str(storage)]) == 0
            answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
            labels = list(task.verbalizers)
            y = np.array([labels.index(r["label"]) for r in test])
            probs = np.array([[a["probs"][label] for label in labels] for a in answers])
            predicted = np.array([labels.index(a["label"]) for a in answers])
            # The stage's accuracy and calibrated strip rate, recomputed from predict's answers.
            assert (predicted == y).mean() == row["accuracy"][t]
            tau = [thresholds[task.name][label] for label in labels]
            assert decisions_at(probs, y, tau).strip_rate.macro == pytest.approx(row["strip_rate_calibrated"][t], abs=1e-12)
            assert [a["decided"] for a in answers] == [tau[p] is not None and probs[i, p] >= tau[p]
                                                       for i, p in enumerate(predicted)]
            assert {a["task"] for a in answers} == {task.name}
    assert 0 < sum(row["strip_rate_calibrated"]) and all(p >= 0.5 for p in row["precision_calibrated"] if p)


def test_thresholds_and_validation_accuracy_come_from_the_validation_slice(run):
    cfg, storage, run_dir = run
    predictor = Predictor(run_dir)
    stored = predictor.thresholds
    ledger = Ledger.read(run_dir)
    validation_row = ledger.outputs(StageKey("evaluate", predictor.bank_task))["validation"]["oracle"]
    for t, task in enumerate(cfg.tasks):
        data = ledger.outputs(StageKey("prepare", t))["path"]
        validation = load_prepared(data, "validation")
        assert stored["validation"][task.name] == {"rows": 100, "source": "generated"}
        seen = {tuple(ex["prompt_ids"]) for split in ("train", "test") for ex in load_prepared(data, split)}
        assert not seen & {tuple(ex["prompt_ids"]) for ex in validation}  # never trained on, not the test split
        s = predictor.stage
        probs = predict_probs(s.model, s.objective, s.method, validation, cfg.eval.batch_size).numpy()
        labels = np.array([ex["label"] for ex in validation])
        chosen = calibrated_thresholds(probs.astype(np.float64), labels, cfg.eval.target_precision)
        assert list(stored["thresholds"]["oracle"][task.name].values()) == chosen
        assert validation_row["accuracy"][t] == pytest.approx(float(np.mean(probs.argmax(1) == labels)), abs=1e-12)
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert set(summary["strip_rate_calibrated"]) == {"oracle"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serving(run, tmp_path):
    """Serve a copy of the run whose ledger stops after task 0's bank; yields (url, copy, full ledger)."""
    from ray import serve

    from pipelines.serve.server import deploy

    cfg, _, run_dir = run
    copy = tmp_path / cfg.run_id
    copy.mkdir()
    shutil.copy(run_dir / "config.yaml", copy)
    full = _ledger(run_dir)
    first = {**full, "stages": {k: v for k, v in full["stages"].items() if not k.startswith("task1/")}}
    atomic_write_text(copy / "ledger.json", json.dumps(first))
    try:
        yield deploy(copy, "127.0.0.1", _free_port(), replicas=1, poll_s=0.2), copy, full
    finally:
        serve.shutdown()


def test_serve_answers_as_predict_and_follows_the_run(run, serving):
    cfg, _, run_dir = run
    url, copy, full = serving
    texts = [r["text"] for r in load_split(cfg.tasks[0], "test", 0, cfg.data).rows]
    bodies = [{"text": texts[i % len(texts)], "task": cfg.tasks[0].name} for i in range(200)]
    expected = {}
    for bank in (cfg.tasks[0].name, cfg.tasks[1].name):
        predictor = Predictor(run_dir, bank)
        expected[bank] = predictor.predict([predictor.parse(b, "test") for b in bodies])
    assert expected[cfg.tasks[0].name] != expected[cfg.tasks[1].name]

    info = requests.get(url, timeout=30).json()
    assert (info["bank_after_task"], info["tasks"]) == (cfg.tasks[0].name, [cfg.tasks[0].name])
    results: list[dict | None] = [None] * len(bodies)
    switched_at: list[float] = []

    def post(i: int) -> None:
        sent = time.monotonic()
        r = requests.post(url, json=bodies[i], timeout=120)
        results[i] = {"sent": sent, "status": r.status_code, "bank": r.headers.get("x-clpipe-bank"),
                      "answer": r.json()}

    with ThreadPoolExecutor(20) as pool:  # 20 requests in flight at a time
        futures = [pool.submit(post, i) for i in range(len(bodies))]
        while sum(f.done() for f in futures) < 40:
            time.sleep(0.01)
        atomic_write_text(copy / "ledger.json", json.dumps(full))  # task 1's bank becomes durable
        while requests.get(url, timeout=30).json()["bank_after_task"] != cfg.tasks[1].name:
            time.sleep(0.05)
        switched_at.append(time.monotonic())
        for f in futures:
            f.result()

    assert [r["status"] for r in results] == [200] * len(bodies)
    banks = [r["bank"] for r in results]
    assert set(banks) == {cfg.tasks[0].name, cfg.tasks[1].name}
    for i, r in enumerate(results):
        want = expected[r["bank"]][i]
        got = r["answer"]
        assert (got["label"], got["task"], got["decided"]) == (want["label"], want["task"], want["decided"])
        # Batches mix requests as they arrive, so prompts are padded differently than in predict's batches.
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    after = [r["bank"] for r in results if r["sent"] > switched_at[0]]
    assert after and set(after) == {cfg.tasks[1].name}
    info = requests.get(url, timeout=30).json()
    assert info["tasks"] == [t.name for t in cfg.tasks] and info["batches"]["items"] == len(bodies)


def test_serve_rejects_bad_requests(run, serving):
    cfg, _, _ = run
    url, _, _ = serving
    bad = requests.post(url, data=b'{"text": "w1 w2", ', timeout=30)
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    no_task = requests.post(url, json={"text": "w1 w2"}, timeout=30)
    assert no_task.status_code == 400 and "method moe_cl needs a task id" in no_task.json()["error"]
    later_task = requests.post(url, json=[{"text": "w1", "task": cfg.tasks[0].name},
                                          {"text": "w1", "task": cfg.tasks[1].name}], timeout=30)
    assert later_task.status_code == 400
    assert later_task.json()["error"].startswith(
        f"request item 1: field 'task': '{cfg.tasks[1].name}' is not a task of bank '{cfg.tasks[0].name}'")
    both = requests.post(url, json=[{"text": "w1 w2", "task": cfg.tasks[0].name}] * 2, timeout=30)
    assert both.status_code == 200 and len(both.json()) == 2 and both.json()[0] == both.json()[1]


def test_serve_restarts_a_crashed_replica(run, serving):
    import ray

    cfg, _, _ = run
    url, _, _ = serving
    body = {"text": "w21 w22 w23", "task": cfg.tasks[0].name}
    first = requests.post(url, json=body, timeout=30).json()
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "PredictorDeployment" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline, answer = time.monotonic() + 120, None
    while time.monotonic() < deadline and (answer is None or answer.status_code != 200):
        try:
            answer = requests.post(url, json=body, timeout=30)
        except requests.ConnectionError:
            time.sleep(0.5)
    assert answer is not None and answer.status_code == 200 and answer.json() == first
    now = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "PredictorDeployment" in a["name"]]
    assert now and now != [replicas[0]["name"]]  # a new replica, started by Serve


def test_a_bf16_run_trained_on_a_gpu_is_served_with_the_cpus_attention(run, tmp_path):
    _, _, run_dir = run
    served = tmp_path / run_dir.name
    shutil.copytree(run_dir, served)
    ledger = _ledger(served)
    # what the model stage records for bf16-mixed on a CUDA device
    ledger["stages"]["model"]["outputs"]["precision"] = "bf16-mixed"
    ledger["stages"]["model"]["outputs"]["spec"].update(dtype="bfloat16", attention="sdpa")
    atomic_write_text(served / "ledger.json", json.dumps(ledger))
    predictor = Predictor(served)
    lm = predictor.stage.model.lm
    assert (predictor.base.dtype, predictor.base.attention) == ("bfloat16", "eager")
    assert next(lm.parameters()).dtype == torch.bfloat16 and lm.config._attn_implementation == "eager"
