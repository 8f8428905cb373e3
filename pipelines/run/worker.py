"""The Ray Train worker loop of a train stage: a DeepSpeed ZeRO engine over the stage's Learner.

Runs in every worker of a `TorchTrainer`. The engine is built fresh for each task stage, after
the method has frozen what must not train (DeepSpeed ignores `requires_grad` changes made after
`initialize`). Every `checkpoint_every` steps, all ranks write the engine state, their RNG state
and (rank 0) the consolidated bank tensors into one Ray Train checkpoint; a restarted worker
group resumes from the latest one and continues bit-identically.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cl_core.training import Learner, build_optimizer, to_device
from pipelines.assembly import Stage, build_stage
from pipelines.config import RunConfig
from pipelines.data.tasks import load_prepared
from pipelines.run.progress import StageProgress

ENGINE_TAG = "engine"
BANK_TENSORS = "bank_tensors.safetensors"
PROGRESS = "progress.json"
LOG_EVERY = 10  # steps per batch of losses sent to MLflow and per progress report to Ray Train


def skip_shm_jit() -> None:
    """On CPU, stop DeepSpeed g++-building its shared-memory comm op at start-up (~47 s, and it
    fails without a compiler); gloo does not need it. The module is reached through sys.modules
    because the attribute path `deepspeed.comm.torch` resolves to the real torch."""
    import deepspeed  # noqa: F401  (loads deepspeed.comm.torch)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def deepspeed_config(cfg: RunConfig, largest_bank_param: int) -> dict:
    """The engine config: a user's JSON if given, else one from `deepspeed.*`; batch sizes from `training.*`.

    Under ZeRO-3 the bank stays replicated and only the frozen base model is partitioned: the
    persistence threshold is raised to the largest bank tensor (LoRA factors, gates; kilobytes).
    Routing calls gates and experts depending on the data, and the discriminator reads features
    outside the layer's output; replicated bank tensors need no gather for either, so ranks never
    wait on each other for them (ZeRO-3 hangs or fails when ranks touch different partitioned
    parameters). A read outside every layer's forward (MoE-CL's anchor) still needs them
    registered with the learner: see `train_loop`.
    """
    ds = cfg.deepspeed.settings()  # read where the config was loaded: a worker on another node has no path
    if ds is None:
        ds = {"zero_optimization": {"stage": cfg.deepspeed.zero_stage}}
    zero = ds.setdefault("zero_optimization", {"stage": cfg.deepspeed.zero_stage})
    if cfg.deepspeed.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        ds["zero_force_ds_cpu_optimizer"] = False  # keep torch's AdamW: no CPUAdam JIT build
    if zero.get("stage") == 3:
        wanted = cfg.deepspeed.persistence_threshold
        if wanted is None:
            wanted = zero.get("stage3_param_persistence_threshold", 100_000)  # DeepSpeed's default
        zero["stage3_param_persistence_threshold"] = max(wanted, largest_bank_param)
    ds["train_micro_batch_size_per_gpu"] = cfg.training.batch_size
    ds["gradient_accumulation_steps"] = cfg.training.grad_accum
    ds.setdefault("gradient_clipping", 1.0)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def epoch_order(n: int, seed: int, task: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}-{task}-{epoch}").shuffle(order)
    return order


def micro_batches(n_examples: int, cfg: RunConfig, task: int, rank: int, world: int,
                  n_task: int | None = None) -> list[list[int]]:
    """Every micro batch of this rank for the whole stage, in order: a pure function of the config,
    so a resumed stage picks up at exactly the step it stopped.

    An epoch is `n_task` examples (the task's own training set), whatever `n_examples` the method
    trains on: every method gets the same optimizer steps per task, and one that adds earlier
    tasks' examples (replay, MTL) draws each epoch's `n_task` from all `n_examples`, reshuffled."""
    size, accum = cfg.training.batch_size, cfg.training.grad_accum
    per_rank = math.ceil((n_examples if n_task is None else n_task) / world)  # equal on every rank
    out = []
    for epoch in range(cfg.training.epochs):
        order = epoch_order(n_examples, cfg.training.seed, task, epoch)
        mine = [order[i % n_examples] for i in range(rank, per_rank * world, world)]
        chunks = [mine[s:s + size] for s in range(0, len(mine), size)]
        # Whole accumulation cycles only, so no optimizer step is left partial.
        out += chunks + chunks[: -len(chunks) % accum]
    return out


def _gathered_bank_tensors(engine, learner: Learner, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole bank on rank 0; under ZeRO-3 the partitions are gathered first (a collective)."""
    import deepspeed

    model = learner.model
    with deepspeed.zero.GatheredParameters(model.bank_parameters(), enabled=zero_stage == 3):
        return {k: v.detach().clone().cpu() for k, v in model.bank_state_dict().items()}


def checkpoint_only_trainable(learner: torch.nn.Module) -> None:
    """Make the learner's state_dict, which DeepSpeed's checkpoint saves, hold no frozen parameter.

    DeepSpeed's `exclude_frozen_parameters` drops the names `named_parameters()` yields, and that
    yields a tied weight once: its other name stayed (SmolLM2's tied lm_head, 113 MB of each 119 MB
    checkpoint). Resuming needs only the trainable tensors, the optimizer and the RNG state."""
    frozen = [n for n, p in learner.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def drop_frozen(module, state, prefix, local_metadata):
        for name in frozen:
            state.pop(prefix + name, None)

    learner.register_state_dict_post_hook(drop_frozen)


@dataclass
class StageRun:
    """What a train stage's worker holds: its rank, the engine over the stage's learner, and the
    whole stage's micro batches (`schedule`, indices into `examples`)."""

    cfg: RunConfig
    task: int
    rank: int
    world: int
    stage: Stage
    learner: Learner
    engine: Any
    zero_stage: int
    partitioned: int
    examples: list[dict]
    schedule: list[list[int]]


def build(config: dict) -> StageRun:
    """The stage's model set up for its task, its DeepSpeed engine, and its micro batches."""
    import deepspeed
    import ray.train

    skip_shm_jit()
    cfg: RunConfig = config["run_config"]  # validated by the driver, pickled by Ray
    task = config["task"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))

    stage = build_stage(cfg, config["base_model"], config.get("parent_bank") and Path(config["parent_bank"]),
                        setup_task=task)
    learner = Learner(stage.model, stage.objective, stage.method)
    checkpoint_only_trainable(learner)
    optimizer = build_optimizer(learner, cfg.training.lr)
    ds_config = deepspeed_config(cfg, max(p.numel() for p in stage.model.bank_parameters()))
    engine, _, _, _ = deepspeed.initialize(model=learner, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    zero_stage = ds_config["zero_optimization"].get("stage", 0)
    partitioned = sum(not getattr(p, "ds_persist", True) for p in learner.parameters())
    if zero_stage == 3:
        # A method may read bank tensors outside their layer's forward (an anchor to their earlier
        # values): registered with the learner, DeepSpeed gathers them for its whole forward.
        for p in stage.model.bank_parameters():
            deepspeed.zero.register_external_parameter(learner, p)

    current = load_prepared(config["data"][task], "train")
    earlier = [load_prepared(p, "train") for p in config["data"][:task]] if stage.method.uses_earlier_examples else []
    examples = stage.method.training_examples(task, current, earlier, cfg.training.seed)
    schedule = micro_batches(len(examples), cfg, task, rank, world, n_task=len(current))
    return StageRun(cfg, task, rank, world, stage, learner, engine, zero_stage, partitioned, examples, schedule)


def restore(run: StageRun) -> tuple[int, dict | None]:
    """Engine, RNG and method state from Ray Train's latest checkpoint, if any. Returns the step to
    start at, and the metrics that checkpoint reported when it is the stage's last (the stage is
    done; it is reported again, e.g. after the durable copy of its tensors was found damaged)."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, None
    with checkpoint.as_directory() as d:
        run.engine.load_checkpoint(d, tag=ENGINE_TAG, load_module_strict=False)
        progress = json.loads((Path(d) / PROGRESS).read_text())
        # Method state (e.g. dual_router's EMA) is not a module buffer: restore it from the bank tensors.
        if (Path(d) / BANK_TENSORS).exists():
            saved = load_file(str(Path(d) / BANK_TENSORS))
            run.stage.model.method_state = {k[6:]: v.to(run.engine.device) for k, v in saved.items()
                                            if k.startswith("state.")}
        torch.set_rng_state(torch.load(Path(d) / f"rng_rank{run.rank}.pt", weights_only=True))
    finished = progress["step"] == len(run.schedule) and "metrics" in progress
    return progress["step"], progress["metrics"] if finished else None


def step(run: StageRun, index: int) -> tuple[dict, float]:
    """One micro batch: forward, backward, the engine's step (an optimizer step at the end of an
    accumulation cycle). Returns its logs (the loss averaged over ranks) and its tokens on all ranks."""
    import torch.distributed as dist

    step_start = time.perf_counter()
    stage, engine = run.stage, run.engine
    batch = to_device(stage.objective.collate([run.examples[i] for i in run.schedule[index]]), engine.device)
    # The method's costly figures on logged steps; not under ZeRO-3, where their extra backward
    # would reach base weights already released to their partitions.
    diagnose = run.zero_stage < 3 and ((index + 1) % LOG_EVERY == 0 or index + 1 == len(run.schedule))
    loss, logs = engine(batch, diagnose=diagnose)
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()  # asked before step() advances the count
    engine.step()
    if boundary:  # an optimizer step happened
        stage.method.after_step(stage.model)
    totals = torch.stack([loss.detach().float(), batch["attention_mask"].sum().float()])  # over all ranks
    dist.all_reduce(totals)
    logs["loss"] = float(totals[0]) / run.world
    logs["tokens_per_s"] = float(totals[1]) / (time.perf_counter() - step_start)
    return logs, float(totals[1])


def save(run: StageRun, metrics: dict) -> None:
    """A Ray Train checkpoint of every rank's engine shards and RNG state, and (rank 0) the
    consolidated bank tensors and the progress with the metrics reported beside it."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        # Collective: every rank writes its shards; Ray merges the ranks' folders.
        run.engine.save_checkpoint(d, tag=ENGINE_TAG, exclude_frozen_parameters=True)
        torch.save(torch.get_rng_state(), Path(d) / f"rng_rank{run.rank}.pt")
        tensors = _gathered_bank_tensors(run.engine, run.learner, run.zero_stage)
        if run.rank == 0:
            save_file(tensors, str(Path(d) / BANK_TENSORS))
            (Path(d) / PROGRESS).write_text(json.dumps({"step": metrics["step"], "steps": len(run.schedule),
                                                        "metrics": metrics}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop(config: dict) -> None:
    """The stage's loop: build, restore from the latest checkpoint, then step to the end, with a
    checkpoint every `checkpoint_every` steps and at the last."""
    import ray.train

    run = build(config)
    start, finished = restore(run)
    if finished is not None:
        with ray.train.get_checkpoint().as_directory() as d:
            ray.train.report(finished, checkpoint=ray.train.Checkpoint.from_directory(d))
        return
    cfg, schedule = run.cfg, run.schedule
    meter = StageProgress(config.get("progress") if run.rank == 0 else None, len(schedule), "step", first=start)
    tracker = config.get("mlflow")
    client = None
    if tracker and run.rank == 0:
        from mlflow import MlflowClient
        client = MlflowClient(tracker["tracking_uri"])
    every = cfg.training.checkpoint_every
    pending, started, checkpoint_s, tokens = [], time.perf_counter(), 0.0, 0.0
    for index in range(start, len(schedule)):
        logs, step_tokens = step(run, index)
        tokens += step_tokens
        done = index + 1
        meter.update(done, loss=logs["loss"], tokens_per_s=tokens / (time.perf_counter() - started - checkpoint_s))
        pending.append((done, logs))
        last = done == len(schedule)
        if client is not None and (done % LOG_EVERY == 0 or last):
            _log_losses(client, tracker["run_id"], pending)
        if done % LOG_EVERY == 0 or last:
            pending = []
        metrics = {"step": done, "steps": len(schedule), "loss": logs["loss"], "resumed_from": start,
                   "partitioned_params": run.partitioned, "node_id": ray.get_runtime_context().get_node_id(),
                   # Training compute only: checkpoint I/O is orchestration overhead.
                   "compute_s": time.perf_counter() - started - checkpoint_s}
        if done % every == 0 or last:
            checkpoint_start = time.perf_counter()
            save(run, metrics)
            checkpoint_s += time.perf_counter() - checkpoint_start
        elif done % LOG_EVERY == 0:
            ray.train.report(metrics)


def _log_losses(client, run_id: str, pending: list[tuple[int, dict]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"train/{k}", v, now, step) for step, logs in pending for k, v in logs.items()]
    try:
        client.log_batch(run_id, metrics=metrics)
    except Exception as e:  # tracking must never cost training progress
        print(f"[clpipe] MLflow logging failed, training continues: {e}", file=sys.stderr)
