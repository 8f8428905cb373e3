"""How much of each task's text the benchmark's prompts keep at its max length.

    python -m benchmarks.prompt_lengths [--sequence long] [--max-length 96] [--model smollm2]

For every task of the sequence, on its test split, with cl_quality's template and labels: the
share of prompts whose text the pipeline cuts (`cl_core.objectives.encode_prompt` keeps the
template, the option list and room for the longest answer, and cuts the text's end), and the
median text length in tokens. A task whose question comes after its passage (multirc: passage,
question, candidate answer; rte and cb: sentence 1, then sentence 2) loses the part that decides
the label when its text is cut. Tokenizer only, no model weights. Writes
`benchmarks/results/prompt_lengths.json` (or --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipelines.compare.sequences import DEFAULT_DATA, MODELS, REPO, RESULTS, SEQUENCES, Budget, run_config
from cl_core.atomic import atomic_write_text
from cl_core.base_model import ModelSpec, load_tokenizer
from cl_core.objectives import encode_prompt
from pipelines.compare.docs import after_writing
from pipelines.config import RunConfig
from pipelines.data.tasks import load_split, task_format


def task_lengths(cfg: RunConfig, tokenizer, max_length: int) -> dict[str, dict]:
    """Per task: test prompts, the share whose text is cut at `max_length`, the median text tokens."""
    out = {}
    for t, task in enumerate(cfg.tasks):
        rows = load_split(task, "test", t, cfg.data).rows
        cut = [len(encode_prompt(tokenizer, task_format(task, max_length), r["text"])) <
               len(encode_prompt(tokenizer, task_format(task, 1 << 20), r["text"])) for r in rows]
        out[task.name] = {"prompts": len(rows), "cut_share": round(100 * float(np.mean(cut)), 1),
                          "median_text_tokens": int(np.median([len(tokenizer.encode(r["text"], add_special_tokens=False))
                                                               for r in rows]))}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", default="long", choices=sorted(SEQUENCES))
    parser.add_argument("--max-length", type=int, default=Budget().max_length)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS / "prompt_lengths.json")
    args = parser.parse_args(argv)
    budget = Budget(model=args.model, max_length=args.max_length)
    cfg = RunConfig.model_validate(run_config("seq_lora", args.sequence, SEQUENCES[args.sequence], 0, args.data, budget))
    tokenizer = load_tokenizer(ModelSpec(**MODELS[args.model]))
    lengths = task_lengths(cfg, tokenizer, args.max_length)
    for task, figures in lengths.items():
        print(f"{task:12s} {figures['cut_share']:5.1f}% cut, median text {figures['median_text_tokens']} tokens")
    atomic_write_text(args.out, json.dumps({"prompt_lengths": {"sequence": args.sequence, "model": args.model,
                                                               "max_length": args.max_length, "tasks": lengths}},
                                           indent=1))
    after_writing(args.out, REPO)


if __name__ == "__main__":
    main()
