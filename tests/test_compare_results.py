"""pipelines.compare: the resumable results file, the plan, a run's row, the report and the docs page;
and benchmarks.cl_quality as a person runs it (a subprocess from the repository root)."""

import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.compare.docs import DOC, benchmarks_doc
from pipelines.compare.outputs import run_row
from pipelines.compare.plan import Plan, planned_runs, run_benchmark
from pipelines.compare.report import stage_times, write_report
from pipelines.compare.results import Results
from pipelines.compare.stats import aggregate, encode, run_key
from pipelines.run.ledger import Ledger, StageKey

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"method", "sequence", "order", "seed", "AA", "BwT", "FwT", "forgetting", "val_AA", "val_BwT",
            "learning_gain", "strip_rate", "task_agnostic_AA", "task_agnostic_BwT", "steps_per_task", "n_test", "n_val",
            "trainable_params", "bank_growth", "wall_s", "stage_seconds", "oracle"}
BUDGET = {"model": "tiny", "steps_per_task": 16, "batch_size": 8, "rank": 8, "lr": 0.001, "max_length": 96,
          "test_examples": 200}
DRAWS = 400


def fake_run(aa_by_method: dict[str, float], calls: list):
    """A run function that records its calls and answers a row from hand-made correctness."""
    def run(label, sequence, tasks, seed):
        calls.append((label, sequence, seed))
        rate = aa_by_method[label] + 0.02 * seed + 0.01 * (label == "moe_cl") * seed ** 2
        uniform = np.random.default_rng(seed).random((len(tasks), 50))  # shared by methods at a seed: paired
        final = [(u < rate).astype(int) for u in uniform]
        correct = [final[:i + 1] for i in range(len(tasks))]  # nothing forgotten: BwT 0
        row = {key: None for key in ROW_KEYS}
        row.update(method=label, sequence=sequence, order=list(tasks), seed=seed, AA=100 * rate, BwT=0.0,
                   FwT=0.0, forgetting=0.0, strip_rate=50.0, n_test=[50] * len(tasks), trainable_params=10, bank_growth={},
                   wall_s=60.0, oracle=label == "per_task_lora", val_AA=100 * rate - 1, val_BwT=0.0,
                   stage_seconds={f"task{t}/{k}": s * (t + 1) for t in range(len(tasks))
                                  for k, s in (("train", 50.0), ("evaluate", 5.0))})
        return row, {"oracle": encode(correct)}
    return run


SEQUENCES = {"s1": ["a", "b"]}
AA = {"moe_cl": 0.8, "seq_lora": 0.6, "replay": 0.75, "ewc": 0.62, "olora": 0.7, "per_task_lora": 0.9}
PLANS = {"s1": Plan(tuple(AA), ("moe_cl", "moe_cl_no_gan", "seq_lora", "replay"), (0, 1), strongest_other=True)}


def results(out: Path, budget: dict = BUDGET) -> Results:
    return Results(out, budget, draws=DRAWS, report=lambda rows, summary: write_report(out, budget, rows, summary))


def test_a_half_finished_benchmark_runs_only_what_is_missing(tmp_path):
    first = []

    def stopping(label, sequence, tasks, seed):  # the benchmark is killed during its fifth run
        if len(first) == 4:
            raise KeyboardInterrupt
        return fake_run(AA, first)(label, sequence, tasks, seed)

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(SEQUENCES, PLANS, results(tmp_path), stopping)
    saved = json.loads((tmp_path / "cl_quality.json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(AA)[:4]

    again = []
    resumed = results(tmp_path)
    run_benchmark(SEQUENCES, PLANS, resumed, fake_run(AA, again))
    assert not set(again) & set(first)  # nothing finished runs twice
    # Every method at seed 0; then seed 1 for the multi-seed labels and the strongest other non-oracle
    # baseline at seed 0 (olora: 70 beats ewc's 62; the oracle per_task_lora does not count).
    multi = {(label, "s1", 1) for label in ("moe_cl", "seq_lora", "replay", "olora")}
    assert set(first) | set(again) == {(label, "s1", 0) for label in AA} | multi
    assert len(resumed.rows) == len(first) + len(again) == len(AA) + len(multi)
    assert planned_runs(PLANS, resumed.rows)[-1] == ("olora", "s1", 1)

    third = []
    run_benchmark(SEQUENCES, PLANS, results(tmp_path), fake_run(AA, third))
    assert third == []
    saved = json.loads((tmp_path / "cl_quality.json").read_text())
    assert all(set(row) == ROW_KEYS for row in saved["rows"])
    assert set(saved["aggregate"]["intervals"]) == {"t_seeds", "t_orders", "examples"}  # names its intervals
    pair = next(p for p in saved["aggregate"]["pairs"]
                if (p["sequence"], p["a"], p["b"], p["measure"]) == ("s1", "moe_cl", "seq_lora", "AA"))
    assert pair["seeds"] == [0, 1] and pair["interval"] == "t_seeds" and pair["differences"] == pytest.approx([22, 25])
    # t over two seeds: 23.5 ± 12.71 × 2.12 / √2
    assert pair["ci95"] == pytest.approx([4.44, 42.56], abs=0.01) and pair["verdict"] == "better"
    report = (tmp_path / "cl_quality.md").read_text()
    assert "| moe_cl − seq_lora | AA | +23.5 | +22.0, +25.0 | [+4.4, +42.6] | t_seeds | better | 2 |" in report
    # AA 73 and 83 at the two seeds: the t-interval is cut at 100, where accuracy ends; validation AA beside
    assert "| moe_cl | 2 | 78.0 [14.5, 100.0] | 73.0, 83.0 | 80.5 [61.4, 99.6] |" in report
    assert (tmp_path / "cl_quality_aa_bwt.png").stat().st_size > 10_000


def test_plans_run_the_multi_seed_methods_at_the_other_seeds_only():
    plans = {"o1": Plan(("seq_lora", "olora", "mtl"), ("seq_lora", "olora", "moe_cl"), (0, 1)),
             "long": Plan(("seq_lora", "moe_cl"), ("seq_lora",), (0,))}
    assert planned_runs(plans, []) == [("seq_lora", "o1", 0), ("olora", "o1", 0), ("mtl", "o1", 0),
                                       ("seq_lora", "long", 0), ("moe_cl", "long", 0),
                                       ("seq_lora", "o1", 1), ("olora", "o1", 1)]


def test_a_results_file_of_another_budget_is_refused_and_kept(tmp_path):
    run_benchmark({"s1": ["a", "b"]}, {"s1": Plan(("moe_cl",), (), (0,))}, results(tmp_path), fake_run(AA, []))
    before = (tmp_path / "cl_quality.json").read_text()
    with pytest.raises(SystemExit, match="steps_per_task"):
        Results(tmp_path, {**BUDGET, "steps_per_task": 32})
    with pytest.raises(SystemExit, match="another --sequence name"):
        run_benchmark({"s1": ["b", "a"]}, {"s1": Plan(("moe_cl",), (), (0,))}, results(tmp_path), fake_run(AA, []))
    assert (tmp_path / "cl_quality.json").read_text() == before
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cl_quality.json").write_text("[]")  # the single-seed predecessor wrote a list
    with pytest.raises(SystemExit, match="not a results file"):
        Results(tmp_path / "old", BUDGET)


def test_a_superseded_row_is_kept_aside_and_its_rerun_scored_on_its_new_correctness(tmp_path):
    plans = {"s1": Plan(("moe_cl", "seq_lora"), (), (0,))}
    run_benchmark(SEQUENCES, plans, results(tmp_path), fake_run(AA, []))
    kept = results(tmp_path)
    kept.write()  # the report, written while the old rows are all there (fills the stats cache)
    for row in list(kept.rows):
        kept.supersede(row)
    superseded = json.loads((tmp_path / "cl_quality_superseded.json").read_text())
    assert [s["row"]["method"] for s in superseded] == ["moe_cl", "seq_lora"] and superseded[0]["examples"]["oracle"]
    again = []
    run_benchmark(SEQUENCES, plans, kept, fake_run({"moe_cl": 0.6, "seq_lora": 0.8}, again))
    assert again == [("moe_cl", "s1", 0), ("seq_lora", "s1", 0)]
    saved = json.loads((tmp_path / "cl_quality.json").read_text())["aggregate"]
    assert saved == json.loads(json.dumps(aggregate(kept.rows, kept.examples, draws=DRAWS)))  # a new process's
    aa = {m["method"]: m["AA"]["mean"] for m in saved["methods"]}
    assert aa["seq_lora"] > aa["moe_cl"] + 10  # the new code's order, the reverse of the superseded rows'


def write_ledger(run_dir: Path, validation: bool) -> None:
    """Evaluate stages as the pipeline records them: task 0's row may carry a later task (GEM FwT); with
    `validation`, the validation slices beside the test rows."""
    rows = {"task0/evaluate": [[1, 0, 1], [0, 0, 0]], "task1/evaluate": [[1, 1, 0], [1, 0, 0]]}
    outputs = {k: {"rows": {"oracle": {"correct": v}}} for k, v in rows.items()}
    if validation:
        for k, v in (("task0/evaluate", [[1, 1]]), ("task1/evaluate", [[1, 1], [0, 1]])):
            outputs[k]["validation"] = {"oracle": {"correct": v}}
    (run_dir / "ledger.json").unlink(missing_ok=True)
    ledger = Ledger(run_dir, "config-hash")
    ledger.mark_done(StageKey("train", 0), {}, seconds=40.123)
    for key, out in outputs.items():
        ledger.mark_done(StageKey.parse(key), out, seconds=2.5)


def test_a_row_from_a_pipeline_result_with_and_without_the_validation_split(tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.compare.outputs.bank_size", lambda run_dir, n: {"trainable_params": 1234, "bank_growth": {}})
    write_ledger(tmp_path, validation=False)
    summary = {"oracle": {"AA": 50.0, "BwT": 0.0, "FwT": 1.0, "forgetting": 0.0}}
    result = SimpleNamespace(summary=summary, strip_calibrated={"oracle": [40.0, 60.0]}, run_dir=tmp_path, busy_s=3.25)
    row, examples = run_row(result, "seq_lora", "mine", ["x", "y"], 3, oracle=False)
    assert set(row) == ROW_KEYS and row["trainable_params"] == 1234
    assert row["learning_gain"] is None and row["steps_per_task"] is None  # before the pipeline reports them
    assert row["val_AA"] is None and row["val_BwT"] is None and row["n_val"] is None  # no validation split yet
    assert row["n_test"] == [3, 3] and row["wall_s"] == 3.2 and row["strip_rate"] == 50.0 and not row["oracle"]
    assert row["stage_seconds"] == {"task0/evaluate": 2.5, "task0/train": 40.12, "task1/evaluate": 2.5}
    assert examples == {"oracle": [["101"], ["110", "100"]]}

    # The pipeline with the validation split (issue 32): RunResult.val_summary, the ledger's `validation`.
    write_ledger(tmp_path, validation=True)
    summary["oracle"]["learning_gain"], result.steps_per_task = 30.0, [16, 16]
    result.val_summary = {"oracle": {"AA": 75.0, "BwT": -5.0}}
    row, again = run_row(result, "seq_lora", "mine", ["x", "y"], 3, oracle=False)
    assert row["learning_gain"] == 30.0 and row["steps_per_task"] == [16, 16]
    assert (row["val_AA"], row["val_BwT"], row["n_val"]) == (75.0, -5.0, [2, 2])
    assert again == examples  # the test split's correctness, not the validation slices'


def test_the_long_sequence_s_stage_times_grow_with_the_task_index(tmp_path):
    rows = [fake_run(AA, [])(m, "long", ["a", "b", "c"], 0)[0] for m in ("moe_cl", "seq_lora")]
    lines = stage_times(rows)
    assert lines[2] == "| 0 | a | 50 | 5 | 50 | 5 |" and lines[4] == "| 2 | c | 150 | 15 | 150 | 15 |"
    assert lines[-2] == ("- moe_cl s0: evaluation (baseline, before, evaluate stages) takes 9% of all stage seconds; "
                         "a task's evaluate stage grows by +5.0 s per task index (it scores every task so far), its "
                         "train stage by +50.0 s.")
    assert stage_times([]) == ["No long row with stage seconds yet."]


def test_the_docs_page_is_written_from_the_results_files(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "mine.py").write_text('"""Measures a thing.\n\n    python -m benchmarks.mine\n        [--x]\n"""\n')
    out = tmp_path / "benchmarks" / "results"
    run_benchmark({"long": ["a", "b"]}, {"long": Plan(("olora", "per_task_lora", "seq_lora"), (), (0,))}, results(out),
                  fake_run(AA, []))
    (out / "sweep.json").write_text(json.dumps({"command": "clpipe tune x", "trials": [{"lam": 1.0, "AA": 70.0, "BwT": -2.0}]}))
    text = benchmarks_doc(tmp_path)
    assert "- `mine`: Measures a thing.\n  `python -m benchmarks.mine [--x]`" in text
    assert "![AA against BwT](../benchmarks/results/cl_quality_aa_bwt.png)" in text
    assert "| olora | O-LoRA | 73.9 | 63.0 [54.0, 73.0] † | 0.0 [0.0, 0.0] † |" in text  # beside the published
    assert ("- olora > per_task_lora: olora − per_task_lora AA -21.0 [-29.0, -13.0] (one seed: test sampling only): "
            "reversed") in text
    assert "| 1.0 | 70.0 | -2.0 | — | — | — |" in text and "chosen on test examples" in text


def test_the_committed_docs_page_is_what_the_results_give():
    assert (REPO / DOC).read_text() == benchmarks_doc(REPO), \
        "docs/benchmarks.md is stale: run `python -m pipelines.compare.docs`"


def test_no_test_imports_a_benchmark_module():
    """benchmarks/ is a folder of scripts, not an installed package: tests reach it only through a subprocess."""
    importing = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            importing += [f"{path.name}: {n}" for n in names if n == "benchmarks" or n.startswith("benchmarks.")]
    assert importing == []


def cl_quality(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.cl_quality", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, check=False)


def write_task_folders(root: Path, tasks: list[str]) -> None:
    """Task folders in the shared data's layout, a few rows each."""
    for task in tasks:
        (root / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            (root / task / f"{split}.jsonl").write_text("".join(
                json.dumps({"text": f"review {i}", "label": label}) + "\n"
                for i, label in enumerate(["positive", "negative", "neutral", "negative"])))


LONG = ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "multirc", "boolq", "wic"]


def test_the_estimate_prints_the_field_s_plan_its_size_and_time(tmp_path):
    write_task_folders(tmp_path / "data", LONG)
    done = cl_quality("--estimate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("standard_o1: 15 runs planned, 0 finished; each trains 4 tasks and scores 3,400 test "
                               "examples (up to 200 per task); 15 left × 48–48 min")
    assert lines[1].startswith("standard_o2: 11 runs planned") and lines[2].startswith("standard_o3: 11 runs planned")
    assert lines[3] == ("long: 4 runs planned, 0 finished; each trains 14 tasks and scores 13,200 test examples "
                        "(up to 100 per task); 4 left × 168–186 min")
    assert lines[4].startswith("in all 40.8–42.0 h left") and not (tmp_path / "out" / "cl_quality.json").exists()
    bad = cl_quality("--estimate", "--data", str(tmp_path / "data"), "--methods", "moe_cl,nope")
    assert bad.returncode == 1 and "--methods: unknown ['nope']" in bad.stderr


@pytest.mark.slow
def test_the_benchmark_runs_a_tiny_sequence_once_and_runs_it_again_after_redo(tmp_path):
    from cl_core.synthetic import synthetic_rows

    for t, (name, labels) in enumerate({"syn_a": ["w1", "w2"], "syn_b": ["w3", "w4", "w5"]}.items()):
        (tmp_path / "data" / name).mkdir(parents=True)
        for split, n, seed in (("train", 40, 0), ("test", 30, 1)):
            lines = "".join(json.dumps(r) + "\n" for r in synthetic_rows(t, labels, n, seed))
            (tmp_path / "data" / name / f"{split}.jsonl").write_text(lines)
    args = ["--model", "tiny", "--order", "syn_a,syn_b", "--sequence", "smoke", "--data", str(tmp_path / "data"),
            "--methods", "seq_lora", "--seeds", "0", "--steps-per-task", "2", "--test-examples", "20",
            "--max-length", "32", "--lr", "0.01", "--storage", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    done = cl_quality(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "cl_quality.json").read_text())
    (row,) = saved["rows"]
    assert set(row) == ROW_KEYS and row["n_test"] == [20, 20] and row["order"] == ["syn_a", "syn_b"]
    assert {"task0/train", "task1/evaluate", "baseline/evaluate"} <= set(row["stage_seconds"])
    cells = json.loads((tmp_path / "out" / "cl_quality_examples.json").read_text())[run_key(row)]["oracle"]
    assert row["AA"] == pytest.approx(100 * np.mean([np.mean([int(c) for c in cell]) for cell in cells[-1]]))
    (entry,) = saved["aggregate"]["methods"]
    assert entry["AA"]["interval"] == "examples" and entry["AA"]["ci95"][0] <= row["AA"] <= entry["AA"]["ci95"][1]
    (run_dir,) = (tmp_path / "runs").glob("clq-seq_lora-smoke-*")
    config = (run_dir / "config.yaml").read_text()
    assert "seed: 0" in config and "max_test_examples: 20" in config and "max_train_examples: 16" in config

    assert "seq_lora smoke seed 0: finished earlier" in cl_quality(*args).stdout
    redo = cl_quality(*args, "--redo", "seq_lora", "--estimate")
    assert "seq_lora on smoke, seed 0: superseded; it runs again" in redo.stdout
    assert json.loads((tmp_path / "out" / "cl_quality.json").read_text())["rows"] == []
    assert [s["row"]["seed"] for s in json.loads((tmp_path / "out" / "cl_quality_superseded.json").read_text())] == [0]
    assert not run_dir.exists() and [p.name.split(".")[0] for p in (tmp_path / "runs" / "superseded").iterdir()] == \
        [run_dir.name]
