"""Elastic weight consolidation on the sequential LoRA (Kirkpatrick et al., 2017).

After each task, a diagonal Fisher of the trainable bank parameters is estimated as the mean,
over the task's training examples, of the squared gradient of each example's objective loss (the
per-sample empirical Fisher, `cl_core.anchoring`), and the parameters' values are kept as the
anchor θ*. Fishers add up
over tasks; the anchor is the latest. While training later tasks the loss gains

    lam · Σ_i F_i (θ_i − θ*_i)².

Both live in `model.method_state` under "ewc.fisher.<param>" and "ewc.anchor.<param>", <param>
being the parameter's key in the bank file (e.g. "layers.0.experts.0.A_gate"), so they travel
with the bank from stage to stage.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cl_core.anchoring import anchor_penalty, empirical_fisher, store_fisher
from cl_core.continual_model import ContinualModel
from cl_core.experts import RoutingContext
from cl_core.methods import MethodParams, register
from cl_core.methods.common import SharedLoRAMethod

PREFIX = "ewc."


class EWCParams(MethodParams):
    # The λ sweep on order1 and its choice: docs/methods.md, EWC.
    lam: float = Field(1000.0, ge=0, description="weight of the Fisher penalty lam · Σ F (θ − θ*)² on later tasks")


@register(EWCParams)
class EWC(SharedLoRAMethod):
    name = "ewc"

    def penalty(self, model: ContinualModel) -> torch.Tensor | None:
        return anchor_penalty(model, PREFIX, model.bank.expert_parameters())

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        if self.params.lam == 0:
            return {}
        penalty = self.penalty(model)
        return {} if penalty is None else {"ewc": self.params.lam * penalty}

    def after_task(self, model: ContinualModel, task: int, batches, loss_fn) -> None:
        params = {k: p for k, p in model.bank.expert_parameters().items() if p.requires_grad}
        store_fisher(model, PREFIX, params, empirical_fisher(params, batches, loss_fn)[0])
