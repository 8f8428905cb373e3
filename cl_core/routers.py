"""Routers: how each token's FFN output mixes the experts of one layer.

- `task`: MoE-CL. Token-wise softmax over {shared experts, the sample's task experts}; one
  bias-free linear gate d→E per task, N(0, 0.02). Needs the task id. In a layer where a task
  added no expert (CMoE), the latest earlier task with experts there serves it. A task's
  snapshot experts (kind "snapshot") take the shared experts' place for it where the routing
  context lists it in `snapshot_tasks`.
- `learned`: softmax (or top-k) over all experts of the layer; no task id.
- `similarity`: MoCL. Per-sample softmax(8·cos(query, key_k)) over task experts, the query being
  frozen features of the input; no task id. Given task ids (>= 0), a sample mixes only the experts
  of tasks up to its own.
- `merged`: O-LoRA. No gates: every expert's LoRA delta is summed into the weights; no task id.

Routers grow with the bank: every added expert calls `on_expert_added`, so replaying the bank's
expert list rebuilds a router's structure exactly (that is how banks are loaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.experts import ExpertMeta, Route, RoutingContext

ROUTER_KINDS = ("task", "learned", "similarity", "merged")


def _gate_vector(hidden: int, ref: torch.Tensor | None = None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(hidden))
    nn.init.normal_(p, std=0.02)
    return p if ref is None else nn.Parameter(p.to(device=ref.device, dtype=ref.dtype))


class TaskRouter(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.shared: list[int] = []
        self.snapshots: dict[int, list[int]] = {}
        self.task_experts: dict[int, list[int]] = {}
        self.gates = nn.ModuleDict()

    def on_expert_added(self, index: int, meta: ExpertMeta) -> None:
        if meta.kind == "shared":
            self.shared.append(index)
            return
        if meta.kind == "snapshot":
            self.snapshots.setdefault(meta.task, []).append(index)
            return
        self.task_experts.setdefault(meta.task, []).append(index)
        # A task's gate has one output per expert it mixes; (re)built while the task's experts
        # are added, before any training of that task.
        gate = nn.Linear(self.hidden, len(self.shared) + len(self.task_experts[meta.task]), bias=False)
        nn.init.normal_(gate.weight, std=0.02)
        self.gates[str(meta.task)] = gate

    def group_of(self, task: int) -> int:
        """The task whose experts and gate serve `task` in this layer: `task` itself or, where it
        added no expert (CMoE expands some layers only), the latest earlier task that did."""
        if task in self.task_experts:
            return task
        earlier = [t for t in self.task_experts if t < task]
        if not earlier:
            raise ValueError(f"task {task} has no experts in this bank (tasks: {sorted(self.task_experts)})")
        return max(earlier)

    def experts_for(self, task: int, snapshot_tasks: frozenset[int] = frozenset()) -> list[int]:
        shared = self.snapshots.get(task, self.shared) if task in snapshot_tasks else self.shared
        return shared + self.task_experts[self.group_of(task)]

    def gate_for(self, task: int) -> nn.Linear:
        return self.gates[str(self.group_of(task))]

    def forward(self, x: torch.Tensor, ctx: RoutingContext, layer: nn.Module) -> Route:
        if ctx.task_ids is None:
            raise ValueError("the 'task' router needs task ids: evaluate with eval.task_id=oracle, "
                             "or use a method that locates the task (seta, cmoe, mocl)")
        b, t, _ = x.shape
        tasks = torch.unique(ctx.task_ids).tolist()
        for task in tasks:
            self.group_of(task)  # raises for a task without experts here or earlier
        if len(tasks) == 1:
            experts = self.experts_for(tasks[0], ctx.snapshot_tasks)
            gates = torch.softmax(self.gate_for(tasks[0])(x), dim=-1)
            return Route(gates=gates.reshape(b * t, -1), experts=experts)
        # Mixed-task batch (replay, joint training): dense over the union, zero weight elsewhere.
        experts = sorted({e for task in tasks for e in self.experts_for(task, ctx.snapshot_tasks)})
        column = {e: i for i, e in enumerate(experts)}
        gates = x.new_zeros(b, t, len(experts))
        for task in tasks:
            cols = torch.tensor([column[e] for e in self.experts_for(task, ctx.snapshot_tasks)], device=x.device)
            in_task = (ctx.task_ids == task).to(x.dtype)[:, None, None]
            weights = torch.softmax(self.gate_for(task)(x), dim=-1) * in_task
            gates = gates.index_add(2, cols, weights)
        return Route(gates=gates.reshape(b * t, -1), experts=experts)


class LearnedRouter(nn.Module):
    def __init__(self, hidden: int, top_k: int | None = None):
        super().__init__()
        self.hidden = hidden
        self.top_k = top_k
        self.rows = nn.ParameterList()

    def on_expert_added(self, index: int, meta: ExpertMeta) -> None:
        ref = self.rows[0] if len(self.rows) else None
        self.rows.append(_gate_vector(self.hidden, ref))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.stack(list(self.rows)).T

    def forward(self, x: torch.Tensor, ctx: RoutingContext, layer: nn.Module) -> Route:
        logits = self.logits(x.reshape(-1, x.shape[-1]))
        probs = torch.softmax(logits, dim=-1)
        ctx.router_probs.append(probs)
        if self.top_k is None or self.top_k >= probs.shape[-1]:
            return Route(gates=probs, experts=list(range(probs.shape[-1])))
        top, idx = probs.topk(self.top_k, dim=-1)
        return Route(gates=top / top.sum(-1, keepdim=True), topk_experts=idx)


class SimilarityRouter(nn.Module):
    """MoCL-style: keys matched by cosine to a frozen per-sample query, temperature 8."""

    def __init__(self, query_dim: int, temperature: float = 8.0):
        super().__init__()
        self.query_dim = query_dim
        self.temperature = temperature
        self.keys = nn.ParameterList()
        self.keyed_experts: list[int] = []

    def on_expert_added(self, index: int, meta: ExpertMeta) -> None:
        if meta.kind != "task":
            raise ValueError("the 'similarity' router keys task experts only; set bank.shared_experts: 0")
        ref = self.keys[0] if len(self.keys) else None
        key = nn.Parameter(torch.empty(self.query_dim).uniform_(-1, 1))
        self.keys.append(key if ref is None else nn.Parameter(key.to(device=ref.device, dtype=ref.dtype)))
        self.keyed_experts.append(index)

    def similarities(self, query: torch.Tensor) -> torch.Tensor:
        """cos(query_b, key_k): [B, K]."""
        return F.normalize(query, dim=-1) @ F.normalize(torch.stack(list(self.keys)), dim=-1).T

    def forward(self, x: torch.Tensor, ctx: RoutingContext, layer: nn.Module) -> Route:
        if ctx.query is None:
            raise ValueError("the 'similarity' router needs a query; call ExpertBank.routing(query=...)")
        b, t, _ = x.shape
        logits = self.temperature * self.similarities(ctx.query.to(x.dtype))
        if ctx.task_ids is not None:  # a given task id: no later task's expert (-1: unknown, all)
            owners = torch.tensor([layer.expert_meta[e].task for e in self.keyed_experts], device=x.device)
            later = (owners[None, :] > ctx.task_ids[:, None]) & (ctx.task_ids[:, None] >= 0)
            logits = logits.masked_fill(later, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        gates = weights[:, None, :].expand(b, t, -1).reshape(b * t, -1)
        return Route(gates=gates, experts=list(self.keyed_experts))


class MergedRouter(nn.Module):
    """O-LoRA: every expert at once, deltas summed (`Route.merged`); nothing to learn, no task id."""

    def on_expert_added(self, index: int, meta: ExpertMeta) -> None:
        pass

    def forward(self, x: torch.Tensor, ctx: RoutingContext, layer: nn.Module) -> Route:
        return Route(merged=True)


def build_router(kind: str, hidden: int, top_k: int | None, query_dim: int) -> nn.Module:
    if kind == "task":
        return TaskRouter(hidden)
    if kind == "learned":
        return LearnedRouter(hidden, top_k)
    if kind == "similarity":
        return SimilarityRouter(query_dim)
    if kind == "merged":
        return MergedRouter()
    raise ValueError(f"unknown router kind {kind!r}; choose one of {ROUTER_KINDS}")
