"""Any method on a benchmark sequence in one process (see `benchmarks/in_process.py` for the
command): the pipeline's data preparation, training step and evaluation without Ray, DeepSpeed and
MLflow around them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cl_core.atomic import atomic_write_text
from cl_core.bank import growth_by_owner
from cl_core.base_model import load_tokenizer
from cl_core.methods import build_method, method_params
from cl_core.metrics import average_accuracy, backward_transfer
from cl_core.precision import base_settings, resolve_precision
from cl_core.training import Learner, evaluate_task, plan_task, task_loss_fn, train_steps
from pipelines.assembly import build_stage, materialize_base_model
from pipelines.compare import sequences
from pipelines.compare.sequences import DEFAULT_DATA, REPO, SEQUENCES, Budget
from pipelines.compare.stats import encode, t_interval, verdict
from pipelines.config import RunConfig, parse_config
from pipelines.data.tasks import load_prepared, prepare_task
from pipelines.run.stages import eval_modes
from pipelines.run.worker import micro_batches

CACHE = REPO / "runs" / "in_process"
# The prepared slice of train rows never trained on (issue 32 names it "validation").
VALIDATION_SPLIT = "validation"
SPLITS = {"validation": VALIDATION_SPLIT, "test": "test"}
MAX_GRAD_NORM = 1.0  # DeepSpeed's gradient_clipping in the pipeline's engine config


def run_config(method: str, params: dict, sequence: str, seed: int, budget: Budget, data: Path = DEFAULT_DATA,
               validation_examples: int = 100, tasks: list[str] | None = None) -> RunConfig:
    """The continual-learning benchmark's run of `method` with `params` at `seed`."""
    if tasks is None and sequence not in SEQUENCES:
        raise SystemExit(f"sequence {sequence!r}: expected one of {sorted(SEQUENCES)} (or give its tasks)")
    order = SEQUENCES[sequence] if tasks is None else tasks
    cfg = sequences.run_config(method, sequence, order, seed, data, budget)
    cfg["method"] = {"name": method, "params": params}
    cfg["eval"]["validation_examples"] = validation_examples
    return parse_config(cfg, f"in_process/{method}/{sequence}/s{seed}")


def ordered_batches(objective, examples: list[dict], size: int):
    """The task's rows in order, in batches: what the bank stage gives `after_task`."""
    return lambda: (objective.collate(examples[s:s + size]) for s in range(0, len(examples), size))


def train_task(stage, cfg: RunConfig, task: int, paths: list[str]) -> None:
    """One task as the plan, train and bank stages do it, on the live model."""
    model, objective, method = stage.model, stage.objective, stage.method
    current = load_prepared(paths[task], "train")
    if method.plans_tasks:
        extras = set(model.extras)
        model.eval()
        torch.manual_seed(cfg.training.seed * 1000 + task)
        plan_task(model, objective, method, task, ordered_batches(objective, current, cfg.training.batch_size))
        for name in set(model.extras) - extras:  # the plan stage keeps no probe head
            del model.extras[name]
            del model.extra_specs[name]
    torch.manual_seed(cfg.training.seed * 1000 + task)
    method.setup_task(model, task)
    objective.setup_task(model, task)
    earlier = [load_prepared(p, "train") for p in paths[:task]] if method.uses_earlier_examples else []
    examples = method.training_examples(task, current, earlier, cfg.training.seed)
    schedule = micro_batches(len(examples), cfg, task, 0, 1, n_task=len(current))
    train_steps(Learner(model, objective, method), (objective.collate([examples[i] for i in chunk]) for chunk in schedule),
                lr=cfg.training.lr, max_grad_norm=MAX_GRAD_NORM)
    model.eval()
    method.after_task(model, task, ordered_batches(objective, current, cfg.training.batch_size),
                      task_loss_fn(model, objective, method))


def matrix(correct: list[list[list[int]]]) -> np.ndarray:
    """Accuracy matrix in points from correct[i][j] (j ≤ i); NaN above the diagonal."""
    n = len(correct)
    return np.array([[100 * np.mean(correct[i][j]) if j <= i else np.nan for j in range(n)] for i in range(n)])


def prepared_stage(cfg: RunConfig, cache: Path = CACHE) -> tuple[object, list[dict], str]:
    """(the stage's model, objective and method with an empty bank; each task's prepared data
    summary; the precision) for a run in this process."""
    if cfg.training.grad_accum != 1:
        raise ValueError("training.grad_accum: the in-process loop steps after every micro batch (1)")
    cpu = torch.device("cpu")
    precision = resolve_precision(cfg.training.precision, cpu)
    base = materialize_base_model(cfg, cache / "models").model_copy(update=base_settings(precision, cpu))
    tokenizer = load_tokenizer(base)
    summaries = [prepare_task(t, i, tokenizer, base.source, cfg.training.max_length, cfg.training.seed, cfg.data,
                              cache / "data", cfg.eval.validation_examples) for i, t in enumerate(cfg.tasks)]
    return build_stage(cfg, base), summaries, precision


def run(method: str, params: dict, sequence: str, seed: int, budget: Budget, data: Path = DEFAULT_DATA,
        cache: Path = CACHE, validation_examples: int = 100, tasks: list[str] | None = None,
        inference: dict[str, dict] | None = None) -> dict:
    """One run: per split ("validation", "test") and task-id mode, the accuracy matrix R (points),
    AA, BwT and the per-example correctness after task i on task j (`cl_stats.encode`d).

    `inference`: name → parameters that change only how the method answers (e.g. MoE-CL's
    `shared_inference`): the same trained model is also evaluated under each, in
    out["inference"][name] (same structure), at the cost of its evaluations only."""
    cfg = run_config(method, params, sequence, seed, budget, data, validation_examples, tasks)
    stage, summaries, precision = prepared_stage(cfg, cache)
    paths = [s["path"] for s in summaries]
    modes = eval_modes(cfg, stage.method)
    answering = {None: stage.method}
    for name, overrides in (inference or {}).items():
        answering[name] = build_method(method, method_params(method, {**params, **overrides}), stage.method.task_labels)
    start = time.perf_counter()
    correct = {name: {split: {mode: [] for mode in modes} for split in SPLITS} for name in answering}
    for task in range(len(paths)):
        train_task(stage, cfg, task, paths)
        for name, answers in answering.items():
            for split, prepared in SPLITS.items():
                for mode in modes:
                    correct[name][split][mode].append([
                        evaluate_task(stage.model, stage.objective, answers, load_prepared(p, prepared),
                                      cfg.eval.batch_size, mode)["correct"] for p in paths[:task + 1]])
    out = {"method": method, "params": params, "sequence": sequence, "order": [t.name for t in cfg.tasks],
           "seed": seed, "precision": precision, "wall_s": round(time.perf_counter() - start, 1),
           "n": {split: [summary["splits"][prepared]["rows"] for summary in summaries]
                 for split, prepared in SPLITS.items()},
           # experts and parameters per owner ("shared", task index) in the final bank
           "bank": growth_by_owner(stage.model.bank.structure(),
                                   {k: list(v.shape) for k, v in stage.model.bank.state_dict().items()}),
           **scores(correct[None])}
    if inference:
        out["inference"] = {name: {"params": inference[name], **scores(correct[name])} for name in inference}
    return out


def scores(correct: dict[str, dict[str, list]]) -> dict:
    """split → mode → AA, BwT, R and the encoded correctness."""
    out = {}
    for split, by_mode in correct.items():
        out[split] = {}
        for mode, cells in by_mode.items():
            R = matrix(cells)
            out[split][mode] = {"AA": average_accuracy(R), "BwT": backward_transfer(R), "R": np.round(R, 2).tolist(),
                                "correct": encode(cells)}
    return out


class Results:
    """A results file of in-process runs: rows by (label, sequence, seed), one budget per file."""

    def __init__(self, path: Path, budget: Budget, validation_examples: int):
        self.path = path
        self.header = {"budget": asdict(budget), "validation_examples": validation_examples}
        self.rows: list[dict] = []
        if path.exists():
            saved = json.loads(path.read_text())
            if {k: saved.get(k) for k in self.header} != self.header:
                raise SystemExit(f"{path} was made with {({k: saved.get(k) for k in self.header})}, not "
                                 f"{self.header}: give the same budget to continue it, or another --out")
            self.rows = saved["runs"]

    def finished(self, label: str, sequence: str, seed: int) -> dict | None:
        return next((r for r in self.rows if (r["label"], r["sequence"], r["seed"]) == (label, sequence, seed)), None)

    def check_label(self, label: str, method: str, params: dict) -> None:
        """A label names one (method, params) in a file: its rows pool over seeds."""
        for r in self.rows:
            if r["label"] == label and (r["method"], r["params"]) != (method, params):
                raise SystemExit(f"{self.path}: label {label!r} ran {r['method']} {r['params']}, not {method} {params}")

    def add(self, *rows: dict) -> None:
        """Append `rows` to what the file holds now: another process may have added rows since
        this one read it (runs of other labels into the same file, one at a time)."""
        on_disk = json.loads(self.path.read_text())["runs"] if self.path.exists() else []
        merged = {(r["label"], r["sequence"], r["seed"]): r for r in on_disk}
        for row in [*self.rows, *rows]:
            merged.setdefault((row["label"], row["sequence"], row["seed"]), row)
        self.rows = list(merged.values())
        atomic_write_text(self.path, json.dumps({**self.header, "runs": self.rows}))


def paired(rows_a: list[dict], rows_b: list[dict], measure: str, split: str = "validation",
           mode: str = "oracle") -> dict | None:
    """a − b of `measure` ("AA", "BwT") on one sequence, seed by seed over the seeds both have:
    each seed's difference, their mean, its 95% t-interval and the verdict; None without a
    common seed. Same seed, same validation and test rows: the pairs share their examples."""
    a = {r["seed"]: r[split][mode][measure] for r in rows_a}
    b = {r["seed"]: r[split][mode][measure] for r in rows_b}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    differences = [a[s] - b[s] for s in seeds]
    interval = t_interval(differences) if len(differences) > 1 else None
    return {"seeds": seeds, "per_seed": [round(d, 2) for d in differences], "difference": float(np.mean(differences)),
            "ci95": None if interval is None else [round(v, 2) for v in interval],
            "verdict": "one seed: not decided" if interval is None else verdict(*interval)}


@contextlib.contextmanager
def held(lock: Path | None):
    """The machine-wide lock for heavy jobs, held for one run (None: no lock)."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_missing(results: Results, label: str, method: str, params: dict, sequences: list[str], seeds: list[int],
                budget: Budget, lock: Path | None = None, inference: dict[str, dict] | None = None,
                **kwargs) -> list[dict]:
    """Every (sequence, seed) of `label` that the results file lacks, one at a time; each row is
    written as it finishes, and beside it a row "<label>@<name>" per `inference` variant (the
    same training answering with those parameters). Returns the rows, finished earlier or now."""
    results.check_label(label, method, params)
    for name, overrides in (inference or {}).items():
        results.check_label(f"{label}@{name}", method, {**params, **overrides})
    rows = []
    for seed in seeds:
        for sequence in sequences:
            row = results.finished(label, sequence, seed)
            if row is None:
                with held(lock):
                    row = {"label": label, **run(method, params, sequence, seed, budget, inference=inference,
                                                 validation_examples=results.header["validation_examples"], **kwargs)}
                variants = [{**row, "label": f"{label}@{name}", "params": {**params, **variant.pop("params")},
                             "trained_as": label, **variant} for name, variant in row.pop("inference", {}).items()]
                results.add(row, *variants)
                for finished in (row, *variants):
                    report(finished)
            rows.append(row)
    return rows


def report(row: dict) -> None:
    val, test = row["validation"]["oracle"], row["test"]["oracle"]
    print(f"{row['label']} {row['sequence']} seed {row['seed']}: validation AA {val['AA']:.1f} BwT {val['BwT']:+.1f}; "
          f"test AA {test['AA']:.1f} BwT {test['BwT']:+.1f} ({row['wall_s']:.0f} s)", flush=True)
