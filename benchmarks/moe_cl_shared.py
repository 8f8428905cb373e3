"""Choosing MoE-CL's retention default on validation: its variants and sequential LoRA in process.

    python -m benchmarks.moe_cl_shared [--variants free,fisher10,...] [--sequences order1,multiemo]
                                       [--seeds 0,1] [--lock /tmp/clpipe-heavy.lock]
    python -m benchmarks.moe_cl_shared --summarise     # runs nothing: the summary and the choice so far

Each variant is MoE-CL with the parameters below (spelled out in full, so that a change of
MoE-CL's defaults does not change what a name ran), run by `benchmarks.in_process` with the
continual-learning benchmark's budget (16 steps of 8 examples per task, lr 1e-3, rank 8) and 100
validation and 100 test examples per task, into `benchmarks/results/moe_cl_selection.json`;
`seq_lora` runs beside them as the reference. The summary
(`benchmarks/results/moe_cl_selection_summary.json`) pairs every variant with sequential LoRA and
with the free shared expert in the paper's form, seed by seed, on validation (what the choice
reads) and on test (reported only): the mean difference and its t-interval over seeds. Its
`choice` applies the rule in `docs/methods.md` (MoE-CL) to the validation rows, or names the runs
it still waits for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cl_core.atomic import atomic_write_text
from pipelines.compare import in_process
from pipelines.compare.moe_cl_selection import VARIANTS, choice, summary
from pipelines.compare.sequences import Budget

RESULTS = Path(__file__).resolve().parent / "results" / "moe_cl_selection.json"
SUMMARY = RESULTS.with_name("moe_cl_selection_summary.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sequences", default="order1,multiemo")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lock", type=Path)
    parser.add_argument("--summarise", action="store_true", help="run nothing: write the summary and the choice")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    budget = Budget(test_examples=100)
    results = in_process.Results(RESULTS, budget, validation_examples=100)
    for label in [] if args.summarise else args.variants.split(","):
        method, params, inference = VARIANTS[label]
        in_process.run_missing(results, label, method, params, args.sequences.split(","),
                               [int(s) for s in args.seeds.split(",")], budget, args.lock, inference)
        write_summary(results.rows)
    print(json.dumps(write_summary(results.rows), indent=1))


def write_summary(rows: list[dict]) -> dict:
    out = {"choice": choice(rows), "pairs": summary(rows)}
    atomic_write_text(SUMMARY, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
