"""Faults that must not lose data: a full disk during a bank write, an unreachable MLflow, secrets."""

import errno

import pytest
import torch

import cl_core.bank as bank_module
from cl_core.bank import BankError, load_bank
from cl_core.methods import build_method
from pipelines.tracking import Tracker, TrackingError, flatten
from tests.conftest import tiny_model


def _bank(tmp_path):
    model, _ = tiny_model("task")
    method = build_method("moe_cl")
    method.setup_task(model, 0)
    model.save(tmp_path / "bank")
    return model, method


def test_disk_full_while_writing_a_bank_keeps_the_previous_one(tmp_path, monkeypatch):
    model, method = _bank(tmp_path)
    before = load_bank(tmp_path / "bank")[1]
    method.setup_task(model, 1)  # the bank grows; the next save would replace the files

    def full_disk(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bank_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save(tmp_path / "bank")
    manifest, after = load_bank(tmp_path / "bank")  # still verifies: old tensors, old manifest
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.name for p in (tmp_path / "bank").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_manifest_missing_means_no_bank(tmp_path):
    _bank(tmp_path)
    (tmp_path / "bank" / "manifest.json").unlink()
    with pytest.raises(BankError, match="no manifest"):
        load_bank(tmp_path / "bank")


def test_unreachable_mlflow_fails_fast_before_compute(tmp_path):
    with pytest.raises(TrackingError, match=r"MLflow at http://127.0.0.1:9/ is not reachable"):
        Tracker("http://127.0.0.1:9/", "clpipe", tmp_path)


def test_secret_looking_values_are_never_logged():
    params = flatten({"method": {"name": "moe_cl", "params": {"api_token": "s3cr3t", "adv_weight": 0.1}},
                      "mlflow": {"password": "x"}})
    assert params == {"method.name": "moe_cl", "method.params.adv_weight": "0.1"}


def test_busy_seconds_count_overlapping_stages_once_and_no_time_between_crash_and_rerun(tmp_path, monkeypatch):
    from pipelines.run import ledger as ledger_module

    ledger = ledger_module.Ledger(tmp_path, "hash")
    clock = iter([10.0, 20.0, 110.0])  # when each stage is settled
    monkeypatch.setattr(ledger_module.time, "time", lambda: next(clock))
    ledger.mark_done("task0/train", {}, 10.0)  # 0..10
    ledger.mark_done("task0/evaluate", {"finished_at": 15.0}, 10.0)  # 5..15, overlapped, settled at 20
    ledger.mark_done("task1/train", {}, 10.0)  # 100..110, after a crash and a rerun
    assert ledger.busy_seconds() == 25.0  # a sum of stage seconds says 30, the wall clock 110
