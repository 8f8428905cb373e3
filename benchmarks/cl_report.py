"""The continual-learning benchmark's report: `cl_quality.md` (one table per sequence with 95%
intervals, the paired comparisons, the goals of the MoE-CL and baselines issues with their figures
and verdicts) and `cl_quality_aa_bwt.png` (AA against BwT per method, interval bars)."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cl_core.atomic import atomic_write, atomic_write_text

FIGURE = "cl_quality_aa_bwt.png"
# The named sequences the goals are stated on (a goal with no rows there is "not measured yet").
GOAL_SEQUENCES = ("order1", "multiemo")
REHEARSAL_FREE = ("seq_lora", "ewc", "olora", "mocl", "seta")
NOT_MEASURED = "not measured yet"


def fmt(stat: dict | None, signed: bool = False) -> str:
    """"mean [low, high]" (points) or — where undefined."""
    if stat is None:
        return "—"
    f = "{:+.1f}" if signed else "{:.1f}"
    low, high = stat["ci95"]
    return f"{f.format(stat['mean'])} [{f.format(low)}, {f.format(high)}]"


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean over seeds of a row figure; None where any row lacks it."""
    values = [r[key] for r in rows]
    return None if any(v is None for v in values) else float(np.mean(values))


def plain(value, signed: bool = False, digits: int = 1) -> str:
    return "—" if value is None else f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def sequence_table(sequence: str, rows: list[dict], summary: dict) -> str:
    head = ("| method | seeds | AA | BwT | forgetting | FwT | learning gain | task-agnostic AA | task-agnostic BwT "
            "| task-agnostic forgetting | steps/task | test examples/task | strip rate (calibrated) "
            "| trainable params | wall (s, mean) |")
    lines = [head, "|" + "---|" * 15]
    for entry in (e for e in summary["methods"] if e["sequence"] == sequence):
        mine = [r for r in rows if r["sequence"] == sequence and r["method"] == entry["method"]]
        steps = {str(r["steps_per_task"]) for r in mine}
        name = entry["method"] + (" (oracle)" if mine[0]["oracle"] else "")
        lines.append(
            f"| {name} | {len(mine)} | {fmt(entry['AA'])} | {fmt(entry['BwT'], True)} | {fmt(entry['forgetting'])} | "
            f"{plain(mean_of(mine, 'FwT'), True)} | {plain(mean_of(mine, 'learning_gain'), True)} | "
            f"{fmt(entry['task_agnostic_AA'])} | {fmt(entry['task_agnostic_BwT'], True)} | "
            f"{fmt(entry['task_agnostic_forgetting'])} | "
            f"{'—' if steps == {'None'} else ', '.join(sorted(steps))} | {min(min(r['n_test']) for r in mine)} | "
            f"{plain(mean_of(mine, 'strip_rate'))} | {mine[0]['trainable_params']:,} | "
            f"{plain(mean_of(mine, 'wall_s'), digits=0)} |")
    return "\n".join(lines)


def pairs_table(sequence: str, summary: dict) -> str:
    lines = ["| a − b | measure | difference | 95% interval | verdict (a vs b) | seeds |", "|" + "---|" * 6]
    for p in (p for p in summary["pairs"] if p["sequence"] == sequence):
        lines.append(f"| {p['a']} − {p['b']} | {p['measure']} | {p['difference']:+.1f} | "
                     f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] | {p['verdict']} | {len(p['seeds'])} |")
    return "\n".join(lines)


def _pair(summary: dict, sequence: str, a: str, b: str, measure: str) -> dict | None:
    return next((p for p in summary["pairs"] if (p["sequence"], p["a"], p["b"], p["measure"]) == (sequence, a, b, measure)),
                None)


def _method(summary: dict, sequence: str, method: str) -> dict | None:
    return next((e for e in summary["methods"] if (e["sequence"], e["method"]) == (sequence, method)), None)


def _diff(p: dict) -> str:
    return f"{p['difference']:+.1f} [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] ({p['verdict']})"


def goals(rows: list[dict], summary: dict) -> list[str]:
    """Each goal of issues 11 (MoE-CL) and 12 (baselines, SETA, metrics) per sequence, with its
    figure and "met", "not met" or "not measured yet"."""
    verdict = {True: "met", False: "not met"}
    sequences = list(GOAL_SEQUENCES) + sorted({r["sequence"] for r in rows} - set(GOAL_SEQUENCES))
    lines = []
    for seq in sequences:
        moe = _method(summary, seq, "moe_cl")
        lines.append(f"{seq}: MoE-CL BwT ≥ −2: " + (
            NOT_MEASURED if moe is None else f"BwT {fmt(moe['BwT'], True)}, {verdict[moe['BwT']['mean'] >= -2]}"))
        found = {b: _pair(summary, seq, "moe_cl", b, "AA") for b in REHEARSAL_FREE}
        figures = ", ".join(f"vs {b} {_diff(p)}" for b, p in found.items() if p)
        missing = [b for b, p in found.items() if p is None]
        status = (f"{NOT_MEASURED} (no rows: {', '.join(missing)})" if missing
                  else verdict[all(p["difference"] >= 0 for p in found.values())])
        lines.append(f"{seq}: MoE-CL AA ≥ every non-oracle rehearsal-free baseline's (paired AA difference): "
                     f"{figures + '; ' if figures else ''}{status}")
        replay = _pair(summary, seq, "moe_cl", "replay", "AA")
        lines.append(f"{seq}: MoE-CL AA not below replay's by more than the interval: " + (
            NOT_MEASURED if replay is None else f"{_diff(replay)}, {verdict[replay['verdict'] != 'worse']}"))
        ablation = [_pair(summary, seq, "moe_cl", "moe_cl_no_gan", m) for m in ("AA", "BwT")]
        lines.append(f"{seq}: the adversarial term (MoE-CL − MoE-CL with adv_weight 0): " + (
            NOT_MEASURED if None in ablation else
            f"AA {_diff(ablation[0])}, BwT {_diff(ablation[1])}: " +
            ("an effect" if {p["verdict"] for p in ablation} - {"not distinguishable"} else "no distinguishable effect")))
        ewc = [_pair(summary, seq, "ewc", "seq_lora", m) for m in ("AA", "BwT")]
        if None in ewc:
            lines.append(f"{seq}: EWC's rows differ from sequential LoRA's: {NOT_MEASURED}")
        else:
            differ = any(p["difference"] != 0 for p in ewc) or _rows_differ(rows, seq, "ewc", "seq_lora")
            lines.append(f"{seq}: EWC's rows differ from sequential LoRA's: AA {_diff(ewc[0])}, BwT {_diff(ewc[1])}, "
                         f"{verdict[differ]}")
        seta = _method(summary, seq, "seta")
        lines.append(f"{seq}: SETA task-agnostic BwT ≥ −3: " + (
            NOT_MEASURED if seta is None else "no task-agnostic evaluation, not met" if seta["task_agnostic_BwT"] is None
            else f"{fmt(seta['task_agnostic_BwT'], True)}, {verdict[seta['task_agnostic_BwT']['mean'] >= -3]}"))
        routed = {m: [r for r in rows if r["sequence"] == seq and r["method"] == m] for m in ("olora", "mocl")}
        lines.append(f"{seq}: O-LoRA and MoCL evaluated without a task id: " + (
            f"{NOT_MEASURED} (no rows: {', '.join(m for m, rs in routed.items() if not rs)})"
            if not all(routed.values()) else
            ", ".join(f"{m} task-agnostic AA {fmt(_method(summary, seq, m)['task_agnostic_AA'])}" for m in routed) +
            f", {verdict[all(r['task_agnostic_AA'] is not None for rs in routed.values() for r in rs)]}"))
    lacking = [r for r in rows if any(r[k] is None for k in ("FwT", "learning_gain", "steps_per_task"))]
    lines.append("every row reports FwT (GEM), learning gain and optimizer steps per task: " + (
        NOT_MEASURED if not rows else f"{len(rows) - len(lacking)} of {len(rows)} rows, {verdict[not lacking]}"))
    steps = {str(r["steps_per_task"]) for r in rows if r["steps_per_task"] is not None}
    lines.append("one budget: the same optimizer steps per task in every row: " + (
        NOT_MEASURED if not steps or lacking else f"{', '.join(sorted(steps))}, {verdict[len(steps) == 1]}"))
    return lines


def _rows_differ(rows: list[dict], sequence: str, a: str, b: str) -> bool:
    """Whether any seed's AA or BwT differs between two methods' rows."""
    by = {(r["method"], r["seed"]): r for r in rows if r["sequence"] == sequence}
    return any(by[a, s][k] != by[b, s][k] for (m, s) in by if m == a and (b, s) in by for k in ("AA", "BwT"))


def aa_bwt_figure(summary: dict, path: Path) -> None:
    """One panel per sequence: each method at (BwT, AA) with its 95% intervals as bars."""
    sequences = sorted({e["sequence"] for e in summary["methods"]})
    methods = sorted({e["method"] for e in summary["methods"]})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    # Constrained layout leaves room for the legend below the panels, where it hides no point.
    fig = Figure(figsize=(6.5 * max(1, len(sequences)), 6), layout="constrained")
    FigureCanvasAgg(fig)
    legend = {}
    for k, seq in enumerate(sequences):
        ax = fig.add_subplot(1, max(1, len(sequences)), k + 1)
        for e in (e for e in summary["methods"] if e["sequence"] == seq):
            x, y, seeds = e["BwT"], e["AA"], len(e["seeds"])
            ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci95"][0]], [x["ci95"][1] - x["mean"]]],
                        yerr=[[y["mean"] - y["ci95"][0]], [y["ci95"][1] - y["mean"]]], fmt="o",
                        color=colours[e["method"]], capsize=3, label=f"{e['method']} ({seeds} seed{'s' * (seeds > 1)})")
            ax.annotate(e["method"], (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set(title=seq, xlabel="BwT (points; right: keeps old tasks)", ylabel="AA (points)")
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 6), fontsize=7)
    fig.suptitle("AA against BwT, 95% intervals (test examples and seeds)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def report_body(rows: list[dict], summary: dict, heading: str, figure: str) -> list[str]:
    """The figure, a table and the pairs per sequence, then the goals: the part of the report that
    the README repeats (`heading` is the markdown level of its section titles)."""
    text = [f"![AA against BwT]({figure})", ""]
    for seq in sorted({r["sequence"] for r in rows}):
        order = next(r["order"] for r in rows if r["sequence"] == seq)
        text += [f"{heading} {seq}: {' → '.join(order)}", "", sequence_table(seq, rows, summary), "",
                 pairs_table(seq, summary), ""]
    return text + [f"{heading} Goals", ""] + [f"- {line}" for line in goals(rows, summary)] + [""]


def write_report(out: Path, budget, rows: list[dict], summary: dict, readme: Path | None = None) -> None:
    """`cl_quality.md` and the figure in `out`; with `readme`, also its section between the
    README_BEGIN and README_END markers (the rest of the file is kept as it is)."""
    b = asdict(budget)
    seeds = sorted({r["seed"] for r in rows})
    wall = sum(r["wall_s"] for r in rows)
    budget_line = (
        f"Budget, the same for every method: model {b['model']}, {b['steps_per_task']} optimizer steps per task "
        f"({budget.train_examples} training examples, batch {b['batch_size']}, 1 epoch), LoRA rank {b['rank']}, "
        f"lr {b['lr']:g}, max length {b['max_length']}, up to {b['test_examples']} test examples per task (the "
        f"whole split where smaller). Seeds run: {', '.join(map(str, seeds)) or 'none yet'}. {len(rows)} runs, "
        f"{wall / 3600:.2f} h of run time in all (stages in flight) (last written on {platform.machine()} with "
        f"{os.cpu_count()} CPUs).")
    legend = ("Figures in points: mean over seeds [95% interval: bootstrap over test examples, and over seeds "
              "where there are several]. Pairwise rows are paired (same seeds, same test examples); the verdict is "
              "\"better\" or \"worse\" when the interval excludes 0.")
    text = ["# Continual-learning quality", "", budget_line, "", legend, ""]
    atomic_write_text(out / "cl_quality.md", "\n".join(text + report_body(rows, summary, "##", FIGURE)))
    if summary["methods"]:
        aa_bwt_figure(summary, out / FIGURE)
    if readme is not None:
        figure = os.path.relpath(out / FIGURE, readme.resolve().parent)
        sync_readme(readme, [budget_line, "", legend, ""] + report_body(rows, summary, "####", figure))


README_BEGIN = "<!-- cl_quality report: written by `python -m benchmarks.cl_quality --readme`, do not edit -->"
README_END = "<!-- end of the cl_quality report -->"


def readme_around_report(readme: Path) -> tuple[str, str]:
    """The README's text up to its report section's first marker, and from its end marker on."""
    try:
        text = readme.read_text()
    except OSError as e:
        raise SystemExit(f"--readme {readme}: {e.strerror}") from None
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"--readme {readme}: no report section (a line {README_BEGIN!r}, later a line "
                         f"{README_END!r}); add the two lines where the report belongs")
    return text[:begin + len(README_BEGIN)], text[end:]


def sync_readme(readme: Path, lines: list[str]) -> None:
    """Replaces what lies between the markers; a README without them is refused, untouched."""
    head, tail = readme_around_report(readme)
    atomic_write_text(readme, head + "\n" + "\n".join(lines) + "\n" + tail)
