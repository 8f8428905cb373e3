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
from pipelines.serve.api import Limits
from pipelines.serve.predict import PredictError, Predictor
from pipelines.serve.server import deploy
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


def _first_bank_only(run, folder):
    """A copy of the run whose ledger stops after task 0's bank; returns (copy, the full ledger)."""
    cfg, _, run_dir = run
    copy = folder / cfg.run_id
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ray_train"))  # the ledger's paths are relative
    full = _ledger(run_dir)
    first = {**full, "stages": {k: v for k, v in full["stages"].items() if not k.startswith("task1/")}}
    atomic_write_text(copy / "ledger.json", json.dumps(first))
    return copy, full


@pytest.fixture
def serving(run, tmp_path, request):
    """Serve a copy of the run that has task 0's bank only; yields (url, copy, full ledger). Indirect
    parameters: keyword arguments of `deploy` (host, limits, token)."""
    from ray import serve

    copy, full = _first_bank_only(run, tmp_path)
    options = getattr(request, "param", {})
    try:
        url = deploy(copy, port=_free_port(), replicas=1, poll_s=0.2, **options)
        yield url.replace("0.0.0.0", "127.0.0.1"), copy, full
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


@pytest.mark.parametrize("serving", [{"host": "0.0.0.0", "token": "s3cret-token",
                                      "limits": Limits(max_body_bytes=4096, max_items=8)}], indirect=True)
def test_serve_off_loopback_needs_the_token_and_keeps_its_limits(run, serving):
    cfg, _, _ = run
    url, copy, _ = serving
    first, later = cfg.tasks[0].name, cfg.tasks[1].name
    body = {"text": "w1 w2", "task": first}
    missing = requests.post(url, json=body, timeout=30)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert requests.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert requests.get(url, timeout=30).status_code == 401
    docs = requests.get(url + "docs", timeout=30)  # the API page needs no token
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    with pytest.raises(PredictError, match="a bearer token is required"):
        deploy(copy, host="0.0.0.0", port=_free_port())

    client = requests.Session()  # from here on, with the token
    client.headers["Authorization"] = "Bearer s3cret-token"
    assert client.post(url, json=body, timeout=30).status_code == 200

    def unprocessable(response, loc):
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["detail"][0]["loc"] == loc
        return body["error"]

    malformed = client.post(url, data=b'{"text": "w1 w2", ', headers={"content-type": "application/json"}, timeout=30)
    at = malformed.json()["detail"][0]["loc"][1]  # where the parser stopped: at the end of the 19 bytes
    assert at in (18, 19) and unprocessable(malformed, ["body", at]).startswith(f"request: malformed JSON at character {at}")
    assert "method moe_cl needs a task id" in unprocessable(client.post(url, json={"text": "w1 w2"}, timeout=30),
                                                            ["body", "task"])
    assert unprocessable(client.post(url, json=[{"text": "w1", "task": first}, {"text": "w1", "task": later}],
                                     timeout=30), ["body", 1, "task"]).startswith(
        f"request item 1: field 'task': '{later}' is not a task of bank '{first}'")
    assert unprocessable(client.post(url, json=[{"text": "w1", "task": first}, {"txt": "w1", "task": first}],
                                     timeout=30), ["body", 1, "text"]) == "request item 1: field 'text': Field required"
    too_long = client.post(url, json=[{"text": "w1 " * 1400, "task": first}], timeout=30)
    assert too_long.status_code == 413 and "Content Too Large" in too_long.text  # from its Content-Length
    chunked = client.post(url, data=iter([b'[{"text": "', b"w1 " * 1400, b'", "task": "' + first.encode() + b'"}]']),
                          headers={"content-type": "application/json"}, timeout=30)  # no Content-Length
    assert chunked.status_code == 413 and "Content Too Large" in chunked.text
    many = client.post(url, json=[{"text": "w1", "task": first}] * 9, timeout=30)
    assert many.status_code == 413 and "9 items in one request" in many.json()["detail"]
    both = client.post(url, json=[{"text": "w1 w2", "task": first, "id": 3}] * 8, timeout=30)
    assert both.status_code == 200 and len(both.json()) == 8 and both.json()[0] == both.json()[7]
    assert both.json()[0]["id"] == 3 and both.headers["x-clpipe-bank"] == first
    assert {"Row", "Answer"} <= set(client.get(url + "openapi.json", timeout=30).json()["components"]["schemas"])


def test_a_bank_that_cannot_load_makes_the_replica_unhealthy(run, serving, tmp_path):
    from ray import serve

    from pipelines.serve.server import APP_NAME

    _, _, run_dir = run
    url, copy, full = serving
    damaged = tmp_path / "damaged-bank"
    shutil.copytree(copy / full["stages"]["task1/bank"]["outputs"]["path"], damaged)  # stored relative to the run
    tensors = damaged / "bank.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    full["stages"]["task1/bank"]["outputs"]["path"] = str(damaged)
    atomic_write_text(copy / "ledger.json", json.dumps(full))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and requests.get(url, timeout=30).json()["load_error"] is None:
        time.sleep(0.2)
    assert "sha256 mismatch" in requests.get(url, timeout=30).json()["load_error"]
    while time.monotonic() < deadline:  # Serve's health check (every 10 s) reads it
        status = serve.status().applications[APP_NAME].deployments["PredictorDeployment"]
        if status.status != "HEALTHY":
            break
        time.sleep(1)
    # Serve's status says only that the health check failed; the replica's reason is the GET's load_error above
    assert status.status == "UNHEALTHY" and "health check failed" in status.message


def test_export_of_a_mixture_bank_points_at_the_mlflow_model(run, tmp_path, capsys):
    cfg, storage, _ = run
    assert main(["export", cfg.run_id, "--to", str(tmp_path / "adapter"), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert "method moe_cl mixes" in err and f"models:/{cfg.run_id}@latest" in err
    assert not (tmp_path / "adapter").exists()


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
