"""`clpipe serve`: a run's predictor behind HTTP on Ray Serve (FastAPI ingress), following the run's
latest bank.

    POST /       {"text": …, "task": …, "id": …} or a list of them → the object(s) `clpipe predict` writes
    GET  /       the bank in use, its tasks, how requests were batched, a bank that failed to load
    GET  /docs   the OpenAPI page (request and answer models)

Requests are answered in batches across clients: whenever the model is free, everything waiting
(up to `eval.batch_size` texts) goes in one batch. A lone request runs at once; under load the
requests that arrive while a batch runs make the next one. (Ray Serve's `@serve.batch` forms the
next batch while the current one runs and closes it `batch_wait_timeout_s` after its first
request: with batches that take seconds on a CPU, 16 clients' requests became many small batches
queued behind the running one.)

Each replica watches the run's ledger; when a newer bank is durable and evaluated it loads it
beside the one in use and swaps the reference: batches already running finish on the old bank,
later ones use the new one, and nothing restarts. The `X-Clpipe-Bank` header names the bank (the
task it was trained after) that answered. A newer bank that fails to load makes the replica
unhealthy (`check_health`), so that Serve replaces it and `serve status` says why.
"""

# No `from __future__ import annotations`: Ray ships this class to replicas by value (cloudpickle),
# without the module's globals that FastAPI would need to resolve string annotations of its routes.
import asyncio
import ipaddress
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Body, FastAPI, Response
from ray import serve
from ray.serve.metrics import Counter, Histogram

from pipelines.run.results import latest_bank, read_run
from pipelines.serve.api import (Answer, Limits, Rows, build_app, item_error, require_token, too_many_items,
                                 token_digest)
from pipelines.serve.predict import PredictError, Predictor, Query

APP_NAME = "clpipe"
BANK_HEADER = "X-Clpipe-Bank"
TOKEN_ENV = "CLPIPE_SERVE_TOKEN"
MAX_ONGOING_REQUESTS = 64  # per replica, waiting for a batch or in one; more wait in Serve's queue
LATENCY_BOUNDARIES_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
log = logging.getLogger("ray.serve")
ERROR_RESPONSES = {401: {"description": "no or a wrong bearer token"},
                   413: {"description": "body or item count over the server's limits"},
                   422: {"description": "a bad item: `loc` names it and its field"}}


@dataclass
class Job:
    """Up to a batch of one request's texts, and the future its answers go to."""

    queries: list[Query]
    future: asyncio.Future


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress()  # the app is built per replica, with its limits and token: __serve_build_asgi_app__
class PredictorDeployment:
    def __init__(self, run_dir: str, threads: int, poll_s: float, limits: Limits, token_sha256: str | None):
        torch.set_num_threads(threads)
        self.run_dir, self.limits, self.token_sha256 = Path(run_dir), limits, token_sha256
        self.predictor = self._load(None)
        self.batch_size = self.predictor.cfg.eval.batch_size  # predict's batches
        self.batches = {"count": 0, "items": 0}
        self.load_error: str | None = None
        # One thread computes, with the replica's torch threads; the event loop keeps taking requests.
        self.compute = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        self.jobs: deque[Job] = deque()
        self.ready: asyncio.Event | None = None  # made on the event loop that serves requests
        self.answers = Counter("clpipe_answers", "texts answered, by task", tag_keys=("task",))
        self.decided = Counter("clpipe_decided", "texts answered with a decided label, by task", tag_keys=("task",))
        self.latency = Histogram("clpipe_request_latency_ms", "request latency in the replica (wait and compute)",
                                 boundaries=LATENCY_BOUNDARIES_MS)
        self.batch_sizes = Histogram("clpipe_batch_texts", "texts per batch", boundaries=[1, 2, 4, 8, 16, 32, 64])
        threading.Thread(target=self._follow, args=(poll_s,), daemon=True, name="follow-run").start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = build_app(self.limits.max_body_bytes)
        auth = [require_token(self.token_sha256)]
        app.post("/", response_model=Answer | list[Answer], response_model_exclude_none=True, dependencies=auth,
                 responses=ERROR_RESPONSES)(self.predict)
        app.get("/", dependencies=auth)(self.info)
        return app

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
            except Exception:  # a ledger mid-replace: read it again next poll
                log.exception("clpipe serve: could not read the run's ledger")
                continue
            if newest is None or newest <= self.predictor.bank_task:
                continue
            name = cfg.tasks[newest].name
            try:
                self.predictor = self._load(name)
                self.load_error = None
                log.info("clpipe serve: now answering from the bank after %s", name)
            except Exception as e:  # the ledger says it is durable: a damaged or missing bank
                self.load_error = f"the bank after {name} does not load: {e}"
                log.exception("clpipe serve: %s; still answering from %s", self.load_error, self.predictor.tasks[-1])

    def check_health(self) -> None:
        """Serve's health check: unhealthy while the run's newest evaluated bank cannot be loaded."""
        if self.load_error is not None:
            raise RuntimeError(self.load_error)

    async def _answer(self, queries: list[Query]) -> list[tuple[dict, str]]:
        """(answer, bank) per query, from the batches `_batches` runs."""
        loop = asyncio.get_running_loop()
        if self.ready is None:
            self.ready = asyncio.Event()
            self.batcher = loop.create_task(self._batches())  # referenced: the loop keeps tasks weakly
        futures = []
        for start in range(0, len(queries), self.batch_size):
            futures.append(loop.create_future())
            self.jobs.append(Job(queries[start:start + self.batch_size], futures[-1]))
        self.ready.set()
        return [pair for part in await asyncio.gather(*futures) for pair in part]

    async def _batches(self) -> None:
        """Whenever the model is free: one batch of the waiting jobs, up to `batch_size` texts."""
        loop = asyncio.get_running_loop()
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.jobs:
                batch = [self.jobs.popleft()]
                while self.jobs and sum(len(j.queries) for j in batch) + len(self.jobs[0].queries) <= self.batch_size:
                    batch.append(self.jobs.popleft())
                batch = [j for j in batch if not j.future.done()]  # requests that timed out or left
                if not batch:
                    continue
                predictor = self.predictor  # the bank this batch uses, whatever a switch does meanwhile
                queries = [q for j in batch for q in j.queries]
                try:
                    answers = await loop.run_in_executor(self.compute, predictor.predict, queries)
                except Exception as e:
                    for j in batch:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                self.batches["count"] += 1
                self.batches["items"] += len(queries)
                self.batch_sizes.observe(len(queries))
                start = 0
                for j in batch:
                    if not j.future.done():
                        j.future.set_result([(a, predictor.tasks[-1]) for a in answers[start:start + len(j.queries)]])
                    start += len(j.queries)

    async def predict(self, rows: Annotated[Rows, Body()], response: Response):
        """Classify one text or a list of them with the bank in use (the `X-Clpipe-Bank` header names it)."""
        started = time.perf_counter()
        is_list = isinstance(rows, list)
        items = rows if is_list else [rows]
        if len(items) > self.limits.max_items:
            raise too_many_items(len(items), self.limits.max_items)
        if not items:
            return item_error(False, 0, None, "request: an empty list; send at least one {\"text\": …}")
        predictor = self.predictor
        queries = []
        for i, row in enumerate(items):
            try:
                queries.append(predictor.parse(row.model_dump(exclude_none=True),
                                               f"request item {i}" if is_list else "request"))
            except PredictError as e:
                return item_error(is_list, i, e.field, str(e))
        results = await self._answer(queries)
        for answer, _ in results:
            self.answers.inc(tags={"task": answer["task"]})
            if answer["decided"]:
                self.decided.inc(tags={"task": answer["task"]})
        response.headers[BANK_HEADER] = ",".join(sorted({bank for _, bank in results}))
        self.latency.observe((time.perf_counter() - started) * 1000)
        answers = [answer for answer, _ in results]
        return answers if is_list else answers[0]

    async def info(self) -> dict:
        """The bank in use, its tasks, how requests were batched, and a newer bank that failed to load."""
        return {**self.predictor.describe(), "batches": self.batches, "load_error": self.load_error}


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_access(host: str, token: str | None) -> None:
    """A server other machines can reach answers only requests with the bearer token."""
    if token is None and not is_loopback(host):
        raise PredictError(f"--host {host}: other machines can reach it; a bearer token is required "
                           f"(set {TOKEN_ENV} or --token-file)")


def deploy(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, poll_s: float = 1.0,
           limits: Limits = Limits(), token: str | None = None) -> str:
    """Start Serve on the connected Ray (HTTP on host:port) with the run's predictor; returns its URL."""
    check_access(host, token)
    cfg, _ = read_run(run_dir)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": limits.request_timeout_s})
    threads = max(1, int(cfg.ray.cpus_per_worker))
    deployment = PredictorDeployment.options(
        num_replicas=replicas, max_queued_requests=limits.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.ray.cpus_per_worker},
    ).bind(str(run_dir), threads, poll_s, limits, token_digest(token))
    serve.run(deployment, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"


def serve_run(run_dir: Path, host: str, port: int, replicas: int, limits: Limits, token: str | None) -> int:
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
    try:
        limits.check()
    except ValueError as e:
        raise PredictError(str(e)) from None
    check_access(host, token)  # before Ray starts
    cfg, _ = read_run(run_dir)
    Predictor(run_dir)  # before Ray starts: no run, no bank → a clear error now
    on_cluster = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    start_ray(cfg)
    url = deploy(run_dir, host, port, replicas, limits=limits, token=token)
    print(f"serving run {cfg.run_id} on {url} ({replicas} replica(s)); it follows the run's latest bank; "
          f"API at {url}docs{'; requests need the bearer token' if token else ''}. Ctrl-C stops it", flush=True)

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
