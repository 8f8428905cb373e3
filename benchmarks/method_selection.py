"""Choosing SETA's `shared_lr_scale` and EWC's `lam` on validation, from in-process runs.

    python -m benchmarks.method_selection      # reads the runs, writes the summary and the choice

The runs (one label per candidate value, order1 and multiemo, seeds 0 and 1, the benchmark's
budget) are made by `benchmarks.in_process`, e.g.

    python -m benchmarks.in_process --out benchmarks/results/seta_validation.json --method seta \\
        --label seta_lr0.3 --params '{"shared_lr_scale": 0.3}' --lock /tmp/clpipe-heavy.lock
    python -m benchmarks.in_process --out benchmarks/results/ewc_lambda_validation.json --method ewc \\
        --label ewc_lam1000 --params '{"lam": 1000}' --lock /tmp/clpipe-heavy.lock

The rules (docs/methods.md), read on validation only, over the candidates that have every
(sequence, seed) run:
- EWC: the λ with the highest mean validation AA over the runs.
- SETA (its goal: task-agnostic BwT ≥ −3 on every sequence): among the values whose mean
  task-agnostic validation BwT is ≥ −3 on each sequence, the highest mean task-agnostic
  validation AA; if none qualifies, the highest mean task-agnostic validation BwT.
Test figures are summarised beside them and read by no rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipelines.compare import in_process
from cl_core.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SWEEPS = {"ewc": (RESULTS / "ewc_lambda_validation.json", "lam", "oracle"),
          "seta": (RESULTS / "seta_validation.json", "shared_lr_scale", "inferred")}
SEQUENCES, SEEDS = ("order1", "multiemo"), (0, 1)
SETA_BWT_GOAL = -3.0


def describe(runs: list[dict], mode: str) -> dict:
    """Per sequence: each seed's AA and BwT on validation and test (in `mode`), their means, and
    the experts and parameters per owner of the seed-0 bank where the run recorded it."""
    out = {}
    for sequence in SEQUENCES:
        mine = sorted((r for r in runs if r["sequence"] == sequence), key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in mine]}
        for split in ("validation", "test"):
            for measure in ("AA", "BwT"):
                values = [round(r[split][mode][measure], 2) for r in mine]
                entry[f"{split}_{measure}"] = values
                entry[f"{split}_{measure}_mean"] = round(float(np.mean(values)), 2) if values else None
        if mine and "bank" in mine[0]:
            entry["bank_seed0"] = mine[0]["bank"]
        out[sequence] = entry
    return out


def complete(runs: list[dict]) -> bool:
    return {(r["sequence"], r["seed"]) for r in runs} >= {(s, seed) for s in SEQUENCES for seed in SEEDS}


def choose(method: str, described: dict[str, dict]) -> tuple[str | None, str]:
    """The chosen label and why, by the method's rule over the complete candidates."""
    if not described:
        return None, "no complete candidate yet"

    def mean_over(label: str, key: str) -> float:
        return float(np.mean([described[label][s][key] for s in SEQUENCES]))

    if method == "ewc":
        best = max(described, key=lambda label: mean_over(label, "validation_AA_mean"))
        return best, "highest mean validation AA"
    keeping = [label for label in described
               if all(described[label][s]["validation_BwT_mean"] >= SETA_BWT_GOAL for s in SEQUENCES)]
    if keeping:
        best = max(keeping, key=lambda label: mean_over(label, "validation_AA_mean"))
        return best, f"highest mean task-agnostic validation AA among those with BwT >= {SETA_BWT_GOAL} on each sequence"
    best = max(described, key=lambda label: mean_over(label, "validation_BwT_mean"))
    return best, f"none keeps BwT >= {SETA_BWT_GOAL} on every sequence: the highest mean task-agnostic validation BwT"


def summarise(method: str) -> dict:
    path, param, mode = SWEEPS[method]
    rows = json.loads(path.read_text())["runs"] if path.exists() else []
    labels = {}
    for row in rows:
        labels.setdefault(row["label"], []).append(row)
    candidates = {label: describe(runs, mode) for label, runs in labels.items()}
    chosen, why = choose(method, {label: candidates[label] for label, runs in labels.items() if complete(runs)})
    out = {"mode": mode, "param": param, "candidates": candidates, "chosen": chosen, "rule": why}
    if chosen is not None:
        out["chosen_params"] = labels[chosen][0]["params"]
        out["vs_chosen"] = {label: {s: {split: {m: in_process.paired(
            [r for r in runs if r["sequence"] == s], [r for r in labels[chosen] if r["sequence"] == s], m, split, mode)
            for m in ("AA", "BwT")} for split in ("validation", "test")} for s in SEQUENCES}
            for label, runs in labels.items() if label != chosen}
    return out


def main() -> None:
    # No options: --help shows the rules above, and a stray argument is refused rather than ignored.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    summary = {method: summarise(method) for method in SWEEPS}
    atomic_write_text(RESULTS / "method_selection_summary.json", json.dumps(summary, indent=1))
    for method, entry in summary.items():
        print(f"{method}: {entry['chosen']} ({entry['rule']})")
        for label, described in entry["candidates"].items():
            print("  " + label + ": " + "; ".join(
                f"{s} val AA {d['validation_AA_mean']} BwT {d['validation_BwT_mean']} "
                f"(test {d['test_AA_mean']} / {d['test_BwT_mean']}, seeds {d['seeds']})" for s, d in described.items()))


if __name__ == "__main__":
    main()
