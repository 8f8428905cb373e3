"""Every method through the real pipeline on real task sequences, several seeds, with intervals.

    python -m benchmarks.cl_quality [--sequence order1,multiemo] [--methods moe_cl,seq_lora,…]
        [--seeds 0,1,2] [--steps-per-task 16] [--test-examples 200] [--estimate]
    python -m benchmarks.cl_quality --order taskA,taskB,taskC --sequence mine --data DIR

Sequences (task folders under --data, each with train.jsonl and test.jsonl): `order1`
(task-incremental: bbc_news_topic → vader_movieReviewSnippets → spamassassin → foldoc_subject)
and `multiemo` (domain-incremental: MultiEmo hotels → medicine → products → reviews, one label
set); `--order` runs any task folders in any order under the name `--sequence`. A task's labels
are the sorted distinct labels of its training file.

One budget for every method (recorded in the results; a results file made with another budget
is refused): the same optimizer steps per task (steps × batch training examples, one epoch),
LoRA rank, learning rate, length and batch, and up to `--test-examples` test examples per task
(the whole test split where smaller). Seeds change the experts' initialisation, the training
sample and its order (`training.seed`); each seed also draws its own test sample, which every
method shares at that seed, so comparisons are paired seed by seed. The first seed runs every
method; the others run MoE-CL, its no-GAN ablation (adv_weight 0), seq_lora, replay and the
strongest other non-oracle baseline on that sequence at the first seed.

Runs go one at a time. After each, its row is written to `<out>/cl_quality.json` (rows,
budget, aggregate: means, 95% intervals, paired verdicts; see benchmarks.cl_stats), its
per-example correctness to `<out>/cl_quality_examples.json`, and the report
(`cl_quality.md`, `cl_quality_aa_bwt.png`) is regenerated. A rerun skips finished rows, and a
run interrupted midway continues from its own ledger under --storage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.cl_report import readme_around_report, write_report
from benchmarks.cl_stats import aggregate, encode, run_key
from cl_core.atomic import atomic_write_text
from cl_core.bank import growth_by_owner, load_bank
from cl_core.methods import METHODS

SEQUENCES = {
    "order1": ["bbc_news_topic", "vader_movieReviewSnippets", "spamassassin", "foldoc_subject"],
    "multiemo": ["multiemo_hotels", "multiemo_medicine", "multiemo_products", "multiemo_reviews"],
}
# The prompt the shared data README measured MultiEmo with; other tasks use the config's default.
TEMPLATES = {task: "Review: {text}\nSentiment (one of: {labels}):" for task in SEQUENCES["multiemo"]}
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
MODELS = {"smollm2": {"kind": "smollm2"},
          "tiny": {"kind": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 256}}
# Rows beside the methods: MoE-CL without its adversarial term.
ABLATIONS = {"moe_cl_no_gan": ("moe_cl", {"adv_weight": 0.0})}
# Run at every seed; so is the strongest other non-oracle baseline at the first seed.
MULTI_SEED = ["moe_cl", "moe_cl_no_gan", "seq_lora", "replay"]
GOAL_METHODS = ["moe_cl", "moe_cl_no_gan", "seq_lora", "replay", "ewc", "olora", "mocl", "seta"]
# Wall time of one SmolLM2 run (4 tasks, 16 steps per task, 200 test examples, bf16-mixed) on
# the 2-core CPU machine: the estimate before any run of a results file has finished.
MEASURED_RUN_S = {"smollm2": 48 * 60}


@dataclass(frozen=True)
class Budget:
    """What every method gets; part of every run's config and of the results file."""

    model: str = "smollm2"
    steps_per_task: int = 16
    batch_size: int = 8
    rank: int = 8
    lr: float = 1e-3
    max_length: int = 96
    test_examples: int = 200

    @property
    def train_examples(self) -> int:
        return self.steps_per_task * self.batch_size  # one epoch, no gradient accumulation


def method_of(label: str) -> tuple[str, dict]:
    """`label` is a method name or an ablation's: (method, its params)."""
    return ABLATIONS.get(label, (label, {}))


def task_labels(data: Path, task: str) -> list[str]:
    """Sorted distinct labels of the task's training file; a missing folder or file is named."""
    for split in ("train", "test"):
        if not (data / task / f"{split}.jsonl").is_file():
            raise SystemExit(f"--data {data}: {task}/{split}.jsonl not found (a task folder holds train.jsonl "
                             f"and test.jsonl)")
    with open(data / task / "train.jsonl") as f:
        labels = sorted({str(json.loads(line)["label"]) for line in f if line.strip()})
    if len(labels) < 2:
        raise SystemExit(f"--data {data}: {task}/train.jsonl has {len(labels)} distinct label(s); a task needs 2")
    return labels


def run_config(label: str, sequence: str, tasks: list[str], seed: int, data: Path, budget: Budget) -> dict:
    method, params = method_of(label)
    order_hash = hashlib.sha256(">".join(tasks).encode()).hexdigest()[:6]  # names the order, whatever the hash covers
    task_configs = []
    for t in tasks:
        task = {"name": t, "data": {"train": str(data / t / "train.jsonl"), "test": str(data / t / "test.jsonl")},
                "labels": task_labels(data, t), "max_train_examples": budget.train_examples,
                "max_test_examples": budget.test_examples}
        if t in TEMPLATES:
            task["template"] = TEMPLATES[t]
        task_configs.append(task)
    return {
        "name": f"clq-{label}-{sequence}-{order_hash}-s{seed}",
        "model": MODELS[budget.model],
        "tasks": task_configs,
        "objective": "lm",
        "method": {"name": method, "params": params},
        "bank": {"rank": budget.rank, "alpha": 2 * budget.rank, "dropout": 0.05},
        "training": {"epochs": 1, "lr": budget.lr, "batch_size": budget.batch_size, "max_length": budget.max_length,
                     "seed": seed, "checkpoint_every": 20},
        "ray": {"num_workers": 1, "cpus_per_worker": 2},
        "eval": {"task_id": "both" if METHODS[method].method.routable else "oracle", "batch_size": 20},
        "data": {"on_bad_rows": "skip"},  # spamassassin has a few empty messages
    }


def correctness(run_dir: Path, tasks: int, mode: str = "oracle") -> list[list[list[int]]] | None:
    """correct[i][j] (j ≤ i): 0/1 per test example of task j after training task i, from the
    ledger; None if the run has no evaluation in this task-id mode."""
    from pipelines.run.ledger import Ledger, StageKey

    ledger = Ledger.read(run_dir)
    rows = [ledger.outputs(StageKey("evaluate", i))["rows"] for i in range(tasks)]
    if any(mode not in row for row in rows):
        return None
    return [rows[i][mode]["correct"][:i + 1] for i in range(tasks)]


def bank_size(run_dir: Path, tasks: int) -> dict:
    """The final bank's parameters (experts, routers, method modules; not method buffers), and its
    experts and their parameters per owner ("shared", or the task index: how the bank grew)."""
    manifest, _ = load_bank(next((run_dir / "banks").glob(f"task{tasks - 1}-*")))
    return {"trainable_params": int(sum(np.prod(shape) for key, shape in manifest["shapes"].items()
                                        if not key.startswith("state."))),
            "bank_growth": growth_by_owner(manifest["structure"]["bank"], manifest["shapes"])}


def run_one(label: str, sequence: str, tasks: list[str], seed: int, data: Path, budget: Budget,
            storage: Path) -> tuple[dict, dict]:
    """One run through the pipeline (continued from its ledger if it started earlier): its row and
    its per-example correctness per task-id mode."""
    from pipelines.config import parse_config
    from pipelines.run.driver import Driver

    cfg = parse_config(run_config(label, sequence, tasks, seed, data, budget), f"cl_quality/{label}/{sequence}/s{seed}")
    result = Driver(cfg, storage).run()
    oracle, inferred = result.summary["oracle"], result.summary.get("inferred")
    examples = {mode: correctness(result.run_dir, len(tasks), mode) for mode in ("oracle", "inferred")}
    row = {
        "method": label, "sequence": sequence, "order": list(tasks), "seed": seed,
        "AA": oracle["AA"], "BwT": oracle["BwT"], "FwT": oracle["FwT"], "forgetting": oracle["forgetting"],
        # Null until the pipeline reports them (learning gain beside GEM's FwT; optimizer steps).
        "learning_gain": oracle.get("learning_gain"),
        "strip_rate": float(np.mean(result.strip_calibrated["oracle"])),
        "task_agnostic_AA": inferred["AA"] if inferred else None,
        "task_agnostic_BwT": inferred["BwT"] if inferred else None,
        "steps_per_task": getattr(result, "steps_per_task", None),
        "n_test": [len(cell) for cell in examples["oracle"][-1]],
        **bank_size(result.run_dir, len(tasks)),
        "wall_s": round(result.busy_s, 1),
        "oracle": METHODS[method_of(label)[0]].method.oracle,
    }
    return row, {mode: encode(c) for mode, c in examples.items() if c is not None}


class Results:
    """The results file and the per-example file beside it; each finished run is written as it finishes."""

    def __init__(self, out: Path, budget: Budget, draws: int | None = None, readme: Path | None = None):
        self.out, self.budget, self.draws, self.readme = out, budget, draws, readme
        self.path, self.examples_path = out / "cl_quality.json", out / "cl_quality_examples.json"
        self.rows, self.examples, self.stats_cache = [], {}, {}
        if readme is not None:
            readme_around_report(readme)  # a README without the report's markers stops the benchmark here
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if not isinstance(saved, dict) or "budget" not in saved:
                raise SystemExit(f"{self.path} is not a results file of this benchmark (no budget): move it away, "
                                 f"or give another --out")
            if saved["budget"] != asdict(budget):
                raise SystemExit(f"{self.path} was made with budget {saved['budget']}, not {asdict(budget)}: "
                                 f"give the same budget to continue it, or another --out")
            self.examples = json.loads(self.examples_path.read_text()) if self.examples_path.exists() else {}
            # A row counts as finished only with its correctness (written first).
            self.rows = [r for r in saved["rows"] if run_key(r) in self.examples]

    def finished(self, label: str, sequence: str, tasks: list[str], seed: int) -> dict | None:
        key = run_key({"method": label, "sequence": sequence, "order": tasks, "seed": seed})
        return next((r for r in self.rows if run_key(r) == key), None)

    def check_order(self, sequence: str, tasks: list[str]) -> None:
        """One order per sequence name in a results file: its aggregates pool the seeds."""
        for r in self.rows:
            if r["sequence"] == sequence and r["order"] != tasks:
                raise SystemExit(f"{self.path}: sequence {sequence!r} was run as {' → '.join(r['order'])}; "
                                 f"give this order another --sequence name")

    def add(self, row: dict, examples: dict) -> None:
        self.examples[run_key(row)] = examples
        self.rows.append(row)
        self._save()

    def supersede(self, row: dict) -> None:
        """Moves a finished row and its correctness to `cl_quality_superseded.json` beside the
        results (written first, so that a crash between the writes loses nothing)."""
        key = run_key(row)
        path = self.out / "cl_quality_superseded.json"
        kept = json.loads(path.read_text()) if path.exists() else []
        kept.append({"row": row, "examples": self.examples[key], "superseded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        atomic_write_text(path, json.dumps(kept))
        self.rows.remove(row)
        del self.examples[key]
        # Its rerun has the same key: stats cached from the old correctness would stand in for the new.
        for cached in [k for k in self.stats_cache if k[0] == key]:
            del self.stats_cache[cached]
        self._save()

    def _save(self) -> None:
        """The correctness first: a row without it does not count as finished when read back."""
        atomic_write_text(self.examples_path, json.dumps(self.examples))
        self.write()

    def write(self) -> None:
        kwargs = {} if self.draws is None else {"draws": self.draws}
        summary = aggregate(self.rows, self.examples, cache=self.stats_cache, **kwargs)
        payload = {"budget": asdict(self.budget), "rows": self.rows, "aggregate": summary}
        atomic_write_text(self.path, json.dumps(payload, indent=1))
        write_report(self.out, self.budget, self.rows, summary, self.readme)


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


def strongest_other(rows: list[dict], sequence: str, seed: int, labels: list[str]) -> str | None:
    """The non-oracle method outside MULTI_SEED with the best AA on the sequence at `seed`."""
    candidates = [r for r in rows if r["sequence"] == sequence and r["seed"] == seed and not r["oracle"]
                  and r["method"] in labels and r["method"] not in MULTI_SEED]
    return max(candidates, key=lambda r: r["AA"])["method"] if candidates else None


def planned_runs(sequences: dict[str, list[str]], labels: list[str], seeds: list[int],
                 rows: list[dict]) -> list[tuple[str, str, int]]:
    """(label, sequence, seed) in running order: every label at the first seed, sequence by
    sequence; then the multi-seed labels at the other seeds (the strongest other baseline as
    soon as the first seed's rows name it)."""
    runs = [(label, sequence, seeds[0]) for sequence in sequences for label in labels]
    for sequence in sequences:
        multi = [label for label in MULTI_SEED if label in labels]
        strongest = strongest_other(rows, sequence, seeds[0], labels)
        runs += [(label, sequence, seed) for seed in seeds[1:] for label in multi + ([strongest] if strongest else [])]
    return runs


def run_benchmark(sequences: dict[str, list[str]], labels: list[str], seeds: list[int], results: Results,
                  run: Callable[[str, str, list[str], int], tuple[dict, dict]]) -> None:
    """Runs what `results` lacks, one at a time; `run(label, sequence, tasks, seed)` → (row, examples)."""
    for sequence, tasks in sequences.items():
        results.check_order(sequence, tasks)
    done = set()
    while True:  # the plan grows once the first seed names each sequence's strongest other baseline
        todo = [r for r in planned_runs(sequences, labels, seeds, results.rows) if r not in done]
        if not todo:
            return
        label, sequence, seed = todo[0]
        done.add(todo[0])
        tasks = sequences[sequence]
        if results.finished(label, sequence, tasks, seed):
            print(f"{label} {sequence} seed {seed}: finished earlier", flush=True)
            continue
        start = time.perf_counter()
        row, examples = run(label, sequence, tasks, seed)
        results.add(row, examples)
        print(f"{label} {sequence} seed {seed}: AA {row['AA']:.1f} BwT {row['BwT']:+.1f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def estimate(sequences: dict, labels: list[str], seeds: list[int], results: Results) -> str:
    """Runs planned, finished, and the time the rest takes at the finished runs' mean wall time
    (or the measured SmolLM2 run before any has finished)."""
    multi = [label for label in MULTI_SEED if label in labels]
    others = any(label not in MULTI_SEED and not METHODS[method_of(label)[0]].method.oracle for label in labels)
    total = len(sequences) * (len(labels) + (len(seeds) - 1) * (len(multi) + others))
    finished = [r for r in results.rows if r["sequence"] in sequences and r["method"] in labels and r["seed"] in seeds]
    per_run = (np.mean([r["wall_s"] for r in finished]) if finished else MEASURED_RUN_S.get(results.budget.model))
    left = total - len(finished)
    if per_run is None:
        return f"{total} runs planned, {len(finished)} finished; no measured run to estimate the time from"
    source = f"mean of {len(finished)} finished" if finished else "one measured SmolLM2 run"
    return (f"{total} runs planned, {len(finished)} finished; {left} left × {per_run / 60:.1f} min ({source}) "
            f"≈ {left * per_run / 3600:.1f} h")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    labels = GOAL_METHODS + sorted(set(METHODS) - set(GOAL_METHODS))
    parser.add_argument("--methods", default=",".join(labels), help="methods and ablations (moe_cl_no_gan)")
    parser.add_argument("--sequence", default="order1,multiemo", help=f"named sequences {sorted(SEQUENCES)}, or "
                        "the name of --order")
    parser.add_argument("--order", help="task folders under --data, in order (comma-separated)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS), help="tiny: a random Llama, for smoke runs")
    parser.add_argument("--steps-per-task", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=96, help="tokens per example (prompt + answer)")
    parser.add_argument("--test-examples", type=int, default=200, help="per task; the whole split where smaller")
    parser.add_argument("--storage", type=Path, default=REPO / "runs" / "cl_quality")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--estimate", action="store_true", help="print the plan's size and time, run nothing")
    parser.add_argument("--report", action="store_true", help="rewrite the aggregate and report, run nothing")
    parser.add_argument("--readme", type=Path, help="also rewrite this README's report section (between its markers)")
    parser.add_argument("--redo", default="", help="methods (of --methods) whose code changed: their rows on --sequence "
                        "at --seeds and their run folders are moved aside, and they run again")
    return parser.parse_args(argv)


def checked_plan(args: argparse.Namespace) -> tuple[dict[str, list[str]], list[str], list[int]]:
    """Sequences, labels and seeds from the flags; every problem exits naming its flag, before compute."""
    labels = [m for m in args.methods.split(",") if m]
    unknown = [m for m in labels if method_of(m)[0] not in METHODS]
    if unknown or not labels:
        raise SystemExit(f"--methods: unknown {unknown}; available: {sorted(METHODS) + sorted(ABLATIONS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: {args.seeds!r} repeats a seed")
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
    for tasks in sequences.values():
        for task in tasks:
            task_labels(args.data, task)
    return sequences, labels, seeds


def checked_redo(redo: str, labels: list[str]) -> list[str]:
    chosen = [m for m in redo.split(",") if m]
    if outside := [m for m in chosen if m not in labels]:
        raise SystemExit(f"--redo: {outside} not among --methods {labels}")
    return chosen


def check_configs(sequences: dict[str, list[str]], labels: list[str], seed: int, data: Path, budget: Budget) -> None:
    """Every run's config validates (fields, method params) before the first run starts; the model's
    bounds (rank ≤ hidden size) are checked as each run starts, before its compute."""
    from pydantic import ValidationError

    from pipelines.config import RunConfig

    for sequence, tasks in sequences.items():
        for label in labels:
            try:
                RunConfig.model_validate(run_config(label, sequence, tasks, seed, data, budget))
            except ValidationError as e:
                raise SystemExit(f"{label} on {sequence}: the run config is invalid:\n{e}") from None


def main(argv=None) -> None:
    args = parse_args(argv)
    sequences, labels, seeds = checked_plan(args)
    budget = Budget(args.model, args.steps_per_task, args.batch_size, args.rank, args.lr, args.max_length,
                    args.test_examples)
    results = Results(args.out, budget, readme=args.readme)
    print(estimate(sequences, labels, seeds, results), flush=True)
    if args.report:
        results.write()
    if args.estimate or args.report:
        return
    data, storage = args.data.resolve(), args.storage.resolve()
    check_configs(sequences, labels, seeds[0], data, budget)
    redo(results, checked_redo(args.redo, labels), sequences, seeds, data, budget, storage)
    run_benchmark(sequences, labels, seeds, results,
                  lambda label, sequence, tasks, seed: run_one(label, sequence, tasks, seed, data, budget, storage))
    print(estimate(sequences, labels, seeds, results), file=sys.stderr)


if __name__ == "__main__":
    main()
