"""Experience replay: sequential LoRA plus a fixed buffer of earlier tasks' examples.

Each earlier task s keeps a buffer of `buffer_size` examples, or, if `ratio` is given,
round(ratio · |current task|) examples (both per earlier task, capped at the task's size). The
buffer of task s is drawn with a generator seeded by (seed, s) only, so it is the same set at
every later task, as if it were stored once when task s ended; it is drawn from the earlier
tasks' training data the pipeline hands to `training_examples`, so nothing needs to go in the
bank. The buffers are mixed into the current task's examples and shuffled with (seed, task).

Batches then mix tasks: use the `lm` objective (the `head` objective needs one task per batch).
"""

from __future__ import annotations

import random

from pydantic import Field, model_validator

from cl_core.methods import MethodParams, register
from cl_core.methods.seq_lora import SeqLoRA

DEFAULT_BUFFER_SIZE = 50


def replay_buffer(examples: list[dict], size: int, seed: int, task: int) -> list[dict]:
    """`size` examples of one earlier task, fixed by (seed, task)."""
    size = min(size, len(examples))
    rng = random.Random(seed * 100_003 + task)
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), size))]


class ReplayParams(MethodParams):
    buffer_size: int | None = Field(None, ge=0)  # neither given: DEFAULT_BUFFER_SIZE
    ratio: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_of(self):
        if self.buffer_size is not None and self.ratio is not None:
            raise ValueError("give buffer_size or ratio, not both")
        return self


@register(ReplayParams)
class Replay(SeqLoRA):
    name = "replay"
    mixes_tasks = True  # batches hold several tasks: needs the `lm` objective
    uses_earlier_examples = True

    def per_task_count(self, current: list[dict]) -> int:
        if self.params.ratio is not None:
            return round(self.params.ratio * len(current))
        return DEFAULT_BUFFER_SIZE if self.params.buffer_size is None else self.params.buffer_size

    def training_examples(self, task: int, current: list[dict], earlier: list[list[dict]], seed: int) -> list[dict]:
        n = self.per_task_count(current)
        mixed = list(current)
        for s, examples in enumerate(earlier):
            mixed += replay_buffer(examples, n, seed, s)
        random.Random(seed * 100_003 + 50_000 + task).shuffle(mixed)
        return mixed
