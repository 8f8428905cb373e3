"""Latency and throughput of `clpipe serve` against `clpipe predict`'s predictor in one process.

    python -m benchmarks.serve --json

Trains a small MoE-CL run on SmolLM2-135M-Instruct (bbc_news_topic → vader_movieReviewSnippets,
16 training examples per task, 1 epoch: a real bank, not an accurate one) in `--storage`
(default ./runs; a second invocation resumes or reuses it) unless `--run-dir` names a finished
run. The texts are the tasks' test texts, in turn, each with its task. Then:

- in process, through the predictor `clpipe predict` uses (model load not counted, as many torch
  threads as the replica): the median latency of one text alone, and texts/s over all the
  requests' texts at once (batches of `eval.batch_size`, grouped by task);
- over HTTP to one Serve replica with as many CPUs as a training worker: `--one-client` requests
  one after the other (p50, p99), then `--requests` requests from `--concurrency` client threads
  (requests/s, p50, p99, the replica's mean batch, and the share of the machine's cores the client
  threads themselves used: on one machine they compete with the server).

Prints one JSON object on its last line; `goals` compares p50 at one client with 1.5 × the
in-process latency of one text, and the throughput at `--concurrency` clients with 0.8 × predict's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.pipeline_overhead import DEFAULT_DATA, TASKS

BENCH_TASKS = ("bbc_news_topic", "vader_movieReviewSnippets")
P50_GOAL, THROUGHPUT_GOAL = 1.5, 0.8


def benchmark_config(data: Path, train_examples: int, test_examples: int) -> dict:
    return {
        "name": "serve-bench",
        "model": {"kind": "smollm2"},
        "tasks": [{"name": name, "data": {"train": str(data / name / "train.jsonl"),
                                          "test": str(data / name / "test.jsonl")},
                   "labels": TASKS[name], "max_train_examples": train_examples, "max_test_examples": test_examples}
                  for name in BENCH_TASKS],
        "method": {"name": "moe_cl", "params": {"adv_weight": 0.05}},
        "training": {"epochs": 1, "lr": 5e-4, "batch_size": 8, "max_length": 96, "checkpoint_every": 10},
        "deepspeed": {"zero_stage": 2},
        "ray": {"num_workers": 1, "cpus_per_worker": 2},
        "eval": {"batch_size": 16, "validation_examples": 32},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def in_process(run_dir: Path, bodies: list[dict], single: int) -> dict:
    """The predictor in this process: median ms of one text alone, and texts/s over all bodies."""
    from pipelines.serve.predict import Predictor

    predictor = Predictor(run_dir)
    queries = [predictor.parse(b, "benchmark") for b in bodies]
    predictor.predict(queries[: predictor.cfg.eval.batch_size])  # load the model and warm up
    alone = []
    for query in queries[:single]:
        start = time.perf_counter()
        predictor.predict([query])
        alone.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    predictor.predict(queries)
    return {"in_process_ms_1_text": _ms(alone, 50), "predict_texts_per_s": round(len(queries) / (time.perf_counter() - start), 2)}


def over_http(url: str, bodies: list[dict], single: int, concurrency: int) -> dict:
    import requests

    session = requests.Session()
    for body in bodies[:concurrency]:  # warm up
        session.post(url, json=body, timeout=300).raise_for_status()
    alone = []
    for body in bodies[:single]:
        sent = time.perf_counter()
        session.post(url, json=body, timeout=300).raise_for_status()
        alone.append((time.perf_counter() - sent) * 1000)
    before = session.get(url, timeout=60).json()["batches"]

    def post(body: dict) -> tuple[float, int]:
        sent = time.perf_counter()
        status = requests.post(url, json=body, timeout=300).status_code
        return (time.perf_counter() - sent) * 1000, status

    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(post, bodies))
    wall, client_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    after = session.get(url, timeout=60).json()["batches"]
    loaded = [ms for ms, _ in results]
    return {"p50_ms_1_client": _ms(alone, 50), "p99_ms_1_client": _ms(alone, 99),
            f"requests_per_s_{concurrency}_clients": round(len(bodies) / wall, 2),
            f"p50_ms_{concurrency}_clients": _ms(loaded, 50), f"p99_ms_{concurrency}_clients": _ms(loaded, 99),
            f"batch_mean_{concurrency}_clients": round((after["items"] - before["items"]) / (after["count"] - before["count"]), 2),
            # The clients share this machine with the server: the share of its cores they took.
            f"client_cpu_share_{concurrency}_clients": round(client_cpu_s / (wall * os.cpu_count()), 3),
            "failed": sum(status != 200 for _, status in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with <task>/{train,test}.jsonl")
    parser.add_argument("--train-examples", type=int, default=16)
    parser.add_argument("--test-examples", type=int, default=50)
    parser.add_argument("--storage", type=Path, default=Path("runs"), help="where the benchmark's run lives")
    parser.add_argument("--run-dir", type=Path, default=None, help="benchmark this finished run instead")
    parser.add_argument("--one-client", type=int, default=40, help="requests one after the other")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="only the JSON line (and the driver's progress)")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from pipelines.config import parse_config
    from pipelines.data.tasks import load_split
    from pipelines.run.driver import Driver, start_ray
    from pipelines.run.results import read_run
    from pipelines.serve.server import deploy

    run_dir = args.run_dir
    if run_dir is None:
        cfg = parse_config(benchmark_config(args.data, args.train_examples, args.test_examples), "serve benchmark")
        run_dir = Driver(cfg, args.storage).run().run_dir
    cfg, _ = read_run(run_dir)
    texts = [{"text": r["text"], "task": task.name} for t, task in enumerate(cfg.tasks)
             for r in load_split(task, "test", t, cfg.data).rows[: args.test_examples]]
    bodies = [texts[i % len(texts)] for i in range(args.requests)]

    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # as many threads as the replica has
    result = in_process(run_dir, bodies, args.one_client)
    start_ray(cfg)
    try:
        url = deploy(run_dir, "127.0.0.1", _free_port())
        result.update(over_http(url, bodies, args.one_client, args.concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    n = args.concurrency
    result.update(requests=len(bodies), concurrency=n,
                  p50_vs_in_process=round(result["p50_ms_1_client"] / result["in_process_ms_1_text"], 3),
                  serve_vs_predict_throughput=round(result[f"requests_per_s_{n}_clients"] / result["predict_texts_per_s"], 3))
    result["goals"] = {f"p50_ms_1_client <= {P50_GOAL} x in_process_ms_1_text": result["p50_vs_in_process"] <= P50_GOAL,
                       f"serve_vs_predict_throughput >= {THROUGHPUT_GOAL}":
                           result["serve_vs_predict_throughput"] >= THROUGHPUT_GOAL}
    if not args.json:
        print(f"run {cfg.run_id}, bank after {cfg.tasks[-1].name}; {len(bodies)} requests, {n} at a time")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
