"""MoE-CL: a dedicated LoRA expert per task, a shared expert, a task gate, and a task-aware
discriminator trained adversarially against the shared expert (Kang et al., 2025).

Per layer l, D_l = Linear(d, max_tasks) classifies the task from the attention-masked mean of the
shared expert's output. The objective is L_task − w·L_D for everything upstream of D and L_D for
D itself. A gradient-reversal layer gives both with one backward and one optimizer: the loss
is L_task + w·L_D, D descends on it, and the reversed gradient makes the shared expert ascend,
pushing it towards task-invariant features. w = 0 is the no-GAN ablation.

Beyond the paper, `feature_memory` > 0 keeps that many pooled shared-expert features per task and
layer (vectors, no text) so D also trains on earlier tasks' labels; without it D only ever sees
the current task's label, and the game degenerates to "predict the current task".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from cl_core.experts import RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import add_task_experts
from cl_core.continual_model import ContinualModel


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by -1 backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    return GradReverse.apply(x)


def discriminator_input(features: torch.Tensor) -> torch.Tensor:
    """Features as D reads them: layer-normalised without parameters.

    With cross-entropy on logits, the reversed gradient could raise L_D without bound just by
    inflating the feature norm; normalising leaves the shared expert only the direction, i.e.
    the task information, to play with.
    """
    return F.layer_norm(features, features.shape[-1:])


def freeze_earlier_tasks(model: ContinualModel, task: int) -> None:
    """Experts and gates of earlier tasks stay bit-identical from now on."""
    for earlier in range(task):
        model.bank.set_trainable(False, kind="task", task=earlier)
        for layer in model.bank.layers:
            gate = layer.router.gates[str(earlier)] if hasattr(layer.router, "gates") else None
            if gate is not None:
                gate.requires_grad_(False)


class MoECLParams(MethodParams):
    adv_weight: float = Field(0.1, ge=0)
    shared_experts: int = Field(1, ge=1)  # the discriminator reads the shared expert
    experts_per_task: int = Field(1, ge=1)
    max_tasks: int = Field(16, ge=1)
    feature_memory: int = Field(0, ge=0)


@register(MoECLParams)
class MoECL(Method):
    name = "moe_cl"
    router = "task"
    routable = False

    def setup_task(self, model: ContinualModel, task: int) -> None:
        if task >= self.params.max_tasks:
            raise ValueError(f"moe_cl.max_tasks is {self.params.max_tasks}; task index {task} does not fit")
        add_task_experts(model, task, self.params.shared_experts, self.params.experts_per_task)
        freeze_earlier_tasks(model, task)
        for layer in range(len(model.bank.layers)):
            if f"disc_{layer}" not in model.extras:
                model.add_linear(f"disc_{layer}", model.hidden_size, self.params.max_tasks)

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {"task_ids": batch["task_ids"], "capture_shared": training}

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        labels = batch["task_ids"]
        # Cross-entropy on logits; the reference code applies it to softmax outputs, which squashes
        # the gradient and double-normalises.
        adversarial = torch.stack([
            F.cross_entropy(model.extras[f"disc_{l}"](discriminator_input(grad_reverse(f))).float(), labels)
            for l, f in enumerate(ctx.shared_features)]).mean()
        losses = {"disc": self.params.adv_weight * adversarial}
        if self.params.feature_memory and "memory_tasks" in model.method_state:
            remembered = model.method_state["memory_tasks"]
            losses["disc_memory"] = self.params.adv_weight * torch.stack([
                F.cross_entropy(model.extras[f"disc_{l}"](discriminator_input(model.method_state[f"memory_{l}"])).float(),
                                remembered)
                for l in range(len(model.bank.layers))]).mean()
        return losses

    @torch.no_grad()
    def after_task(self, model: ContinualModel, task: int, batches, loss_fn) -> None:
        if not self.params.feature_memory:
            return
        per_layer: list[list[torch.Tensor]] = [[] for _ in model.bank.layers]
        kept = 0
        for batch in batches():
            with model.bank.routing(task_ids=batch["task_ids"], attention_mask=batch["attention_mask"],
                                    capture_shared=True) as ctx:
                model.hidden_states(batch["input_ids"], batch["attention_mask"])
            for l, f in enumerate(ctx.shared_features):
                per_layer[l].append(f.detach().float())
            kept += len(batch["input_ids"])
            if kept >= self.params.feature_memory:
                break
        for l, feats in enumerate(per_layer):
            new = torch.cat(feats)[: self.params.feature_memory]
            old = model.method_state.get(f"memory_{l}")
            model.method_state[f"memory_{l}"] = new if old is None else torch.cat([old, new])
        labels = torch.full((len(new),), task, dtype=torch.long, device=new.device)
        old = model.method_state.get("memory_tasks")
        model.method_state["memory_tasks"] = labels if old is None else torch.cat([old, labels])
