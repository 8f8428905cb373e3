"""MoE-CL: a dedicated LoRA expert per task, a shared expert, a task gate, and a task-aware
discriminator trained adversarially against the shared expert (Kang et al., 2025).

Task t's forward uses the frozen base, its own expert and gate (frozen once t is learned) and the
shared expert, which every task trains. So the shared expert alone can make an old task forget.
The default, chosen on validation (`docs/methods.md`, MoE-CL, says how), is the paper's: no
anchor (`shared_anchor` "none"), every task through the current shared expert. The controls that
keep earlier tasks, each an option:
- `shared_anchor` "fisher" with `shared_anchor_on` "loss_rise": after each task t the bank keeps
  that task's own local model of its loss in the shared expert θ: its value θ*_t there, its mean
  gradient g_t and per-sample Fisher F_t (`cl_core.anchoring.store_task_statistics`). While a
  later task trains, each earlier task j whose estimated loss change ĉ_j = g_jᵀΔ + ½ΔᵀF_jΔ
  (Δ = θ − θ*_j, second order) is above 0 pulls θ towards θ*_j with its own loss-scaled Fisher,
  weighted `shared_anchor_weight`; a task the estimate says has not lost pulls nothing, so a
  move that helps it goes free. The estimate only switches the pull: its linear term is not
  descended (a stale gradient followed for many steps overshoots).
- `shared_anchor` "fisher" with "every_task": a pull towards θ at the end of the previous task
  weighted by the summed loss-scaled Fisher (`store_loss_scaled_fisher`) on every task; with
  "new_labels" (the label rule: it compares label names), only while a task whose label set no
  earlier task had trains. "l2": the same pull unweighted.
- `shared_inference` "snapshot" (a variant that changes inference; the paper's form is
  "current"): after each task t the bank keeps frozen snapshot experts, the shared expert as t
  left it (θ*_t). At inference a task answers from its snapshot where `snapshot_choice` says the
  snapshot is the better, as judged after the latest task: "memory", its `choice_memory`
  remembered rows have a higher loss now than at its end (a declared memory of each task's
  rows, held out of its training, so that it judges as unseen rows would: rows trained on
  favour the snapshot that fitted them); "estimate", ĉ_j > 0 (no rows). Training is otherwise
  unchanged (the same steps, over the rows left).
- `shared_lr_scale`, `shared_weight_decay`: its own optimizer parameter group; `shared_ema`: an
  exponential moving average of it over training steps.

The adversarial game, per layer l: D_l = Linear(d, tasks seen, no bias) classifies the task from
what the shared expert adds to the FFN at each sample's attention-masked mean FFN input x̄
(`MixtureFFN.shared_delta`; x̄ detached, so the game's gradient reaches the shared expert alone,
not the experts of lower layers). D descends on its cross-entropy, each task weighing the same,
over the current task's features and those of earlier tasks' remembered inputs (`feature_memory`
pooled FFN inputs per earlier task and layer, vectors, never text). The remembered inputs pass
through the current shared expert at every step, so D compares the tasks under one shared
expert, not the current one against its earlier selves. Without memory every sample carries the
current task's id and D learns "always the current task". The shared expert plays the other side
with a bounded objective instead of reversing D's gradient (cross-entropy on logits is unbounded
for the side that maximises it): it descends on KL(uniform ‖ D's prediction) over the current
task's features, zero when D cannot tell the tasks apart, through D's weights held fixed. Its
weight ramps from 0 to `adv_weight` over the first `adv_warmup_steps` optimizer steps of a task,
while D learns to tell the new task apart. `adv_weight` 0 is the no-GAN ablation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from cl_core.anchoring import (anchor_penalty, estimated_loss_change, has_task_statistics, store_anchor,
                               store_loss_scaled_fisher, store_start, store_task_statistics, task_anchor_penalty)
from cl_core.experts import ExpertMeta, RoutingContext
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
    """Experts, gates and snapshots of earlier tasks stay bit-identical from now on."""
    model.bank.set_trainable(False, kind="snapshot")
    for earlier in range(task):
        model.bank.set_trainable(False, kind="task", task=earlier)
        for layer in model.bank.layers:
            gate = layer.router.gates[str(earlier)] if hasattr(layer.router, "gates") else None
            if gate is not None:
                gate.requires_grad_(False)


class MoECLParams(MethodParams):
    adv_weight: float = Field(0.1, ge=0, description="weight of the shared expert's loss against the discriminators "
                              "(KL from uniform); 0: no adversarial game")
    adv_warmup_steps: int = Field(4, ge=0, description="optimizer steps at a task's start over which that weight ramps "
                                  "up from 0")
    feature_memory: int = Field(64, ge=0, description="pooled FFN inputs kept per earlier task and layer for the "
                                "discriminators (vectors, no text)")
    shared_lr_scale: float = Field(1.0, gt=0, description="the shared experts' learning rate over the others'")
    shared_weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the shared experts (the others "
                                       "have none)")
    shared_anchor: Literal["none", "l2", "fisher"] = Field(
        "none", description="pull of the shared expert towards its earlier values: none, unweighted (l2) or "
        "Fisher-weighted")
    shared_anchor_weight: float = Field(10.0, ge=0, description="weight of that pull")
    # "new_labels" is the label rule (it compares label names); "loss_rise" needs "fisher"
    shared_anchor_on: Literal["every_task", "loss_rise", "new_labels"] = Field(
        "loss_rise", description="when it pulls: on every task; towards each earlier task whose estimated loss rose "
        "(with fisher); or only while a task with new label names trains")
    shared_inference: Literal["current", "snapshot"] = Field(
        "current", description="current: every task answers through the current shared expert (the paper); "
        "snapshot: a task may answer from the shared expert as it left it")
    snapshot_choice: Literal["estimate", "memory"] = Field(
        "memory", description="under snapshot inference, which tasks answer from their snapshot: memory (their "
        "remembered rows' loss rose) or estimate (second-order loss change above 0)")
    choice_memory: int = Field(16, ge=0, description="under snapshot inference, training rows per task held out of "
                               "training to choose snapshots")
    shared_ema: float = Field(0.0, ge=0, lt=1, description="decay per optimizer step of a moving average of the "
                              "shared experts, written into them after the task; 0: none")
    shared_experts: int = Field(1, ge=1, description="shared experts per layer, added at the first task (what the "
                                "discriminators read)")
    experts_per_task: int = Field(1, ge=1, description="new task experts per layer for each task")
    max_tasks: int = Field(16, ge=1, description="the most tasks a run holds; a longer sequence is refused when the "
                           "config is read")

    @model_validator(mode="after")
    def _consistent(self):
        if self.shared_inference == "snapshot" and self.snapshot_choice == "memory" and not self.choice_memory:
            raise ValueError("snapshot_choice 'memory' reads the remembered rows: set choice_memory > 0")
        if self.shared_anchor_on == "loss_rise" and self.shared_anchor not in ("fisher", "none"):
            raise ValueError(f"shared_anchor_on 'loss_rise' pulls with each task's Fisher: set shared_anchor "
                             f"'fisher' (not {self.shared_anchor!r}) or another shared_anchor_on")
        return self


def shared_parameters(model: ContinualModel) -> dict[str, torch.nn.Parameter]:
    return model.bank.expert_parameters(kind="shared")


def snapshot_name(task: int, shared: str) -> str:
    return f"snapshot{task}.{shared}"


@register(MoECLParams)
class MoECL(Method):
    name = "moe_cl"
    router = "task"
    routable = False
    anchored = False  # does the anchor pull while the task set up last trains?
    estimated: tuple[int, ...] = ()  # earlier tasks with their own loss statistics (`store_task_statistics`)

    def anchors(self, task: int) -> bool:
        """Does the shared expert's anchor pull while `task` trains?"""
        p = self.params
        if p.shared_anchor == "none" or not p.shared_anchor_weight or task == 0:
            return False
        if p.shared_anchor_on in ("every_task", "loss_rise"):
            return True
        if self.task_labels is None or len(self.task_labels) <= task:
            return True  # the label rule without labels: holding the old tasks is the safe side
        return self.task_labels[task] not in self.task_labels[:task]

    def keeps_task_statistics(self) -> bool:
        p = self.params
        return (p.shared_anchor == "fisher" and p.shared_anchor_on == "loss_rise") or p.shared_inference == "snapshot"

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
        if self.params.shared_anchor == "fisher" or self.keeps_task_statistics():
            store_start(model, PREFIX, shared_parameters(model))
        self.anchored = self.anchors(task)
        self.estimated = tuple(j for j in range(task) if has_task_statistics(model, PREFIX, j))

    def discriminates(self, model: ContinualModel) -> bool:
        """Is there a game to play: a weight, and more than one task for D to tell apart?"""
        return self.params.adv_weight > 0 and model.extras["disc_0"].out_features > 1

    def training_examples(self, task: int, current: list[dict], earlier: list[list[dict]], seed: int) -> list[dict]:
        """Under snapshot inference with a choice memory, the last `choice_memory` rows are held
        out: the memory that judges the snapshots must not have been trained on (the schedule
        still takes the task's steps, over the rows left)."""
        count = self.params.choice_memory if self.params.shared_inference == "snapshot" else 0
        if count and len(current) <= count:
            raise ValueError(f"moe_cl.choice_memory {count}: task {task} has {len(current)} training rows; "
                             f"it holds that many out of training")
        return current[:-count] if count else current

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {"task_ids": batch["task_ids"], "capture_inputs": training and self.discriminates(model),
                "snapshot_tasks": frozenset() if training else self.snapshot_tasks(model)}

    def snapshot_tasks(self, model: ContinualModel) -> frozenset[int]:
        """The tasks that answer from their snapshot under `shared_inference` "snapshot"."""
        flags = model.method_state.get(f"{PREFIX}reads_snapshot.{self.params.snapshot_choice}")
        if self.params.shared_inference != "snapshot" or flags is None:
            return frozenset()
        return frozenset(j for j, flag in enumerate(flags.tolist()) if flag)

    def param_groups(self, model: ContinualModel, params: list[torch.nn.Parameter], lr: float) -> list[dict]:
        shared = {id(p) for p in shared_parameters(model).values()}
        return shared_param_groups(params, shared, lr, self.params.shared_lr_scale, self.params.shared_weight_decay)

    def shared_features(self, model: ContinualModel, ctx: RoutingContext) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per layer: the current batch's shared features, and the remembered tasks' (None before
        any), both through the current shared expert."""
        out = []
        for l, layer in enumerate(model.bank.layers):
            memory = model.method_state.get(f"memory_inputs_{l}")
            out.append((layer.shared_delta(ctx.pooled_inputs[l]),
                        None if memory is None else layer.shared_delta(memory)))
        return out

    def _discriminator_loss(self, model: ContinualModel, l: int, current: torch.Tensor,
                            memory: torch.Tensor | None, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's cross-entropy at layer l on detached features, each task weighing the same
        whatever its number of examples; and whether D named each example's task."""
        x, labels = discriminator_input(current.detach()), task_ids
        if memory is not None:
            x = torch.cat([x, discriminator_input(memory.detach())])
            labels = torch.cat([labels, model.method_state["memory_tasks"]])
        logits = F.linear(x, model.extras[f"disc_{l}"].weight.float())
        counts = torch.bincount(labels, minlength=logits.shape[1]).float()
        weights = 1.0 / counts[labels]
        loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / weights.sum()
        return loss, logits.argmax(-1) == labels

    def _ramp(self, model: ContinualModel) -> torch.Tensor | float:
        if not self.params.adv_warmup_steps:
            return 1.0
        # A tensor, so that a GPU step does not wait on reading the counter back.
        return ((model.method_state["adv_steps"] + 1).float() / self.params.adv_warmup_steps).clamp(max=1.0)

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        losses = {}
        if ctx.pooled_inputs:
            disc, confusion = [], []
            for l, (current, memory) in enumerate(self.shared_features(model, ctx)):
                weight = model.extras[f"disc_{l}"].weight
                disc.append(self._discriminator_loss(model, l, current, memory, batch["task_ids"])[0])
                # The shared expert's side sees D fixed: the gradient reaches the features only.
                logp = F.log_softmax(F.linear(discriminator_input(current), weight.detach().float()), -1)
                confusion.append(-logp.mean(-1).mean() - math.log(weight.shape[0]))  # KL(uniform ‖ p) ≥ 0
            losses["disc"] = torch.stack(disc).mean()
            losses["confusion"] = self.params.adv_weight * self._ramp(model) * torch.stack(confusion).mean()
        if self.anchored:
            penalty = self._anchor_penalty(model)
            if penalty is not None:
                losses["anchor"] = self.params.shared_anchor_weight * penalty
        return losses

    def _anchor_penalty(self, model: ContinualModel) -> torch.Tensor | None:
        shared = shared_parameters(model)
        if self.params.shared_anchor_on != "loss_rise":
            return anchor_penalty(model, PREFIX, shared, weighted=self.params.shared_anchor == "fisher")
        with torch.no_grad():
            losing = [j for j in self.estimated if float(estimated_loss_change(model, PREFIX, j, shared)) > 0]
        if not losing:
            return None
        return torch.stack([task_anchor_penalty(model, PREFIX, j, shared) for j in losing]).sum()

    def training_logs(self, model: ContinualModel, ctx: RoutingContext, task_loss: torch.Tensor,
                      extra: dict[str, torch.Tensor], diagnose: bool) -> dict[str, float]:
        if "disc" not in extra:
            return {}
        with torch.no_grad():
            hits = [self._discriminator_loss(model, l, current, memory, ctx.task_ids)[1].float().mean()
                    for l, (current, memory) in enumerate(self.shared_features(model, ctx))]
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
        elif self.params.shared_anchor == "fisher" and self.params.shared_anchor_on != "loss_rise":
            store_loss_scaled_fisher(model, PREFIX, shared, batches, loss_fn)
        if self.keeps_task_statistics():
            store_task_statistics(model, PREFIX, task, shared, batches, loss_fn)
        if self.params.shared_inference == "snapshot":
            add_snapshot(model, task)
            if self.params.choice_memory:
                remember_rows(model, task, batches, self.params.choice_memory, loss_fn)
            choose_snapshots(model, task, loss_fn, memory=self.params.choice_memory > 0)
        if self.params.feature_memory:
            remember_pooled_inputs(model, task, batches, self.params.feature_memory)


def add_snapshot(model: ContinualModel, task: int) -> None:
    """Frozen copies of the shared experts as they are now, task `task`'s snapshot experts."""
    existing = model.bank.expert_names()
    for l, layer in enumerate(model.bank.layers):
        for e, meta in enumerate(list(layer.expert_meta)):
            if meta.kind == "shared" and snapshot_name(task, meta.name) not in existing:
                model.bank.add_expert(ExpertMeta(name=snapshot_name(task, meta.name), kind="snapshot", task=task),
                                      layers=[l], init_from={l: e})
    model.bank.set_trainable(False, kind="snapshot")


def remember_rows(model: ContinualModel, task: int, batches, count: int, loss_fn) -> None:
    """Keep the last `count` of `task`'s training rows, those `training_examples` held out of its
    training (the declared choice memory: read to choose, never trained on), as collated
    batches, and their mean loss now, at the task's end."""
    total = sum(len(batch["input_ids"]) for batch in batches())
    seen, kept, losses = 0, 0, []
    with torch.no_grad():
        for batch in batches():
            size = len(batch["input_ids"])
            start = max(0, total - count - seen)
            seen += size
            if start >= size:
                continue
            batch = {k: v[start:] for k, v in batch.items()}
            for field, value in batch.items():
                model.method_state[f"{PREFIX}task{task}.rows{kept}.{field}"] = value
            losses.append((float(loss_fn(batch)), size - start))
            kept += 1
    model.method_state[f"{PREFIX}task{task}.rows_loss"] = torch.tensor(sum(l * n for l, n in losses) / count)


def remembered_loss(model: ContinualModel, task: int, loss_fn) -> float:
    """Mean loss of `task`'s remembered rows with the bank as it is now."""
    total, count, b = 0.0, 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        while f"{PREFIX}task{task}.rows{b}.input_ids" in model.method_state:
            prefix = f"{PREFIX}task{task}.rows{b}."
            batch = {k[len(prefix):]: v.to(device) for k, v in model.method_state.items() if k.startswith(prefix)}
            total += float(loss_fn(batch)) * len(batch["input_ids"])
            count += len(batch["input_ids"])
            b += 1
    return total / count


def choose_snapshots(model: ContinualModel, task: int, loss_fn, memory: bool) -> None:
    """After task `task`: which tasks j ≤ task would answer better from their snapshot (θ*_j)
    than from the current shared expert, by each rule: "estimate", ĉ_j > 0; "memory" (where
    rows are remembered), the remembered rows' loss higher now than at j's end. Kept in
    method_state "moe_cl.reads_snapshot.<rule>" (1: the snapshot), read at inference."""
    shared = shared_parameters(model)
    with torch.no_grad():
        rules = {"estimate": [j < task and float(estimated_loss_change(model, PREFIX, j, shared)) > 0
                              for j in range(task + 1)]}
    if memory:
        rules["memory"] = [j < task and remembered_loss(model, j, loss_fn) > float(model.method_state[f"{PREFIX}task{j}.rows_loss"])
                           for j in range(task + 1)]
    for rule, flags in rules.items():
        model.method_state[f"{PREFIX}reads_snapshot.{rule}"] = torch.tensor(flags, dtype=torch.long)


def gradient_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """‖∂loss/∂params‖ without touching `.grad` (the graph is kept for the real backward)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)))


@torch.no_grad()
def remember_pooled_inputs(model: ContinualModel, task: int, batches, count: int) -> None:
    """Keep `count` pooled FFN inputs of `task` per layer (vectors, no text): what D's memory
    features are computed from, through the shared expert of the moment."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.bank.layers]
    kept = 0
    for batch in batches():
        with model.bank.routing(task_ids=batch["task_ids"], attention_mask=batch["attention_mask"],
                                capture_inputs=True) as ctx:
            model.hidden_states(batch["input_ids"], batch["attention_mask"])
        for l, x in enumerate(ctx.pooled_inputs):
            per_layer[l].append(x)
        kept += len(batch["input_ids"])
        if kept >= count:
            break
    for l, inputs in enumerate(per_layer):
        new = torch.cat(inputs)[:count]
        old = model.method_state.get(f"memory_inputs_{l}")
        model.method_state[f"memory_inputs_{l}"] = new if old is None else torch.cat([old, new])
    labels = torch.full((len(new),), task, dtype=torch.long, device=new.device)
    old = model.method_state.get("memory_tasks")
    model.method_state["memory_tasks"] = labels if old is None else torch.cat([old, labels])
