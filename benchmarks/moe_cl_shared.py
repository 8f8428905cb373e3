"""Which control of MoE-CL's shared expert keeps old tasks: measured on the shared sequences.

    python -m benchmarks.moe_cl_shared [--sequences order1,multiemo] [--variants lr1,lr0.1]
                                       [--seeds 0,1] [--test-examples 100] [--steps 16]

MoE-CL's only moving part for an earlier task is the shared expert (see cl_core/methods/moe_cl.py),
so this compares the drift controls on SmolLM2-135M-Instruct with the continual-learning
benchmark's budget (16 optimizer steps of 8 examples per task, lr 1e-3, rank 8), in process: the
pipeline's data preparation, training step and evaluation without Ray and MLflow around them,
which would add minutes per run and change no number. Each finished (sequence, variant) is written
to `benchmarks/results/moe_cl_shared.json` at once, with its accuracy matrix and per-example
correctness, and skipped when the command runs again (the budget is `benchmarks.cl_quality`'s
Budget; the test examples default to 100 here to keep the sweep to minutes per run). A seed
changes what it changes in the continual-learning benchmark: initialisation, training sample and
order, and test sample. Differences against `lr1` (the shared expert free: at the experts' learning
rate, no anchor) are paired over the seeds both have and the same test examples
(`pipelines.compare.stats.compare`: a t-interval over seeds where there are several, else a bootstrap over
test examples).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from cl_core.atomic import atomic_write_text
from cl_core.base_model import load_tokenizer
from cl_core.metrics import average_accuracy, backward_transfer
from cl_core.precision import base_settings, resolve_precision
from cl_core.training import Learner, evaluate_task, task_loss_fn, train_steps
from pipelines.assembly import build_stage, materialize_base_model
from pipelines.compare import stats as compare_stats
from pipelines.compare.docs import after_writing
from pipelines.config import parse_config
from pipelines.data.tasks import load_prepared, prepare_task
from benchmarks import cl_quality
from benchmarks.cl_quality import DEFAULT_DATA, REPO, SEQUENCES, Budget

RESULTS = Path(__file__).resolve().parent / "results" / "moe_cl_shared.json"
# Each spelled out in full, so that a change of MoE-CL's defaults does not change what a name ran.
FREE = {"shared_lr_scale": 1.0, "shared_anchor": "none"}
VARIANTS = {
    "lr1": FREE,
    "lr0.1": {**FREE, "shared_lr_scale": 0.1},
    "lr0.02": {**FREE, "shared_lr_scale": 0.02},
    "ema0.9": {**FREE, "shared_ema": 0.9},
    "lr0.1-nogan": {**FREE, "shared_lr_scale": 0.1, "adv_weight": 0.0},
    **{f"fisher{w:g}": {"shared_lr_scale": 1.0, "shared_anchor": "fisher", "shared_anchor_weight": w,
                        "shared_anchor_on": "every_task"} for w in (1.0, 3.0, 10.0)},
}


def run_config(sequence: str, variant: str, seed: int, budget: Budget) -> dict:
    """The continual-learning benchmark's MoE-CL run at `seed`, with the variant's parameters."""
    cfg = cl_quality.run_config("moe_cl", sequence, SEQUENCES[sequence], seed, DEFAULT_DATA, budget)
    return {**cfg, "name": f"shared-{sequence}-{variant}-s{seed}",
            "method": {"name": "moe_cl", "params": VARIANTS[variant]}}


def shuffled_batches(collate, examples: list[dict], batch_size: int, seed: int):
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]])


def run(sequence: str, variant: str, seed: int, budget: Budget, cache: Path) -> dict:
    cfg = parse_config(run_config(sequence, variant, seed, budget))
    cpu = torch.device("cpu")
    precision = resolve_precision(cfg.training.precision, cpu)
    base = materialize_base_model(cfg, cache / "models").model_copy(update=base_settings(precision, cpu))
    tokenizer = load_tokenizer(base)
    paths = [prepare_task(t, i, tokenizer, base.source, cfg.training.max_length, cfg.training.seed, cfg.data,
                          cache / "data", 0)["path"] for i, t in enumerate(cfg.tasks)]
    stage = build_stage(cfg, base)
    model, objective, method = stage.model, stage.objective, stage.method
    learner = Learner(model, objective, method)
    start = time.perf_counter()
    correct: list[list[list[int]]] = []
    for t, path in enumerate(paths):
        torch.manual_seed(cfg.training.seed * 1000 + t)
        method.setup_task(model, t)
        objective.setup_task(model, t)
        train = load_prepared(path, "train")
        batch = cfg.training.batch_size
        train_steps(learner, shuffled_batches(objective.collate, train, batch, cfg.training.seed + t), lr=cfg.training.lr)
        method.after_task(model, t, lambda: shuffled_batches(objective.collate, train, batch, 0),
                          task_loss_fn(model, objective, method))
        correct.append([evaluate_task(model, objective, method, load_prepared(p, "test"), batch_size=20)["correct"]
                        for p in paths[: t + 1]])
    R = np.array([[np.mean(row[j]) * 100 if j < len(row) else np.nan for j in range(len(paths))] for row in correct])
    return {"sequence": sequence, "variant": variant, "seed": seed, "params": VARIANTS[variant], "precision": precision,
            "AA": average_accuracy(R), "BwT": backward_transfer(R), "R": np.round(R, 2).tolist(),
            "wall_s": round(time.perf_counter() - start, 1), "correct": correct}


def compare(rows: list[dict]) -> dict:
    """Each variant minus `lr1` on the same sequence, over the seeds both have: AA and BwT, the
    mean difference, its paired 95% interval and the verdict."""
    stats: dict[tuple[str, str], dict[int, compare_stats.RunStats]] = {}
    for row in rows:
        correct = [[np.array(c) for c in stage] for stage in row["correct"]]
        stats.setdefault((row["sequence"], row["variant"]), {})[row["seed"]] = compare_stats.run_stats(correct, row["seed"])
    out = {}
    for (sequence, variant), runs in stats.items():
        ref = stats.get((sequence, "lr1"))
        if ref is None or variant == "lr1":
            continue
        pairs = {name: compare_stats.compare(runs, ref, name) for name in ("AA", "BwT")}
        if None not in pairs.values():
            out[f"{sequence}/{variant}-lr1"] = {
                name: {**p, "difference": round(p["difference"], 1), "ci95": [round(v, 1) for v in p["ci95"]]}
                for name, p in pairs.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", default="order1,multiemo")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--cache", default=str(REPO / "runs" / "moe_cl_shared"))
    args = parser.parse_args()
    budget = Budget(steps_per_task=args.steps, test_examples=args.test_examples)
    done = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
    for seed in (int(s) for s in args.seeds.split(",")):
        for sequence in args.sequences.split(","):
            for variant in args.variants.split(","):
                if any((r["sequence"], r["variant"], r["seed"]) == (sequence, variant, seed) for r in done):
                    continue
                row = run(sequence, variant, seed, budget, Path(args.cache))
                done.append(row)
                print(f"{sequence} {variant} seed {seed}: AA {row['AA']:.1f} BwT {row['BwT']:+.1f} "
                      f"({row['wall_s']:.0f} s)", flush=True)
                atomic_write_text(RESULTS, json.dumps({"steps_per_task": args.steps, "test_examples": args.test_examples,
                                                       "runs": done, "vs_lr1": compare(done)}, indent=1))
                after_writing(RESULTS, REPO)
    print(json.dumps(compare(done), indent=1))


if __name__ == "__main__":
    main()
