"""`clpipe serve`: a run's predictor behind HTTP on Ray Serve, following the run's latest bank.

    POST /   {"text": …, "task": …} or a list of them → the object(s) `clpipe predict` writes
    GET  /   the bank in use, its tasks, and how requests were batched

Requests are batched across clients (`@serve.batch`). Each replica watches the run's ledger;
when a newer bank is durable and evaluated (its thresholds stored), it loads it beside the one
in use and swaps the reference: batches already running finish on the old bank, later ones use
the new one, and nothing restarts. The `X-Clpipe-Bank` header names the bank (the task it was
trained after) that answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipelines.run.results import latest_bank, read_run
from pipelines.serve.predict import PredictError, Predictor

APP_NAME = "clpipe"
# Ray Serve forms the next batch while the current one runs, from what arrives within this wait:
# a few milliseconds would split a burst of requests into batches of one or two.
BATCH_WAIT_S = 0.05
BANK_HEADER = "X-Clpipe-Bank"
log = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=256)
class PredictorDeployment:
    def __init__(self, run_dir: str, threads: int, poll_s: float):
        torch.set_num_threads(threads)
        self.run_dir = Path(run_dir)
        self.predictor = self._load(None)
        self.batches = {"count": 0, "items": 0}
        self.predict_batch.set_max_batch_size(self.predictor.cfg.eval.batch_size)  # predict's batch size
        threading.Thread(target=self._follow, args=(poll_s,), daemon=True, name="follow-run").start()

    def _load(self, bank_of: str | None) -> Predictor:
        predictor = Predictor(self.run_dir, bank_of)
        predictor.stage  # load the model now, not in the first request
        return predictor

    def _follow(self, poll_s: float) -> None:
        """Swap in a newer durable, evaluated bank as soon as the ledger has one."""
        while True:
            time.sleep(poll_s)
            try:
                cfg, ledger = read_run(self.run_dir)
                newest = latest_bank(cfg, ledger)
                if newest is not None and newest > self.predictor.bank_task:
                    self.predictor = self._load(cfg.tasks[newest].name)
                    log.info("clpipe serve: now answering from the bank after %s", cfg.tasks[newest].name)
            except Exception:  # a ledger mid-replace or a bank still being verified: try again next poll
                log.exception("clpipe serve: could not switch banks; still answering from %s",
                              self.predictor.tasks[-1])

    @serve.batch(batch_wait_timeout_s=BATCH_WAIT_S)
    async def predict_batch(self, queries: list) -> list[tuple[dict, str]]:
        predictor = self.predictor  # the bank this batch uses, whatever a switch does meanwhile
        self.batches["count"] += 1
        self.batches["items"] += len(queries)
        answers = await asyncio.to_thread(predictor.predict, queries)
        return [(answer, predictor.tasks[-1]) for answer in answers]

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse({**self.predictor.describe(), "batches": self.batches})
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method} not allowed: POST a JSON object or list"}, 405)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return JSONResponse({"error": f"malformed JSON: {e}"}, 400)
        rows = body if isinstance(body, list) else [body]
        if not rows:
            return JSONResponse({"error": "empty list: send at least one {\"text\": …}"}, 400)
        predictor = self.predictor
        try:
            queries = [predictor.parse(row, "request" if row is body else f"request item {i}")
                       for i, row in enumerate(rows)]
        except PredictError as e:
            return JSONResponse({"error": str(e)}, 400)
        results = await asyncio.gather(*(self.predict_batch(q) for q in queries))
        answers = [answer for answer, _ in results]
        banks = sorted({bank for _, bank in results})
        return JSONResponse(answers if isinstance(body, list) else answers[0],
                            headers={BANK_HEADER: ",".join(banks)})


def deploy(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, poll_s: float = 1.0) -> str:
    """Start Serve on the connected Ray (HTTP on host:port) with the run's predictor; returns its URL."""
    cfg, _ = read_run(run_dir)
    serve.start(http_options={"host": host, "port": port})
    threads = max(1, int(cfg.ray.cpus_per_worker))
    app = PredictorDeployment.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cfg.ray.cpus_per_worker},
    ).bind(str(run_dir), threads, poll_s)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"


def serve_run(run_dir: Path, host: str, port: int, replicas: int) -> int:
    """`clpipe serve`: deploy, then keep serving until Ctrl-C or SIGTERM.

    On a local Ray started here, stopping it stops Serve too; on a cluster (`ray.address`,
    `ray job submit`) only this application is deleted, and the cluster's Serve stays up.
    """
    import os
    import signal

    import ray

    from pipelines.run.driver import start_ray

    if replicas < 1:
        raise PredictError(f"--replicas {replicas}: need at least 1")
    cfg, _ = read_run(run_dir)
    Predictor(run_dir)  # before Ray starts: no run, no bank → a clear error now
    on_cluster = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    start_ray(cfg)
    url = deploy(run_dir, host, port, replicas)
    print(f"serving run {cfg.run_id} on {url} ({replicas} replica(s)); it follows the run's latest bank. "
          f"Ctrl-C stops it", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        if on_cluster:
            serve.delete(APP_NAME)
        ray.shutdown()
