"""Any method on a benchmark sequence in one process: the pipeline's data preparation, training
step and evaluation without Ray, DeepSpeed and MLflow around them (they add minutes per run and
change no number that a selection reads).

    python -m benchmarks.in_process --out benchmarks/results/X.json --label NAME --method M
        [--params '{"k": v}'] [--sequences order1,multiemo] [--seeds 0,1]
        [--steps 16] [--test-examples 100] [--validation-examples 100] [--inference '{"name": {...}}']
        [--lock /tmp/clpipe-heavy.lock]

A run is `cl_quality`'s run config (same budget, seed, task data, prompt) with the method and
params given. Per task: the stage's seed, `plan_task` where the method plans, `setup_task`, the
method's training examples in the Ray Train worker's micro-batch schedule (`micro_batches`), AdamW
in the method's parameter groups with DeepSpeed's gradient clipping (1.0), `after_task` over the
task's training rows in order as the bank stage reads them; then every task so far is evaluated
on its validation slice and its test split, in each task-id mode the pipeline would use.

Validation: rows of the task's train file that are never trained on (beyond max_train_examples,
`pipelines.data.tasks.split_validation`), at most `--validation-examples` of them. Choices read
validation only; test figures are reported. Each finished run goes to the results file at once
(atomically) and is skipped when the command runs again; `--lock` holds a file lock per run, so
that other heavy jobs on the machine get in between runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.compare.in_process import Results, run_missing
from pipelines.compare.sequences import Budget


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--label", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--params", default="{}", type=json.loads)
    parser.add_argument("--sequences", default="order1,multiemo")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--validation-examples", type=int, default=100)
    parser.add_argument("--inference", default="{}", type=json.loads,
                        help='name → parameters that change only inference, e.g. {"snap": {"shared_inference": "snapshot"}}')
    parser.add_argument("--lock", type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = Budget(steps_per_task=args.steps, test_examples=args.test_examples)
    results = Results(args.out, budget, args.validation_examples)
    run_missing(results, args.label, args.method, args.params, args.sequences.split(","),
                [int(s) for s in args.seeds.split(",")], budget, args.lock, args.inference or None)


if __name__ == "__main__":
    main()
