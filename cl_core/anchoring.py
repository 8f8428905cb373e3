"""Elastic anchoring, shared by EWC and SETA: a diagonal Fisher of some parameters after a task,
and the penalty Σ_i F_i (θ_i − θ*_i)² on later tasks.

The Fisher is the per-sample empirical Fisher: the mean over the task's training examples of
the squared gradient of each example's own loss. (The square of a batch's mean gradient is not:
the examples' gradients partly cancel in the mean, which made it several times smaller.)

F and θ* live in `model.method_state` under "<prefix>fisher.<key>" / "<prefix>anchor.<key>",
<key> being the parameter's key in the bank file, so they travel with the bank between stages.
Fishers add up over tasks; the anchor is the latest value. An unweighted (L2) anchor stores θ* alone.
`store_task_statistics` keeps each task's own θ*, mean gradient and Fisher instead, for a
second-order estimate of each earlier task's loss change (`estimated_loss_change`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from cl_core.continual_model import ContinualModel


def examples_of(batch: dict[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    """A collated batch as batches of one example each (every field is indexed by example first)."""
    for i in range(len(batch["input_ids"])):
        yield {k: v[i:i + 1] for k, v in batch.items()}


def gradient_statistics(params: dict[str, torch.nn.Parameter], batches: Callable[[], Iterable[dict]],
                        loss_fn: Callable[[dict], torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """(mean gradient, per-sample empirical diagonal Fisher; both float32, by name; the mean
    example loss) of `params` over the examples, one example's own loss at a time."""
    names, tensors = list(params), list(params.values())
    device = tensors[0].device
    was = [p.requires_grad for p in tensors]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    squares = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    count, loss_sum = 0, 0.0
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches():
                for example in examples_of({k: v.to(device) for k, v in batch.items()}):
                    loss = loss_fn(example)
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for s, q, g in zip(sums, squares, grads):
                        if g is not None:
                            s.add_(g.detach().float())
                            q.add_(g.detach().float().pow(2))
                    count += 1
                    loss_sum += float(loss.detach())
    finally:
        for p, w in zip(tensors, was):
            p.requires_grad_(w)
    if count == 0:
        raise ValueError("no training examples to estimate the Fisher from")
    return ({name: s / count for name, s in zip(names, sums)}, {name: q / count for name, q in zip(names, squares)},
            loss_sum / count)


def empirical_fisher(params: dict[str, torch.nn.Parameter], batches: Callable[[], Iterable[dict]],
                     loss_fn: Callable[[dict], torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """(per-sample empirical diagonal Fisher of `params`, float32, by name; the mean example loss)."""
    _, fisher, loss = gradient_statistics(params, batches, loss_fn)
    return fisher, loss


def store_fisher(model: ContinualModel, prefix: str, params: dict[str, torch.nn.Parameter],
                 fisher: dict[str, torch.Tensor]) -> None:
    """Add `fisher` to the Fishers of earlier tasks and make the current values of `params` θ*."""
    for name, p in params.items():
        old = model.method_state.get(f"{prefix}fisher.{name}")
        f = fisher[name]
        model.method_state[f"{prefix}fisher.{name}"] = f if old is None else old.to(f.device) + f
    store_anchor(model, prefix, params)


def store_start(model: ContinualModel, prefix: str, params: dict[str, torch.nn.Parameter]) -> None:
    """θ_start of `params`, their value as a task is set up: what `store_loss_scaled_fisher`
    measures the task's move from."""
    for name, p in params.items():
        model.method_state[f"{prefix}start.{name}"] = p.detach().float().clone()


def store_loss_scaled_fisher(model: ContinualModel, prefix: str, params: dict[str, torch.nn.Parameter],
                             batches: Callable[[], Iterable[dict]], loss_fn: Callable[[dict], torch.Tensor]) -> None:
    """After a task: its per-sample Fisher F_t of `params`, scaled by L_t / D_t (L_t the task's
    mean loss, D_t = Σ F_t (θ − θ_start)² the Fisher-weighted distance `params` moved during the
    task), added to earlier tasks' (`store_fisher`). So `anchor_penalty` at weight 1 equals the
    task's loss when `params` move as far again: a weight that means the same on any model."""
    fisher, task_loss = empirical_fisher(params, batches, loss_fn)
    scale = loss_scale(model, prefix, params, fisher, task_loss)
    store_fisher(model, prefix, params, {k: f * scale for k, f in fisher.items()})


def loss_scale(model: ContinualModel, prefix: str, params: dict[str, torch.nn.Parameter],
               fisher: dict[str, torch.Tensor], task_loss: float) -> float:
    """L_t / D_t, D_t = Σ F_t (θ − θ_start)² with θ_start from `store_start` (1 where D_t is 0)."""
    moved = sum(float((fisher[k] * (p.detach().float() - model.method_state[f"{prefix}start.{k}"].to(p.device)).pow(2)).sum())
                for k, p in params.items())
    return task_loss / moved if moved > 0 else 1.0


def store_anchor(model: ContinualModel, prefix: str, params: dict[str, torch.nn.Parameter]) -> None:
    """θ* of `params` alone, for an unweighted (L2) anchor."""
    for name, p in params.items():
        model.method_state[f"{prefix}anchor.{name}"] = p.detach().float().clone()


def anchor_penalty(model: ContinualModel, prefix: str, params: dict[str, torch.nn.Parameter],
                   weighted: bool = True) -> torch.Tensor | None:
    """Σ_i F_i (θ_i − θ*_i)² (`weighted`) or Σ_i (θ_i − θ*_i)² over the parameters that have an
    anchor; None before the first one."""
    terms = []
    for key, p in params.items():
        anchor = model.method_state.get(f"{prefix}anchor.{key}")
        if anchor is None:
            continue
        drift = (p.float() - anchor.to(device=p.device, dtype=torch.float32)).pow(2)
        if weighted:
            drift = model.method_state[f"{prefix}fisher.{key}"].to(device=p.device, dtype=torch.float32) * drift
        terms.append(drift.sum())
    return torch.stack(terms).sum() if terms else None


def store_task_statistics(model: ContinualModel, prefix: str, task: int, params: dict[str, torch.nn.Parameter],
                          batches: Callable[[], Iterable[dict]], loss_fn: Callable[[dict], torch.Tensor]) -> None:
    """After task `task`, its own (not summed) local model of its loss in `params`: their value
    θ*_t, the task's mean gradient g_t and per-sample Fisher F_t there, under
    "<prefix>task<t>.{anchor,gradient,fisher}.<key>" (what `estimated_loss_change` reads), and
    "<prefix>task<t>.scale", L_t / D_t as `store_loss_scaled_fisher` scales (where `store_start`
    kept the task's start; else 1), for `task_anchor_penalty`."""
    gradient, fisher, loss = gradient_statistics(params, batches, loss_fn)
    for name, p in params.items():
        model.method_state[f"{prefix}task{task}.anchor.{name}"] = p.detach().float().clone()
        model.method_state[f"{prefix}task{task}.gradient.{name}"] = gradient[name]
        model.method_state[f"{prefix}task{task}.fisher.{name}"] = fisher[name]
    started = all(f"{prefix}start.{k}" in model.method_state for k in params)
    scale = loss_scale(model, prefix, params, fisher, loss) if started else 1.0
    model.method_state[f"{prefix}task{task}.scale"] = torch.tensor(scale, device=next(iter(params.values())).device)


def has_task_statistics(model: ContinualModel, prefix: str, task: int) -> bool:
    return f"{prefix}task{task}.scale" in model.method_state


def _task_terms(model: ContinualModel, prefix: str, task: int, params: dict[str, torch.nn.Parameter]):
    """Per parameter: (Δ = θ − θ*_t, g_t, F_t), float32 on the parameter's device."""
    for key, p in params.items():
        state = [model.method_state[f"{prefix}task{task}.{part}.{key}"].to(device=p.device, dtype=torch.float32)
                 for part in ("anchor", "gradient", "fisher")]
        yield p.float() - state[0], state[1], state[2]


def estimated_loss_change(model: ContinualModel, prefix: str, task: int,
                          params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """g_tᵀΔ + ½ s_t Σ_i F_t,i Δ_i², Δ = θ − θ*_t: a second-order estimate of how much task t's
    loss has changed since its end (`store_task_statistics`), differentiable in `params`.

    The curvature is the Fisher scaled by s_t = L_t / D_t, so that the quadratic term of a move
    as large as the task's own (in the Fisher's metric) is half the task's loss: the per-sample
    diagonal Fisher alone is far flatter than the loss (docs/methods.md, MoE-CL)."""
    scale = model.method_state[f"{prefix}task{task}.scale"].float()
    return torch.stack([(g * d).sum() + 0.5 * scale * (f * d.pow(2)).sum()
                        for d, g, f in _task_terms(model, prefix, task, params)]).sum()


def task_anchor_penalty(model: ContinualModel, prefix: str, task: int,
                        params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """(L_t / D_t) Σ_i F_t,i (θ_i − θ*_t,i)²: task t's own loss-scaled Fisher pull towards θ*_t."""
    scale = model.method_state[f"{prefix}task{task}.scale"].float()
    return scale * torch.stack([(f * d.pow(2)).sum() for d, _, f in _task_terms(model, prefix, task, params)]).sum()
