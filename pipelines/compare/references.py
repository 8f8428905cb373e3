"""The published figures the continual-learning rows are set beside, and whether their order holds here.

T5-large on O-LoRA's CL_Benchmark, average accuracy after the last task, from the O-LoRA
repository's `logs_and_outputs/*/all_results.json` (see `../shared/data/README.md`). Yahoo Answers
is missing here: yelp stands in for it in the standard orders, and the long sequence has 14 of its
15 tasks. Per-task LoRA (a LoRA per task, the task id given at inference) is the nearest method
here to incremental LoRA (a new LoRA per task, the earlier ones frozen, all of them summed, no task
id); it forgets nothing by construction, so it sits above incremental LoRA rather than beside it.
"""

from __future__ import annotations

from itertools import pairwise

# sequence → (what the paper ran, [(method here, the paper's method, its AA)] in the paper's order,
# [(a published method with no counterpart here, its AA)]).
PUBLISHED = {
    "standard_o1": ("O-LoRA's order 1: dbpedia → amazon → yahoo → agnews (yelp for yahoo here)",
                    [("olora", "O-LoRA", 78.4), ("per_task_lora", "incremental LoRA", 68.6),
                     ("seq_lora", "sequential LoRA", 62.9)],
                    [("sequential fine-tuning (all weights)", 67.8)]),
    "long": ("O-LoRA's 15-task order (order 4; 14 tasks here, without yahoo)",
             [("olora", "O-LoRA", 73.9), ("per_task_lora", "incremental LoRA", 58.5),
              ("seq_lora", "sequential LoRA", 32.4)],
             []),
}
# What the reader needs beside a sequence's comparison.
NOTES = {"long": "Here a prompt is cut to the budget's max length, where O-LoRA's T5 reads up to 512 tokens: "
                 "`prompt_lengths` gives the share of each task's test prompts whose text is cut, and a cut "
                 "multirc, rte or cb prompt loses the question or the second sentence that decides its label."}
HOLDS = {"better": "holds", "worse": "reversed", "not distinguishable": "not distinguishable"}


def _fmt(stat: dict) -> str:
    mark = " †" if stat["interval"] == "examples" else ""
    return f"{stat['mean']:.1f} [{stat['ci95'][0]:.1f}, {stat['ci95'][1]:.1f}]{mark}"


def _pair(summary: dict, sequence: str, a: str, b: str) -> dict | None:
    return next((p for p in summary["pairs"]
                 if (p["sequence"], p["a"], p["b"], p["measure"]) == (sequence, a, b, "AA")), None)


def _pooled_pair(summary: dict, group: str, a: str, b: str) -> dict | None:
    return next((p for p in summary.get("pooled", [])
                 if (p["group"], p.get("a"), p.get("b"), p["measure"]) == (group, a, b, "AA")), None)


def order_check(pair: dict | None, a: str, b: str) -> str:
    """Whether the published a > b holds here, from the paired AA difference a − b."""
    if pair is None:
        return f"{a} > {b}: not measured yet"
    low, high = pair["ci95"]
    where = "one seed: test sampling only" if pair["interval"] == "examples" else \
        f"t over {len(pair['orders'])} orders" if pair["interval"] == "t_orders" else f"t over {len(pair['seeds'])} seeds"
    return f"{a} > {b}: {a} − {b} AA {pair['difference']:+.1f} [{low:+.1f}, {high:+.1f}] ({where}): {HOLDS[pair['verdict']]}"


def published_section(summary: dict, heading: str, pooled_group: str = "standard") -> list[str]:
    """Per sequence with published figures: a table of ours beside theirs, then whether each
    adjacent step of the published order holds here (and, for order 1, over the standard orders)."""
    lines = []
    for sequence, (what, order, unmatched) in PUBLISHED.items():
        entries = {e["method"]: e for e in summary["methods"] if e["sequence"] == sequence}
        lines += [f"{heading} {sequence} beside {what}", "",
                  "| method here | published method | published AA (T5-large) | AA here | BwT here |", "|---|---|---|---|---|"]
        for method, theirs, aa in order:
            e = entries.get(method)
            ours = ("not run yet", "—") if e is None else (_fmt(e["AA"]), _fmt(e["BwT"]))
            lines.append(f"| {method} | {theirs} | {aa:.1f} | {ours[0]} | {ours[1]} |")
        lines += [f"| — | {name} | {aa:.1f} | not run here | — |" for name, aa in unmatched] + [""]
        lines += [NOTES[sequence], ""] if sequence in NOTES else []
        steps = [*pairwise(order), (order[0], order[-1])]
        lines += [f"- {order_check(_pair(summary, sequence, a[0], b[0]), a[0], b[0])}" for a, b in steps]
        if sequence == "standard_o1":
            lines += [f"- over standard_o1..o3, {order_check(_pooled_pair(summary, pooled_group, a[0], b[0]), a[0], b[0])}"
                      for a, b in steps]
        lines.append("")
    return lines
