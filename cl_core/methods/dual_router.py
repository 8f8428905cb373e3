"""Dual router: a task-level router over task keys, a token-level router within the task's expert
group, and momentum (EMA) updates that are slow for shared experts and fast for task experts.

Structure. Task 0 adds `shared_experts` shared experts ("shared<i>"); every task adds one expert
("task<t>") to every layer, and a key k_t ∈ R^q (module "dual_key_<t>", a bias-free
Linear(q, 1) whose weight is the key).

Routing, two levels.
- Task level: a sample's task is argmax_t cos(query, k_t), the query being the mean input
  embedding of its prompt tokens (frozen). Training routes with the true task id; `infer_task_ids`
  gives the located one (`routable`). While task t trains, k_t learns by
  key_weight · [mean(1 − cos(query, k_t)) + CE(temperature · cos(query, k), t)], the cross-entropy
  over the keys of tasks 0..t (earlier keys frozen): the first term pulls k_t towards its task's
  queries (the only signal at task 0, where a softmax over one key is constant), the second
  pushes it away from the earlier keys.
- Where a key starts. `plan_task(t)` (before `setup_task`, with the task's training data) stores
  the mean query of task t's training examples ("dual.query_mean.<t>"), and `setup_task` starts
  k_t there. Started at `nn.Linear`'s random init instead, a key is mostly that random direction
  after a task's few optimizer steps (Adam moves each coordinate by about lr per step, and the
  init's coordinates are ±1/√q), while the prompt queries of different tasks are nearly parallel
  (they share most of their mean embedding), so the random remainder decided which key a query
  matched and later keys took earlier tasks' queries (docs/methods.md, "Dual router"). Without
  a plan (a caller that skips `plan_task`, the untrained baseline) a key keeps the random init.
- Token level: the bank's `task` router, a learned softmax gate per task over
  {shared experts, the task's experts}.

Momentum, precisely. `setup_task(t)` copies the live values of the shared experts' and task t's
experts' LoRA factors into an EMA θ̄ ("dual.ema.<bank key>" in method_state, float32). The live
parameters then train as usual. After every optimizer step, `after_step` (a proposed trainer hook)
updates θ̄ ← m·θ̄ + (1 − m)·θ with m = m_shared (default 0.99: slow) for shared experts and
m = m_task (default 0.5: fast) for task t's experts; it counts the steps ("dual.ema_steps").
`after_task(t)` writes θ̄ into the live experts (the bank keeps the momentum weights) and drops
the EMA state. Gates and keys are not averaged. So a shared expert absorbs a task slowly (after
n steps the task-start value still weighs m_shared^n) while a task expert keeps close to its
latest weights. θ̄ is in method_state, so it reaches the bank stage with the trained tensors;
`after_task` refuses to run if no step was averaged (a trainer without the hook would otherwise
silently reset the experts to their task-start values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from pydantic import Field

from cl_core.continual_model import ContinualModel
from cl_core.experts import RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import add_task_experts, prompt_query

EMA = "dual.ema."
STEPS = "dual.ema_steps"
QUERY_MEAN = "dual.query_mean."


def key_name(task: int) -> str:
    return f"dual_key_{task}"


class DualRouterParams(MethodParams):
    shared_experts: int = Field(1, ge=0, description="shared experts per layer, added at the first task")
    m_shared: float = Field(0.99, ge=0, lt=1, description="EMA momentum of the shared experts per optimizer step "
                            "(higher: slower)")
    m_task: float = Field(0.5, ge=0, lt=1, description="EMA momentum of the training task's experts per optimizer step")
    key_weight: float = Field(1.0, ge=0, description="weight of the task key's loss (pull towards its task's queries "
                              "plus cross-entropy over the keys); 0: keys stay where they start")
    temperature: float = Field(8.0, gt=0, description="scale of the key cosines in that cross-entropy")


@register(DualRouterParams)
class DualRouter(Method):
    name = "dual_router"
    router = "task"
    routable = True
    oracle = False
    plans_tasks = True  # the task's mean query, where its key starts

    # -- structure ---------------------------------------------------------------------------
    @torch.no_grad()
    def plan_task(self, model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
                  loss_fn: Callable[[dict], torch.Tensor]) -> None:
        """The mean query of task `task`'s training examples, where `setup_task` starts its key."""
        device = next(model.parameters()).device
        total, n = None, 0
        for batch in batches():
            q = prompt_query(model, {k: v.to(device) for k, v in batch.items()}).double()
            total = q.sum(0) if total is None else total + q.sum(0)
            n += len(q)
        if n == 0:
            raise ValueError(f"dual_router: task {task} has no training batches to start its key from")
        model.method_state[QUERY_MEAN + str(task)] = (total / n).float()

    def setup_task(self, model: ContinualModel, task: int) -> None:
        add_task_experts(model, task, self.params.shared_experts)
        if key_name(task) not in model.extras:
            key = model.add_linear(key_name(task), model.hidden_size, 1, bias=False)
            start = model.method_state.get(QUERY_MEAN + str(task))
            if start is not None:
                with torch.no_grad():
                    key.weight[0].copy_(start.to(key.weight.device))
        model.bank.set_trainable(False)
        model.bank.set_trainable(True, kind="shared")
        model.bank.set_trainable(True, task=task)
        for layer in model.bank.layers:
            for key, gate in layer.router.gates.items():
                gate.requires_grad_(key == str(task))
        for t in range(len(self.keys(model))):
            model.extras[key_name(t)].requires_grad_(t == task)
        # The EMA starts at the task-start values of what trains.
        for key in [k for k in model.method_state if k.startswith(EMA)]:
            del model.method_state[key]
        for key, (p, _) in self.averaged(model, task).items():
            model.method_state[EMA + key] = p.detach().float().clone()
        model.method_state[STEPS] = torch.zeros((), dtype=torch.long, device=next(model.parameters()).device)

    def averaged(self, model: ContinualModel, task: int) -> dict[str, tuple[torch.nn.Parameter, float]]:
        """The experts' parameters the EMA tracks while `task` trains, by bank key, with their momentum."""
        out = {}
        for i, layer in enumerate(model.bank.layers):
            for e, meta in enumerate(layer.expert_meta):
                if meta.kind == "shared" or meta.task == task:
                    m = self.params.m_shared if meta.kind == "shared" else self.params.m_task
                    for n, p in layer.experts[e].named_parameters():
                        out[f"layers.{i}.experts.{e}.{n}"] = (p, m)
        return out

    def _tracked(self, model: ContinualModel) -> list[tuple[str, torch.nn.Parameter, float]]:
        """(state key, live parameter, momentum) of every EMA entry in method_state."""
        out = []
        for key in model.method_state:
            if not key.startswith(EMA):
                continue
            _, i, _, e, n = key[len(EMA):].split(".")
            layer = model.bank.layers[int(i)]
            m = self.params.m_shared if layer.expert_meta[int(e)].kind == "shared" else self.params.m_task
            out.append((key, getattr(layer.experts[int(e)], n), m))
        return out

    # -- training ----------------------------------------------------------------------------
    def keys(self, model: ContinualModel) -> list[torch.Tensor]:
        keys, t = [], 0
        while key_name(t) in model.extras:
            keys.append(model.extras[key_name(t)].weight[0])
            t += 1
        return keys

    def key_similarities(self, model: ContinualModel, query: torch.Tensor) -> torch.Tensor:
        """cos(query_b, k_t): [B, T]."""
        keys = torch.stack(self.keys(model))
        return F.normalize(query.to(keys.dtype), dim=-1) @ F.normalize(keys, dim=-1).T

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        if not self.params.key_weight:
            return {}
        sims = self.key_similarities(model, prompt_query(model, batch)).float()
        own = sims.gather(1, batch["task_ids"][:, None]).squeeze(1)
        loss = (1 - own).mean() + F.cross_entropy(self.params.temperature * sims, batch["task_ids"])
        return {"key": self.params.key_weight * loss}

    @torch.no_grad()
    def after_step(self, model: ContinualModel) -> None:
        """θ̄ ← m·θ̄ + (1 − m)·θ for every tracked expert parameter; call after each optimizer step."""
        for key, p, m in self._tracked(model):
            ema = model.method_state[key]
            model.method_state[key] = ema.to(p.device).mul_(m).add_(p.detach().float(), alpha=1 - m)
        if STEPS in model.method_state:
            model.method_state[STEPS] += 1

    @torch.no_grad()
    def after_task(self, model: ContinualModel, task: int, batches, loss_fn) -> None:
        tracked = self._tracked(model)
        if tracked and int(model.method_state.get(STEPS, 0)) == 0:
            raise RuntimeError("dual_router: no optimizer step was averaged; the trainer must call "
                               "method.after_step(model) after every optimizer step")
        for key, p, _ in tracked:
            p.copy_(model.method_state.pop(key).to(device=p.device, dtype=p.dtype))
        model.method_state.pop(STEPS, None)
        model.method_state.pop(QUERY_MEAN + str(task), None)  # the key has started from it

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        if not self.keys(model):
            return torch.zeros_like(batch["task_ids"])
        return self.key_similarities(model, prompt_query(model, batch)).argmax(-1).to(batch["task_ids"].device)
