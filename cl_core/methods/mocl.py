"""MoCL: a task expert per task, selected by matching a frozen query against learned task keys
(Wang et al., 2024).

Every layer's `similarity` router keeps one key per task expert and mixes the experts with
softmax(8 · cos(query, key_k)); the query is `ExpertBank.query` over the prompt tokens only
(for LM batches attention_mask ∧ labels = -100, so training and evaluation see the same
tokens). While task t trains, the loss gains match_weight · mean over layers and samples of
1 − cos(query, key_t), pulling task t's keys towards its inputs; earlier experts and keys are
frozen. `infer_task_ids` names the task whose keys match best (cosines averaged over layers),
for the task-inference accuracy and the `inferred` eval mode.

Task ids. With a given task id (training, and the `oracle` eval mode), a sample mixes only the
modules of tasks up to its own, as MoCL's task-aware setting does: later tasks' modules do not
touch it. In the `inferred` mode the located task plays that part: modules of tasks after the
best-matching one are left out.
Keys are router parameters, so they are saved with the bank.

A new task's keys (uniform(-1, 1) from the router) are scaled by `key_scale` (0.01). Routing
reads only a key's direction, but Adam moves every coordinate by about lr per step, so keys of
coordinates ~1 need ~1/lr steps to turn towards their task; small keys turn within a few dozen
(in effect a larger learning rate for the keys). key_scale=1 keeps the router's init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from cl_core.experts import ExpertMeta, RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import prompt_query
from cl_core.continual_model import ContinualModel


def key_tasks(layer) -> list[int]:
    """The task of each key of a layer's similarity router, in key order."""
    return [layer.expert_meta[e].task for e in layer.router.keyed_experts]


class MoCLParams(MethodParams):
    match_weight: float = Field(1.0, ge=0, description="weight of the key loss 1 − cos(query, own task's key), mean "
                                "over layers")
    key_scale: float = Field(0.01, gt=0, description="a new task's keys start at the router's init times this "
                             "(small keys turn faster; 1: the init)")


@register(MoCLParams)
class MoCL(Method):
    name = "mocl"
    router = "similarity"
    routable = True
    oracle = False

    def setup_task(self, model: ContinualModel, task: int) -> None:
        name = f"task{task}"
        if name not in model.bank.expert_names():
            model.bank.add_expert(ExpertMeta(name=name, kind="task", task=task))
            with torch.no_grad():
                for layer in model.bank.layers:
                    layer.router.keys[-1].mul_(self.params.key_scale)
        model.bank.set_trainable(False)
        model.bank.set_trainable(True, task=task)
        for layer in model.bank.layers:
            for key, owner in zip(layer.router.keys, key_tasks(layer)):
                key.requires_grad_(owner == task)

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {"query": prompt_query(model, batch), "task_ids": batch["task_ids"]}

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        if not self.params.match_weight:
            return {}
        task_ids = batch["task_ids"]
        losses = []
        for layer in model.bank.layers:
            column = {t: i for i, t in enumerate(key_tasks(layer))}
            index = torch.tensor([column[t] for t in task_ids.tolist()], device=task_ids.device)
            keys = torch.stack(list(layer.router.keys))[index]  # [B, q]: each sample's own task key
            losses.append((1 - F.cosine_similarity(ctx.query.to(keys.dtype), keys, dim=-1)).mean())
        return {"match": self.params.match_weight * torch.stack(losses).mean()}

    @torch.no_grad()
    def similarities(self, model: ContinualModel, batch: dict) -> tuple[torch.Tensor, list[int]]:
        """cos(query, key) averaged over layers [B, K], and the task of each key."""
        query = prompt_query(model, batch)
        sims = torch.stack([layer.router.similarities(query) for layer in model.bank.layers]).mean(0)
        return sims, key_tasks(model.bank.layers[0])

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        sims, tasks = self.similarities(model, batch)
        return torch.tensor(tasks, device=sims.device)[sims.argmax(-1)]
