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

from cl_core.methods import register
from cl_core.methods.seq_lora import SeqLoRA

DEFAULT_BUFFER_SIZE = 50


def replay_buffer(examples: list[dict], size: int, seed: int, task: int) -> list[dict]:
    """`size` examples of one earlier task, fixed by (seed, task)."""
    size = min(size, len(examples))
    rng = random.Random(seed * 100_003 + task)
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), size))]


@register
class Replay(SeqLoRA):
    name = "replay"
    mixes_tasks = True  # batches hold several tasks: needs the `lm` objective

    def __init__(self, buffer_size: int | None = None, ratio: float | None = None):
        if buffer_size is not None and ratio is not None:
            raise ValueError("replay: give buffer_size or ratio, not both")
        if buffer_size is not None and buffer_size < 0:
            raise ValueError("replay.buffer_size must be >= 0")
        if ratio is not None and ratio < 0:
            raise ValueError("replay.ratio must be >= 0")
        self.buffer_size = DEFAULT_BUFFER_SIZE if buffer_size is None and ratio is None else buffer_size
        self.ratio = ratio

    def per_task_count(self, current: list[dict]) -> int:
        return round(self.ratio * len(current)) if self.ratio is not None else self.buffer_size

    def training_examples(self, task: int, current: list[dict], earlier: list[list[dict]], seed: int) -> list[dict]:
        n = self.per_task_count(current)
        mixed = list(current)
        for s, examples in enumerate(earlier):
            mixed += replay_buffer(examples, n, seed, s)
        random.Random(seed * 100_003 + 50_000 + task).shuffle(mixed)
        return mixed
