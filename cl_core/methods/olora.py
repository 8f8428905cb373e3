"""O-LoRA: a new LoRA per task, kept orthogonal to the earlier ones, all of them active together
(Wang et al., 2023).

Each task adds a LoRA expert; earlier experts are frozen. Every forward, in training and at
inference, runs the weights with every task's delta summed in, W + Σ_k B_k A_k on gate, up and
down projections (the `merged` router): no gates and no task id (`routable`). While task t
trains, the loss gains

    lam_orth · Σ_{s<t} Σ_{layers} Σ_{p ∈ gate, up, down} ‖A_t^p (A_s^p)ᵀ‖²_F  +  lam_l2 · ‖θ_t‖²

(θ_t: every A and B of task t's LoRA), so the new LoRA's input subspaces stay orthogonal to the
earlier tasks' and its update does not disturb what they compute. Squared Frobenius norms, as
specified for this project (the reference code uses Σ|·| for the orthogonality and an unsquared
norm for the L2 term).

`infer_task_ids` returns -1 ("unknown, not needed") so that `eval.task_id: inferred` runs.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cl_core.continual_model import ContinualModel
from cl_core.experts import RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import add_task_lora

A_FACTORS = ("A_gate", "A_up", "A_down")


def olora_terms(model: ContinualModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(orthogonality, L2) of the newest task's LoRA against the earlier tasks', summed over layers."""
    ref = next(model.bank.layers[0].experts.parameters())
    orth = ref.new_zeros((), dtype=torch.float32)
    l2 = ref.new_zeros((), dtype=torch.float32)
    for layer in model.bank.layers:
        current = max(m.task for m in layer.expert_meta)
        new = [layer.experts[i] for i in layer.experts_of(kind="task", task=current)]
        old = [layer.experts[i] for i in layer.experts_of(kind="task") if layer.expert_meta[i].task != current]
        for expert in new:
            for factor in A_FACTORS:
                a_t = getattr(expert, factor).float()
                for earlier in old:
                    orth = orth + (a_t @ getattr(earlier, factor).detach().float().T).pow(2).sum()
            l2 = l2 + sum(p.float().pow(2).sum() for p in expert.parameters())
    return orth, l2


class OLoRAParams(MethodParams):
    lam_orth: float = Field(0.5, ge=0, description="weight of the orthogonality penalty Σ ‖A_t A_sᵀ‖²_F against the "
                            "earlier tasks' LoRAs")
    lam_l2: float = Field(0.0, ge=0, description="weight of the squared L2 norm of the training task's LoRA")


@register(OLoRAParams)
class OLoRA(Method):
    name = "olora"
    router = "merged"
    routable = True
    oracle = False

    def setup_task(self, model: ContinualModel, task: int) -> None:
        add_task_lora(model, task)

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {}  # every LoRA at once: nothing to choose

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        orth, l2 = olora_terms(model)
        losses = {}
        if self.params.lam_orth:
            losses["orth"] = self.params.lam_orth * orth
        if self.params.lam_l2:
            losses["l2"] = self.params.lam_l2 * l2
        return losses

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        return torch.full_like(batch["input_ids"][:, 0], -1)
