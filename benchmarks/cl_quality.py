"""Every method through the real pipeline on four real tasks with SmolLM2-135M-Instruct.

    python -m benchmarks.cl_quality [--methods moe_cl,seq_lora] [--train-examples 32] [--test-examples 24]

One fixed budget for all methods (same examples per task, epochs, rank, seed), the `lm`
objective, two task orders. Writes `benchmarks/results/cl_quality.json` (a list of rows
{"method", "order", "AA", "BwT", "FwT", "forgetting", "strip_rate", "task_agnostic_AA",
"trainable_params", "wall_s", "oracle"}, accuracies in points) and `cl_quality.md` (the table).
Runs finished earlier are reused from the storage folder (each run has its own ledger), so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cl_core.bank import load_bank
from cl_core.methods import METHODS

LABELS = {
    "bbc_news_topic": ["business", "entertainment", "politics", "sports", "tech"],
    "vader_movieReviewSnippets": ["negative", "positive"],
    "spamassassin": ["ham", "spam"],
    "foldoc_subject": ["company", "database", "graphics", "hardware", "language", "mathematics", "networking",
                       "operating system", "programming", "security"],
}
ORDERS = {
    "order1": ["bbc_news_topic", "vader_movieReviewSnippets", "spamassassin", "foldoc_subject"],
    "order2": ["foldoc_subject", "spamassassin", "vader_movieReviewSnippets", "bbc_news_topic"],
}
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
# Rows beside the methods: MoE-CL without its adversarial term, for the GAN goal.
ABLATIONS = {"moe_cl_no_gan": ("moe_cl", {"adv_weight": 0.0})}
NON_ORACLE_BASELINES = ["seq_lora", "replay", "ewc", "olora", "mocl"]


def run_config(label: str, order: str, data: Path, train_examples: int, test_examples: int, epochs: int,
               lr: float, max_length: int) -> dict:
    """`label` is a method name or an ablation's."""
    method, params = ABLATIONS.get(label, (label, {}))
    routable = METHODS[method].method.routable
    return {
        "name": f"clq-{label}-{order}",
        "model": {"kind": "smollm2"},
        "tasks": [{"name": t, "data": {"train": str(data / t / "train.jsonl"), "test": str(data / t / "test.jsonl")},
                   "labels": LABELS[t], "max_train_examples": train_examples, "max_test_examples": test_examples}
                  for t in ORDERS[order]],
        "objective": "lm",
        "method": {"name": method, "params": params},
        "bank": {"rank": 8, "alpha": 16, "dropout": 0.05},
        "training": {"epochs": epochs, "lr": lr, "batch_size": 8, "max_length": max_length, "seed": 0,
                     "checkpoint_every": 20},
        "ray": {"num_workers": 1, "cpus_per_worker": 2},
        "eval": {"task_id": "both" if routable else "oracle", "batch_size": 20},
        "data": {"on_bad_rows": "skip"},  # spamassassin has a few empty messages
    }


def bank_size(run_dir: Path, tasks: int) -> int:
    """Parameters in the final bank (experts, routers, method modules; not method buffers)."""
    bank_dir = next((run_dir / "banks").glob(f"task{tasks - 1}-*"))
    manifest, _ = load_bank(bank_dir)
    return int(sum(np.prod(shape) for key, shape in manifest["shapes"].items() if not key.startswith("state.")))


def table(rows: list[dict]) -> str:
    head = "| method | order | AA | BwT | FwT | forgetting | strip rate (upper bound) | task-agnostic AA | trainable params | wall (s) |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        agnostic = "—" if r["task_agnostic_AA"] is None else f"{r['task_agnostic_AA']:.1f}"
        name = r["method"] + (" (oracle)" if r["oracle"] else "")
        lines.append(f"| {name} | {r['order']} | {r['AA']:.1f} | {r['BwT']:+.1f} | {r['FwT']:+.1f} | "
                     f"{r['forgetting']:.1f} | {r['strip_rate']:.1f} | {agnostic} | {r['trainable_params']:,} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The benchmark's four goals per order, each with its figures and whether it is met."""
    verdict = {True: "met", False: "not met"}
    lines = []
    for order in sorted({r["order"] for r in rows}):
        by = {r["method"]: r for r in rows if r["order"] == order}
        if "seq_lora" in by:
            bwt = by["seq_lora"]["BwT"]
            lines.append(f"{order}: sequential LoRA forgets (BwT ≤ −5): BwT {bwt:+.1f}, {verdict[bwt <= -5]}")
        baselines = [by[name] for name in NON_ORACLE_BASELINES if name in by]
        if "moe_cl" in by and baselines:
            moe, best = by["moe_cl"], max(baselines, key=lambda r: r["AA"])
            met = moe["AA"] >= best["AA"] and moe["BwT"] >= -2
            lines.append(f"{order}: MoE-CL AA ≥ every non-oracle baseline's, with BwT ≥ −2: AA {moe['AA']:.1f} vs "
                         f"{best['AA']:.1f} ({best['method']}), BwT {moe['BwT']:+.1f}, {verdict[met]}")
        if "moe_cl" in by and "moe_cl_no_gan" in by:
            d_aa = by["moe_cl"]["AA"] - by["moe_cl_no_gan"]["AA"]
            d_bwt = by["moe_cl"]["BwT"] - by["moe_cl_no_gan"]["BwT"]
            lines.append(f"{order}: the GAN term (adv_weight 0.1 vs 0) changes AA by {d_aa:+.1f} and BwT by "
                         f"{d_bwt:+.1f}: it {'helps' if d_aa > 0 else 'does not help'} here")
        agnostic = [by[name] for name in ("seta", "cmoe") if name in by and by[name]["task_agnostic_AA"] is not None]
        if "per_task_lora" in by and agnostic:
            best, oracle = max(agnostic, key=lambda r: r["task_agnostic_AA"]), by["per_task_lora"]["AA"]
            share = best["task_agnostic_AA"] / oracle
            lines.append(f"{order}: task-agnostic SETA or CMoE ≥ 90% of the per-task LoRA oracle's AA: "
                         f"{best['task_agnostic_AA']:.1f} ({best['method']}) vs {oracle:.1f} = {share:.0%}, "
                         f"{verdict[share >= 0.9]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    goal_methods = ["seq_lora", "moe_cl", "per_task_lora", "seta", "cmoe"]
    parser.add_argument("--methods", default=",".join(goal_methods + sorted(set(METHODS) - set(goal_methods))))
    parser.add_argument("--orders", default="order1,order2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--train-examples", type=int, default=32)
    parser.add_argument("--test-examples", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=96, help="tokens per example (prompt + answer)")
    parser.add_argument("--storage", type=Path, default=REPO / "runs" / "cl_quality")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    from pipelines.config import parse_config
    from pipelines.driver import Driver

    rows = []
    # Order-major, so that a benchmark stopped early has every method on the first order.
    # Each method followed by its ablations, in the order given (the default puts the goals' methods first).
    labels = [label for method in args.methods.split(",")
              for label in [method, *(a for a, (m, _) in ABLATIONS.items() if m == method)]]
    for order in args.orders.split(","):
        for label in labels:
            cfg = parse_config(run_config(label, order, args.data, args.train_examples, args.test_examples,
                                          args.epochs, args.lr, args.max_length), f"cl_quality/{label}/{order}")
            method = cfg.method.name
            start = time.perf_counter()
            result = Driver(cfg, args.storage).run()
            oracle = result.summary["oracle"]
            rows.append({
                "method": label, "order": order, "AA": oracle["AA"], "BwT": oracle["BwT"], "FwT": oracle["FwT"],
                "forgetting": oracle["forgetting"], "strip_rate": float(np.mean(result.strip["oracle"])),
                "task_agnostic_AA": result.summary["inferred"]["AA"] if "inferred" in result.summary else None,
                "trainable_params": bank_size(result.run_dir, len(cfg.tasks)),
                "wall_s": sum(result.stage_seconds.values()) or time.perf_counter() - start,
                "oracle": METHODS[method].method.oracle,
            })
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "cl_quality.json").write_text(json.dumps(rows, indent=2))
            training = cfg.training
            budget = (f"Budget: SmolLM2-135M-Instruct ({result.precision}, CPU), {args.train_examples} training and "
                      f"{args.test_examples} test examples per task, {training.epochs} epoch(s), LoRA rank "
                      f"{cfg.bank.rank}, lr {training.lr:g}, batch {training.batch_size}, max length "
                      f"{training.max_length}, seed {training.seed}.")
            goal_lines = "".join(f"- {line}\n" for line in goals(rows))
            (args.out / "cl_quality.md").write_text(
                f"# Continual-learning quality\n\n{budget}\n\n{table(rows)}\n\n## Goals\n\n{goal_lines}")
            print(table(rows[-1:]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
