"""Tiny models and synthetic tasks shared by the tests (hidden 64, 2 layers, fixed seeds)."""

from __future__ import annotations

import random

import pytest
import torch

from cl_core.bank import BankConfig
from cl_core.base_model import ModelSpec, load_base_model
from cl_core.continual_model import ContinualModel
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


def tiny_run(name: str = "t", tasks: int = 2, **sections) -> dict:
    """A tiny run config (dict): generated tasks, 2 workers × 1 CPU, ZeRO-2 unless overridden."""
    cfg = {
        "name": name,
        "model": {"kind": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 256},
        "tasks": [{"name": f"task{t}", "data": {"synthetic": {"n_train": 48, "n_test": 24}},
                   "labels": [f"w{2 * t + 1}", f"w{2 * t + 2}"]} for t in range(tasks)],
        # The Fisher anchor, not the default: the runs then also cover the statistics it stores in the
        # bank and reads outside a layer's forward (ZeRO-3 gathers them), and resume restores them.
        "method": {"name": "moe_cl", "params": {"adv_weight": 0.1, "shared_anchor": "fisher"}},
        "bank": {"dropout": 0.05},
        # float32 unless a test asks otherwise: "auto" would depend on the host's bf16 support.
        "training": {"epochs": 2, "lr": 0.01, "batch_size": 8, "max_length": 32, "checkpoint_every": 2,
                     "precision": "fp32"},
        "deepspeed": {"zero_stage": 2},
        "ray": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (ray.init costs seconds); workers import the repo's packages."""
    import ray

    from pipelines.run.driver import start_ray
    from pipelines.config import parse_config

    start_ray(parse_config(tiny_run()))
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    """Fast tests first, slow ones after (each group in file order): a broken fast check fails
    within the first minutes instead of after the Ray and DeepSpeed runs."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
