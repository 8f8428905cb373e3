"""`docs/benchmarks.md`, written from the benchmark scripts' docstrings and `benchmarks/results/*.json`,
so that the figures in the docs are the results files' and cannot drift from them.

    python -m pipelines.compare.docs [--repo .]

`benchmarks.cl_quality` rewrites it after every run it adds (and with `--report`); a test checks
that the committed page is what the results give.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path

from cl_core.atomic import atomic_write_text
from pipelines.compare.report import FIGURE, report_body, report_head

DOC = Path("docs") / "benchmarks.md"
RESULTS = Path("benchmarks") / "results"
CL_QUALITY = "cl_quality.json"
# Results of sweeps and studies run before the validation split: every choice among them read test examples.
BEFORE_VALIDATION = "chosen on test examples (before the validation split): in-sample figures"
SKIP = {"cl_quality_examples.json", "cl_quality_superseded.json"}


def usage(script: Path) -> tuple[str, list[str]]:
    """A benchmark script's summary (its docstring's first paragraph) and its command lines."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    summary = " ".join(doc.split("\n\n")[0].split())
    commands, lines = [], doc.splitlines()
    for k, line in enumerate(lines):
        if line.strip().startswith("python -m "):
            indent, parts = len(line) - len(line.lstrip()), [line.strip()]
            for more in lines[k + 1:]:  # a command's continuation lines are indented further
                if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                    break
                parts.append(more.strip())
            commands.append(" ".join(parts))
    return summary, commands


def table(records: list[dict], columns: list[str]) -> list[str]:
    def cell(value) -> str:
        return f"{value:.1f}" if isinstance(value, float) else "—" if value is None else str(value)

    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] +
            ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in records])


def sweep(data: dict) -> list[str]:
    """A `clpipe tune` sweep written down by hand: the searched parameter(s) and each trial's figures."""
    trials = data.get("trials") or data.get("trials_done") or []
    measures = ["AA", "BwT", "FwT", "forgetting", "learning_gain"]
    params = [k for k in trials[0] if k not in measures and not isinstance(trials[0][k], (list, dict)) and k != "run_id"]
    lines = [f"`{data['command']}` ({BEFORE_VALIDATION}).", ""] if "command" in data else []
    return lines + table(trials, params + measures)


def in_process_record(row: dict) -> dict:
    """An in-process run (pipelines.compare.in_process): AA and BwT on each split, task id given
    (`oracle`) and, where the method locates the task, without it (`inferred`)."""
    record = {k: row[k] for k in ("label", "sequence", "seed", "wall_s")}
    for mode, tag in (("oracle", ""), ("inferred", " no id")):
        for split, short in (("validation", "val"), ("test", "test")):
            for measure in ("AA", "BwT"):
                if mode in row[split]:
                    record[f"{short} {measure}{tag}"] = row[split][mode][measure]
    return record


def in_process_runs(data: dict) -> list[str]:
    records = [in_process_record(row) for row in data["runs"]]
    columns = list(dict.fromkeys(c for r in records for c in r))
    return ["Validation (what a choice reads) and test (reported only).", ""] + table(records, columns)


def runs_table(data: dict) -> list[str]:
    """A study's runs (a list, or a dict by variant) and its paired differences, where it has them."""
    runs = data["runs"]
    records = [{"run": k, **v} for k, v in runs.items()] if isinstance(runs, dict) else runs
    columns = [c for c in ("run", "sequence", "variant", "seed", "AA", "BwT", "wall_s") if c in records[0]]
    lines = [(BEFORE_VALIDATION if "vs_lr1" in data else "test examples; nothing was chosen on them") + ".", ""]
    lines += table(records, columns)
    differences = data.get("vs_lr1") or data.get("bf16_minus_fp32")
    if differences:
        lines += ["", "| difference | measure | value | 95% interval | interval | verdict |", "|---|---|---|---|---|---|"]
        flat = differences.items() if "vs_lr1" in data else [("bf16-mixed − fp32", differences)]
        for name, measures in flat:
            for measure, d in measures.items():
                lines.append(f"| {name} | {measure} | {d['difference']:+.1f} | [{d['ci95'][0]:+.1f}, "
                             f"{d['ci95'][1]:+.1f}] | {d.get('interval', 'examples')} | {d.get('verdict', '—')} |")
    return lines


def drift(data: dict) -> list[str]:
    records = [{"task": task, **figures} for task, figures in data["tasks"].items()]
    return [f"Run `{data['run']}`, test split, task id given.", ""] + \
        table(records, ["task", "bank_j", "final", "final_with_bank_j_shared", "bank_j_with_final_shared"])


def prompt_lengths(data: dict) -> list[str]:
    figures = data["prompt_lengths"]
    records = [{"task": task, **f} for task, f in figures["tasks"].items()]
    head = (f"Sequence `{figures['sequence']}`, {figures['model']} tokenizer, max length {figures['max_length']} tokens "
            "(prompt and answer): the share of test prompts whose text is cut.")
    return [head, ""] + table(records, ["task", "prompts", "cut_share", "median_text_tokens"])


def selection_choice(data: dict) -> list[str]:
    """A selection's summary: the choice its rule made on validation, or the runs it waits for."""
    choice = data["choice"]
    if choice["chosen"] is None:
        waiting = "; ".join(f"`{label}`: {', '.join(runs)}" for label, runs in choice["waiting_for"].items())
        return [f"Nothing chosen yet: the rule waits for {waiting}."]
    means = [{"candidate": label, "mean validation AA": aa} for label, aa in choice["mean_validation_AA"].items()]
    return ([f"Chosen on validation: `{choice['chosen']}` ({choice['method']}, `{json.dumps(choice['params'])}`).", ""]
            + table(means, ["candidate", "mean validation AA"]))


def is_paired(data) -> bool:
    """`{"sequence/label": {split: {measure: difference}}}`, as `moe_cl_selection.game_pairs` writes it."""
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and {"validation", "test"} <= set(v) for v in data.values())


def paired_differences(data: dict) -> list[str]:
    """Paired differences seed by seed: each seed's value, the mean, its 95% t-interval, the verdict."""
    lines = ["Each row: the label minus its paired twin, seed by seed, then the mean, its 95% t-interval over the "
             "seeds and the verdict (validation and test alike; nothing is chosen from them).", "",
             "| pair | split | measure | per seed | mean | 95% t-interval | verdict |", "|---|---|---|---|---|---|---|"]
    for pair, splits in data.items():
        for split in ("validation", "test"):
            for measure, d in splits[split].items():
                seeds = ", ".join(f"{v:+.2f}" for v in d["per_seed"])
                low, high = d["ci95"] or (None, None)
                interval = "—" if low is None else f"[{low:+.2f}, {high:+.2f}]"
                lines.append(f"| {pair} | {split} | {measure} | {seeds} | {d['difference']:+.2f} | {interval} | "
                             f"{d['verdict']} |")
    return lines


def other_result(data) -> list[str]:
    if is_paired(data):
        return paired_differences(data)
    if isinstance(data, dict) and "choice" in data:
        return selection_choice(data)
    if isinstance(data, dict) and isinstance(data.get("runs"), list) and data["runs"] and "validation" in data["runs"][0]:
        return in_process_runs(data)
    if isinstance(data, dict) and "prompt_lengths" in data:
        return prompt_lengths(data)
    if isinstance(data, dict) and ("trials" in data or "trials_done" in data):
        return sweep(data)
    if isinstance(data, dict) and "runs" in data:
        return runs_table(data)
    if isinstance(data, dict) and "tasks" in data and "run" in data:
        return drift(data)
    return ["(no table for this file's layout: see the file)"]


def benchmarks_doc(repo: Path) -> str:
    """The page: how each benchmark runs, the continual-learning report, then every other results file."""
    results = repo / RESULTS
    figure = os.path.relpath(results / FIGURE, (repo / DOC).parent)
    written = ("Written by `python -m pipelines.compare.docs` from the benchmark scripts and `benchmarks/results/*.json` "
               "(`python -m benchmarks.cl_quality` rewrites it after every run); do not edit by hand. Each benchmark "
               "runs from the repository root; `--help` lists its flags.")
    text = ["# Benchmarks", "", written, "", "## The benchmarks", ""]
    for script in sorted((repo / "benchmarks").glob("*.py")):
        if script.name == "__init__.py":
            continue
        summary, commands = usage(script)
        text += [f"- `{script.stem}`: {summary}"] + [f"  `{c}`" for c in commands]
    text.append("")
    main = results / CL_QUALITY
    if main.exists():
        saved = json.loads(main.read_text())
        source = "From `benchmarks/results/cl_quality.json` (`cl_quality.md` beside it is the same report)."
        text += ["## Continual-learning quality", "", source, ""] + report_head(saved["budget"], saved["rows"])
        text += report_body(saved["rows"], saved["aggregate"], "###", figure)
    for path in sorted(results.glob("*.json")):
        if path.name in SKIP | {CL_QUALITY}:
            continue
        text += [f"## {path.stem}", "", f"From `benchmarks/results/{path.name}`.", ""]
        text += other_result(json.loads(path.read_text())) + [""]
    return "\n".join(text)


def write_benchmarks_doc(repo: Path) -> None:
    atomic_write_text(repo / DOC, benchmarks_doc(repo))


def after_writing(results_file: Path, repo: Path) -> None:
    """A benchmark wrote `results_file`: where it lies in the repository's results folder, the docs
    page follows it (elsewhere, say a smoke run's folder, nothing changes)."""
    if results_file.resolve().parent == (repo / RESULTS).resolve():
        write_benchmarks_doc(repo)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the repository root (benchmarks/, docs/)")
    args = parser.parse_args(argv)
    if not (args.repo / "benchmarks").is_dir():
        raise SystemExit(f"--repo {args.repo}: no benchmarks/ folder (give the repository root)")
    write_benchmarks_doc(args.repo)


if __name__ == "__main__":
    main()
