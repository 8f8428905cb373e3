"""Throughput and latency of `clpipe serve` against `clpipe predict` on the same texts.

    python -m benchmarks.serve --json

Trains a small MoE-CL run on SmolLM2-135M-Instruct (bbc_news_topic → vader_movieReviewSnippets,
a few examples per task, 1 epoch: enough for a real bank, not for accuracy) unless `--run-dir`
names a finished run. Then answers the same texts (the tasks' test texts, in turn, with their
task) twice: in this process through the predictor `clpipe predict` uses (batches of
`eval.batch_size`, model load not counted, as many threads as the replica), and over HTTP from `--concurrency` client threads to
one Serve replica with as many CPUs as a training worker. Prints one JSON object on its last
line: {"requests_per_s", "p50_ms", "p99_ms", "batch_mean", "failed", "serve_vs_predict_throughput",
"predict_texts_per_s", "requests"}; batch_mean is the replica's mean dynamic batch size.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.pipeline_overhead import DEFAULT_DATA, TASKS

BENCH_TASKS = ("bbc_news_topic", "vader_movieReviewSnippets")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with <task>/{train,test}.jsonl")
    parser.add_argument("--train-examples", type=int, default=16)
    parser.add_argument("--test-examples", type=int, default=50)
    parser.add_argument("--storage", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--run-dir", type=Path, default=None, help="benchmark this finished run instead")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="only the JSON line (and the driver's progress)")
    args = parser.parse_args()

    import ray
    import requests
    import torch
    from ray import serve

    from pipelines.config import parse_config
    from pipelines.data.tasks import load_split
    from pipelines.run.driver import Driver, start_ray
    from pipelines.run.results import read_run
    from pipelines.serve.predict import Predictor
    from pipelines.serve.server import deploy

    run_dir = args.run_dir
    if run_dir is None:
        cfg = parse_config(benchmark_config(args.data, args.train_examples, args.test_examples), "serve benchmark")
        run_dir = Driver(cfg, args.storage or Path(tempfile.mkdtemp(prefix="clpipe-serve-"))).run().run_dir
    cfg, _ = read_run(run_dir)
    texts = [{"text": r["text"], "task": task.name} for t, task in enumerate(cfg.tasks)
             for r in load_split(task, "test", t, cfg.data).rows[: args.test_examples]]
    bodies = [texts[i % len(texts)] for i in range(args.requests)]

    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # as many threads as the replica has
    predictor = Predictor(run_dir)
    queries = [predictor.parse(b, "benchmark") for b in bodies]
    predictor.predict(queries[: cfg.eval.batch_size])  # load the model and warm up
    start = time.perf_counter()
    predictor.predict(queries)
    predict_per_s = len(queries) / (time.perf_counter() - start)
    del predictor

    start_ray(cfg)
    url = deploy(run_dir, "127.0.0.1", _free_port())
    try:
        session = requests.Session()
        for body in bodies[: args.concurrency]:  # warm up
            session.post(url, json=body, timeout=300)
        before = session.get(url, timeout=60).json()["batches"]
        latencies, failed = [], 0

        def post(body: dict) -> tuple[float, int]:
            sent = time.perf_counter()
            r = requests.post(url, json=body, timeout=300)
            return (time.perf_counter() - sent) * 1000, r.status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for ms, status in pool.map(post, bodies):
                latencies.append(ms)
                failed += status != 200
        wall = time.perf_counter() - start
        after = session.get(url, timeout=60).json()["batches"]
    finally:
        serve.shutdown()
        ray.shutdown()
    serve_per_s = len(bodies) / wall
    result = {"requests_per_s": round(serve_per_s, 2), "p50_ms": round(float(np.percentile(latencies, 50)), 1),
              "p99_ms": round(float(np.percentile(latencies, 99)), 1),
              "batch_mean": round((after["items"] - before["items"]) / (after["count"] - before["count"]), 2),
              "failed": failed, "serve_vs_predict_throughput": round(serve_per_s / predict_per_s, 3),
              "predict_texts_per_s": round(predict_per_s, 2), "requests": len(bodies)}
    if not args.json:
        print(f"run {cfg.run_id}, bank after {cfg.tasks[-1].name}; {len(bodies)} requests, "
              f"{args.concurrency} at a time")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
