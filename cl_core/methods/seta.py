"""SETA: shared + task-unique experts under one learned router, with elastic anchoring of the
shared experts and a router that keeps earlier tasks' tokens on their experts.

Structure. Task 0 adds `shared_experts` shared experts ("shared<i>", kind "shared"); every task
adds one unique expert ("task<t>.0", kind "task"). Every layer's `learned` router mixes all of its
experts (softmax, or top-k if the bank sets top_k) from the token alone, so no task id is needed
at inference (`routable`); the router's row of an expert is its gate vector.

What trains on task t: its unique expert and router row, the shared experts and their rows.
Earlier unique experts and their rows are frozen.

Anchoring. After task t, the per-sample empirical Fisher F_t of the shared parameters (the shared
experts' LoRA factors and their router rows; `cl_core.anchoring`) is taken and θ* set to their
current value. F_t is scaled so that the penalty is the size of the task loss: by L_t / D_t, L_t
being task t's mean training loss at its end and D_t = Σ F_t (θ* − θ_start)² the Fisher-weighted
distance the shared parameters moved while task t trained (θ_start: their value when task t was
set up). Scaled Fishers add up over tasks, θ* is the latest, and on later tasks the loss gains

    anchor_lambda · Σ_i F_i (θ_i − θ*_i)²,

which, at anchor_lambda 1, equals task t's loss when the shared parameters move as far again.

A slower shared part. `shared_lr_scale` gives the shared parameters their own learning rate in
the optimizer (as MoE-CL's shared expert has): on SmolLM2 they alone explain what SETA forgets
(`benchmarks/seta_drift.py`), and no anchor_lambda kept order1's BwT ≥ −3 (README, SETA). The
default 0.3 was measured: on order1 BwT −18.2 → +1.2 and AA 70.0 → 72.5 over 1.0, on MultiEmo
AA 37.6 → 41.8 (README, SETA); 0.1 slows them so much that the new unique expert takes over.

Router protection. Nothing else stops a later task's router row from taking over an earlier
task's tokens (measured on the tiny model: the newest row took the largest gate mass on the old
task's tokens). So after task t, router inputs of its tokens are kept per layer
("seta.tokens.<t>.<layer>") with the gates the router gave them ("seta.gates.<t>.<layer>", over
the experts of that time): `router_memory` prompt tokens drawn at random, and `router_memory`
decision positions (each example's last prompt token, whose output scores the answer). The
random draw alone holds few of those (one per example among all prompt tokens), and routing
there differs from the average token: on the tiny model, task 0's expert takes 0.69 of the gate
at layer 1's decision positions and 0.50 on its prompt tokens overall. While a later task trains
the loss gains

    router_weight · mean over stored tasks s and layers of KL(stored gates ‖ current gates),

which charges both the later rows' mass on s's tokens and any move of the shared rows there.

The stored inputs are those of the time task s ended; later training of the shared experts in
lower layers moves the real inputs a little from them.

Not implemented: SETA's "split on share" (a shared expert that a task uses heavily is split into
a new shared expert and the task's own). The bank here grows by one unique expert per task.

F, θ*, θ_start and the stored tokens and gates live in `model.method_state` as "seta.fisher.<key>",
"seta.anchor.<key>", "seta.start.<key>" and "seta.tokens.<task>.<layer>", <key> being the
parameter's key in the bank file (e.g. "layers.0.experts.0.A_gate", "layers.0.router.rows.0"),
so they travel with the bank from stage to stage.

`infer_task_ids` returns -1 ("unknown") for every sample: the learned router reads no task id.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cl_core.anchoring import anchor_penalty, store_loss_scaled_fisher, store_start
from cl_core.experts import RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import add_task_experts, prompt_mask, shared_param_groups
from cl_core.objectives import at_last_token
from cl_core.continual_model import ContinualModel

PREFIX = "seta."
TOKENS, GATES = PREFIX + "tokens.", PREFIX + "gates."


def shared_parameters(model: ContinualModel) -> dict[str, torch.nn.Parameter]:
    """The shared experts' parameters and router rows, by their bank-file key."""
    params = {}
    for i, layer in enumerate(model.bank.layers):
        for e in layer.experts_of(kind="shared"):
            for n, p in layer.experts[e].named_parameters():
                params[f"layers.{i}.experts.{e}.{n}"] = p
            params[f"layers.{i}.router.rows.{e}"] = layer.router.rows[e]
    return params


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
    shared_experts: int = Field(1, ge=1)  # the anchored experts
    anchor_lambda: float = Field(1.0, ge=0)  # 1: the penalty is the size of the task loss (see above)
    router_weight: float = Field(10.0, ge=0)
    router_memory: int = Field(64, ge=1)  # stored prompt tokens, and decision positions, per task and layer
    shared_lr_scale: float = Field(0.3, gt=0)  # the shared experts' and rows' learning rate over the others'


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
