"""Turn an accuracy matrix into report artifacts: a CSV, a heatmap PNG and a terminal table.

``R[i, j]`` is the accuracy on task ``j`` after training stage ``i`` (stage ``i`` trains task
``task_names[i]``); NaN marks a cell not evaluated. NaN is allowed anywhere here, so a run
that stopped part-way can still be reported.
"""

from __future__ import annotations

import csv
import io
import os
import math
from typing import Sequence

import matplotlib
import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cl_core.atomic import atomic_write_bytes

FloatArray = npt.NDArray[np.floating]

PathLike = str | os.PathLike[str]


def _checked_matrix(R: FloatArray, task_names: Sequence[str]) -> npt.NDArray[np.float64]:
    """Return ``R`` as float64 after checking it is square with one name per stage."""
    matrix = np.asarray(R, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square [T, T] matrix, got shape {matrix.shape}")
    if len(task_names) != matrix.shape[0]:
        raise ValueError(
            f"task_names must have {matrix.shape[0]} entries to match R, got {len(task_names)}"
        )
    return matrix


def accuracy_matrix(rows: Sequence[Sequence[float]], tasks: int) -> FloatArray:
    """R[stage, task] in percent from evaluate-stage rows (fractions; row t covers tasks 0..t),
    NaN where nothing is measured yet (tasks not yet seen, stages not yet evaluated)."""
    R = np.full((tasks, tasks), np.nan)
    for t, row in enumerate(rows):
        R[t, : len(row)] = np.array(row) * 100
    return R


def matrix_csv(R: FloatArray, task_names: Sequence[str], path: PathLike) -> None:
    """Write ``R`` as CSV: header ``stage,<task>...``, one row per stage, empty cell for NaN.

    Values are written in full precision (``repr``) so the file reads back to the same floats.
    """
    matrix = _checked_matrix(R, task_names)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["stage", *task_names])
    for stage_name, row in zip(task_names, matrix):
        writer.writerow([stage_name, *("" if math.isnan(v) else repr(float(v)) for v in row)])
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def matrix_heatmap(R: FloatArray, task_names: Sequence[str], path: PathLike, title: str) -> None:
    """Write ``R`` as a PNG heatmap with each value annotated and NaN cells left blank.

    Uses the object-oriented Agg canvas rather than pyplot, so no global figure state or
    display backend is involved (safe in Ray workers and threads). Annotations keep three
    significant digits, which reads well whether ``R`` holds fractions or points.
    """
    matrix = _checked_matrix(R, task_names)
    num_tasks = matrix.shape[0]
    finite = matrix[np.isfinite(matrix)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="white")

    size = 2.0 + 0.9 * num_tasks
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap=colormap, vmin=low, vmax=high)
    figure.colorbar(image, ax=axes, label="accuracy")

    midpoint = (low + high) / 2
    for (stage, task), value in np.ndenumerate(matrix):
        if math.isnan(value):
            continue
        axes.text(
            task,
            stage,
            f"{value:.3g}",
            ha="center",
            va="center",
            color="black" if value > midpoint else "white",
        )

    axes.set_xticks(range(num_tasks), labels=list(task_names), rotation=45, ha="right")
    axes.set_yticks(range(num_tasks), labels=list(task_names))
    axes.set_xlabel("evaluated on task")
    axes.set_ylabel("after training stage")
    axes.set_title(title)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def format_matrix(
    R: FloatArray,
    task_names: Sequence[str],
    baseline: FloatArray | None = None,
    *,
    scale: float = 100.0,
) -> str:
    """Render ``R`` as a fixed-width table in points with one decimal, ``-`` for NaN.

    ``scale`` turns ``R``'s unit into points: 100 for fractions in [0, 1], 1 when ``R``
    already holds points. With ``baseline`` (the untrained bank's accuracy per task) an
    ``untrained`` row comes first, so each column reads top to bottom in time.
    """
    matrix = _checked_matrix(R, task_names)
    row_names = list(task_names)
    rows = list(matrix)
    if baseline is not None:
        untrained = np.asarray(baseline, dtype=np.float64)
        if untrained.shape != (matrix.shape[0],):
            raise ValueError(
                f"baseline must have shape ({matrix.shape[0]},) to match R, got {untrained.shape}"
            )
        row_names.insert(0, "untrained")
        rows.insert(0, untrained)

    cells = [["-" if math.isnan(v) else f"{v * scale:.1f}" for v in row] for row in rows]
    name_width = max(len("stage"), *(len(name) for name in row_names))
    column_widths = [
        max(len(name), *(len(row[column]) for row in cells))
        for column, name in enumerate(task_names)
    ]

    def line(first: str, values: Sequence[str]) -> str:
        padded = (value.rjust(width) for value, width in zip(values, column_widths))
        return "  ".join([first.ljust(name_width), *padded])

    header = line("stage", list(task_names))
    return "\n".join([header, *(line(name, row) for name, row in zip(row_names, cells))])


def markdown_matrix(R: FloatArray, task_names: Sequence[str], baseline: FloatArray | None = None) -> str:
    """``R`` (in points) as a Markdown table, as ``format_matrix`` lays it out (an ``untrained``
    row first when ``baseline`` is given); for MLflow's run description."""
    lines = format_matrix(R, task_names, baseline, scale=1.0).splitlines()
    cells = [line.split() for line in lines]
    header = ["after training", *cells[0][1:]]
    return "\n".join(["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *cells[1:]]])
