"""One continual-learning sequence in float32 and in bf16-mixed: do AA and BwT agree?

    python -m benchmarks.precision_quality [--method moe_cl] [--sequence order1] [--steps-per-task 16]
        [--test-examples 200] [--json]

Runs the sequence through the real pipeline with cl_quality's run config (SmolLM2-135M-Instruct,
the `lm` objective, one budget) once per precision. Both runs are evaluated on the same test
examples, so the difference bf16-mixed − fp32 of AA and BwT gets a paired bootstrap 95% interval
over test examples (cl_core.metrics.paired_difference); the precisions agree when it holds 0.
Finished runs are reused from their ledgers. Writes `precision_quality.json` under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.compare.sequences import DEFAULT_DATA, REPO, SEQUENCES, Budget, run_config
from cl_core.metrics import average_accuracy, backward_transfer, paired_difference
from pipelines.compare.docs import after_writing
from pipelines.compare.outputs import correctness

PRECISIONS = ("fp32", "bf16-mixed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="moe_cl")
    parser.add_argument("--sequence", default="order1", choices=sorted(SEQUENCES))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps-per-task", type=int, default=16, help="at batch 8")
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--storage", type=Path, default=REPO / "runs" / "precision_quality")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = parser.parse_args()

    from pipelines.config import parse_config
    from pipelines.run.driver import Driver

    runs, correct = {}, {}
    for precision in PRECISIONS:
        budget = Budget(steps_per_task=args.steps_per_task, lr=args.lr, max_length=args.max_length,
                        test_examples=args.test_examples)
        raw = run_config(args.method, args.sequence, SEQUENCES[args.sequence], 0, args.data, budget)
        raw["name"] += f"-{precision}"
        raw["training"]["precision"] = precision
        cfg = parse_config(raw, f"precision_quality/{precision}")
        result = Driver(cfg, args.storage).run()
        summary = result.summary["oracle"]
        runs[precision] = {"AA": summary["AA"], "BwT": summary["BwT"], "wall_s": round(result.busy_s, 1)}
        correct[precision] = correctness(result.run_dir, len(cfg.tasks))

    differences = {}
    for name, measure in (("AA", average_accuracy), ("BwT", backward_transfer)):
        d, low, high = paired_difference(correct["bf16-mixed"], correct["fp32"], measure)
        differences[name] = {"difference": round(100 * d, 2), "ci95": [round(100 * low, 2), round(100 * high, 2)]}
    agree = all(v["ci95"][0] <= 0 <= v["ci95"][1] for v in differences.values())
    out = {"method": args.method, "sequence": args.sequence, "steps_per_task": args.steps_per_task,
           "test_examples": args.test_examples, "runs": runs, "bf16_minus_fp32": differences,
           "agree_within_interval": agree}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision_quality.json").write_text(json.dumps(out, indent=2))
    after_writing(args.out / "precision_quality.json", REPO)
    for precision, r in runs.items():
        print(f"{precision:<11} AA {r['AA']:5.1f}  BwT {r['BwT']:+5.1f}  wall {r['wall_s']:.0f} s")
    for name, v in differences.items():
        print(f"bf16-mixed − fp32 {name}: {v['difference']:+.1f} points, 95% CI [{v['ci95'][0]:+.1f}, {v['ci95'][1]:+.1f}]")
    print(f"agree within the interval: {agree}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
