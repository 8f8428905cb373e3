"""The cl_quality benchmark's statistics, rows, resume and goals, on hand-made correctness."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import cl_quality
from benchmarks.cl_quality import Budget, Results, planned_runs, run_benchmark, run_config
from benchmarks.cl_report import goals
from benchmarks.cl_stats import aggregate, compare, decode, encode, run_key, run_stats, summarize
from pipelines.config import parse_config
from pipelines.run.ledger import Ledger, StageKey

ROW_KEYS = {"method", "sequence", "order", "seed", "AA", "BwT", "FwT", "forgetting", "learning_gain", "strip_rate",
            "task_agnostic_AA", "task_agnostic_BwT", "steps_per_task", "n_test", "trainable_params", "bank_growth", "wall_s", "oracle"}
DRAWS = 400


def run_correctness(rates: list[list[float]], n: int, seed: int) -> list[list[np.ndarray]]:
    """correct[i][j] with about rates[i][j] of n examples right, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    return [[(rng.random(n) < rates[i][j]).astype(int) for j in range(i + 1)] for i in range(len(rates))]


def test_the_interval_holds_a_known_difference_and_excludes_zero():
    a = run_correctness([[0.8], [0.75, 0.8]], 300, seed=1)
    # b answers the same examples, with 30 of the 300 examples of each final cell turned wrong: AA 10 points lower.
    b = [[cell.copy() for cell in stage] for stage in a]
    for j in range(2):
        right = np.flatnonzero(b[1][j] == 1)[:30]
        b[1][j][right] = 0
    result = compare({0: run_stats(a, 0, DRAWS)}, {0: run_stats(b, 0, DRAWS)}, "AA")
    assert result["difference"] == pytest.approx(10.0)
    low, high = result["ci95"]
    assert low <= 10.0 <= high and low > 0
    assert result["verdict"] == "better"


def test_the_verdict_flips_when_a_difference_is_planted():
    base = run_correctness([[0.7], [0.7, 0.7]], 200, seed=2)
    noise = np.random.default_rng(3)
    flipped = [[np.where(noise.random(len(c)) < 0.05, 1 - c, c) for c in stage] for stage in base]  # 5%, both ways
    other = flipped
    base, other = run_stats(base, 0, DRAWS), run_stats(other, 0, DRAWS)
    same = compare({0: base}, {0: other}, "AA")
    assert same["verdict"] == "not distinguishable" and same["ci95"][0] < 0 < same["ci95"][1]
    worse = [[c.copy() for c in stage] for stage in flipped]
    worse[1][0][np.flatnonzero(worse[1][0] == 1)[:50]] = 0  # task 0 forgotten on 50 of 200 examples
    worse = run_stats(worse, 0, DRAWS)
    assert compare({0: base}, {0: worse}, "BwT")["verdict"] == "better"
    assert compare({0: worse}, {0: base}, "BwT")["verdict"] == "worse"


def test_seeds_that_disagree_widen_the_interval():
    runs = {s: run_correctness([[rate]], 400, seed=s) for s, rate in enumerate((0.5, 0.7, 0.9))}
    stats = {s: run_stats(c, s, DRAWS) for s, c in runs.items()}
    pooled, alone = summarize(stats, "AA"), summarize({1: stats[1]}, "AA")
    assert pooled["mean"] == pytest.approx(np.mean([np.mean(runs[s][0][0]) * 100 for s in runs]))
    assert pooled["ci95"][1] - pooled["ci95"][0] > 2 * (alone["ci95"][1] - alone["ci95"][0])
    assert pooled["seeds"] == [0, 1, 2]


def test_a_paired_comparison_refuses_runs_on_different_test_examples():
    with pytest.raises(ValueError, match="same examples"):
        compare({0: run_stats(run_correctness([[0.5]], 10, 0), 0, DRAWS)},
                {0: run_stats(run_correctness([[0.5]], 12, 0), 0, DRAWS)}, "AA")


def test_correctness_round_trips_through_its_json_encoding():
    correct = run_correctness([[0.5], [0.6, 0.4]], 7, seed=4)
    assert [[c.tolist() for c in stage] for stage in decode(encode(correct))] == \
        [[c.tolist() for c in stage] for stage in correct]


def test_routing_without_a_task_id_gets_its_own_forgetting_and_interval():
    oracle = [[np.ones(40, int)], [np.ones(40, int), np.ones(40, int)]]
    inferred = [[np.ones(40, int)], [np.r_[np.ones(30, int), np.zeros(10, int)], np.ones(40, int)]]  # 10 of 40 lost
    row = {"method": "seta", "sequence": "s", "order": ["a", "b"], "seed": 0}
    examples = {run_key(row): {"oracle": encode(oracle), "inferred": encode(inferred)}}
    entry = aggregate([row], examples, draws=DRAWS)["methods"][0]
    assert entry["forgetting"]["mean"] == 0.0
    assert entry["task_agnostic_forgetting"]["mean"] == pytest.approx(25.0)
    low, high = entry["task_agnostic_forgetting"]["ci95"]
    assert 0 < low < 25.0 < high


# -- rows, resume --------------------------------------------------------------------------------------
def fake_run(aa_by_method: dict[str, float], calls: list):
    """A run function that records its calls and answers a row from hand-made correctness."""
    def run(label, sequence, tasks, seed):
        calls.append((label, sequence, seed))
        rate = aa_by_method[label] + 0.02 * seed
        uniform = np.random.default_rng(seed).random((len(tasks), 50))  # shared by methods at a seed: paired
        final = [(u < rate).astype(int) for u in uniform]
        correct = [final[:i + 1] for i in range(len(tasks))]  # nothing forgotten: BwT 0
        row = {key: None for key in ROW_KEYS}
        row.update(method=label, sequence=sequence, order=list(tasks), seed=seed, AA=100 * rate, BwT=0.0,
                   FwT=0.0, forgetting=0.0, strip_rate=50.0, n_test=[50] * len(tasks), trainable_params=10,
                   wall_s=60.0, oracle=label == "per_task_lora")
        return row, {"oracle": encode(correct)}
    return run


SEQUENCES = {"s1": ["a", "b"]}
AA = {"moe_cl": 0.8, "seq_lora": 0.6, "replay": 0.75, "ewc": 0.62, "olora": 0.7, "per_task_lora": 0.9}


def test_a_half_finished_benchmark_runs_only_what_is_missing(tmp_path):
    labels, seeds, budget = list(AA), [0, 1], Budget(model="tiny")
    first = []

    def stopping(label, sequence, tasks, seed):  # the benchmark is killed during its fifth run
        if len(first) == 4:
            raise KeyboardInterrupt
        return fake_run(AA, first)(label, sequence, tasks, seed)

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(SEQUENCES, labels, seeds, Results(tmp_path, budget, draws=DRAWS), stopping)
    saved = json.loads((tmp_path / "cl_quality.json").read_text())
    assert [r["method"] for r in saved["rows"]] == labels[:4]

    again = []
    results = Results(tmp_path, budget, draws=DRAWS)
    run_benchmark(SEQUENCES, labels, seeds, results, fake_run(AA, again))
    assert not set(again) & set(first)  # nothing finished runs twice
    # Every method at seed 0; then seed 1 for the multi-seed labels and the strongest other non-oracle
    # baseline at seed 0 (olora: 70 beats ewc's 62; the oracle per_task_lora does not count).
    multi = {(label, "s1", 1) for label in ("moe_cl", "seq_lora", "replay", "olora")}
    assert set(first) | set(again) == {(label, "s1", 0) for label in labels} | multi
    assert len(results.rows) == len(first) + len(again) == len(labels) + len(multi)
    assert planned_runs(SEQUENCES, labels, seeds, results.rows)[-1] == ("olora", "s1", 1)

    third = []
    run_benchmark(SEQUENCES, labels, seeds, Results(tmp_path, budget, draws=DRAWS), fake_run(AA, third))
    assert third == []
    saved = json.loads((tmp_path / "cl_quality.json").read_text())
    assert all(set(row) == ROW_KEYS for row in saved["rows"])
    pair = next(p for p in saved["aggregate"]["pairs"]
                if (p["sequence"], p["a"], p["b"], p["measure"]) == ("s1", "moe_cl", "seq_lora", "AA"))
    assert pair["seeds"] == [0, 1] and pair["verdict"] == "better"
    assert "| moe_cl | 2 |" in (tmp_path / "cl_quality.md").read_text()
    assert (tmp_path / "cl_quality_aa_bwt.png").stat().st_size > 10_000


def test_a_results_file_of_another_budget_is_refused_and_kept(tmp_path):
    run_benchmark({"s1": ["a", "b"]}, ["moe_cl"], [0], Results(tmp_path, Budget(model="tiny"), draws=DRAWS),
                  fake_run(AA, []))
    before = (tmp_path / "cl_quality.json").read_text()
    with pytest.raises(SystemExit, match="steps_per_task"):
        Results(tmp_path, Budget(model="tiny", steps_per_task=32))
    with pytest.raises(SystemExit, match="another --sequence name"):
        run_benchmark({"s1": ["b", "a"]}, ["moe_cl"], [0], Results(tmp_path, Budget(model="tiny")), fake_run(AA, []))
    assert (tmp_path / "cl_quality.json").read_text() == before
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cl_quality.json").write_text("[]")  # the single-seed predecessor wrote a list
    with pytest.raises(SystemExit, match="not a results file"):
        Results(tmp_path / "old", Budget(model="tiny"))


def test_the_readme_section_follows_the_rows_and_the_rest_is_kept(tmp_path):
    from benchmarks.cl_report import README_BEGIN, README_END

    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n", "\n## Later\nkept\n"
    readme.write_text(f"{before}{README_BEGIN}\nstale table\n{README_END}{after}")
    out = tmp_path / "results"
    out.mkdir()
    run_benchmark(SEQUENCES, ["moe_cl", "seq_lora"], [0], Results(out, Budget(model="tiny"), draws=DRAWS, readme=readme),
                  fake_run(AA, []))
    text = readme.read_text()
    assert text.startswith(before + README_BEGIN) and text.endswith(README_END + after)
    assert "stale table" not in text and "](results/cl_quality_aa_bwt.png)" in text
    section = text[text.index(README_BEGIN):text.index(README_END)]
    aa_pair = next(line for line in section.splitlines() if line.startswith("| moe_cl − seq_lora | AA |"))
    assert "| moe_cl | 1 | " in section and aa_pair.endswith("| better | 1 |")  # 80 against 60
    assert "#### Goals" in section

    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no report section"):
        Results(out, Budget(model="tiny"), draws=DRAWS, readme=readme)
    assert readme.read_text() == "no markers\n"


def test_run_one_writes_the_row_schema_from_a_pipeline_result(tmp_path, monkeypatch):
    tasks = ["bbc_news_topic", "vader_movieReviewSnippets"]
    for t in tasks:
        (tmp_path / "data" / t).mkdir(parents=True)
        for split in ("train", "test"):
            (tmp_path / "data" / t / f"{split}.jsonl").write_text('{"text": "x", "label": "no"}\n{"text": "y", "label": "yes"}\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The evaluate stages' rows as the pipeline records them: task 0's row may carry a later task (GEM FwT).
    rows = {"task0/evaluate": {"oracle": {"correct": [[1, 0, 1], [0, 0, 0]]}},
            "task1/evaluate": {"oracle": {"correct": [[1, 1, 0], [1, 0, 0]]}}}
    ledger = Ledger(run_dir, "config-hash")
    for key, row in rows.items():
        ledger.mark_done(StageKey.parse(key), {"rows": row}, seconds=1.0)
    summary = {"oracle": {"AA": 50.0, "BwT": 0.0, "FwT": 1.0, "forgetting": 0.0}}
    result = SimpleNamespace(summary=summary, strip_calibrated={"oracle": [40.0, 60.0]}, run_dir=run_dir,
                             busy_s=3.25)

    class FakeDriver:
        def __init__(self, cfg, storage):
            assert cfg.training.seed == 3 and [t.name for t in cfg.tasks] == tasks

        def run(self):
            return result

    monkeypatch.setattr("pipelines.run.driver.Driver", FakeDriver)
    monkeypatch.setattr(cl_quality, "bank_size", lambda run_dir, n: {"trainable_params": 1234, "bank_growth": {}})
    row, examples = cl_quality.run_one("seq_lora", "mine", tasks, 3, tmp_path / "data", Budget(model="tiny"), tmp_path)
    assert set(row) == ROW_KEYS
    assert row["learning_gain"] is None and row["steps_per_task"] is None  # before the pipeline reports them
    assert row["n_test"] == [3, 3] and row["wall_s"] == 3.2 and row["strip_rate"] == 50.0 and not row["oracle"]
    assert examples == {"oracle": [["101"], ["110", "100"]]}
    summary["oracle"]["learning_gain"], result.steps_per_task = 30.0, 16
    row, _ = cl_quality.run_one("seq_lora", "mine", tasks, 3, tmp_path / "data", Budget(model="tiny"), tmp_path)
    assert row["learning_gain"] == 30.0 and row["steps_per_task"] == 16


def write_task_folders(root, tasks):
    """Task folders in the shared data's layout, a few rows each."""
    for task in tasks:
        (root / task).mkdir(parents=True)
        for split in ("train", "test"):
            (root / task / f"{split}.jsonl").write_text("".join(
                json.dumps({"text": f"review {i}", "label": label}) + "\n"
                for i, label in enumerate(["positive", "negative", "ambivalent", "neutral", "negative"])))


def test_a_method_whose_code_changed_runs_again_and_its_old_row_and_run_are_kept(tmp_path, capsys):
    data, storage, out, budget = tmp_path / "data", tmp_path / "runs", tmp_path / "out", Budget(model="tiny")
    write_task_folders(data, SEQUENCES["s1"])
    run_benchmark(SEQUENCES, ["moe_cl", "seq_lora"], [0], Results(out, budget, draws=DRAWS), fake_run(AA, []))
    run_dir = storage / parse_config(run_config("seq_lora", "s1", SEQUENCES["s1"], 0, data, budget)).run_id
    run_dir.mkdir(parents=True)
    (run_dir / "ledger.json").write_text('{"stages": {}}')
    with pytest.raises(SystemExit, match="--redo: \\['seta'\\] not among --methods"):
        cl_quality.checked_redo("seta", ["moe_cl", "seq_lora"])

    results = Results(out, budget, draws=DRAWS)
    cl_quality.redo(results, cl_quality.checked_redo("seq_lora", ["moe_cl", "seq_lora"]), SEQUENCES, [0], data,
                    budget, storage)
    assert capsys.readouterr().out.splitlines()[-1] == "seq_lora on s1, seed 0: superseded; it runs again"
    assert [r["method"] for r in json.loads((out / "cl_quality.json").read_text())["rows"]] == ["moe_cl"]
    superseded = json.loads((out / "cl_quality_superseded.json").read_text())
    assert [s["row"]["method"] for s in superseded] == ["seq_lora"] and superseded[0]["examples"]["oracle"]
    assert not run_dir.exists()
    [moved] = (storage / "superseded").iterdir()
    assert moved.name.startswith(run_dir.name + ".") and (moved / "ledger.json").read_text() == '{"stages": {}}'
    again = []
    run_benchmark(SEQUENCES, ["moe_cl", "seq_lora"], [0], Results(out, budget, draws=DRAWS), fake_run(AA, again))
    assert again == [("seq_lora", "s1", 0)]


def test_rows_run_again_after_redo_are_scored_on_their_new_correctness(tmp_path):
    data, out, budget, labels = tmp_path / "data", tmp_path / "out", Budget(model="tiny"), ["moe_cl", "seq_lora"]
    write_task_folders(data, SEQUENCES["s1"])
    run_benchmark(SEQUENCES, labels, [0], Results(out, budget, draws=DRAWS), fake_run(AA, []))
    results = Results(out, budget, draws=DRAWS)
    results.write()  # the report, written as the benchmark does while the old rows are all there
    cl_quality.redo(results, labels, SEQUENCES, [0], data, budget, tmp_path / "runs")
    run_benchmark(SEQUENCES, labels, [0], results, fake_run({"moe_cl": 0.6, "seq_lora": 0.8}, []))
    saved = json.loads((out / "cl_quality.json").read_text())["aggregate"]
    assert saved == json.loads(json.dumps(aggregate(results.rows, results.examples, draws=DRAWS)))  # a new process's
    aa = {m["method"]: m["AA"]["mean"] for m in saved["methods"]}
    assert aa["seq_lora"] > aa["moe_cl"] + 10  # the new code's order, the reverse of the superseded rows'


def test_run_config_carries_the_budget_seed_and_ablation(tmp_path):
    write_task_folders(tmp_path, cl_quality.SEQUENCES["multiemo"])
    cfg = run_config("moe_cl_no_gan", "multiemo", cl_quality.SEQUENCES["multiemo"], 2, tmp_path,
                     Budget(steps_per_task=16, batch_size=8))
    assert cfg["method"] == {"name": "moe_cl", "params": {"adv_weight": 0.0}}
    assert cfg["training"]["seed"] == 2 and cfg["training"]["epochs"] == 1
    task = cfg["tasks"][0]
    assert task["max_train_examples"] == 128 and task["max_test_examples"] == 200
    assert task["labels"] == ["ambivalent", "negative", "neutral", "positive"] and task["template"].startswith("Review:")


# -- goals ---------------------------------------------------------------------------------------------
def test_goals_follow_the_figures_and_say_what_is_not_measured(tmp_path):
    rows, examples = [], {}
    for label, rate in {"moe_cl": 0.8, "moe_cl_no_gan": 0.8, "seq_lora": 0.6, "replay": 0.85}.items():
        row, ex = fake_run({label: rate}, [])(label, "order1", ["a", "b"], 0)
        rows.append(row)
        examples[run_key(row)] = ex
    lines = goals(rows, aggregate(rows, examples, draws=DRAWS))
    assert lines[0] == "order1: MoE-CL BwT ≥ −2: BwT +0.0 [+0.0, +0.0], met"
    assert "vs seq_lora +" in lines[1] and lines[1].endswith("not measured yet (no rows: ewc, olora, mocl, seta)")
    assert "(worse), not met" in lines[2]  # replay 5 points above on the same examples
    assert lines[3].endswith("no distinguishable effect")
    assert lines[7].endswith("not measured yet") and "not measured yet (no rows: seq_lora" in lines[8]  # multiemo
    assert lines[-2] == "every row reports FwT (GEM), learning gain and optimizer steps per task: 0 of 4 rows, not met"


# -- the real pipeline -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_benchmark_runs_a_tiny_sequence_through_the_pipeline_and_does_not_run_it_twice(tmp_path, ray_local, capsys):
    from cl_core.synthetic import synthetic_rows

    for t, (name, labels) in enumerate({"syn_a": ["w1", "w2"], "syn_b": ["w3", "w4", "w5"]}.items()):
        (tmp_path / "data" / name).mkdir(parents=True)
        for split, n, seed in (("train", 40, 0), ("test", 30, 1)):
            lines = "".join(json.dumps(r) + "\n" for r in synthetic_rows(t, labels, n, seed))
            (tmp_path / "data" / name / f"{split}.jsonl").write_text(lines)
    argv = ["--model", "tiny", "--order", "syn_a,syn_b", "--sequence", "smoke", "--data", str(tmp_path / "data"),
            "--methods", "seq_lora", "--seeds", "0", "--steps-per-task", "2", "--test-examples", "20",
            "--max-length", "32", "--lr", "0.01", "--storage", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    cl_quality.main(argv)
    saved = json.loads((tmp_path / "out" / "cl_quality.json").read_text())
    (row,) = saved["rows"]
    assert set(row) == ROW_KEYS and row["n_test"] == [20, 20] and row["order"] == ["syn_a", "syn_b"]
    cells = json.loads((tmp_path / "out" / "cl_quality_examples.json").read_text())[run_key(row)]["oracle"]
    final = [np.mean([int(c) for c in cell]) for cell in cells[-1]]
    assert row["AA"] == pytest.approx(100 * np.mean(final))  # the pipeline's AA from the recorded examples
    (entry,) = saved["aggregate"]["methods"]
    assert entry["AA"]["mean"] == pytest.approx(row["AA"]) and entry["AA"]["ci95"][0] <= row["AA"] <= entry["AA"]["ci95"][1]
    capsys.readouterr()
    cl_quality.main(argv)
    assert "seq_lora smoke seed 0: finished earlier" in capsys.readouterr().out

