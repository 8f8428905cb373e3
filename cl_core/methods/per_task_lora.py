"""Per-task LoRA: a fresh LoRA expert per task, earlier ones frozen, chosen by the task id.

The isolation oracle: no forgetting by construction (earlier experts and gates stay
bit-identical), no transfer, and it needs the true task id at inference (`routable = False`).
The bank uses the `task` router with no shared expert: each task's gate then has a single
output, its softmax is identically 1, so a sample of task t runs exactly the FFN with task t's
LoRA. The one-output gates get no gradient and are frozen.
"""

from __future__ import annotations

from cl_core.continual_model import ContinualModel
from cl_core.methods import Method, register
from cl_core.methods.common import add_task_lora


@register()
class PerTaskLoRA(Method):
    name = "per_task_lora"
    router = "task"
    routable = False
    oracle = True

    def setup_task(self, model: ContinualModel, task: int) -> None:
        add_task_lora(model, task)
