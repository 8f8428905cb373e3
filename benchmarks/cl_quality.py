"""Every method through the real pipeline on real task sequences, several seeds, with honest intervals.

    python -m benchmarks.cl_quality [--sequence standard_o1,standard_o2,standard_o3,long]
        [--methods moe_cl,seq_lora,…] [--seeds 0,1] [--model smollm2|tiny] [--estimate] [--report]
    python -m benchmarks.cl_quality --order taskA,taskB,taskC --sequence mine --data DIR

Sequences (SEQUENCES: task folders under --data, each with train.jsonl and test.jsonl): the
field's, from O-LoRA's CL_Benchmark (`standard_o1`..`standard_o3` and the 14-task `long`; yelp
stands in for the missing yahoo), and our own `order1` and `multiemo`, on which the defaults were
chosen. `--order` runs any task folders in any order under the name `--sequence`. A task's labels
are the sorted distinct labels of its training file.

Each sequence has its plan (PLANS): the methods at the first seed, those that also run at the
other seeds, and its seeds; `--methods` and `--seeds` replace them. One budget for every method
(recorded in the results; a results file made with another budget is refused): the same optimizer
steps per task (steps × batch training examples, one epoch), LoRA rank, learning rate, length and
batch, and up to `--test-examples` test examples per task (100 on `long`; the whole split where
smaller), plus each task's validation slice (rows of its train file never trained on). Seeds change
the experts' initialisation, the training sample and its order, and the test sample, which every
method shares at that seed, so comparisons are paired seed by seed (pipelines.compare.stats says
which interval, and why).

Runs go one at a time. After each, its row is written to `<out>/cl_quality.json` (rows, budget,
aggregate), its per-example correctness to `<out>/cl_quality_examples.json`, the report
(`cl_quality.md`, `cl_quality_aa_bwt.png`) is regenerated, and so is `docs/benchmarks.md` when
`<out>` is this repository's `benchmarks/results`. A rerun skips finished rows, and a run
interrupted midway continues from its own ledger under --storage.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cl_core.methods import METHODS
from pipelines.compare.cost import evaluated_examples, scaled_wall
from pipelines.compare.docs import after_writing
from pipelines.compare.outputs import run_row
from pipelines.compare.plan import Plan, planned_runs, run_benchmark
from pipelines.compare.report import write_report
from pipelines.compare.results import Results
from pipelines.compare.sequences import (ABLATIONS, DEFAULT_DATA, MEASURED_RUN_S, MODELS, MULTI_SEED, OURS, PLANS,
                                         POOLED, REPO, RESULTS, SEQUENCES, Budget, method_of, run_config,
                                         task_labels)

def run_one(label: str, sequence: str, tasks: list[str], seed: int, data: Path, budget: Budget,
            storage: Path) -> tuple[dict, dict]:
    """One run through the pipeline (continued from its ledger if it started earlier): its row and
    its per-example correctness per task-id mode (`pipelines.compare.outputs.run_row`)."""
    from pipelines.config import parse_config
    from pipelines.run.driver import Driver

    cfg = parse_config(run_config(label, sequence, tasks, seed, data, budget), f"cl_quality/{label}/{sequence}/s{seed}")
    result = Driver(cfg, storage).run()
    return run_row(result, label, sequence, tasks, seed, METHODS[method_of(label)[0]].method.oracle)


def open_results(out: Path, budget: Budget) -> Results:
    """The results file under `out`, whose every write also rewrites the report (and the docs page
    when `out` is this repository's results folder)."""
    def report(rows: list[dict], summary: dict) -> None:
        write_report(out, asdict(budget), rows, summary)
        after_writing(out / "cl_quality.json", REPO)

    return Results(out, asdict(budget), pooled=POOLED, report=report)


def redo(results: Results, labels: list[str], sequences: dict[str, list[str]], seeds: list[int], data: Path,
         budget: Budget, storage: Path) -> None:
    """After a change to a method's code: its finished rows (on `sequences`, at `seeds`) move to the
    superseded file and its run folders to `<storage>/superseded/`, so that the benchmark runs them
    again from the start instead of reusing their rows or ledgers."""
    from pipelines.config import parse_config

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for sequence, tasks in sequences.items():
        for label in labels:
            for seed in seeds:
                row = results.finished(label, sequence, tasks, seed)
                if row is not None:
                    results.supersede(row)
                run_dir = storage / parse_config(run_config(label, sequence, tasks, seed, data, budget)).run_id
                started = run_dir.exists()
                if started:
                    (storage / "superseded").mkdir(exist_ok=True)
                    run_dir.rename(storage / "superseded" / f"{run_dir.name}.{stamp}")
                if row is not None or started:
                    print(f"{label} on {sequence}, seed {seed}: superseded; it runs again", flush=True)


def estimate(sequences: dict[str, list[str]], plans: dict[str, Plan], results: Results) -> str:
    """The plan's size per sequence (runs, tasks trained, test examples scored) and the time left,
    scaled from the finished runs' mean (or one measured SmolLM2 run before any): `cost.scaled_wall`."""
    done = [r for r in results.rows if r.get("wall_s")]
    if done:
        ref = (float(np.mean([r["wall_s"] for r in done])), float(np.mean([len(r["order"]) for r in done])),
               float(np.mean([evaluated_examples(len(r["order"]), min(r["n_test"])) for r in done])))
        source = f"mean of {len(done)} finished runs, {ref[0] / 60:.0f} min"
    elif results.budget["model"] in MEASURED_RUN_S:
        ref = (MEASURED_RUN_S[results.budget["model"]], 4, evaluated_examples(4, 200))
        source = f"one measured SmolLM2 run of 4 tasks, {ref[0] / 60:.0f} min"
    else:
        ref, source = None, "no measured run to estimate the time from"
    planned, lines, total = planned_runs(plans, results.rows), [], np.zeros(2)
    for sequence, tasks in sequences.items():
        mine = [(label, seed) for label, seq, seed in planned if seq == sequence]
        left = [(label, seed) for label, seed in mine if not results.finished(label, sequence, tasks, seed)]
        n_test = Budget(**results.budget).test_examples_on(sequence)
        scored = evaluated_examples(len(tasks), n_test)
        lines.append(f"{sequence}: {len(mine)} runs planned, {len(mine) - len(left)} finished; each trains "
                     f"{len(tasks)} tasks and scores {scored:,} test examples (up to {n_test} per task)")
        if ref is not None:
            bounds = np.array(scaled_wall(*ref, len(tasks), scored))
            total += bounds * len(left)
            lines[-1] += f"; {len(left)} left × {bounds[0] / 60:.0f}–{bounds[1] / 60:.0f} min"
    if ref is not None:
        source = f"in all {total[0] / 3600:.1f}–{total[1] / 3600:.1f} h left, one run at a time (from the {source})"
    return "\n".join(lines + [source])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="methods and ablations (moe_cl_no_gan) at each sequence's first seed; "
                        "default: each sequence's plan")
    parser.add_argument("--sequence", default="standard_o1,standard_o2,standard_o3,long",
                        help=f"named sequences {sorted(SEQUENCES)}, or the name of --order")
    parser.add_argument("--order", help="task folders under --data, in order (comma-separated)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", help="default: each sequence's plan (order1, multiemo 0,1,2; standard 0,1; long 0)")
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS), help="tiny: a random Llama, for smoke runs")
    parser.add_argument("--steps-per-task", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=96, help="tokens per example (prompt + answer)")
    parser.add_argument("--test-examples", type=int, default=200, help="per task; the whole split where smaller")
    parser.add_argument("--storage", type=Path, default=REPO / "runs" / "cl_quality")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--estimate", action="store_true", help="print the plan's size and time, run nothing")
    parser.add_argument("--report", action="store_true", help="rewrite the aggregate and report, run nothing")
    parser.add_argument("--redo", default="", help="methods whose code changed: their rows on --sequence at the "
                        "plan's seeds and their run folders are moved aside, and they run again (with --estimate: "
                        "moved aside, nothing run)")
    return parser.parse_args(argv)


def checked_plan(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, Plan]]:
    """Sequences and their plans from the flags; every problem exits naming its flag, before compute."""
    labels = None if args.methods is None else [m for m in args.methods.split(",") if m]
    if labels is not None and (not labels or any(method_of(m)[0] not in METHODS for m in labels)):
        unknown = [m for m in labels if method_of(m)[0] not in METHODS]
        raise SystemExit(f"--methods: unknown {unknown}; available: {sorted(METHODS) + sorted(ABLATIONS)}")
    try:
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise SystemExit(f"--seeds: {args.seeds!r} is empty or repeats a seed")
    if args.order:
        tasks = [t for t in args.order.split(",") if t]
        if args.sequence in SEQUENCES and SEQUENCES[args.sequence] != tasks:
            raise SystemExit(f"--sequence {args.sequence} names {' → '.join(SEQUENCES[args.sequence])}; "
                             f"give --order another --sequence name")
        if len(set(tasks)) != len(tasks) or len(tasks) < 2:
            raise SystemExit(f"--order: at least two distinct task folders, got {args.order!r}")
        sequences = {args.sequence: tasks}
    else:
        names = args.sequence.split(",")
        if missing := [n for n in names if n not in SEQUENCES]:
            raise SystemExit(f"--sequence: unknown {missing}; named sequences are {sorted(SEQUENCES)} (or give --order)")
        sequences = {n: SEQUENCES[n] for n in names}
    plans = {}
    for name in sequences:
        plan = PLANS.get(name, Plan(OURS, MULTI_SEED, (0, 1, 2), strongest_other=True))
        plans[name] = Plan(tuple(labels or plan.methods), plan.multi_seed, tuple(seeds or plan.seeds),
                           plan.strongest_other, plan.test_examples)
    for tasks in sequences.values():
        for task in tasks:
            task_labels(args.data, task)
    return sequences, plans


def checked_redo(redo: str, plans: dict[str, Plan]) -> list[str]:
    chosen = [m for m in redo.split(",") if m]
    labels = sorted({m for plan in plans.values() for m in plan.methods})
    if outside := [m for m in chosen if m not in labels]:
        raise SystemExit(f"--redo: {outside} not among the planned methods {labels}")
    return chosen


def check_configs(sequences: dict[str, list[str]], plans: dict[str, Plan], data: Path, budget: Budget) -> None:
    """Every run's config validates (fields, method params) before the first run starts; the model's
    bounds (rank ≤ hidden size) are checked as each run starts, before its compute."""
    from pydantic import ValidationError

    from pipelines.config import RunConfig

    for sequence, tasks in sequences.items():
        for label in plans[sequence].methods:
            try:
                RunConfig.model_validate(run_config(label, sequence, tasks, plans[sequence].seeds[0], data, budget))
            except ValidationError as e:
                raise SystemExit(f"{label} on {sequence}: the run config is invalid:\n{e}") from None


def main(argv=None) -> None:
    args = parse_args(argv)
    sequences, plans = checked_plan(args)
    budget = Budget(args.model, args.steps_per_task, args.batch_size, args.rank, args.lr, args.max_length,
                    args.test_examples)
    results = open_results(args.out, budget)
    data, storage = args.data.resolve(), args.storage.resolve()
    labels = checked_redo(args.redo, plans)
    for sequence, tasks in sequences.items():
        redo(results, labels, {sequence: tasks}, list(plans[sequence].seeds), data, budget, storage)
    print(estimate(sequences, plans, results), flush=True)
    if args.report:
        results.write()
    if args.estimate or args.report:
        return
    check_configs(sequences, plans, data, budget)
    run_benchmark(sequences, plans, results,
                  lambda label, sequence, tasks, seed: run_one(label, sequence, tasks, seed, data, budget, storage))
    print(estimate(sequences, plans, results), file=sys.stderr)


if __name__ == "__main__":
    main()
