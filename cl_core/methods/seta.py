"""SETA: shared + task-unique experts under one learned router, with elastic anchoring of the
shared experts, a router that keeps earlier tasks' tokens on their experts, and split-on-share.

Structure. Task 0 adds `shared_experts` shared experts ("shared<i>", kind "shared"); every task
adds one unique expert ("task<t>.0", kind "task") to every layer, and split-on-share (below) adds
copies of shared experts where a task would compete with earlier tasks for them. Every layer's
`learned` router mixes all of its experts (softmax, or top-k if the bank sets top_k) from the
token alone, so no task id is needed at inference (`routable`); the router's row of an expert is
its gate vector.

What trains on task t: its own experts and their router rows, and the shared experts and their
rows except where t split them. Earlier tasks' experts and their rows are frozen.

Anchoring. After task t, the per-sample empirical Fisher F_t of the shared parameters (the shared
experts' LoRA factors and their router rows; `cl_core.anchoring`) is taken and θ* set to their
current value. F_t is scaled so that the penalty is the size of the task loss: by L_t / D_t, L_t
being task t's mean training loss at its end and D_t = Σ F_t (θ* − θ_start)² the Fisher-weighted
distance the shared parameters moved while task t trained (θ_start: their value when task t was
set up). Scaled Fishers add up over tasks, θ* is the latest, and on later tasks the loss gains

    anchor_lambda · Σ_i F_i (θ_i − θ*_i)²,

which, at anchor_lambda 1, equals task t's loss when the shared parameters move as far again.

A slower shared part. `shared_lr_scale` gives the shared parameters their own learning rate in
the optimizer (as MoE-CL's shared expert has): on SmolLM2 their drift alone explains what SETA
forgot (`benchmarks/seta_drift.py`); its default is chosen on validation (docs/methods.md, SETA).

Router protection. Nothing else stops a later task's router row from taking over an earlier
task's tokens. So after task t, router inputs of its tokens are kept per layer
("seta.tokens.<t>.<layer>") with the gates the router gave them ("seta.gates.<t>.<layer>", over
the experts of that time): `router_memory` prompt tokens drawn at random, and `router_memory`
decision positions (each example's last prompt token, whose output scores the answer), where
routing differs from the average token. While a later task trains the loss gains

    router_weight · mean over stored tasks s and layers of KL(stored gates ‖ current gates),

which charges both the later rows' mass on s's tokens and any move of the shared rows there.
The stored inputs are those of the time task s ended; later training of the shared experts in
lower layers moves the real inputs a little from them.

Split-on-share. The paper (arXiv 2601.17616, "Split-on-Share") names the mechanism, says that it
decomposes the model into modular subspaces so that tasks do not compete for the same parameters,
and (per its public summaries) selects the subspaces by gradient sensitivity; the public text
does not define the rule. This project's rule, the closest we can justify: before task t ≥ 1
trains (`plan_task`, on the bank the earlier tasks left, over task t's training examples), each
layer's shared expert s gets the share

    share(l, s) = cos(F_<t, F_t)  over s's LoRA factors and router row,

F_<t being the Fisher the earlier tasks stored for the anchor and F_t task t's per-sample
empirical Fisher: how far the new task's loss depends on the same coordinates of s as the
earlier tasks' losses, i.e. how much the tasks would compete for them. Where share ≥
`split_share`, s splits in that layer: a copy of it (LoRA factors and router row) joins the bank
as task t's own expert ("task<t>.split<s>", kind "task"), trains with task t's unique expert and
is frozen after task t like it, while s and its row stay frozen during task t, exactly as the
earlier tasks left them. The router term above keeps the copy's row off the earlier tasks' tokens. Elsewhere s trains, anchored. The shares go to "seta.share.<t>" and the
decisions to "seta.split.<t>" ([layers, shared_experts]) in method_state. A `split_share` above 1
never splits (a cosine is at most 1).

F, θ*, θ_start and the stored tokens and gates live in `model.method_state` as "seta.fisher.<key>",
"seta.anchor.<key>", "seta.start.<key>" and "seta.tokens.<task>.<layer>", <key> being the
parameter's key in the bank file (e.g. "layers.0.experts.0.A_gate", "layers.0.router.rows.0"),
so they travel with the bank from stage to stage.

`infer_task_ids` returns -1 ("unknown") for every sample: the learned router reads no task id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from pydantic import Field

from cl_core.anchoring import (
    anchor_penalty,
    empirical_fisher,
    store_loss_scaled_fisher,
    store_start,
)
from cl_core.continual_model import ContinualModel
from cl_core.experts import ExpertMeta, RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import add_task_experts, prompt_mask, shared_param_groups
from cl_core.objectives import at_last_token

PREFIX = "seta."
TOKENS, GATES = PREFIX + "tokens.", PREFIX + "gates."
SHARE, SPLIT = PREFIX + "share.", PREFIX + "split."


def shared_parameters(model: ContinualModel) -> dict[str, torch.nn.Parameter]:
    """The shared experts' parameters and router rows, by their bank-file key."""
    return {key: p for i, layer in enumerate(model.bank.layers) for e in layer.experts_of(kind="shared")
            for key, p in expert_parameters(layer, i, e).items()}


def expert_parameters(layer, index: int, expert: int) -> dict[str, torch.nn.Parameter]:
    """One expert's LoRA factors and router row in layer `index`, by their bank-file key."""
    params = {f"layers.{index}.experts.{expert}.{n}": p for n, p in layer.experts[expert].named_parameters()}
    params[f"layers.{index}.router.rows.{expert}"] = layer.router.rows[expert]
    return params


def split_name(task: int, shared: int) -> str:
    return f"task{task}.split{shared}"


def shares(model: ContinualModel, task_fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """[layers, shared experts]: cos(F_<t, F_t) over each shared expert's parameters, F_<t the
    earlier tasks' anchored Fisher in method_state and F_t `task_fisher` (by bank-file key)."""
    out = []
    for i, layer in enumerate(model.bank.layers):
        row = []
        for e in layer.experts_of(kind="shared"):
            keys = list(expert_parameters(layer, i, e))
            old = torch.cat([model.method_state[f"{PREFIX}fisher.{k}"].flatten().float() for k in keys])
            new = torch.cat([task_fisher[k].flatten().to(old.device) for k in keys])
            row.append(float(old @ new / (old.norm() * new.norm()).clamp(min=1e-30)))
        out.append(row)
    return torch.tensor(out, dtype=torch.float32)


@torch.no_grad()
def router_inputs(model: ContinualModel, batches, loss_fn, per_layer: int, seed: int) -> list[torch.Tensor]:
    """Router inputs of every layer ([2 · per_layer, d] float32, fewer where the task has fewer):
    `per_layer` prompt tokens and `per_layer` decision positions, each drawn with `seed`."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.bank.layers]
    masks: list[torch.Tensor] = []
    hooks = [layer.router.register_forward_hook(lambda mod, args, out, i=i: captured[i].append(args[0].float()))
             for i, layer in enumerate(model.bank.layers)]
    try:
        for batch in batches():
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            loss_fn(batch)
            masks.append(prompt_mask(batch).bool())
    finally:
        for hook in hooks:
            hook.remove()

    def draw(tokens: torch.Tensor) -> torch.Tensor:
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))[:per_layer]
        return tokens[order.to(tokens.device)]

    out = []
    for xs in captured:
        prompt = torch.cat([x[m] for x, m in zip(xs, masks)])
        decision = torch.cat([at_last_token(x, m) for x, m in zip(xs, masks)])
        out.append(torch.cat([draw(prompt), draw(decision)]))
    return out


class SETAParams(MethodParams):
    shared_experts: int = Field(1, ge=1, description="shared (anchored) experts per layer, added at the first task")
    anchor_lambda: float = Field(1.0, ge=0, description="weight of the elastic anchor on the shared parameters (1: "
                                 "moving them as far again as a task did costs that task's loss)")
    router_weight: float = Field(10.0, ge=0, description="weight of the KL term keeping earlier tasks' stored tokens "
                                 "on the gates they had")
    router_memory: int = Field(64, ge=1, description="prompt tokens, and as many decision positions, stored per task "
                               "and layer for that term")
    shared_lr_scale: float = Field(0.3, gt=0, description="the shared experts' and router rows' learning rate over "
                                   "the others'")
    split_share: float = Field(0.5, ge=0, description="a shared expert splits for a task whose share of it (Fisher "
                               "cosine) is at least this; above 1: never")


@register(SETAParams)
class SETA(Method):
    name = "seta"
    router = "learned"
    routable = True
    oracle = False
    plans_tasks = True  # split-on-share decides before the task's experts are added

    def experts_per_layer(self, tasks: int) -> int:
        """A layer where no task split a shared expert; one with splits holds more."""
        return self.params.shared_experts + tasks

    def plan_task(self, model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
                  loss_fn: Callable[[dict], torch.Tensor]) -> None:
        """Split-on-share: task `task`'s share of every layer's shared experts, and where it splits them."""
        if task == 0 or self.params.split_share > 1:
            return  # nothing anchored yet to compete for; or splitting is off
        fisher, _ = empirical_fisher(shared_parameters(model), batches, loss_fn)
        share = shares(model, fisher)
        device = next(model.parameters()).device
        model.method_state[SHARE + str(task)] = share.to(device)
        model.method_state[SPLIT + str(task)] = (share >= self.params.split_share).long().to(device)

    def split_layers(self, model: ContinualModel, task: int) -> dict[int, list[int]]:
        """{shared expert: the layers where task `task` splits it} (empty without a plan)."""
        split = model.method_state.get(SPLIT + str(task))
        if split is None:
            return {}
        return {s: [i for i in range(split.shape[0]) if split[i, s]] for s in range(split.shape[1])}

    def setup_task(self, model: ContinualModel, task: int) -> None:
        add_task_experts(model, task, self.params.shared_experts)
        split = self.split_layers(model, task)
        for s, layers in split.items():
            if layers and split_name(task, s) not in model.bank.expert_names():
                shared = {i: model.bank.layers[i].experts_of(kind="shared")[s] for i in layers}
                model.bank.add_expert(ExpertMeta(name=split_name(task, s), kind="task", task=task), layers=layers,
                                      init_from=shared)
                with torch.no_grad():  # the copy's gate starts as the shared expert's
                    for i in layers:
                        model.bank.layers[i].router.rows[-1].copy_(model.bank.layers[i].router.rows[shared[i]])
        for i, layer in enumerate(model.bank.layers):
            held = {layer.experts_of(kind="shared")[s] for s, layers in split.items() if i in layers}
            for e, meta in enumerate(layer.expert_meta):
                trainable = (meta.kind == "shared" and e not in held) or meta.task == task
                layer.experts[e].requires_grad_(trainable)
                layer.router.rows[e].requires_grad_(trainable)
        store_start(model, PREFIX, shared_parameters(model))

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict:
        return {}  # the learned router routes on the tokens alone

    def param_groups(self, model: ContinualModel, params: list[torch.nn.Parameter], lr: float) -> list[dict]:
        shared = {id(p) for p in shared_parameters(model).values()}
        return shared_param_groups(params, shared, lr, self.params.shared_lr_scale, weight_decay=0.0)

    def penalty(self, model: ContinualModel) -> torch.Tensor | None:
        return anchor_penalty(model, PREFIX, shared_parameters(model))

    def routing_drift(self, model: ContinualModel) -> torch.Tensor | None:
        """Mean KL(stored gates ‖ current gates) over earlier tasks' stored tokens and the layers."""
        terms = []
        for i, layer in enumerate(model.bank.layers):
            for key, tokens in model.method_state.items():
                if key.startswith(TOKENS) and key.endswith(f".{i}"):
                    stored = model.method_state[GATES + key[len(TOKENS):]]
                    current = torch.log_softmax(layer.router.logits(tokens.float()), dim=-1)[:, : stored.shape[1]]
                    terms.append((stored * (stored.clamp(min=1e-12).log() - current)).sum(-1).mean())
        return torch.stack(terms).mean() if terms else None

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        losses = {}
        penalty = self.penalty(model) if self.params.anchor_lambda else None
        if penalty is not None:
            losses["anchor"] = self.params.anchor_lambda * penalty
        drift = self.routing_drift(model) if self.params.router_weight else None
        if drift is not None:
            losses["router"] = self.params.router_weight * drift
        return losses

    def after_task(self, model: ContinualModel, task: int, batches, loss_fn) -> None:
        store_loss_scaled_fisher(model, PREFIX, shared_parameters(model), batches, loss_fn)
        for i, tokens in enumerate(router_inputs(model, batches, loss_fn, self.params.router_memory, seed=task)):
            model.method_state[f"{TOKENS}{task}.{i}"] = tokens
            with torch.no_grad():
                model.method_state[f"{GATES}{task}.{i}"] = torch.softmax(
                    model.bank.layers[i].router.logits(tokens), dim=-1)

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        return torch.full_like(batch["task_ids"], -1)
