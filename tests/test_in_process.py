"""The in-process runner: the pipeline's stages on a tiny model, validation apart from training
and test, finished runs kept and skipped."""

import json

import numpy as np
import pytest

from pipelines.compare import in_process
from pipelines.compare.sequences import Budget
from pipelines.compare.stats import decode
from cl_core.synthetic import synthetic_rows
from pipelines.data.tasks import load_prepared

BUDGET = Budget(model="tiny", steps_per_task=2, test_examples=12, max_length=32, lr=0.01)
TASKS = {"syn_a": ["w1", "w2"], "syn_b": ["w3", "w4", "w5"]}


@pytest.fixture
def data(tmp_path):
    for t, (name, labels) in enumerate(TASKS.items()):
        (tmp_path / "data" / name).mkdir(parents=True)
        for split, n, seed in (("train", 40, 0), ("test", 30, 1)):
            lines = "".join(json.dumps(r) + "\n" for r in synthetic_rows(t, labels, n, seed))
            (tmp_path / "data" / name / f"{split}.jsonl").write_text(lines)
    return tmp_path / "data"


def _run(data, tmp_path, method="moe_cl", params=None, seed=0):
    return in_process.run(method, params or {}, "smoke", seed, BUDGET, data=data, cache=tmp_path / "cache",
                          validation_examples=10, tasks=list(TASKS))


def test_a_run_scores_validation_rows_never_trained_on_and_test_rows_apart(data, tmp_path):
    row = _run(data, tmp_path)
    # 16 rows trained on (2 steps of 8); the validation slice is 10 of the 24 rows beyond them
    assert row["n"] == {"validation": [10, 10], "test": [12, 12]}
    prepared = sorted((tmp_path / "cache" / "data").glob("*/summary.json"))
    for summary in prepared:
        folder = summary.parent
        train = {tuple(r["prompt_ids"]) for r in load_prepared(str(folder), "train")}
        validation = {tuple(r["prompt_ids"]) for r in load_prepared(str(folder), in_process.VALIDATION_SPLIT)}
        assert len(train) == 16 and len(validation) == 10 and not train & validation
    for split in ("validation", "test"):
        result = row[split]["oracle"]
        correct = decode(result["correct"])
        assert [len(stage) for stage in correct] == [1, 2]
        final = [100 * np.mean(cell) for cell in correct[-1]]
        assert result["AA"] == pytest.approx(np.mean(final))
        assert result["BwT"] == pytest.approx(final[0] - 100 * np.mean(correct[0][0]))
    assert "inferred" not in row["test"]  # MoE-CL needs the task id


def test_the_same_run_twice_gives_the_same_figures(data, tmp_path):
    a, b = _run(data, tmp_path), _run(data, tmp_path)
    assert json.dumps([a["validation"], a["test"]]) == json.dumps([b["validation"], b["test"]])  # NaN too


def test_finished_runs_are_kept_and_skipped_and_a_label_names_one_method(data, tmp_path, monkeypatch):
    results = in_process.Results(tmp_path / "r.json", BUDGET, 10)
    calls = []

    def fake_run(method, params, sequence, seed, budget, **kwargs):
        calls.append((sequence, seed))
        scores = {"oracle": {"AA": 50.0 + seed, "BwT": 0.0}}
        return {"method": method, "params": params, "sequence": sequence, "seed": seed, "wall_s": 1.0,
                "validation": scores, "test": scores}

    monkeypatch.setattr(in_process, "run", fake_run)
    in_process.run_missing(results, "a", "moe_cl", {"adv_weight": 0.0}, ["order1"], [0], BUDGET)
    again = in_process.Results(tmp_path / "r.json", BUDGET, 10)
    rows = in_process.run_missing(again, "a", "moe_cl", {"adv_weight": 0.0}, ["order1"], [0, 1], BUDGET)
    assert calls == [("order1", 0), ("order1", 1)] and [r["seed"] for r in rows] == [0, 1]
    with pytest.raises(SystemExit, match="label 'a' ran moe_cl"):
        in_process.run_missing(again, "a", "moe_cl", {}, ["order1"], [0], BUDGET)
    with pytest.raises(SystemExit, match="was made with"):
        in_process.Results(tmp_path / "r.json", BUDGET, 20)
    # two processes filling one file: neither drops the other's rows
    first, second = in_process.Results(tmp_path / "r.json", BUDGET, 10), in_process.Results(tmp_path / "r.json", BUDGET, 10)
    in_process.run_missing(first, "b", "seq_lora", {}, ["order1"], [0], BUDGET)
    in_process.run_missing(second, "c", "seq_lora", {}, ["order1"], [0], BUDGET)
    saved = in_process.Results(tmp_path / "r.json", BUDGET, 10).rows
    assert [(r["label"], r["seed"]) for r in saved] == [("a", 0), ("a", 1), ("b", 0), ("c", 0)]


def test_a_paired_difference_gets_a_t_interval_over_the_seeds_both_have():
    def rows(values):
        return [{"seed": s, "validation": {"oracle": {"AA": v}}} for s, v in enumerate(values)]

    # differences 1, 3, 2 at seeds 0-2; b has no seed 3
    out = in_process.paired(rows([61.0, 63.0, 62.0, 99.0]), rows([60.0, 60.0, 60.0]), "AA")
    assert out["seeds"] == [0, 1, 2] and out["per_seed"] == [1.0, 3.0, 2.0] and out["difference"] == 2.0
    # mean 2, sd 1, t(0.975, 2) = 4.303: 2 ± 4.303/√3
    assert out["ci95"] == [pytest.approx(2 - 2.484, abs=0.01), pytest.approx(2 + 2.484, abs=0.01)]
    assert out["verdict"] == "not distinguishable"
    wide_apart = in_process.paired(rows([70.0, 71.0, 72.0]), rows([60.0, 60.5, 61.5]), "AA")
    assert wide_apart["verdict"] == "better" and wide_apart["ci95"][0] > 0
    assert in_process.paired(rows([61.0]), rows([60.0]), "AA")["ci95"] is None


def test_the_selection_summary_pairs_each_variant_with_the_references_on_both_splits():
    from pipelines.compare import moe_cl_selection

    def row(label, seed, val_bwt, test_bwt):
        return {"label": label, "sequence": "s", "seed": seed,
                "validation": {"oracle": {"AA": 60.0, "BwT": val_bwt}}, "test": {"oracle": {"AA": 60.0, "BwT": test_bwt}}}

    free = moe_cl_selection.REFERENCES[1]
    rows = [row("seq_lora", 0, -10.0, -9.0), row("seq_lora", 1, -12.0, -8.0),
            row(free, 0, -8.0, -9.0), row(free, 1, -6.0, -8.0), row("mine", 0, -1.0, -2.0)]
    out = moe_cl_selection.summary(rows)
    assert out[f"s/{free}"]["validation"]["BwT"] == [-8.0, -6.0] and out[f"s/{free}"]["seeds"] == [0, 1]
    assert out[f"s/{free}"]["vs_seq_lora"]["validation"]["BwT"]["per_seed"] == [2.0, 6.0]
    assert out[f"s/{free}"]["vs_seq_lora"]["test"]["BwT"]["per_seed"] == [0.0, 0.0]
    assert out["s/mine"][f"vs_{free}"]["validation"]["BwT"]["seeds"] == [0]
    assert f"vs_{free}" not in out[f"s/{free}"] and "vs_seq_lora" not in out["s/seq_lora"]


def test_the_selection_rule_waits_for_every_candidate_then_needs_snapshots_to_beat_their_paper_form():
    from pipelines.compare import moe_cl_selection as sel
    from pipelines.compare.docs import selection_choice

    def rows(aa_by_label: dict[str, list[float]]) -> list[dict]:
        return [{"label": label, "sequence": sequence, "seed": seed,
                 "validation": {"oracle": {"AA": aa, "BwT": 0.0}}, "test": {"oracle": {"AA": 99.0, "BwT": 0.0}}}
                for label, values in aa_by_label.items() for (sequence, seed), aa in zip(sel.CHOICE_RUNS, values)]

    assert sel.candidates() == ["free+mem16", "free+mem16@paper", "loss_rise10+mem16", "loss_rise10+mem16@paper",
                                "fisher10"]
    flat = {label: [60.0] * 4 for label in sel.candidates()}
    waiting = sel.choice(rows({**flat, "fisher10": [70.0] * 3}))
    assert waiting == {"chosen": None, "waiting_for": {"fisher10": ["multiemo seed 1"]}}
    assert "`fisher10`: multiemo seed 1" in selection_choice({"choice": waiting})[0]

    # the references never win, however high: sequential LoRA and the label rule
    noisy = sel.choice(rows({**flat, "seq_lora": [90.0] * 4, "label_rule": [90.0] * 4,
                             "loss_rise10+mem16": [70.0, 62.0, 75.0, 61.0]}))  # best, but its lead is not sure
    assert noisy["highest"] == "loss_rise10+mem16" and noisy["chosen"] == "loss_rise10+mem16@paper"
    assert noisy["snapshots_vs_paper"]["per_run"] == [10.0, 2.0, 15.0, 1.0] and noisy["snapshots_vs_paper"]["ci95"][0] < 0
    assert noisy["params"]["shared_inference"] == "current" and noisy["params"]["shared_anchor_on"] == "loss_rise"

    sure = sel.choice(rows({**flat, "free+mem16": [70.0, 71.0, 72.0, 70.5]}))
    assert sure["chosen"] == "free+mem16" and sure["snapshots_vs_paper"]["ci95"][0] > 0
    assert sure["params"]["shared_inference"] == "snapshot" and sure["mean_validation_AA"]["free+mem16"] == 70.88
    assert sel.choice(rows({**flat, "fisher10": [61.0] * 4}))["chosen"] == "fisher10"  # no paper form to beat
    assert "Chosen on validation: `free+mem16`" in selection_choice({"choice": sure})[0]


def test_the_game_pairs_each_row_with_its_no_gan_twin_seed_by_seed():
    from pipelines.compare.moe_cl_selection import NO_GAME, game_pairs

    def row(label, seed, aa):
        return {"label": label, "sequence": "s", "seed": seed,
                "validation": {"oracle": {"AA": aa, "BwT": 0.0}}, "test": {"oracle": {"AA": aa - 1, "BwT": 0.0}}}

    rows = [row("v", s, 70.0 + s) for s in range(5)] + [row("v" + NO_GAME, s, 68.0) for s in range(4)]
    rows += [row("v@paper", 0, 60.0), row(f"v{NO_GAME}@paper", 0, 61.0), row("lonely", 0, 50.0)]
    out = game_pairs(rows)
    assert set(out) == {"s/v", "s/v@paper"}  # a twin's own rows and a row without a twin pair with nothing
    assert out["s/v"]["validation"]["AA"]["seeds"] == [0, 1, 2, 3]  # seed 4 has no twin yet
    assert out["s/v"]["validation"]["AA"]["per_seed"] == [2.0, 3.0, 4.0, 5.0]
    assert out["s/v"]["validation"]["AA"]["verdict"] == "better"
    assert out["s/v@paper"]["test"]["AA"]["per_seed"] == [-1.0]
    from pipelines.compare.docs import other_result
    page = "\n".join(other_result(out))  # docs/benchmarks.md's table of the pairs
    assert "| s/v | validation | AA | +2.00, +3.00, +4.00, +5.00 | +3.50 | [+1.45, +5.55] | better |" in page
    assert "| s/v@paper | test | AA | -1.00 | -1.00 | — |" in page  # one seed: no interval


def test_an_inference_variant_answers_with_the_same_training_and_gets_its_own_row(data, tmp_path):
    results = in_process.Results(tmp_path / "r.json", BUDGET, 10)
    params = {"shared_anchor": "none", "shared_inference": "snapshot", "choice_memory": 4}
    in_process.run_missing(results, "snap", "moe_cl", params, ["smoke"], [0], BUDGET,
                           inference={"paper": {"shared_inference": "current"}}, data=data,
                           cache=tmp_path / "cache", tasks=list(TASKS))
    snap, paper = results.finished("snap", "smoke", 0), results.finished("snap@paper", "smoke", 0)
    assert paper["params"] == {**params, "shared_inference": "current"} and paper["trained_as"] == "snap"
    # the last task reads the shared expert as it is under both: its column agrees, row by row
    for split in ("validation", "test"):
        assert decode(snap[split]["oracle"]["correct"])[1][1].tolist() == \
            decode(paper[split]["oracle"]["correct"])[1][1].tolist()
        assert snap[split]["oracle"]["R"][0][0] == paper[split]["oracle"]["R"][0][0]  # after task 0: nothing to choose
