"""Elastic anchoring, shared by EWC and SETA: a diagonal Fisher of some parameters after a task,
and the penalty Σ_i F_i (θ_i − θ*_i)² on later tasks.

F and θ* live in `model.method_state` under "<prefix>fisher.<key>" / "<prefix>anchor.<key>",
<key> being the parameter's key in the bank file, so they travel with the bank between stages.
Fishers add up over tasks; the anchor is the latest value. An unweighted (L2) anchor stores θ* alone.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from cl_core.continual_model import ContinualModel


def store_fisher(model: ContinualModel, prefix: str, params: dict[str, torch.nn.Parameter],
                 batches: Callable[[], Iterable[dict]], loss_fn: Callable[[dict], torch.Tensor]) -> None:
    """Empirical diagonal Fisher (mean over batches of the squared gradient) and θ* of `params`."""
    names, tensors = list(params), list(params.values())
    device = tensors[0].device
    was = [p.requires_grad for p in tensors]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    count = 0
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches():
                batch = {k: v.to(device) for k, v in batch.items()}
                grads = torch.autograd.grad(loss_fn(batch), tensors, allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s.add_(g.detach().float().pow(2))
                count += 1
    finally:
        for p, w in zip(tensors, was):
            p.requires_grad_(w)
    if count == 0:
        raise ValueError(f"{prefix.rstrip('.')}: no training batches to estimate the Fisher from")
    for name, s, p in zip(names, sums, tensors):
        fisher = s / count
        old = model.method_state.get(f"{prefix}fisher.{name}")
        model.method_state[f"{prefix}fisher.{name}"] = fisher if old is None else old.to(fisher.device) + fisher
        model.method_state[f"{prefix}anchor.{name}"] = p.detach().float().clone()


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
