"""MoE-CL: a dedicated LoRA expert per task, a shared expert, a task gate, and a task-aware
discriminator trained adversarially against the shared expert (Kang et al., 2025).

Task t's forward uses the frozen base, its own expert and gate (frozen once t is learned) and the
shared expert, which every task trains. So the shared expert alone can make an old task forget,
and this file controls its drift:
- `shared_lr_scale`, `shared_weight_decay`: its own parameter group in the optimizer;
- `shared_anchor` "l2" or "fisher": a pull towards its value at the end of the previous task,
  weighted `shared_anchor_weight`. "fisher" weighs it by the per-sample Fisher scaled as SETA's
  (`cl_core.anchoring.store_loss_scaled_fisher`): at weight 1 the pull equals a task's loss when
  the shared expert moves as far again as it moved during that task;
- `shared_ema` > 0: the bank keeps an exponential moving average of it over training steps.
By default the Fisher anchor at weight 10 pulls only while a task with a label set of its own is
trained (`shared_anchor_on` "new_labels"): measured on the shared sequences (README, MoE-CL), it
turned order1's BwT (four label sets) from about −13 into about 0, while on MultiEmo (one label
set, four domains) the free shared expert carries what later domains teach earlier ones (BwT +8)
and the same anchor cost 9.6 points of AA. "every_task" anchors whatever the labels, as does a
method built without `task_labels`.

The adversarial game, per layer l: D_l = Linear(d, tasks seen, no bias) classifies the task from
the attention-masked mean of what the shared expert adds to the FFN. D descends on its cross-entropy over the
current task's features (detached) and remembered features of earlier tasks (`feature_memory`
pooled vectors per task and layer, never text): without them every sample carries the current
task's id and D learns "always the current task". The shared expert plays the other side with a
bounded objective instead of reversing D's gradient (cross-entropy on logits is unbounded for the
side that maximises it): it descends on KL(uniform ‖ D's prediction), zero when D cannot tell the
tasks apart, through D's weights held fixed. Its weight ramps from 0 to `adv_weight` over the
first `adv_warmup_steps` optimizer steps of a task, while D learns to tell the new task apart.
`adv_weight` 0 is the no-GAN ablation (no discriminator trains).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from cl_core.anchoring import anchor_penalty, store_anchor, store_loss_scaled_fisher, store_start
from cl_core.experts import RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import add_task_experts, shared_param_groups
from cl_core.continual_model import ContinualModel

PREFIX = "moe_cl."


def discriminator_input(features: torch.Tensor) -> torch.Tensor:
    """Features as D reads them: float32, layer-normalised without parameters, so that only their
    direction (the task information) matters, not their scale."""
    features = features.float()
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
    adv_warmup_steps: int = Field(4, ge=0)
    feature_memory: int = Field(64, ge=0)  # pooled shared features kept per earlier task and layer
    shared_lr_scale: float = Field(1.0, gt=0)  # measured: see README, MoE-CL
    shared_weight_decay: float = Field(0.0, ge=0)
    shared_anchor: Literal["none", "l2", "fisher"] = "fisher"
    shared_anchor_weight: float = Field(10.0, ge=0)
    shared_anchor_on: Literal["new_labels", "every_task"] = "new_labels"
    shared_ema: float = Field(0.0, ge=0, lt=1)  # decay per optimizer step; 0 = no moving average
    shared_experts: int = Field(1, ge=1)  # the discriminator reads the shared expert
    experts_per_task: int = Field(1, ge=1)
    max_tasks: int = Field(16, ge=1)


def shared_parameters(model: ContinualModel) -> dict[str, torch.nn.Parameter]:
    return model.bank.expert_parameters(kind="shared")


@register(MoECLParams)
class MoECL(Method):
    name = "moe_cl"
    router = "task"
    routable = False
    anchored = False  # does the anchor pull while the task set up last trains?

    def anchors(self, task: int) -> bool:
        """Does the shared expert's anchor pull while `task` trains?"""
        p = self.params
        if p.shared_anchor == "none" or not p.shared_anchor_weight or task == 0:
            return False
        if p.shared_anchor_on == "every_task" or self.task_labels is None or len(self.task_labels) <= task:
            return True  # labels not given (a run always gives them): holding the old tasks is the safe side
        return self.task_labels[task] not in self.task_labels[:task]

    def setup_task(self, model: ContinualModel, task: int) -> None:
        if task >= self.params.max_tasks:
            raise ValueError(f"moe_cl.max_tasks is {self.params.max_tasks}; task index {task} does not fit")
        add_task_experts(model, task, self.params.shared_experts, self.params.experts_per_task)
        freeze_earlier_tasks(model, task)
        for layer in range(len(model.bank.layers)):
            name = f"disc_{layer}"
            if name not in model.extras:
                model.add_linear(name, model.hidden_size, task + 1, bias=False)
            elif model.extras[name].out_features < task + 1:
                model.widen_linear(name, task + 1)
        device = model.extras["disc_0"].weight.device
        model.method_state["adv_steps"] = torch.zeros((), dtype=torch.long, device=device)
        if self.params.shared_anchor == "fisher":
            store_start(model, PREFIX, shared_parameters(model))
        self.anchored = self.anchors(task)

    def discriminates(self, model: ContinualModel) -> bool:
        """Is there a game to play: a weight, and more than one task for D to tell apart?"""
        return self.params.adv_weight > 0 and model.extras["disc_0"].out_features > 1

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {"task_ids": batch["task_ids"], "capture_shared": training and self.discriminates(model)}

    def param_groups(self, model: ContinualModel, params: list[torch.nn.Parameter], lr: float) -> list[dict]:
        shared = {id(p) for p in shared_parameters(model).values()}
        return shared_param_groups(params, shared, lr, self.params.shared_lr_scale, self.params.shared_weight_decay)

    def _discriminator_batch(self, model: ContinualModel, layer: int, features: torch.Tensor,
                             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's training inputs at a layer: the current features (detached) and the remembered ones."""
        x = discriminator_input(features.detach())
        if f"memory_{layer}" in model.method_state:
            x = torch.cat([x, discriminator_input(model.method_state[f"memory_{layer}"])])
            labels = torch.cat([labels, model.method_state["memory_tasks"]])
        return x, labels

    def _ramp(self, model: ContinualModel) -> torch.Tensor | float:
        if not self.params.adv_warmup_steps:
            return 1.0
        # A tensor, so that a GPU step does not wait on reading the counter back.
        return ((model.method_state["adv_steps"] + 1).float() / self.params.adv_warmup_steps).clamp(max=1.0)

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        losses = {}
        if ctx.shared_features:
            disc, confusion = [], []
            for l, features in enumerate(ctx.shared_features):
                weight = model.extras[f"disc_{l}"].weight
                x, labels = self._discriminator_batch(model, l, features, batch["task_ids"])
                disc.append(F.cross_entropy(F.linear(x, weight.float()), labels))
                # The shared expert's side sees D fixed: the gradient reaches the features only.
                logp = F.log_softmax(F.linear(discriminator_input(features), weight.detach().float()), -1)
                confusion.append(-logp.mean(-1).mean() - math.log(weight.shape[0]))  # KL(uniform ‖ p) ≥ 0
            losses["disc"] = torch.stack(disc).mean()
            losses["confusion"] = self.params.adv_weight * self._ramp(model) * torch.stack(confusion).mean()
        if self.anchored:
            penalty = anchor_penalty(model, PREFIX, shared_parameters(model),
                                     weighted=self.params.shared_anchor == "fisher")
            if penalty is not None:
                losses["anchor"] = self.params.shared_anchor_weight * penalty
        return losses

    def training_logs(self, model: ContinualModel, ctx: RoutingContext, task_loss: torch.Tensor,
                      extra: dict[str, torch.Tensor], diagnose: bool) -> dict[str, float]:
        if "disc" not in extra:
            return {}
        with torch.no_grad():
            hits = []
            for l, features in enumerate(ctx.shared_features):
                x, labels = self._discriminator_batch(model, l, features, ctx.task_ids)
                hits.append((F.linear(x, model.extras[f"disc_{l}"].weight.float()).argmax(-1) == labels).float().mean())
        logs = {"disc/accuracy": float(torch.stack(hits).mean())}
        if diagnose and extra["confusion"].requires_grad:
            shared = [p for p in shared_parameters(model).values() if p.requires_grad]
            logs["adv/grad_ratio"] = gradient_norm(extra["confusion"], shared) / max(gradient_norm(task_loss, shared), 1e-12)
        return logs

    def after_step(self, model: ContinualModel) -> None:
        model.method_state["adv_steps"] += 1
        if not self.params.shared_ema:
            return
        with torch.no_grad():
            for key, p in shared_parameters(model).items():
                ema = model.method_state.setdefault(f"{PREFIX}ema.{key}", p.detach().float().clone())
                ema.mul_(self.params.shared_ema).add_(p.detach().float(), alpha=1 - self.params.shared_ema)

    def after_task(self, model: ContinualModel, task: int, batches, loss_fn) -> None:
        shared = shared_parameters(model)
        if self.params.shared_ema:
            with torch.no_grad():
                for key, p in shared.items():
                    if f"{PREFIX}ema.{key}" in model.method_state:
                        p.copy_(model.method_state[f"{PREFIX}ema.{key}"].to(p.dtype))
        if self.params.shared_anchor == "l2":
            store_anchor(model, PREFIX, shared)
        elif self.params.shared_anchor == "fisher":
            store_loss_scaled_fisher(model, PREFIX, shared, batches, loss_fn)
        if self.params.feature_memory:
            remember_shared_features(model, task, batches, self.params.feature_memory)


def gradient_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """‖∂loss/∂params‖ without touching `.grad` (the graph is kept for the real backward)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)))


@torch.no_grad()
def remember_shared_features(model: ContinualModel, task: int, batches, count: int) -> None:
    """Keep `count` pooled shared-expert features of `task` per layer (vectors, no text)."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.bank.layers]
    kept = 0
    for batch in batches():
        with model.bank.routing(task_ids=batch["task_ids"], attention_mask=batch["attention_mask"],
                                capture_shared=True) as ctx:
            model.hidden_states(batch["input_ids"], batch["attention_mask"])
        for l, f in enumerate(ctx.shared_features):
            per_layer[l].append(f.detach().float())
        kept += len(batch["input_ids"])
        if kept >= count:
            break
    for l, feats in enumerate(per_layer):
        new = torch.cat(feats)[:count]
        old = model.method_state.get(f"memory_{l}")
        model.method_state[f"memory_{l}"] = new if old is None else torch.cat([old, new])
    labels = torch.full((len(new),), task, dtype=torch.long, device=new.device)
    old = model.method_state.get("memory_tasks")
    model.method_state["memory_tasks"] = labels if old is None else torch.cat([old, labels])
