"""CMoE: probe-guided expansion of a mixture of LoRA experts, with a density task locator.

Structure. Task 0 adds one expert ("task0", kind "task") to every layer. Task t > 0 adds its
expert "task<t>" only to the layers a probe says need one; in a layer it skips, task t is served
by the latest earlier task that has an expert there (`TaskRouter.group_of`, see below). All
experts and gates of earlier tasks are frozen, so routing a sample to its task never forgets.

Probe (`plan_task`, before `setup_task`, with the task's data). Every layer gets a temporary
probe expert (fresh LoRA: it starts as the base FFN) and a temporary softmax gate over
{the experts task t would reuse in that layer, probe}; the old experts stay frozen, nothing else
trains. Probe experts and gates train (AdamW, `probe_lr`) on `probe_share` of the task's batches
(every k-th batch, k = round(1/share), at least one) for `probe_epochs` passes, on

    objective loss + balance_weight · mean_l n_l Σ_i f_i P_i + probe_cost · mean_l P_probe,l

the middle term being the Switch load-balancing loss (f_i: share of real tokens whose top-1 is
expert i, P_i: mean gate probability of expert i, n_l experts in layer l's probe gate). The last
term makes the probe pay for the tokens it takes: without it, tokens that old experts and probe
serve equally well (most prompt tokens) split about evenly at random, and that noise swamps the
signal (docs/methods.md, CMoE, has the measured spread).
Then, over the same batches, f_l is the share of real tokens routed top-1 to layer l's probe,
and layer l expands iff

    f_l > max(mean_l f − alpha · std_l f,  floor_l),   floor_l = min_share or 1 / n_l.

alpha = 1 by default: a new task expands every layer except those clearly below the others
(with alpha = 0, about half of the layers of a wholly new task are cut, often on noise). The floor (the
probe must win more than a fair share of tokens) keeps a task that the old experts already
serve from expanding: the relative term alone expands some layers of every task. If no layer
passes, the layer with the largest f_l expands, so that the task has something to train. A new
expert starts as a copy of the old expert its layer's probe gate used most (top-1) — `init_from`.

The plan lives in `model.method_state["cmoe.plan.<t>"]` (long [L]: -1 = reuse, k >= 0 = expand,
initialised from expert k) next to the measured frequencies ("cmoe.probe_freq.<t>"), so the
stages that run `setup_task` later (training, bank) rebuild the same structure. Without a plan
(task 0, or no `plan_task` call, e.g. the untrained baseline) every layer expands with fresh experts.

Task locator (`after_task`). A diagonal Gaussian per task over `ExpertBank.query` features of the
prompt tokens (frozen embeddings): "cmoe.loc.mean" [T, q], "cmoe.loc.var" [T, q] and
"cmoe.loc.count" [T]. `infer_task_ids` is the argmax of the log-density, each task's variance
regularised by adding `var_floor` · its mean over dimensions; the `task` router then routes
with the located task.

Needs (proposed core changes): `Method.plan_task`, called by the trainer before `setup_task`,
and `TaskRouter.group_of` for layers a task did not expand.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from pydantic import Field
from torch import nn

from cl_core.experts import ExpertMeta, LoRAExpert, Route, RoutingContext
from cl_core.methods import Method, MethodParams, register
from cl_core.methods.common import prompt_query
from cl_core.continual_model import ContinualModel
from cl_core.routers import TaskRouter

PLAN = "cmoe.plan."
FREQ = "cmoe.probe_freq."
LOC_MEAN, LOC_VAR, LOC_COUNT = "cmoe.loc.mean", "cmoe.loc.var", "cmoe.loc.count"


def serving_task(layer, task: int) -> int | None:
    """The task whose experts serve `task` in this layer: itself, else the latest earlier task
    with experts here (None if there is none). Mirrors the proposed `TaskRouter.group_of`."""
    own = {m.task for m in layer.expert_meta if m.kind == "task"}
    if task in own:
        return task
    earlier = [t for t in own if t < task]
    return max(earlier) if earlier else None


# -- the probe -----------------------------------------------------------------------------------
class _ProbeRouter(nn.Module):
    """Temporary dense softmax gate over (old experts, probe); keeps what the probe phase reads."""

    def __init__(self, hidden: int, experts: list[int], device: torch.device):
        super().__init__()
        self.experts = experts
        self.gate = nn.Linear(hidden, len(experts), bias=False).to(device=device)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.probs: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: RoutingContext, layer: nn.Module) -> Route:
        b, t, _ = x.shape
        self.probs = torch.softmax(self.gate(x.reshape(b * t, -1)).float(), dim=-1)
        mask = ctx.attention_mask
        self.mask = (torch.ones(b * t, device=x.device) if mask is None or mask.shape != (b, t)
                     else mask.reshape(-1).to(self.probs.dtype))
        return Route(gates=self.probs.to(x.dtype), experts=self.experts)

    def top1_counts(self) -> torch.Tensor:
        """Real tokens routed top-1 to each expert of the gate [n]."""
        top = torch.nn.functional.one_hot(self.probs.argmax(-1), len(self.experts)).to(self.mask.dtype)
        return (top * self.mask[:, None]).sum(0)

    def probe_share(self) -> torch.Tensor:
        """Mean gate probability of the probe (the last expert) over real tokens."""
        return (self.probs[:, -1] * self.mask).sum() / self.mask.sum().clamp(min=1)

    def balance_loss(self) -> torch.Tensor:
        """Switch load balancing n · Σ_i f_i P_i over this forward's real tokens."""
        total = self.mask.sum().clamp(min=1)
        f = self.top1_counts() / total
        p = (self.probs * self.mask[:, None]).sum(0) / total
        return len(self.experts) * (f * p).sum()


def probe_batches(batches: Callable[[], Iterable[dict]], share: float, device) -> list[dict]:
    """Every k-th batch (k = round(1/share)), at least one: a share of the task spread over its data."""
    if not 0 < share <= 1:
        raise ValueError(f"cmoe.probe_share must be in (0, 1], got {share}")
    step = max(1, round(1 / share))
    picked = [{k: v.to(device) for k, v in b.items()} for i, b in enumerate(batches()) if i % step == 0]
    if not picked:
        raise ValueError("cmoe: the task has no training batches to probe with")
    return picked


def run_probe(model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
              loss_fn: Callable[[dict], torch.Tensor], *, share: float = 0.1, epochs: int = 2,
              lr: float = 1e-2, balance_weight: float = 0.01,
              probe_cost: float = 0.3) -> tuple[list[float], list[int], list[int]]:
    """Train probe experts on a share of the task; per layer: the probe's top-1 share of real
    tokens, the most used old expert, and the probe gate's width. The bank is left as it was."""
    layers = model.bank.layers
    device = next(model.parameters()).device
    data = probe_batches(batches, share, device)
    candidates = []
    for l, layer in enumerate(layers):
        serving = serving_task(layer, task)
        if serving is None:
            raise ValueError(f"cmoe: layer {l} has no expert for task {task} to probe against "
                             f"(probing starts at task 1)")
        candidates.append(layer.experts_of(kind="shared") + layer.experts_of(kind="task", task=serving))
    trainable = [p for p in model.parameters() if p.requires_grad]
    originals = [layer.router for layer in layers]
    routers = []
    try:
        for p in trainable:
            p.requires_grad_(False)
        for layer, old in zip(layers, candidates):
            device = next(layer.base.parameters()).device
            probe = LoRAExpert(layer.hidden, layer.intermediate, layer.rank).to(device=device)
            routers.append(_ProbeRouter(layer.hidden, old + [len(layer.experts)], device))
            layer.experts.append(probe)
            layer.router = routers[-1]
        params = [p for layer in layers for p in layer.experts[-1].parameters()]
        params += [p for r in routers for p in r.parameters()]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        with torch.enable_grad():
            for _ in range(epochs):
                for batch in data:
                    loss = loss_fn(batch)
                    loss = loss + balance_weight * torch.stack([r.balance_loss() for r in routers]).mean()
                    if probe_cost:
                        loss = loss + probe_cost * torch.stack([r.probe_share() for r in routers]).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        counts = [torch.zeros(len(r.experts), device=device) for r in routers]
        with torch.no_grad():
            for batch in data:
                loss_fn(batch)
                for c, r in zip(counts, routers):
                    c += r.top1_counts().to(device)
    finally:
        for layer, router in zip(layers, originals):
            if isinstance(layer.router, _ProbeRouter):
                del layer.experts[-1]
            layer.router = router
        for p in trainable:
            p.requires_grad_(True)
    freq = [float(c[-1] / c.sum().clamp(min=1)) for c in counts]
    most_used = [old[int(c[:-1].argmax())] for c, old in zip(counts, candidates)]
    return freq, most_used, [len(r.experts) for r in routers]


def select_layers(freq: list[float], widths: list[int], alpha: float, min_share: float | None) -> list[int]:
    """Layers whose probe share exceeds max(mean − alpha·std, floor); at least the largest one."""
    f = torch.tensor(freq, dtype=torch.float64)
    relative = float(f.mean() - alpha * (f.std(unbiased=False) if len(freq) > 1 else 0.0))
    chosen = [l for l, (x, n) in enumerate(zip(freq, widths))
              if x > max(relative, 1.0 / n if min_share is None else min_share)]
    return chosen or [int(f.argmax())]


def probe_layers(model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
                 loss_fn: Callable[[dict], torch.Tensor], *, share: float = 0.1, epochs: int = 2,
                 lr: float = 1e-2, balance_weight: float = 0.01, probe_cost: float = 0.3,
                 alpha: float = 1.0, min_share: float | None = None) -> list[int]:
    """The layers task `task` should expand (see the module docstring)."""
    freq, _, widths = run_probe(model, task, batches, loss_fn, share=share, epochs=epochs, lr=lr,
                                balance_weight=balance_weight, probe_cost=probe_cost)
    return select_layers(freq, widths, alpha, min_share)


# -- the method ----------------------------------------------------------------------------------
class CMoEParams(MethodParams):
    probe_share: float = Field(0.1, gt=0, le=1, description="share of the task's training batches the probe trains "
                               "and counts on (every round(1 / share)-th batch)")
    probe_epochs: int = Field(2, ge=1, description="passes of the probe over those batches")
    probe_lr: float = Field(1e-2, gt=0, description="AdamW learning rate of the probe experts and their gates")
    balance_weight: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss on the probe gates")
    probe_cost: float = Field(0.3, ge=0, description="weight of the probe's mean gate probability in the probe loss "
                              "(the probe pays for the tokens it takes)")
    alpha: float = Field(1.0, description="a layer expands where its probe share exceeds mean − alpha · std over "
                         "the layers (and the floor)")
    min_share: float | None = Field(None, ge=0, lt=1, description="the floor a layer's probe share must exceed to "
                                    "expand (null: 1 / the experts in its probe gate)")
    var_floor: float = Field(0.01, gt=0, description="task locator: each task's variance is raised by this times its "
                             "mean over dimensions")


@register(CMoEParams)
class CMoE(Method):
    name = "cmoe"
    router = "task"
    routable = True  # the density locator names the task
    oracle = False
    plans_tasks = True  # needs `plan_task` before `setup_task` (proposed hook)

    # -- structure ---------------------------------------------------------------------------
    def plan_task(self, model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
                  loss_fn: Callable[[dict], torch.Tensor]) -> None:
        """Probe which layers task `task` expands; the plan goes to method_state."""
        if task == 0:
            return
        freq, most_used, widths = run_probe(model, task, batches, loss_fn, share=self.params.probe_share,
                                            epochs=self.params.probe_epochs, lr=self.params.probe_lr,
                                            balance_weight=self.params.balance_weight, probe_cost=self.params.probe_cost)
        chosen = set(select_layers(freq, widths, self.params.alpha, self.params.min_share))
        device = next(model.parameters()).device
        model.method_state[PLAN + str(task)] = torch.tensor(
            [most_used[l] if l in chosen else -1 for l in range(len(freq))], dtype=torch.long, device=device)
        model.method_state[FREQ + str(task)] = torch.tensor(freq, dtype=torch.float32, device=device)

    def expansion(self, model: ContinualModel, task: int) -> dict[int, int | None]:
        """{layer: init_from} of the layers task `task` adds an expert to."""
        plan = model.method_state.get(PLAN + str(task))
        if task == 0 or plan is None:
            return {l: None for l in range(len(model.bank.layers))}
        return {l: int(k) for l, k in enumerate(plan.tolist()) if k >= 0}

    def setup_task(self, model: ContinualModel, task: int) -> None:
        grow = self.expansion(model, task)
        if len(grow) < len(model.bank.layers) and not hasattr(TaskRouter, "group_of"):
            raise NotImplementedError("cmoe expands some layers only: the task router needs "
                                      "TaskRouter.group_of (a task reuses the latest earlier task's "
                                      "experts in a layer it did not expand)")
        name = f"task{task}"
        if name not in model.bank.expert_names():
            model.bank.add_expert(ExpertMeta(name=name, kind="task", task=task), layers=sorted(grow),
                                  init_from={l: k for l, k in grow.items() if k is not None})
        model.bank.set_trainable(False)
        model.bank.set_trainable(True, task=task)
        for layer in model.bank.layers:
            for key, gate in layer.router.gates.items():
                gate.requires_grad_(key == str(task))

    # -- the task locator --------------------------------------------------------------------
    @torch.no_grad()
    def after_task(self, model: ContinualModel, task: int, batches, loss_fn) -> None:
        device = next(model.parameters()).device
        total, total_sq, n = None, None, 0
        for batch in batches():
            q = prompt_query(model, {k: v.to(device) for k, v in batch.items()}).double()
            total = q.sum(0) if total is None else total + q.sum(0)
            total_sq = q.pow(2).sum(0) if total_sq is None else total_sq + q.pow(2).sum(0)
            n += len(q)
        if n == 0:
            raise ValueError(f"cmoe: task {task} has no training batches to fit the locator on")
        mean = total / n
        var = (total_sq / n - mean.pow(2)).clamp(min=0)
        state = model.method_state
        rows = 0 if LOC_MEAN not in state else len(state[LOC_MEAN])
        if task > rows:
            raise ValueError(f"cmoe: the locator has {rows} tasks, cannot add task {task}")
        for key, value in ((LOC_MEAN, mean.float()), (LOC_VAR, var.float()),
                           (LOC_COUNT, torch.tensor(float(n), dtype=torch.float32, device=device))):
            old = state[key].to(device) if key in state else value.new_zeros((0, *value.shape))
            state[key] = torch.cat([old[:task], value[None], old[task + 1:]])  # refitting replaces the row

    @torch.no_grad()
    def task_log_density(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        """[B, T] log N(query; mean_t, var_t) under each task's diagonal Gaussian."""
        q = prompt_query(model, batch).float()
        mean = model.method_state[LOC_MEAN].to(q.device)
        var = model.method_state[LOC_VAR].to(q.device)
        var = var + self.params.var_floor * var.mean(-1, keepdim=True).clamp(min=1e-12)
        diff = q[:, None, :] - mean[None]
        return -0.5 * (diff.pow(2) / var + torch.log(2 * math.pi * var)).sum(-1)

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor:
        if LOC_MEAN not in model.method_state:  # nothing fitted yet (e.g. the untrained baseline)
            return torch.zeros_like(batch["task_ids"])
        return self.task_log_density(model, batch).argmax(-1).to(batch["task_ids"].device)
