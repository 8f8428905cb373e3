"""Which part of a SETA run's final bank loses its earlier tasks: the shared experts' drift or the
later tasks' unique experts and router rows (`benchmarks.seta_drift` runs it on a run folder).

For each earlier task j, on its test split with the task id given (`oracle`, as the accuracy
matrix is scored) and the run's own banks:
- `bank_j`: the bank after task j as it is (R[j, j], up to CPU thread-count rounding in bf16);
- `final`: the final bank as it is (the last row of the matrix);
- `final_with_bank_j_shared`: the final bank with the shared parameters (shared experts' LoRA
  factors and their router rows, `seta.shared_parameters`) as they were after task j, so that
  only the later unique experts and their rows differ from bank j;
- `bank_j_with_final_shared`: bank j with the final shared parameters, so that only the shared
  drift differs (no later expert exists in it).
Everything else in SETA's bank is frozen after its task, so these split the forgetting between
the two. Banks load as `clpipe predict` loads them (`Predictor`: the run's base and precision).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cl_core.methods.seta import shared_parameters
from cl_core.training import evaluate_task
from pipelines.data.tasks import load_prepared
from pipelines.run.ledger import StageKey
from pipelines.run.results import read_run
from pipelines.serve.predict import Predictor


def shared_values(stage) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in shared_parameters(stage.model).items()}


@torch.no_grad()
def set_shared(stage, values: dict[str, torch.Tensor]) -> None:
    for k, p in shared_parameters(stage.model).items():
        p.copy_(values[k])


def drift_split(run_dir: Path) -> dict[str, dict[str, float]]:
    cfg, ledger = read_run(run_dir)
    if cfg.method.name != "seta":
        raise ValueError(f"{run_dir}: a {cfg.method.name} run; this splits a seta run's forgetting")
    names = [t.name for t in cfg.tasks]
    last = len(names) - 1

    def accuracy(stage, test: list[dict]) -> float:
        return 100 * evaluate_task(stage.model, stage.objective, stage.method, test, cfg.eval.batch_size,
                                   "oracle")["accuracy"]

    final = Predictor(run_dir, bank_of=names[last]).stage  # names the missing bank if there is none
    final_shared = shared_values(final)
    split = {}
    for j in range(last):
        test = load_prepared(ledger.outputs(StageKey("prepare", j))["path"], "test")
        own = Predictor(run_dir, bank_of=names[j]).stage
        own_shared = shared_values(own)
        row = {"bank_j": accuracy(own, test), "final": accuracy(final, test)}
        set_shared(final, own_shared)
        row["final_with_bank_j_shared"] = accuracy(final, test)
        set_shared(final, final_shared)
        set_shared(own, final_shared)
        row["bank_j_with_final_shared"] = accuracy(own, test)
        split[names[j]] = row
    return split
