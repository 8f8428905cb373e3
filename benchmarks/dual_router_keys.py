"""The dual router's task keys on SmolLM2's real prompts, trained alone: does a key locate its task?

    python -m benchmarks.dual_router_keys [--sequences order1,multiemo] [--seeds 0,1,2,3,4]
        [--out benchmarks/results/dual_router_keys.json]

A key gets no gradient from the task loss (training routes with the true task id), only from the
method's key loss over the prompt queries (mean input embeddings). So training the keys alone,
with the method's own `plan_task`, `setup_task` and key loss, AdamW at the benchmark's
learning rate over the task's micro batches in the Ray Train worker's order, does to them what a
run does, without a forward through the transformer: a second per task. Each task's validation
prompts (train rows never trained on) are then located, after every task, by the keys so far.

Two starts: `planned` (the key starts at its task's mean query: the method as it is) and `random`
(`plan_task` skipped, so the key keeps `nn.Linear`'s init: the method before the fix).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.compare import in_process
from pipelines.compare.sequences import Budget
from cl_core.atomic import atomic_write_text
from cl_core.base_model import load_tokenizer
from cl_core.methods.common import prompt_query
from cl_core.methods.dual_router import key_name
from cl_core.objectives import collate_prompts
from pipelines.assembly import build_stage, materialize_base_model
from pipelines.data.tasks import load_prepared, prepare_task
from pipelines.run.worker import micro_batches


def located(sequence: str, seed: int, planned: bool, budget: Budget, cache: Path = in_process.CACHE) -> dict:
    """"located"[i][j]: the share of task j's validation prompts the keys place in task j after
    task i; "query_cos": cosines between the tasks' mean training queries; "key_cos": each key's
    cosine with its task's mean training query after training."""
    cfg = in_process.run_config("dual_router", {}, sequence, seed, budget)
    base = materialize_base_model(cfg, cache / "models")
    tokenizer = load_tokenizer(base)
    paths = [prepare_task(t, i, tokenizer, base.source, cfg.training.max_length, cfg.training.seed, cfg.data,
                          cache / "data", cfg.eval.validation_examples)["path"] for i, t in enumerate(cfg.tasks)]
    stage = build_stage(cfg, base)
    model, objective, method = stage.model, stage.objective, stage.method
    shares, means, key_cos = [], [], []
    for task, path in enumerate(paths):
        train = load_prepared(path, "train")
        means.append(torch.cat([prompt_query(model, batch) for batch in
                                in_process.ordered_batches(objective, train, cfg.training.batch_size)()]).mean(0))
        torch.manual_seed(cfg.training.seed * 1000 + task)
        if planned:
            method.plan_task(model, task, in_process.ordered_batches(objective, train, cfg.training.batch_size), None)
        method.setup_task(model, task)
        key = model.extras[key_name(task)].weight
        optimizer = torch.optim.AdamW([key], lr=cfg.training.lr, weight_decay=0.0)
        for chunk in micro_batches(len(train), cfg, task, 0, 1):
            loss = method.extra_losses(model, objective.collate([train[i] for i in chunk]), None)["key"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        key_cos.append(round(float(F.cosine_similarity(key[0].detach(), means[-1], dim=0)), 3))
        shares.append([])
        for earlier, earlier_path in enumerate(paths[:task + 1]):
            batch = collate_prompts(load_prepared(earlier_path, in_process.VALIDATION_SPLIT), objective.pad_id)
            shares[-1].append(round(float((method.infer_task_ids(model, batch) == earlier).float().mean()), 3))
    unit = F.normalize(torch.stack(means), dim=-1)
    return {"located": shares, "query_cos": (unit @ unit.T).round(decimals=3).tolist(), "key_cos": key_cos}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", default="order1,multiemo")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dual_router_keys.json"))
    args = parser.parse_args(argv)
    budget = Budget()
    rows = []
    for sequence in args.sequences.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for planned in (False, True):
                out = located(sequence, seed, planned, budget)
                final = out["located"][-1]
                rows.append({"sequence": sequence, "seed": seed, "start": "planned" if planned else "random", **out,
                             "final_mean": round(sum(final) / len(final), 3)})
                print(json.dumps(rows[-1]), flush=True)
    atomic_write_text(args.out, json.dumps({"budget": asdict(budget), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
