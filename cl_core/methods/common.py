"""Helpers several methods share (a method file imports these, never another method's file)."""

from __future__ import annotations

import torch

from cl_core.continual_model import ContinualModel
from cl_core.experts import ExpertMeta


def add_task_experts(model: ContinualModel, task: int, shared_experts: int, experts_per_task: int = 1) -> None:
    """Shared experts at the first task, then `experts_per_task` new experts for `task`; experts
    the bank already has (e.g. loaded from a saved bank) are not added again."""
    names = model.bank.expert_names()
    wanted = [ExpertMeta(name=f"shared{i}", kind="shared") for i in range(shared_experts if task == 0 else 0)]
    wanted += [ExpertMeta(name=f"task{task}.{j}", kind="task", task=task) for j in range(experts_per_task)]
    for meta in wanted:
        if meta.name not in names:
            model.bank.add_expert(meta)


def prompt_mask(batch: dict) -> torch.Tensor:
    """The prompt tokens: attention mask, minus answer tokens where the batch has LM labels, so
    training batches (prompt + answer) and evaluation batches (prompt) give the same features."""
    mask = batch["attention_mask"]
    if "labels" in batch:
        mask = mask * (batch["labels"] == -100).to(mask.dtype)
    return mask


def prompt_query(model: ContinualModel, batch: dict) -> torch.Tensor:
    """Frozen per-sample features [B, q]: mean input embedding of the prompt tokens."""
    return model.bank.query(batch["input_ids"], prompt_mask(batch))


def shared_param_groups(params: list[torch.nn.Parameter], shared: set[int], lr: float, lr_scale: float,
                        weight_decay: float) -> list[dict]:
    """Optimizer groups over the trainable `params`: the shared experts' (ids in `shared`) at
    `lr · lr_scale` with `weight_decay`, the rest at `lr` without: the shared experts are the
    part an old task still runs through, so their drift is what makes it forget."""
    groups = [{"params": [p for p in params if id(p) not in shared], "lr": lr, "weight_decay": 0.0}]
    own = [p for p in params if id(p) in shared]
    if own:
        groups.append({"params": own, "lr": lr * lr_scale, "weight_decay": weight_decay})
    return groups
