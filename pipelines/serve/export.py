"""`clpipe export`: a bank whose forward for a task is one fixed LoRA on the base model, as a PEFT
adapter folder (`adapter_config.json`, `adapter_model.safetensors`) for `PeftModel.from_pretrained`.

Expert k of a bank layer is a LoRA on gate_proj, up_proj and down_proj with peft's own form
(`W + s·B·A`, s = alpha / r, dropout on A's input; see cl_core.experts). A layer's forward for a
task is that of a single LoRA when its routing gives weight 1 whatever the input:
- one expert serves the task (sequential LoRA, replay, EWC and MTL: one shared expert under a
  one-expert `learned` router; per-task LoRA: the task's own expert under a one-output `task` gate);
- O-LoRA's `merged` router adds every expert's delta: their factors side by side along the rank
  are one LoRA of rank E·r, and alpha E·alpha keeps the scaling alpha / r.
Gates mixing several experts per token (MoE-CL, SETA, CMoE, MoCL, the dual router) and per-task
classification heads (objective `head`) are no LoRA: those banks are deployed as the MLflow model.

Besides peft's files the folder holds `clpipe.json`: the tasks' prompt template and labels, which
say how the adapter classifies (the label whose tokens are likeliest after the prompt).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cl_core.atomic import publish_dir, staging_dir
from cl_core.base_model import load_base_model
from cl_core.continual_model import ContinualModel
from cl_core.experts import MixtureFFN
from cl_core.routers import MergedRouter, TaskRouter
from pipelines.serve.predict import PredictError, Predictor

if TYPE_CHECKING:
    from peft import PeftModel

PROJECTIONS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
NOT_A_LORA = ("Deploy this bank as its MLflow model instead: models:/{run}@latest in the run's MLflow store "
              "(docs/serving.md).")


def layer_experts(layer: MixtureFFN, task: int) -> list[int] | None:
    """The experts whose summed deltas are the layer's forward for `task`, or None where the routing
    weighs experts per input."""
    if isinstance(layer.router, MergedRouter):
        return list(range(len(layer.experts)))
    experts = layer.router.experts_for(task) if isinstance(layer.router, TaskRouter) else list(range(len(layer.experts)))
    return experts if len(experts) == 1 else None


def adapter_task(predictor: Predictor, task_name: str | None) -> int:
    """The task the adapter is for: `--task`, or the only one whose LoRA the bank could mean."""
    tasks = predictor.tasks
    if task_name is not None:
        if task_name not in tasks:
            raise PredictError(f"--task {task_name!r}: not a task of bank {tasks[-1]!r}; its tasks: {tasks}")
        return tasks.index(task_name)
    layers = predictor.stage.model.bank.layers
    per_task_lora = isinstance(layers[0].router, TaskRouter) and all(
        layer_experts(layer, len(tasks) - 1) is not None for layer in layers)  # else peft_adapter says it mixes
    if per_task_lora and len(tasks) > 1:
        raise PredictError(f"run {predictor.cfg.run_id}: method {predictor.cfg.method.name} keeps a LoRA per task; "
                           f"--task NAME picks one of {tasks}")
    return len(tasks) - 1


def peft_adapter(model: ContinualModel, base_lm, task: int, base_path: str | None = None, who: str = "the bank",
                 instead: str = "") -> PeftModel:
    """`base_lm` (the bank's base model, unmodified) with a LoRA adapter whose forward is `model`'s for
    `task`, or a PredictError (`who` …, then `instead`) where the bank's forward is no single LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    names = {id(module): name for name, module in model.lm.named_modules()}
    state, ranks, targets = {}, set(), []
    for layer in model.bank.layers:
        experts = layer_experts(layer, task)
        if experts is None:
            raise PredictError(f"{who} mixes {len(layer.experts)} experts per token with learned gates: its forward "
                               f"is no single LoRA. {instead}")
        ranks.add(len(experts))
        for proj, short in PROJECTIONS.items():
            module = f"{names[id(layer)]}.{proj}"
            targets.append(module)
            a = torch.cat([getattr(layer.experts[e], f"A_{short}") for e in experts])  # [E·r, in]
            b = torch.cat([getattr(layer.experts[e], f"B_{short}") for e in experts], dim=1)  # [out, E·r]
            state[f"base_model.model.{module}.lora_A.weight"] = a.detach().float().contiguous()
            state[f"base_model.model.{module}.lora_B.weight"] = b.detach().float().contiguous()
    if len(ranks) != 1:
        raise PredictError(f"{who}: its layers hold different numbers of experts ({sorted(ranks)}), so no one "
                           f"adapter rank. {instead}")
    experts, bank = ranks.pop(), model.bank.config
    # E experts side by side are one LoRA of rank E·r; alpha E·alpha keeps peft's scaling alpha / rank.
    lora = LoraConfig(r=bank.rank * experts, lora_alpha=bank.alpha * experts, lora_dropout=bank.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_path)
    peft_model = get_peft_model(base_lm, lora)
    loaded = set_peft_model_state_dict(peft_model, state)
    if loaded.unexpected_keys:
        raise RuntimeError(f"peft did not take these bank tensors: {loaded.unexpected_keys[:3]}")
    return peft_model.eval()


def export_adapter(run_dir: Path, out: Path, bank_of: str | None = None, task_name: str | None = None) -> dict:
    """Write the PEFT adapter of the bank (after `bank_of`, default the latest) for task `task_name`
    into the new folder `out`; returns what `clpipe.json` records."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PredictError(f"--to {out}: exists and is not an empty folder; name a new one")
    predictor = Predictor(run_dir, bank_of)
    cfg, run = predictor.cfg, predictor.cfg.run_id
    if cfg.objective != "lm":
        raise PredictError(f"run {run}: objective {cfg.objective!r} answers through per-task classification heads, "
                           f"which a LoRA adapter cannot carry. " + NOT_A_LORA.format(run=run))
    task = adapter_task(predictor, task_name)
    model = predictor.stage.model
    base_lm, _ = load_base_model(predictor.base)  # untouched: the bank's layers replaced the other's MLPs
    peft_model = peft_adapter(model, base_lm, task, predictor.base.path,
                              f"run {run}: method {cfg.method.name}", NOT_A_LORA.format(run=run))
    # A LoRA per task serves its task; one LoRA for all serves every task of the bank, each with its template.
    served = [task] if isinstance(model.bank.layers[0].router, TaskRouter) else range(len(predictor.tasks))
    info = {"run": run, "bank_after_task": predictor.tasks[-1], "bank_sha256": predictor.bank_sha256,
            "method": cfg.method.name, "base_model": predictor.base.model_dump(),
            "tasks": {predictor.tasks[t]: {"template": predictor.formats[t].template,
                                           "labels": list(predictor.formats[t].verbalizers),
                                           "max_length": predictor.formats[t].max_length} for t in served}}
    tmp = staging_dir(out)
    peft_model.save_pretrained(tmp)
    (tmp / "clpipe.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        out.rmdir()  # empty, checked above
    if not publish_dir(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        raise PredictError(f"--to {out}: another process wrote it meanwhile")
    return info
