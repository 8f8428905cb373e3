"""Sequential LoRA fine-tuning: one LoRA carried across every task, nothing against forgetting.

The plain continual-learning baseline ("peft LoRA, trained on each task in turn"). The bank holds
a single "shared" expert in a `learned`-router bank. With one expert the router's softmax is
identically 1 (its gate vectors get no gradient and are frozen), so every layer computes exactly

    FFN with W + s·B·A on gate_proj, up_proj and down_proj,   s = alpha / r,

which *is* a peft LoRA on those three projections: A kaiming-uniform(a=√5), B zero (peft's
default init), scaling alpha/r, dropout on the input of A. The bank implementation is used
rather than `peft.get_peft_model` so the bank files, routing and ZeRO handling stay the same
for every method.

Routing needs no task id: `routing_fields` passes none, and `infer_task_ids` returns -1
("unknown, not needed") so that evaluation with `eval.task_id: inferred` runs.
"""

from __future__ import annotations

import torch

from cl_core.experts import ExpertMeta
from cl_core.methods import Method, register
from cl_core.continual_model import ContinualModel

SHARED = "shared"


def add_shared_lora(model: ContinualModel) -> None:
    """The single shared LoRA (added once, kept by later stages), trainable; router frozen."""
    if SHARED not in model.bank.expert_names():
        model.bank.add_expert(ExpertMeta(name=SHARED, kind="shared"))
    model.bank.set_trainable(True, name=SHARED)
    for layer in model.bank.layers:
        # One expert: softmax over one logit is 1 whatever the gate vector; nothing to learn.
        layer.router.requires_grad_(False)


@register()
class SeqLoRA(Method):
    name = "seq_lora"
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
