"""Report artifacts from an accuracy matrix: CSV, heatmap PNG and terminal table."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.run.report import accuracy_matrix, format_matrix, matrix_csv, matrix_heatmap

NAN = np.nan
NAMES = ["alpaca", "gsm8k", "mmlu"]
R3 = np.array(
    [
        [0.8, NAN, NAN],
        [0.875, 0.9, NAN],
        [0.6, 0.85, 0.753],
    ]
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_csv_reads_back_with_stage_names_and_empty_cells_for_nan(tmp_path: Path) -> None:
    path = tmp_path / "matrix.csv"
    matrix_csv(R3, NAMES, path)

    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["stage", "alpaca", "gsm8k", "mmlu"],
        ["alpaca", "0.8", "", ""],
        ["gsm8k", "0.875", "0.9", ""],
        ["mmlu", "0.6", "0.85", "0.753"],
    ]
    assert os.listdir(tmp_path) == ["matrix.csv"]  # no temporary file left behind


def test_csv_quotes_task_names_with_commas(tmp_path: Path) -> None:
    path = tmp_path / "matrix.csv"
    matrix_csv(np.array([[0.5]]), ["qa, short"], path)
    with path.open(newline="") as handle:
        assert list(csv.reader(handle)) == [["stage", "qa, short"], ["qa, short", "0.5"]]


def test_csv_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "matrix.csv"
    path.write_text("old\n")
    matrix_csv(np.array([[0.25]]), ["only"], path)
    assert path.read_text() == "stage,only\nonly,0.25\n"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "matrix.csv"
    path.write_text("old\n")

    def failing_replace(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        matrix_csv(R3, NAMES, path)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["matrix.csv"]


@pytest.mark.parametrize(
    ("matrix", "names", "message"),
    [
        (np.zeros((2, 3)), ["a", "b"], "R must be"),
        (np.zeros((2, 2)), ["a", "b", "c"], "task_names must have 2"),
    ],
    ids=["not-square", "names-mismatch"],
)
def test_artifacts_refuse_mismatched_inputs(
    tmp_path: Path, matrix: np.ndarray, names: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        matrix_csv(matrix, names, tmp_path / "matrix.csv")
    with pytest.raises(ValueError, match=message):
        matrix_heatmap(matrix, names, tmp_path / "matrix.png", "title")
    with pytest.raises(ValueError, match=message):
        format_matrix(matrix, names)
    assert os.listdir(tmp_path) == []


def test_heatmap_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "matrix.png"
    matrix_heatmap(R3, NAMES, path, "seq_lora on 3 tasks")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert os.listdir(tmp_path) == ["matrix.png"]


@pytest.mark.parametrize(
    "matrix",
    [
        np.array([[0.7, NAN], [NAN, NAN]]),  # a run that stopped after stage 0
        np.full((2, 2), NAN),
    ],
    ids=["partial", "all-nan"],
)
def test_heatmap_draws_unfinished_runs(tmp_path: Path, matrix: np.ndarray) -> None:
    path = tmp_path / "matrix.png"
    matrix_heatmap(matrix, ["a", "b"], path, "unfinished")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_format_matrix_shows_points_with_one_decimal_and_dash_for_nan() -> None:
    table = format_matrix(R3, NAMES, baseline=np.array([0.1, 0.2, 0.3]))
    assert table.splitlines() == [
        "stage      alpaca  gsm8k  mmlu",
        "untrained    10.0   20.0  30.0",
        "alpaca       80.0      -     -",
        "gsm8k        87.5   90.0     -",
        "mmlu         60.0   85.0  75.3",
    ]


def test_format_matrix_without_baseline_and_in_points() -> None:
    table = format_matrix(np.array([[81.0, NAN], [79.5, 92.34]]), ["a", "b"], scale=1.0)
    assert table.splitlines() == [
        "stage     a     b",
        "a      81.0     -",
        "b      79.5  92.3",
    ]


def test_format_matrix_refuses_baseline_of_wrong_length() -> None:
    with pytest.raises(ValueError, match="baseline must have shape"):
        format_matrix(R3, NAMES, baseline=np.array([0.1, 0.2]))


def test_accuracy_matrix_from_evaluation_rows_leaves_the_unmeasured_blank() -> None:
    R = accuracy_matrix([[0.5], [0.25, 1.0]], 3)  # two of three stages evaluated
    expected = np.array([[50.0, np.nan, np.nan], [25.0, 100.0, np.nan], [np.nan, np.nan, np.nan]])
    assert np.array_equal(R, expected, equal_nan=True)
