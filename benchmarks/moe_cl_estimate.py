"""How well does a second-order estimate predict what MoE-CL's shared expert does to an earlier task?

    python -m benchmarks.moe_cl_estimate [--sequences order1,multiemo] [--seed 0] [--params '{...}']

Trains MoE-CL in process (`benchmarks.in_process`, the benchmark's budget; the shared expert free:
the per-task Fisher anchor at weight 0, so that the method keeps, after each task j, the shared
expert θ*_j, the task's mean gradient g_j, per-sample Fisher F_j there and its loss scale s_j =
L_j / D_j, `cl_core.anchoring.store_task_statistics`, and pulls nothing).
After each later task t it sets the shared expert back to θ*_j and forward again, and records for
task j: the estimate g_jᵀΔ + ½ s_j ΔᵀF_jΔ (Δ = θ_t − θ*_j; its linear part, its quadratic part
without s_j, and s_j), the actual change of its mean
loss on its training rows (where g_j and F_j come from) and on its validation rows, and its
validation accuracy with the current shared expert and with θ*_j. Validation only; written to
`benchmarks/results/moe_cl_estimate.json`, one entry per (sequence, seed, params).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from cl_core.anchoring import estimated_loss_change
from cl_core.methods.moe_cl import PREFIX
from cl_core.atomic import atomic_write_text
from cl_core.training import evaluate_task, task_loss_fn
from pipelines.data.tasks import load_prepared
from pipelines.compare import in_process
from pipelines.compare.sequences import Budget

RESULTS = Path(__file__).resolve().parent / "results" / "moe_cl_estimate.json"
FREE = {"shared_lr_scale": 1.0, "shared_anchor": "fisher", "shared_anchor_on": "loss_rise", "shared_anchor_weight": 0.0}


@contextlib.contextmanager
def shared_expert_at(model, values: dict[str, torch.Tensor]):
    """The shared expert set to `values` inside the block, restored after."""
    shared = model.bank.expert_parameters(kind="shared")
    kept = {k: p.detach().clone() for k, p in shared.items()}
    with torch.no_grad():
        for k, p in shared.items():
            p.copy_(values[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in shared.items():
                p.copy_(kept[k])


def mean_loss(loss_fn, batches) -> float:
    with torch.no_grad():
        losses = [(float(loss_fn(b)), len(b["input_ids"])) for b in batches()]
    return sum(l * n for l, n in losses) / sum(n for _, n in losses)


def measure(sequence: str, seed: int, params: dict, budget: Budget) -> list[dict]:
    cfg = in_process.run_config("moe_cl", params, sequence, seed, budget)
    stage, summaries, _ = in_process.prepared_stage(cfg)
    model, objective, method = stage.model, stage.objective, stage.method
    paths = [s["path"] for s in summaries]
    loss_fn = task_loss_fn(model, objective, method)
    rows = {j: {split: load_prepared(paths[j], prepared) for split, prepared in
                (("train", "train"), ("validation", in_process.VALIDATION_SPLIT))} for j in range(len(paths))}
    size = cfg.training.batch_size
    out = []
    for t in range(len(paths)):
        in_process.train_task(stage, cfg, t, paths)
        shared = model.bank.expert_parameters(kind="shared")
        for j in range(t):
            anchor = {k: model.method_state[f"{PREFIX}task{j}.anchor.{k}"] for k in shared}
            with torch.no_grad():
                total = float(estimated_loss_change(model, PREFIX, j, shared))
                linear = sum(float((model.method_state[f"{PREFIX}task{j}.gradient.{k}"] * (p.float() - anchor[k])).sum())
                             for k, p in shared.items())
            scale = float(model.method_state[f"{PREFIX}task{j}.scale"])
            entry = {"sequence": sequence, "seed": seed, "after": t, "task": j, "estimate": total,
                     "estimate_linear": linear, "estimate_quadratic": (total - linear) / scale, "scale": scale}
            for split, examples in rows[j].items():
                batches = in_process.ordered_batches(objective, examples, size)
                now = mean_loss(loss_fn, batches)
                with shared_expert_at(model, anchor):
                    then = mean_loss(loss_fn, batches)
                    if split == "validation":
                        entry["accuracy_snapshot"] = evaluate_task(model, objective, method, examples, 20)["accuracy"]
                entry[f"loss_change_{split}"] = now - then
            entry["accuracy_current"] = evaluate_task(model, objective, method, rows[j]["validation"], 20)["accuracy"]
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
            out.append(entry)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", default="order1,multiemo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default=json.dumps(FREE), type=json.loads)
    parser.add_argument("--lock", type=Path)
    args = parser.parse_args(argv)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    budget = Budget(test_examples=100)
    for sequence in args.sequences.split(","):
        key = {"sequence": sequence, "seed": args.seed, "params": args.params}
        if any({k: e[k] for k in key} == key for e in saved):
            continue
        with in_process.held(args.lock):
            pairs = measure(sequence, args.seed, args.params, budget)
        saved.append({**key, "pairs": pairs})
        atomic_write_text(RESULTS, json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
