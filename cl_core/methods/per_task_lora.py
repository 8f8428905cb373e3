"""Per-task LoRA: a fresh LoRA expert per task, earlier ones frozen, chosen by the task id.

The isolation oracle: no forgetting by construction (earlier experts and gates stay
bit-identical), no transfer, and it needs the true task id at inference (`routable = False`).
The bank uses the `task` router with no shared expert: each task's gate then has a single
output, its softmax is identically 1, so a sample of task t runs exactly the FFN with task t's
LoRA. The one-output gates get no gradient and are frozen.
"""

from __future__ import annotations

from cl_core.experts import ExpertMeta
from cl_core.methods import Method, register
from cl_core.continual_model import ContinualModel


def task_expert_name(task: int) -> str:
    return f"task{task}"


def add_task_lora(model: ContinualModel, task: int) -> None:
    """Task `task`'s LoRA (once); it alone trains: earlier experts and every router gate are frozen."""
    if task_expert_name(task) not in model.bank.expert_names():
        model.bank.add_expert(ExpertMeta(name=task_expert_name(task), kind="task", task=task))
    model.bank.set_trainable(False)
    model.bank.set_trainable(True, task=task)
    for layer in model.bank.layers:
        layer.router.requires_grad_(False)


@register()
class PerTaskLoRA(Method):
    name = "per_task_lora"
    router = "task"
    routable = False
    oracle = True

    def setup_task(self, model: ContinualModel, task: int) -> None:
        add_task_lora(model, task)
