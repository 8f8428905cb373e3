"""Tiny models and synthetic tasks shared by the tests (hidden 64, 2 layers, fixed seeds)."""

from __future__ import annotations

import random

import pytest
import torch

from cl_core.bank import BankConfig
from cl_core.model import ContinualModel
from cl_core.models import ModelSpec, load_base_model
from cl_core.objectives import TaskFormat, encode_prompt
from cl_core.synthetic import synthetic_rows

TINY = ModelSpec(kind="tiny", hidden_size=64, num_layers=2, vocab_size=256, seed=0)


def tiny_model(router: str = "task", top_k: int | None = None, dropout: float = 0.0) -> tuple[ContinualModel, object]:
    lm, tok = load_base_model(TINY)
    return ContinualModel(lm, BankConfig(router=router, top_k=top_k, dropout=dropout), TINY.source), tok


def synthetic_task(tok, task: int, n: int, seed: int, labels=("w1", "w2")) -> tuple[TaskFormat, list[dict]]:
    """Encoded examples of a generated task (see cl_core.synthetic)."""
    fmt = TaskFormat(name=f"t{task}", verbalizers=tuple(labels), max_length=32)
    rows = synthetic_rows(task, list(labels), n, seed)
    return fmt, [{"prompt_ids": encode_prompt(tok, fmt, r["text"]), "label": labels.index(r["label"]), "task": task}
                 for r in rows]


def batches(collate, examples: list[dict], batch_size: int, epochs: int = 1, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            yield collate([examples[i] for i in order[s:s + batch_size]])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
