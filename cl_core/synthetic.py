"""Small generated classification tasks for tiny random models (tests, `configs/tiny.yaml`).

Texts are words "w<k>" of the tiny tokenizer. Label j of task t draws 80% of its words from a
block of 10 words of its own, so each task is learnable and its cues differ from other tasks'.
"""

from __future__ import annotations

import random


def synthetic_rows(task: int, labels: list[str], n: int, seed: int) -> list[dict]:
    """`n` rows {"text", "label"}, labels taken in turn; deterministic in (task, seed)."""
    rng = random.Random(seed * 1000 + task)
    rows = []
    for i in range(n):
        j = i % len(labels)
        block = 20 + 40 * task + 10 * j
        words = [f"w{rng.randrange(block, block + 10) if rng.random() < 0.8 else rng.randrange(20, 200)}"
                 for _ in range(rng.randrange(4, 10))]
        rows.append({"text": " ".join(words), "label": labels[j]})
    return rows
