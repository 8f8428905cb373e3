"""Multi-task learning: one shared LoRA trained jointly on every task seen so far (upper bound).

At task t the training set is the union of tasks 0..t, shuffled with the seed; the shared LoRA
continues from the bank of task t-1. Not a continual method (it re-reads all earlier data):
`oracle = True` marks it as a reference. Batches mix tasks: use the `lm` objective.
"""

from __future__ import annotations

import random

from cl_core.methods import register
from cl_core.methods.common import SharedLoRAMethod


@register()
class MTL(SharedLoRAMethod):
    name = "mtl"
    oracle = True
    mixes_tasks = True  # batches hold several tasks: needs the `lm` objective
    uses_earlier_examples = True

    def training_examples(self, task: int, current: list[dict], earlier: list[list[dict]], seed: int) -> list[dict]:
        joint = [ex for examples in earlier for ex in examples] + list(current)
        random.Random(seed * 100_003 + task).shuffle(joint)
        return joint
