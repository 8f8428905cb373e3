"""What several methods share: helpers and base classes. A method file imports these, never
another method's file (a test checks it), so each method can change without moving another."""

from __future__ import annotations

import torch

from cl_core.continual_model import ContinualModel
from cl_core.experts import ExpertMeta
from cl_core.methods import Method

SHARED = "shared"


def add_shared_lora(model: ContinualModel) -> None:
    """The single shared LoRA (added once, kept by later stages), trainable; router frozen."""
    if SHARED not in model.bank.expert_names():
        model.bank.add_expert(ExpertMeta(name=SHARED, kind="shared"))
    model.bank.set_trainable(True, name=SHARED)
    for layer in model.bank.layers:
        # One expert: softmax over one logit is 1 whatever the gate vector; nothing to learn.
        layer.router.requires_grad_(False)


class SharedLoRAMethod(Method):
    """One LoRA carried across every task (sequential LoRA and the methods built on it: EWC,
    replay, multi-task learning).

    The bank holds a single "shared" expert in a `learned`-router bank. With one expert the
    router's softmax is identically 1 (its gate vectors get no gradient and are frozen), so every
    layer computes exactly

        FFN with W + s·B·A on gate_proj, up_proj and down_proj,   s = alpha / r,

    which *is* a peft LoRA on those three projections: A kaiming-uniform(a=√5), B zero (peft's
    default init), scaling alpha/r, dropout on the input of A. The bank implementation is used
    rather than `peft.get_peft_model` so the bank files, routing and ZeRO handling stay the same
    for every method.

    Routing needs no task id: `routing_fields` passes none, and `infer_task_ids` returns -1
    ("unknown, not needed") so that evaluation with `eval.task_id: inferred` runs.
    """

    router = "learned"
    routable = True
    oracle = False

    def experts_per_layer(self, tasks: int) -> int:
        return 1

    def setup_task(self, model: ContinualModel, task: int) -> None:
        add_shared_lora(model)

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {}

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        return torch.full_like(batch["input_ids"][:, 0], -1)


def task_expert_name(task: int) -> str:
    return f"task{task}"


def add_task_lora(model: ContinualModel, task: int) -> None:
    """Task `task`'s own LoRA (once); it alone trains: earlier experts and every router gate are
    frozen (per-task LoRA, O-LoRA)."""
    if task_expert_name(task) not in model.bank.expert_names():
        model.bank.add_expert(ExpertMeta(name=task_expert_name(task), kind="task", task=task))
    model.bank.set_trainable(False)
    model.bank.set_trainable(True, task=task)
    for layer in model.bank.layers:
        layer.router.requires_grad_(False)


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
