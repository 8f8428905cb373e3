"""Continual-learning methods as plugins: one file each, registered by name.

A method is an object with hooks that the training loop calls. `Method` gives every hook a
no-op default, so a method file defines only what makes it different. Its parameters are a
pydantic model declared beside it (`NoParams` when it has none); the registry holds the pair, so
a run config's `method.params` is checked field by field before anything runs.
`build_method("moe_cl", adv_weight=0.1)` makes one from a run config. `task_labels` (each task's
label set, as the run config gives it) is there for a method whose rule depends on what the tasks
decide, e.g. MoE-CL anchoring its shared expert only on a task that brings new labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict

from cl_core.continual_model import ContinualModel
from cl_core.experts import RoutingContext


class MethodParams(BaseModel):
    """A method's parameters: typed, bounded, and no unknown field (a typo fails validation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(MethodParams):
    pass


class RegisteredMethod(NamedTuple):
    method: type[Method]
    params: type[MethodParams]


METHODS: dict[str, RegisteredMethod] = {}


class Method:
    """What a method is, read as class attributes, and its hooks (no-op defaults)."""

    name: str
    router = "task"  # the bank router kind this method needs
    routable = False  # can it route without a task id at inference?
    oracle = False  # a reference that breaks the continual setting (true task ids, all data), not a rival
    plans_tasks = False  # does `plan_task` need to run before `setup_task`?
    mixes_tasks = False  # do its batches hold several tasks (then it needs the `lm` objective)?
    uses_earlier_examples = False  # does `training_examples` read earlier tasks' examples? (loaded only then)

    def __init__(self, params: MethodParams | None = None, task_labels: Sequence[Iterable[str]] | None = None):
        self.params = params if params is not None else METHODS[self.name].params()
        # None where whoever built the method did not say (a method that needs them says so when it does)
        self.task_labels = None if task_labels is None else [frozenset(labels) for labels in task_labels]

    def experts_per_layer(self, tasks: int) -> int | None:
        """How many experts a layer holds after `tasks` tasks (None: not fixed in advance), so
        that a bank's `top_k` can be checked against it before anything runs."""
        return None

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
        """The examples to train task `task` on; `earlier` holds every earlier task's training examples
        where `uses_earlier_examples` is set, and is empty otherwise."""
        return current

    def training_logs(self, model: ContinualModel, ctx: RoutingContext, task_loss: torch.Tensor,
                      extra: dict[str, torch.Tensor], diagnose: bool) -> dict[str, float]:
        """Figures of this training step beyond the losses (logged with them); `diagnose` asks
        for the costly ones, e.g. gradient norms that need extra backward passes."""
        return {}

    def param_groups(self, model: ContinualModel, params: list[torch.nn.Parameter], lr: float) -> list[dict]:
        """The optimizer's parameter groups over the trainable `params` (learning rate, weight
        decay): one group at `lr`, no weight decay, unless the method treats some apart."""
        return [{"params": params, "lr": lr, "weight_decay": 0.0}]

    def after_step(self, model: ContinualModel) -> None:
        """After every optimizer step while training (e.g. momentum copies of experts). State that
        `after_task` needs goes to `model.method_state`: it reaches the bank stage with the trained tensors."""

    def after_task(self, model: ContinualModel, task: int, batches: Callable[[], Iterable[dict]],
                   loss_fn: Callable[[dict], torch.Tensor]) -> None:
        """After training `task`: Fisher, memories, freezing. `batches()` re-reads the task's data."""

    def infer_task_ids(self, model: ContinualModel, batch: dict) -> torch.Tensor | None:
        """Task ids located without the true ones, or None when the method cannot."""
        return None


def register(params: type[MethodParams] = NoParams) -> Callable[[type[Method]], type[Method]]:
    """`@register(MyParams)` above a Method subclass: the method and its parameters, by its name.
    A name already taken by another class is refused (a subclass that forgot its own `name`
    would otherwise replace its parent silently)."""
    def add(cls: type[Method]) -> type[Method]:
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{_qualified(cls)} sets no `name` of its own; a registered method needs one")
        taken = METHODS.get(name)
        if taken is not None and taken.method is not cls:
            raise ValueError(f"method name {name!r} is registered twice: by {_qualified(taken.method)} "
                             f"and by {_qualified(cls)}; give one of them another name")
        METHODS[name] = RegisteredMethod(cls, params)
        return cls
    return add


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_params(name: str, params: dict[str, Any]) -> MethodParams:
    """The method's parameters, validated (a pydantic ValidationError names the bad field)."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not registered; available: {sorted(METHODS)}")
    return METHODS[name].params.model_validate(params)


def build_method(name: str, params: MethodParams | None = None,
                 task_labels: Sequence[Iterable[str]] | None = None, **raw: Any) -> Method:
    """A method from validated `params`, or from keyword values validated here."""
    if params is None:
        params = method_params(name, raw)
    return METHODS[name].method(params, task_labels)


def _register_builtin_methods() -> None:
    """Import every module of this package: each registers its method with @register."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_builtin_methods()
