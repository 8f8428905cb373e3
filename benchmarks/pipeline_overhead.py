"""How much of a run's wall time is orchestration rather than stage compute.

    python -m benchmarks.pipeline_overhead --json

Runs a 3-task sequence (bbc_news_topic → vader_movieReviewSnippets → spamassassin) through the
whole pipeline on SmolLM2-135M-Instruct in a fresh storage folder: local Ray, Ray Train +
DeepSpeed per task, MLflow on every stage. Stage compute is what each stage reports as its own
work (training steps, data preparation, bank building, evaluation, GGUF dequantisation); the
rest of the wall time (Ray and worker start-up, scheduling, model loading in each stage,
checkpoint I/O, tracking) is overhead. Also measures what the finished run keeps on disk per
task (its run folder: banks, evaluation rows, report, ledger, any checkpoint left) against its
banks and evaluation rows; target: storage per task ≤ 1.2 × bank bytes + evaluation bytes. Prints
one JSON object on its last line: {"overhead_fraction": …, "wall_s": …, "stage_compute_s": …,
"storage_per_task_bytes": …, "bank_bytes_per_task": …, "eval_bytes_per_task": …, "storage_target_met": …}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipelines.compare.cost import storage_figures

TASKS = {
    "bbc_news_topic": ["business", "entertainment", "politics", "sports", "tech"],
    "vader_movieReviewSnippets": ["negative", "positive"],
    "spamassassin": ["ham", "spam"],
}
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def benchmark_config(data: Path, train_examples: int, test_examples: int) -> dict:
    return {
        "name": "overhead",
        "model": {"kind": "smollm2"},
        "tasks": [{"name": name, "data": {"train": str(data / name / "train.jsonl"), "test": str(data / name / "test.jsonl")},
                   "labels": labels, "max_train_examples": train_examples, "max_test_examples": test_examples}
                  for name, labels in TASKS.items()],
        "method": {"name": "moe_cl", "params": {"adv_weight": 0.05}},
        "training": {"epochs": 1, "lr": 5e-4, "batch_size": 8, "max_length": 128, "checkpoint_every": 10},
        "deepspeed": {"zero_stage": 2},
        "ray": {"num_workers": 1, "cpus_per_worker": 2},
        "eval": {"batch_size": 20},
        "data": {"on_bad_rows": "skip"},  # spamassassin has a few empty messages
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with <task>/{train,test}.jsonl")
    parser.add_argument("--train-examples", type=int, default=160)
    parser.add_argument("--test-examples", type=int, default=60)
    parser.add_argument("--storage", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--json", action="store_true", help="only the JSON line (and the driver's progress)")
    args = parser.parse_args()

    start = time.perf_counter()
    from pipelines.config import parse_config
    from pipelines.run.driver import Driver
    from pipelines.run.results import print_result

    cfg = parse_config(benchmark_config(args.data, args.train_examples, args.test_examples), "pipeline_overhead")
    storage = args.storage or Path(tempfile.mkdtemp(prefix="clpipe-overhead-"))
    result = Driver(cfg, storage).run()
    wall = time.perf_counter() - start
    if not args.json:
        print_result(result)
        for key, seconds in result.stage_seconds.items():
            print(f"  {key:<22} {seconds:7.1f}s")
    print(json.dumps({"overhead_fraction": round(1 - result.compute_s / wall, 4), "wall_s": round(wall, 1),
                      "stage_compute_s": round(result.compute_s, 1),
                      **storage_figures(result.run_dir, len(result.tasks))}))


if __name__ == "__main__":
    main()
