"""One training step and one evaluation pass, shared by the tests, the benchmarks and the Ray
Train workers (which wrap `Learner` in a DeepSpeed engine)."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from cl_core.continual_model import ContinualModel
from cl_core.metrics import decisions_at, strip_rate
from cl_core.objectives import collate_prompts


class Learner(nn.Module):
    """The module an optimizer (or a DeepSpeed engine) trains: forward(batch) → (loss, logs)."""

    def __init__(self, model: ContinualModel, objective, method):
        super().__init__()
        self.model = model
        self.objective = objective
        self.method = method

    def forward(self, batch: dict[str, torch.Tensor], diagnose: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """`diagnose` also asks the method for its costly figures (e.g. gradient norms): the
        training loops ask on the steps whose logs they send."""
        method_logs: dict[str, float] = {}
        task_loss, extra = routed_losses(self.model, self.objective, self.method, batch,
                                         method_logs=method_logs, diagnose=diagnose)
        loss = task_loss + sum(extra.values())
        logs = {"loss": float(loss.detach()), "loss/task": float(task_loss.detach())}
        logs.update({f"loss/{k}": float(v.detach()) for k, v in extra.items()})
        logs.update(method_logs)
        return loss, logs


def routed_losses(model: ContinualModel, objective, method, batch: dict[str, torch.Tensor],
                  method_terms: bool = True, method_logs: dict[str, float] | None = None,
                  diagnose: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss with the batch routed as the method routes it in training, and (if
    `method_terms`) the method's own loss terms, which read what routing captured; the method's
    training figures go to `method_logs` where given."""
    fields = method.routing_fields(model, batch, training=True)
    with model.bank.routing(attention_mask=batch["attention_mask"], **fields) as ctx:
        task_loss = objective.loss(model, batch)
        extra = method.extra_losses(model, batch, ctx) if method_terms else {}
        if method_logs is not None:
            method_logs.update(method.training_logs(model, ctx, task_loss, extra, diagnose))
    return task_loss, extra


def task_loss_fn(model: ContinualModel, objective, method) -> Callable[[dict], torch.Tensor]:
    """batch → the routed objective loss alone: what a probe or a Fisher pass differentiates."""
    return lambda batch: routed_losses(model, objective, method, batch, method_terms=False)[0]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def build_optimizer(learner: Learner, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in the parameter groups (learning rate, weight decay)
    the method sets: the same optimizer for the in-process loop and the Ray Train workers."""
    return torch.optim.AdamW(learner.method.param_groups(learner.model, trainable_parameters(learner), lr))


def train_steps(learner: Learner, batches: Iterable[dict], lr: float = 1e-3,
                max_grad_norm: float | None = None) -> list[dict[str, float]]:
    """A plain single-process loop (see `build_optimizer`); returns every step's logs
    (`Learner` logs: "loss" and each loss term).

    `max_grad_norm` clips the global gradient norm as the pipeline's DeepSpeed engine does
    (`gradient_clipping`). The method's `after_step` runs after every optimizer step."""
    optimizer = build_optimizer(learner, lr)
    learner.train()
    logs = []
    for batch in batches:
        loss, log = learner(batch)
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(learner), max_grad_norm)
        optimizer.step()
        learner.method.after_step(learner.model)
        logs.append(log)
    learner.eval()
    return logs


def plan_task(model: ContinualModel, objective, method, task: int, batches: Callable[[], Iterable[dict]]) -> None:
    """Run the method's `plan_task` (if it has one) before `setup_task`: the objective is set up
    first, since the probe's loss may need what it adds (e.g. the task's head)."""
    if not method.plans_tasks:
        return
    objective.setup_task(model, task)
    method.plan_task(model, task, batches, task_loss_fn(model, objective, method))


def routing_for_eval(model: ContinualModel, method, batch: dict, task_id_mode: str) -> dict:
    """Routing fields at evaluation: the true task id ('oracle') or the method's own guess ('inferred')."""
    fields = method.routing_fields(model, batch, training=False)
    if task_id_mode == "inferred":
        inferred = method.infer_task_ids(model, batch)
        if inferred is None:
            raise ValueError(f"method {method.name} cannot route without a task id")
        fields["task_ids"] = inferred
    elif task_id_mode != "oracle":
        raise ValueError(f"eval.task_id {task_id_mode!r}: expected oracle or inferred")
    return fields


@torch.no_grad()
def predict_probs(model: ContinualModel, objective, method, examples: list[dict], batch_size: int = 16,
                  task_id_mode: str = "oracle", on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """[n, C] label probabilities of one task's encoded examples, in order and batches of
    `batch_size`: what evaluation scores and what `clpipe predict` answers with. `on_batch(done)`
    after each batch, with the examples done so far (progress lines). `method` None: a model with
    an empty bank, which routes nothing."""
    model.eval()
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = to_device(collate_prompts(chunk, objective.pad_id), device)
        fields = routing_for_eval(model, method, batch, task_id_mode) if method is not None else {}
        probs.append(objective.predict(model, chunk, fields).cpu())
        if on_batch is not None:
            on_batch(start + len(chunk))
    return torch.cat(probs)


def evaluate_task(model: ContinualModel, objective, method, examples: list[dict], batch_size: int = 16,
                  task_id_mode: str = "oracle", target_precision: float = 0.9,
                  thresholds: list[float | None] | None = None,
                  on_batch: Callable[[int], None] | None = None) -> dict:
    """Accuracy and strip rate of the model on one task's encoded examples, and whether each
    example was answered correctly (for intervals over test examples).

    `strip_rate` picks its thresholds on these examples (an upper bound); with `thresholds` fixed
    in advance (see `calibrated_thresholds`), also what they decide: `strip_rate_calibrated` and
    `precision_calibrated`.
    """
    p = predict_probs(model, objective, method, examples, batch_size, task_id_mode, on_batch).numpy().astype(np.float64)
    y = np.array([ex["label"] for ex in examples])
    correct = p.argmax(1) == y
    out = {"accuracy": float(correct.mean()), "strip_rate": strip_rate(p, y, target_precision).macro,
           "n": len(y), "correct": correct.astype(int).tolist()}
    if thresholds is not None:
        decided = decisions_at(p, y, thresholds)
        out.update(strip_rate_calibrated=decided.strip_rate.macro, precision_calibrated=decided.precision)
    return out
