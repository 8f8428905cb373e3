"""The continual-learning benchmark's sequences, prompts, budget and run configs: what
`benchmarks.cl_quality` runs through the pipeline and `pipelines.compare.in_process` runs in one process."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cl_core.methods import METHODS
from pipelines.compare.plan import Plan

STANDARD = {"standard_o1": ["dbpedia", "amazon", "yelp", "agnews"],
            "standard_o2": ["dbpedia", "amazon", "agnews", "yelp"],
            "standard_o3": ["yelp", "amazon", "agnews", "dbpedia"]}
SEQUENCES = {
    "order1": ["bbc_news_topic", "vader_movieReviewSnippets", "spamassassin", "foldoc_subject"],
    "multiemo": ["multiemo_hotels", "multiemo_medicine", "multiemo_products", "multiemo_reviews"],
    **STANDARD,
    "long": ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "multirc",
             "boolq", "wic"],
}
# The field's sequences pooled over their orders in the aggregate (t over orders).
POOLED = {"standard": tuple(STANDARD)}
# O-LoRA's instruction per task type, verbatim from its configs/instruction_config.json, with its
# option list and "Answer:" (its loader's "Task:/Dataset:" lines are left out: they name the task,
# which a router without a task id must not be told). Fixed once, before any result; not tuned.
INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"?',
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning?',
    "SC": "What is the sentiment of the following paragraph?",
    "TC": "What is the topic of the following paragraph?",
    "BoolQA": "According to the following passage, is the question true or false?",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false?",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence?",
}
TASK_TYPES = {"dbpedia": "TC", "agnews": "TC", "amazon": "SC", "yelp": "SC", "imdb": "SC", "sst2": "SC",
              "mnli": "NLI", "cb": "NLI", "rte": "NLI", "qqp": "QQP", "boolq": "BoolQA", "multirc": "MultiRC",
              "wic": "WiC"}
TEMPLATES = {
    # The prompt the shared data README measured MultiEmo with; order1's tasks use the config's default.
    **{task: "Review: {text}\nSentiment (one of: {labels}):" for task in SEQUENCES["multiemo"]},
    **{task: INSTRUCTIONS[kind] + " Choose one from the option.\nOption: {labels}\n{text}\nAnswer:"
       for task, kind in TASK_TYPES.items()},
    "copa": "{text}\nAnswer:",  # its text asks the question and names the options (A, B), as in O-LoRA
}
REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
MODELS = {"smollm2": {"kind": "smollm2"},
          "tiny": {"kind": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 256}}
# Rows beside the methods: MoE-CL without its adversarial term.
ABLATIONS = {"moe_cl_no_gan": ("moe_cl", {"adv_weight": 0.0})}
# order1 and multiemo: run at every seed; so is the strongest other non-oracle baseline at the first seed.
MULTI_SEED = ("moe_cl", "moe_cl_no_gan", "seq_lora", "replay")
GOAL_METHODS = ["moe_cl", "moe_cl_no_gan", "seq_lora", "replay", "ewc", "olora", "mocl", "seta"]
# Wall time of one SmolLM2 run (4 tasks, 16 steps per task, 200 test examples, bf16-mixed) on the
# 2-core CPU machine: what the estimate scales before any run of a results file has finished.
MEASURED_RUN_S = {"smollm2": 48 * 60}


FIELD_METHODS = ("seq_lora", "olora", "per_task_lora", "moe_cl", "moe_cl_no_gan", "replay", "mtl")
FIELD_MULTI_SEED = ("seq_lora", "olora", "moe_cl", "moe_cl_no_gan")
OURS = tuple(GOAL_METHODS + sorted(set(METHODS) - set(GOAL_METHODS)))
# Issue 32's runs on the field's sequences; every method on our own two, as they were run.
PLANS = {"order1": Plan(OURS, MULTI_SEED, (0, 1, 2), strongest_other=True),
         "multiemo": Plan(OURS, MULTI_SEED, (0, 1, 2), strongest_other=True),
         "standard_o1": Plan(FIELD_METHODS + ("ewc", "seta", "cmoe", "mocl"), FIELD_MULTI_SEED, (0, 1)),
         "standard_o2": Plan(FIELD_METHODS, FIELD_MULTI_SEED, (0, 1)),
         "standard_o3": Plan(FIELD_METHODS, FIELD_MULTI_SEED, (0, 1)),
         "long": Plan(("seq_lora", "olora", "per_task_lora", "moe_cl"), FIELD_MULTI_SEED, (0,), test_examples=100)}


@dataclass(frozen=True)
class Budget:
    """What every method gets; part of every run's config and of the results file."""

    model: str = "smollm2"
    steps_per_task: int = 16
    batch_size: int = 8
    rank: int = 8
    lr: float = 1e-3
    max_length: int = 96
    test_examples: int = 200

    @property
    def train_examples(self) -> int:
        return self.steps_per_task * self.batch_size  # one epoch, no gradient accumulation

    def test_examples_on(self, sequence: str) -> int:
        cap = PLANS[sequence].test_examples if sequence in PLANS else None
        return self.test_examples if cap is None else min(cap, self.test_examples)


def method_of(label: str) -> tuple[str, dict]:
    """`label` is a method name or an ablation's: (method, its params)."""
    return ABLATIONS.get(label, (label, {}))


def task_labels(data: Path, task: str) -> list[str]:
    """Sorted distinct labels of the task's training file; a missing folder or file is named."""
    for split in ("train", "test"):
        if not (data / task / f"{split}.jsonl").is_file():
            raise SystemExit(f"--data {data}: {task}/{split}.jsonl not found (a task folder holds train.jsonl "
                             f"and test.jsonl)")
    with open(data / task / "train.jsonl") as f:
        labels = sorted({str(json.loads(line)["label"]) for line in f if line.strip()})
    if len(labels) < 2:
        raise SystemExit(f"--data {data}: {task}/train.jsonl has {len(labels)} distinct label(s); a task needs 2")
    return labels


def run_config(label: str, sequence: str, tasks: list[str], seed: int, data: Path, budget: Budget) -> dict:
    method, params = method_of(label)
    order_hash = hashlib.sha256(">".join(tasks).encode()).hexdigest()[:6]  # names the order, whatever the hash covers
    task_configs = []
    for t in tasks:
        task = {"name": t, "data": {"train": str(data / t / "train.jsonl"), "test": str(data / t / "test.jsonl")},
                "labels": task_labels(data, t), "max_train_examples": budget.train_examples,
                "max_test_examples": budget.test_examples_on(sequence)}
        if t in TEMPLATES:
            task["template"] = TEMPLATES[t]
        task_configs.append(task)
    return {
        "name": f"clq-{label}-{sequence}-{order_hash}-s{seed}",
        "model": MODELS[budget.model],
        "tasks": task_configs,
        "objective": "lm",
        "method": {"name": method, "params": params},
        "bank": {"rank": budget.rank, "alpha": 2 * budget.rank, "dropout": 0.05},
        "training": {"epochs": 1, "lr": budget.lr, "batch_size": budget.batch_size, "max_length": budget.max_length,
                     "seed": seed, "checkpoint_every": 20},
        "ray": {"num_workers": 1, "cpus_per_worker": 2},
        "eval": {"task_id": "both" if METHODS[method].method.routable else "oracle", "batch_size": 20},
        # spamassassin has a few empty messages; mnli's test file has rows labelled "-" (no gold label)
        "data": {"on_bad_rows": "skip"},
    }
