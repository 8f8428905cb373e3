"""Experience replay: sequential LoRA plus a fixed buffer of earlier tasks' examples.

Each earlier task s keeps a buffer of round(buffer_share · |task s's training set|) examples (at
least one; 10% by default). The buffer of task s is drawn with a generator seeded by (seed, s)
only, so it is the same set at every later task, as if it were stored once when task s ended; it
is drawn from the earlier tasks' training data the pipeline hands to `training_examples`, so
nothing needs to go in the bank. The buffers are mixed into the current task's examples and
shuffled with (seed, task).

The buffers come within the task's optimizer steps, not on top of them: the train worker gives
every method one epoch of the current task's size in steps (`micro_batches`), so replay sees
fewer of the current task's examples per epoch, not more steps than the other methods.

Batches then mix tasks: use the `lm` objective (the `head` objective needs one task per batch).
"""

from __future__ import annotations

import random

from pydantic import Field

from cl_core.methods import MethodParams, register
from cl_core.methods.common import SharedLoRAMethod


def replay_buffer(examples: list[dict], size: int, seed: int, task: int) -> list[dict]:
    """`size` examples of one earlier task, fixed by (seed, task)."""
    size = min(size, len(examples))
    rng = random.Random(seed * 100_003 + task)
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), size))]


class ReplayParams(MethodParams):
    buffer_share: float = Field(0.1, gt=0, le=1, description="share of each earlier task's training set kept and "
                                "mixed in (at least one example)")


@register(ReplayParams)
class Replay(SharedLoRAMethod):
    name = "replay"
    mixes_tasks = True  # batches hold several tasks: needs the `lm` objective
    uses_earlier_examples = True

    def buffer_size(self, task_examples: int) -> int:
        return max(1, round(self.params.buffer_share * task_examples))

    def training_examples(self, task: int, current: list[dict], earlier: list[list[dict]], seed: int) -> list[dict]:
        mixed = list(current)
        for s, examples in enumerate(earlier):
            mixed += replay_buffer(examples, self.buffer_size(len(examples)), seed, s)
        random.Random(seed * 100_003 + 50_000 + task).shuffle(mixed)
        return mixed
