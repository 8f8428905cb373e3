"""Building the model, objective and method of a stage from the run config: the one place where
config values reach cl_core (as plain arguments)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_core.atomic import publish_dir, staging_dir
from cl_core.bank import BankConfig
from cl_core.base_model import ModelSpec, load_base_model
from cl_core.continual_model import ContinualModel
from cl_core.objectives import build_objective
from pipelines.config import RunConfig, model_content
from pipelines.data.tasks import task_format


@dataclass
class Stage:
    model: ContinualModel
    objective: object
    method: object
    tokenizer: object


def materialize_base_model(cfg: RunConfig, cache_root: Path) -> ModelSpec:
    """A GGUF model dequantised once into an HF directory, so every stage loads it in a second
    instead of re-reading the GGUF (~25 s on 2 cores). Other kinds are returned as they are."""
    spec = cfg.model.resolved()
    if spec.kind != "gguf":
        return spec
    key = spec.source.replace("/", "_").replace(":", "_")[-120:]
    out = cache_root / key
    if (out / "config.json").exists():
        return ModelSpec(kind="hf", path=str(out), dtype=spec.dtype)
    lm, tok = load_base_model(spec)
    # save_pretrained refuses a GGUF-flagged model: rebuild it plain from its config and weights.
    config = lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(lm)(config)
    plain.load_state_dict(lm.state_dict())
    tmp = staging_dir(out)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "clpipe_source.json").write_text(json.dumps({"source": spec.source}))
    publish_dir(tmp, out)  # False: another process materialized the same model meanwhile; same content
    return ModelSpec(kind="hf", path=str(out), dtype=spec.dtype)


def bank_source(spec: ModelSpec) -> str | None:
    """The base model as its banks record it: a local model or GGUF file (SmolLM2's included) by its
    content, never by where it lies, so that a bank loads wherever the same model is; a tiny model
    by its spec, a hub id as written. (Banks written before this named the path: `spec.source`.)
    None where a local model is not here to read (a moved run answering from its materialized copy):
    the bank's other base-model fields are still checked."""
    resolved = spec.resolved()
    if resolved.kind in ("hf", "gguf") and Path(resolved.path).is_absolute() and not Path(resolved.path).exists():
        return None
    content = model_content(resolved)
    return f"{spec.kind}:sha256:{content['sha256']}" if isinstance(content, dict) else resolved.source


def bank_config(cfg: RunConfig, router: str) -> BankConfig:
    return BankConfig(rank=cfg.bank.rank, alpha=cfg.bank.alpha, dropout=cfg.bank.dropout, router=router,
                      top_k=cfg.bank.top_k)


def build_stage(cfg: RunConfig, base: ModelSpec, parent_bank: Path | None = None,
                setup_task: int | None = None) -> Stage:
    """Base model + the bank as of `parent_bank`, then (optionally) set up for training `setup_task`.

    The bank's identity is the configured model's content (e.g. the GGUF file's digest), not the cached
    copy it loads from nor where the model lies; banks that recorded the configured path load too.
    """
    lm, tokenizer = load_base_model(base)
    formats = [task_format(t, cfg.training.max_length) for t in cfg.tasks]
    method = cfg.method.build(task_labels=[f.verbalizers for f in formats])
    torch.manual_seed(cfg.training.seed)  # identical initial experts on every rank and every rerun
    model = ContinualModel(lm, bank_config(cfg, method.router), source=bank_source(cfg.model),
                           also_source=cfg.model.source)
    objective = build_objective(cfg.objective, tokenizer, formats)
    if parent_bank is not None:
        model.load(parent_bank)
    if setup_task is not None:
        torch.manual_seed(cfg.training.seed * 1000 + setup_task)
        method.setup_task(model, setup_task)
        objective.setup_task(model, setup_task)
    return Stage(model=model, objective=objective, method=method, tokenizer=tokenizer)
