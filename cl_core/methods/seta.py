"""SETA: shared + task-unique experts under one learned router, with elastic anchoring of the
shared experts.

Structure. Task 0 adds `shared_experts` shared experts ("shared<i>", kind "shared"); every task
adds one unique expert ("task<t>.0", kind "task"). Every layer's `learned` router mixes all of its
experts (softmax, or top-k if the bank sets top_k) from the token alone, so no task id is needed
at inference (`routable`); the router's row of an expert is its gate vector.

What trains on task t: its unique expert and router row, the shared experts and their rows.
Earlier unique experts and their rows are frozen.

Anchoring. After task t, a diagonal Fisher of the shared parameters (the shared experts' LoRA
factors and their router rows) is estimated as the mean over the task's batches of the squared
gradient of the objective loss (one gradient per batch), and θ* is their current value. Fishers
add up over tasks, θ* is the latest. On later tasks the loss gains

    anchor_lambda · Σ_i F_i (θ_i − θ*_i)².

F and θ* live in `model.method_state` as "seta.fisher.<key>" / "seta.anchor.<key>", <key> being
the parameter's key in the bank file (e.g. "layers.0.experts.0.A_gate", "layers.0.router.rows.0"),
so they travel with the bank from stage to stage.

`infer_task_ids` returns -1 ("unknown") for every sample: the learned router reads no task id.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cl_core.anchoring import anchor_penalty, store_fisher
from cl_core.experts import RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import add_task_experts
from cl_core.continual_model import ContinualModel

PREFIX = "seta."


def shared_parameters(model: ContinualModel) -> dict[str, torch.nn.Parameter]:
    """The shared experts' parameters and router rows, by their bank-file key."""
    params = {}
    for i, layer in enumerate(model.bank.layers):
        for e in layer.experts_of(kind="shared"):
            for n, p in layer.experts[e].named_parameters():
                params[f"layers.{i}.experts.{e}.{n}"] = p
            params[f"layers.{i}.router.rows.{e}"] = layer.router.rows[e]
    return params


class SETAParams(MethodParams):
    shared_experts: int = Field(1, ge=1)  # the anchored experts
    anchor_lambda: float = Field(100.0, ge=0)


@register(SETAParams)
class SETA(Method):
    name = "seta"
    router = "learned"
    routable = True
    oracle = False

    def experts_per_layer(self, tasks: int) -> int:
        return self.params.shared_experts + tasks

    def setup_task(self, model: ContinualModel, task: int) -> None:
        add_task_experts(model, task, self.params.shared_experts)
        for layer in model.bank.layers:
            for e, meta in enumerate(layer.expert_meta):
                trainable = meta.kind == "shared" or meta.task == task
                layer.experts[e].requires_grad_(trainable)
                layer.router.rows[e].requires_grad_(trainable)

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {}  # the learned router routes on the tokens alone

    def penalty(self, model: ContinualModel) -> torch.Tensor | None:
        return anchor_penalty(model, PREFIX, shared_parameters(model))

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        if not self.params.anchor_lambda:
            return {}
        penalty = self.penalty(model)
        return {} if penalty is None else {"anchor": self.params.anchor_lambda * penalty}

    def after_task(self, model: ContinualModel, task: int, batches, loss_fn) -> None:
        store_fisher(model, PREFIX, shared_parameters(model), batches, loss_fn)

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        return torch.full_like(batch["task_ids"], -1)
