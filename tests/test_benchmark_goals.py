"""The cl_quality benchmark states its goals from the rows: hand-made rows, known verdicts."""

from benchmarks.cl_quality import goals, run_config


def _row(method, AA, BwT, agnostic=None):
    return {"method": method, "order": "order1", "AA": AA, "BwT": BwT, "task_agnostic_AA": agnostic}


def test_goal_verdicts_follow_the_figures():
    rows = [_row("seq_lora", 60.0, -8.0), _row("replay", 70.0, -3.0), _row("moe_cl", 72.0, -1.5),
            _row("moe_cl_no_gan", 73.0, -2.5), _row("per_task_lora", 80.0, 0.0), _row("seta", 65.0, -4.0, 71.0),
            _row("cmoe", 66.0, -1.0, 73.0)]
    lines = goals(rows)
    assert lines[0].endswith("BwT -8.0, met")
    assert "AA 72.0 vs 70.0 (replay), BwT -1.5, met" in lines[1]
    assert "AA by -1.0 and BwT by +1.0: it does not help" in lines[2]
    assert "73.0 (cmoe) vs 80.0 = 91%, met" in lines[3]
    rows[2] = _row("moe_cl", 72.0, -2.5)  # BwT below −2 fails the MoE-CL goal even with the best AA
    assert goals(rows)[1].endswith("not met")


def test_the_no_gan_ablation_is_moe_cl_with_adv_weight_zero(tmp_path):
    cfg = run_config("moe_cl_no_gan", "order2", tmp_path, 32, 24, 1, 1e-3, 96)
    assert cfg["method"] == {"name": "moe_cl", "params": {"adv_weight": 0.0}}
    assert cfg["name"] == "clq-moe_cl_no_gan-order2" and cfg["tasks"][0]["name"] == "foldoc_subject"
