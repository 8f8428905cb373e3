"""pipelines.compare.drift on a tiny SETA run: it reproduces the run's accuracy matrix and swaps
the shared parameters between banks."""

import pytest

from pipelines.compare.drift import drift_split
from pipelines.config import parse_config
from pipelines.run.driver import Driver
from tests.conftest import tiny_run

pytestmark = pytest.mark.slow


def test_seta_drift_reproduces_the_matrix_and_swaps_the_shared_parameters(ray_local, tmp_path):
    # the shared part at the full learning rate: a run that forgets (the default 0.3 barely does)
    cfg = parse_config(tiny_run("drift", method={"name": "seta", "params": {"shared_lr_scale": 1.0}}))
    result = Driver(cfg, tmp_path, lambda _: None).run()
    R = result.matrices["oracle"]
    split = drift_split(result.run_dir)
    task0 = split["task0"]
    print(R, task0)
    assert task0["bank_j"] == pytest.approx(R[0, 0]) and task0["final"] == pytest.approx(R[1, 0])
    # Here task 0 falls from 83.3 to 50.0, and the shared parameters alone carry the fall: swapped
    # in, they restore it, or cause it (task 1's unique expert and router row cost nothing).
    assert task0["final"] < task0["bank_j"] - 20
    assert task0["final_with_bank_j_shared"] == pytest.approx(task0["bank_j"])
    assert task0["bank_j_with_final_shared"] == pytest.approx(task0["final"])
