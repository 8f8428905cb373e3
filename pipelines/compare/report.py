"""The continual-learning benchmark's report: `cl_quality.md` (the protocol, one table per sequence
with each seed's value and honest intervals, the paired comparisons, the standard orders pooled,
the published figures beside ours, the long sequence's stage times, the goals) and
`cl_quality_aa_bwt.png` (AA against BwT per method, interval bars)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cl_core.atomic import atomic_write, atomic_write_text
from pipelines.compare import cost
from pipelines.compare.goals import fmt, goals
from pipelines.compare.references import published_section
from pipelines.compare.stats import INTERVALS

FIGURE = "cl_quality_aa_bwt.png"
# Where the defaults were chosen (EWC's λ, SETA's shared_lr_scale, MoE-CL's default): their rows
# are in sample; nothing was chosen on the others.
IN_SAMPLE = ("order1", "multiemo")
STAGE_TIMES = "long"  # the sequence whose stage times are reported against the task index
PROTOCOL = (
    "Protocol. Test examples are only reported: a choice reads validation (rows of each task's train file that "
    "are never trained on). The defaults of EWC (λ), SETA (shared_lr_scale) and MoE-CL were chosen on order1 and "
    "multiemo, so those rows are in sample; they also predate the validation split and have no validation "
    "figures. standard_o1..o3 and long are the out-of-sample check: nothing was chosen on them. Their prompts "
    "were fixed once per task type before any result (O-LoRA's instruction per task type, its option list, "
    "\"Answer:\"; `benchmarks/cl_quality.py`, TEMPLATES), not tuned.")


def legend() -> str:
    return ("Figures in points: mean over seeds [95% interval]. Intervals: " +
            "; ".join(f"{name}: {text}" for name, text in INTERVALS.items()) +
            ". † marks an interval over test examples only (one seed). A verdict is \"better\" or \"worse\" only "
            "where the interval excludes 0.")


def budget_line(budget: dict, rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    wall = sum(r["wall_s"] for r in rows)
    return (f"Budget, the same for every method: model {budget['model']}, {budget['steps_per_task']} optimizer steps "
            f"per task ({budget['steps_per_task'] * budget['batch_size']} training examples, batch "
            f"{budget['batch_size']}, 1 epoch), LoRA rank {budget['rank']}, lr {budget['lr']:g}, max length "
            f"{budget['max_length']} tokens, up to {budget['test_examples']} test examples per task (fewer where a "
            f"sequence says so or the split is smaller: see each table). Seeds run: "
            f"{', '.join(map(str, seeds)) or 'none yet'}. {len(rows)} runs, {wall / 3600:.2f} h of run time in all.")


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean over seeds of a row figure; None where any row lacks it."""
    values = [r.get(key) for r in rows]
    return None if any(v is None for v in values) else float(np.mean(values))


def plain(value, signed: bool = False, digits: int = 1) -> str:
    return "—" if value is None else f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def per_seed(stat: dict | None, signed: bool = False) -> str:
    return "—" if stat is None else ", ".join(plain(v, signed) for v in stat["values"])


def sequence_table(sequence: str, rows: list[dict], summary: dict) -> str:
    head = ("| method | seeds | AA | AA per seed | val AA | BwT | BwT per seed | val BwT | forgetting | FwT "
            "| learning gain | task-agnostic AA | task-agnostic BwT | steps/task | test / val examples per task "
            "| strip rate (calibrated) | trainable params | wall (s, mean) |")
    lines = [head, "|" + "---|" * 18]
    for entry in (e for e in summary["methods"] if e["sequence"] == sequence):
        mine = [r for r in rows if r["sequence"] == sequence and r["method"] == entry["method"]]
        steps = {s for r in mine for s in (r["steps_per_task"] or [])}
        n_val = [r.get("n_val") for r in mine]
        examples = f"{min(min(r['n_test']) for r in mine)} / " + (
            "—" if None in n_val else str(min(min(n) for n in n_val)))
        name = entry["method"] + (" (oracle)" if mine[0]["oracle"] else "")
        lines.append(
            f"| {name} | {len(mine)} | {fmt(entry['AA'])} | {per_seed(entry['AA'])} | {fmt(entry.get('val_AA'))} | "
            f"{fmt(entry['BwT'], True)} | {per_seed(entry['BwT'], True)} | {fmt(entry.get('val_BwT'), True)} | "
            f"{fmt(entry['forgetting'])} | {plain(mean_of(mine, 'FwT'), True)} | "
            f"{plain(mean_of(mine, 'learning_gain'), True)} | {fmt(entry['task_agnostic_AA'])} | "
            f"{fmt(entry['task_agnostic_BwT'], True)} | {', '.join(map(str, sorted(steps))) or '—'} | {examples} | "
            f"{plain(mean_of(mine, 'strip_rate'))} | {mine[0]['trainable_params']:,} | "
            f"{plain(mean_of(mine, 'wall_s'), digits=0)} |")
    return "\n".join(lines)


def _verdict(p: dict) -> str:
    return p["verdict"] + (" (test sampling only)" if p["interval"] == "examples" else "")


def pairs_table(sequence: str, summary: dict) -> str:
    lines = ["| a − b | measure | difference | per seed | 95% interval | interval | verdict (a vs b) | seeds |",
             "|" + "---|" * 8]
    for p in (p for p in summary["pairs"] if p["sequence"] == sequence):
        lines.append(f"| {p['a']} − {p['b']} | {p['measure']} | {p['difference']:+.1f} | "
                     f"{', '.join(f'{d:+.1f}' for d in p['differences'])} | [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] | "
                     f"{p['interval']} | {_verdict(p)} | {len(p['seeds'])} |")
    return "\n".join(lines)


def pooled_table(summary: dict, group: str) -> str:
    lines = ["| method, or a − b | measure | mean over orders | per order | 95% interval (t over orders) | verdict |",
             "|" + "---|" * 6]
    for p in (p for p in summary.get("pooled", []) if p["group"] == group):
        name = p["method"] if "method" in p else f"{p['a']} − {p['b']}"
        verdict = "—" if "method" in p else p["verdict"]
        lines.append(f"| {name} | {p['measure']} | {p['difference']:+.1f} | "
                     f"{', '.join(f'{v:+.1f}' for v in p['per_order'])} | [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] | "
                     f"{verdict} |")
    return "\n".join(lines)


def stage_times(rows: list[dict], sequence: str = STAGE_TIMES) -> list[str]:
    """Each task's train and evaluation seconds against its index, per method, and the share of all
    stage seconds that evaluation takes: how a run's cost grows with its length."""
    timed = sorted((r for r in rows if r["sequence"] == sequence and r.get("stage_seconds")),
                   key=lambda r: (r["method"], r["seed"]))
    if not timed:
        return [f"No {sequence} row with stage seconds yet."]
    per = {f"{r['method']} s{r['seed']}": cost.by_task(r["stage_seconds"]) for r in timed}
    names = list(per)
    lines = ["| task index | task | " + " | ".join(f"{n} train | {n} evaluate" for n in names) + " |",
             "|" + "---|" * (2 + 2 * len(names))]
    for t, task in enumerate(timed[0]["order"]):
        cells = [f"{per[n][t].get('train', float('nan')):.0f} | {per[n][t].get('evaluate', float('nan')):.0f}"
                 if t < len(per[n]) else "— | —" for n in names]
        lines.append(f"| {t} | {task} | " + " | ".join(cells) + " |")
    lines.append("")
    for r, name in zip(timed, names):
        tasks = per[name]
        lines.append(
            f"- {name}: evaluation (baseline, before, evaluate stages) takes "
            f"{100 * cost.evaluation_share(r['stage_seconds']):.0f}% of all stage seconds; a task's evaluate stage "
            f"grows by {cost.growth([s.get('evaluate', 0.0) for s in tasks]):+.1f} s per task index (it scores every "
            f"task so far), its train stage by {cost.growth([s.get('train', 0.0) for s in tasks]):+.1f} s.")
    return lines


def aa_bwt_figure(summary: dict, path: Path) -> None:
    """One panel per sequence: each method at (BwT, AA) with its 95% intervals as bars."""
    sequences = sorted({e["sequence"] for e in summary["methods"]})
    methods = sorted({e["method"] for e in summary["methods"]})
    palette = colormaps["tab20"]  # 20 distinct colours: more methods than the default cycle's 10
    colours = {m: palette(i % 20) for i, m in enumerate(methods)}
    cols = min(3, max(1, len(sequences)))
    rows_n = -(-max(1, len(sequences)) // cols)
    # Constrained layout leaves room for the legend below the panels, where it hides no point.
    fig = Figure(figsize=(6.5 * cols, 5.5 * rows_n + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    legend_handles = {}
    for k, seq in enumerate(sequences):
        ax = fig.add_subplot(rows_n, cols, k + 1)
        for e in (e for e in summary["methods"] if e["sequence"] == seq):
            x, y, seeds = e["BwT"], e["AA"], len(e["seeds"])
            ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci95"][0]], [x["ci95"][1] - x["mean"]]],
                        yerr=[[y["mean"] - y["ci95"][0]], [y["ci95"][1] - y["mean"]]], fmt="o" if seeds > 1 else "x",
                        color=colours[e["method"]], capsize=3, label=e["method"])
            ax.annotate(f"{e['method']} ({seeds})", (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set(title=seq, xlabel="BwT (points; right: keeps old tasks)", ylabel="AA (points)")
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend_handles.setdefault(label, handle)
    fig.legend(list(legend_handles.values()), list(legend_handles), loc="outside lower center",
               ncol=min(len(legend_handles), 6), fontsize=7)
    fig.suptitle("AA against BwT, 95% intervals: o = t over seeds (seeds in brackets), x = one seed, "
                 "test examples only")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def report_body(rows: list[dict], summary: dict, heading: str, figure: str) -> list[str]:
    """The figure, a table and the pairs per sequence, the standard orders pooled, the published
    figures, the stage times, then the goals (`heading`: the markdown level of section titles)."""
    text = [f"![AA against BwT]({figure})", ""]
    for seq in sorted({r["sequence"] for r in rows}):
        order = next(r["order"] for r in rows if r["sequence"] == seq)
        sample = "in sample: defaults chosen here" if seq in IN_SAMPLE else "out of sample"
        text += [f"{heading} {seq}: {' → '.join(order)} ({sample})", "", sequence_table(seq, rows, summary), "",
                 pairs_table(seq, summary), ""]
    for group in sorted({p["group"] for p in summary.get("pooled", [])}):
        text += [f"{heading} {group}: over its orders", "", pooled_table(summary, group), ""]
    text += published_section(summary, heading)
    text += [f"{heading} {STAGE_TIMES}: stage seconds against the task index", ""] + stage_times(rows) + [""]
    return text + [f"{heading} Goals", ""] + [f"- {line}" for line in goals(rows, summary)] + [""]


def report_head(budget: dict, rows: list[dict]) -> list[str]:
    return [budget_line(budget, rows), "", PROTOCOL, "", legend(), ""]


def write_report(out: Path, budget: dict, rows: list[dict], summary: dict) -> None:
    """`cl_quality.md` and the figure in `out`."""
    text = ["# Continual-learning quality", ""] + report_head(budget, rows) + report_body(rows, summary, "##", FIGURE)
    atomic_write_text(out / "cl_quality.md", "\n".join(text))
    if summary["methods"]:
        aa_bwt_figure(summary, out / FIGURE)
