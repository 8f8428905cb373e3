"""Continual-learning methods as plugins: one file each, registered by name.

A method is an object with hooks that the training loop calls. `Method` gives every hook a
no-op default, so a method file defines only what makes it different. `build_method("moe_cl", adv_weight=0.1)` makes one from a run config.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from cl_core.experts import RoutingContext
from cl_core.model import ContinualModel

METHODS: dict[str, type] = {}


class Method:
    name: str
    router = "task"  # the bank router kind this method needs
    routable = False  # can it route without a task id at inference?
    plans_tasks = False  # does `plan_task` need to run before `setup_task`?

    def plan_task(self, model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
                  loss_fn: Callable[[dict], torch.Tensor]) -> None:
        """Before `setup_task(task)`, once per task, with the bank as earlier tasks left it and the
        task's training data (e.g. CMoE's probe). `setup_task` runs again in later stages, so every
        decision it needs goes to `model.method_state`; the bank's structure must not change here.
        Called only where `plans_tasks` is true."""

    def setup_task(self, model: ContinualModel, task: int) -> None:
        """Before training task `task`: grow the bank, add modules, set what trains."""

    def routing_fields(self, model: ContinualModel, batch: dict, training: bool) -> dict[str, Any]:
        """Fields for `ExpertBank.routing` (task_ids, query, capture_shared) for this batch."""
        return {"task_ids": batch["task_ids"]}

    def extra_losses(self, model: ContinualModel, batch: dict, ctx: RoutingContext) -> dict[str, torch.Tensor]:
        """Loss terms added to the objective's loss, by name."""
        return {}

    def training_examples(self, task: int, current: list[dict], earlier: list[list[dict]], seed: int) -> list[dict]:
        """The examples to train task `task` on, given every earlier task's training examples."""
        return current

    def after_step(self, model: ContinualModel) -> None:
        """After every optimizer step while training (e.g. momentum copies of experts). State that
        `after_task` needs goes to `model.method_state`: it reaches the bank stage with the trained tensors."""

    def after_task(self, model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
                   loss_fn: Callable[[dict], torch.Tensor]) -> None:
        """After training `task`: Fisher, memories, freezing. `batches()` re-reads the task's data."""

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor | None:
        """Task ids located without the true ones, or None when the method cannot."""
        return None


def register(cls: type) -> type:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **params: Any):
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not registered; available: {sorted(METHODS)}")
    try:
        return METHODS[name](**params)
    except TypeError as e:
        raise ValueError(f"method {name}: bad parameters {params}: {e}") from e


def _register_builtin_methods() -> None:
    """Import every module of this package: each registers its method with @register."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_builtin_methods()
