"""Mixed precision (cl_core.precision): what bf16-mixed stores, computes and trains in, on the tiny model."""

import json

import pytest
import torch

from cl_core.bank import BankConfig
from cl_core.methods import build_method
from cl_core.continual_model import ContinualModel
from cl_core.base_model import load_base_model
from cl_core.objectives import LMObjective
from cl_core.precision import base_settings, native_bf16, resolve_precision
from cl_core.training import Learner, evaluate_task, train_steps
from pipelines.config import ConfigError, parse_config
from tests.conftest import TINY, batches, synthetic_task, tiny_run


def _moe_cl(precision: str):
    lm, tok = load_base_model(TINY.model_copy(update=base_settings(precision, torch.device("cpu"))))
    method = build_method("moe_cl")
    model = ContinualModel(lm, BankConfig(router=method.router, dropout=0.0), TINY.source)
    fmt, train = synthetic_task(tok, 0, 64, seed=0)
    _, test = synthetic_task(tok, 0, 32, seed=1)
    objective = LMObjective(tok, [fmt])
    torch.manual_seed(0)
    method.setup_task(model, 0)
    return model, objective, method, train, test


def _train(precision: str):
    model, objective, method, train, test = _moe_cl(precision)
    learner = Learner(model, objective, method)
    logs = train_steps(learner, batches(objective.collate, train, 8, epochs=3), lr=1e-2)
    return model, objective, method, test, logs


def test_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert native_bf16(cpu) and resolve_precision("auto", cpu) == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert resolve_precision("auto", cpu) == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16-mixed", cpu) == "bf16-mixed"  # asked for explicitly: kept (emulated)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="training.precision 'fp16'"):
        resolve_precision("fp16", cpu)


def test_bf16_mixed_stores_the_base_in_bf16_and_trains_float32_tensors():
    model, objective, method, train, _ = _moe_cl("bf16-mixed")
    method.setup_task(model, 1)  # two tasks seen: the discriminators train too
    bank = {id(p) for p in model.bank_parameters()}
    frozen = [p for p in model.parameters() if id(p) not in bank]  # the base model
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16} and not any(p.requires_grad for p in frozen)
    assert trainable and {p.dtype for p in trainable} == {torch.float32}  # experts, gates, discriminators
    with model.bank.routing(task_ids=torch.zeros(1, dtype=torch.long)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    fp32_model = _moe_cl("fp32")[0]
    with fp32_model.bank.routing(task_ids=torch.zeros(1, dtype=torch.long)):
        assert not torch.is_autocast_enabled("cpu")

    learner = Learner(model, objective, method)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = objective.collate(train[:8])
    batch["task_ids"].fill_(1)  # through task 1's expert and gate
    loss, _ = learner(batch)
    assert loss.dtype == torch.float32
    loss.backward()
    optimizer.step()
    assert all(p.grad.dtype == torch.float32 for p in trainable)
    states = [s for s in optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert all(p.grad is None for p in frozen)


def test_bf16_on_a_cpu_runs_eager_attention_with_the_same_loss_as_sdpa():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert base_settings("bf16-mixed", cpu) == {"dtype": "bfloat16", "attention": "eager"}
    assert base_settings("bf16-mixed", cuda) == {"dtype": "bfloat16", "attention": "sdpa"}
    assert base_settings("fp32", cpu) == {"dtype": "float32", "attention": "sdpa"}
    model, objective, method, train, _ = _moe_cl("bf16-mixed")
    assert model.lm.config._attn_implementation == "eager"
    batch = objective.collate(train[:8])
    learner = Learner(model, objective, method)
    eager = learner(batch)[0].item()
    model.lm.set_attn_implementation("sdpa")
    sdpa = learner(batch)[0].item()
    # The same attention up to bf16 rounding of the scores: the losses agree to 1%, and differ.
    assert eager != sdpa and abs(eager - sdpa) < 0.01 * sdpa


def test_bf16_mixed_learns_as_float32_does():
    bf16_model, objective, method, test, bf16_logs = _train("bf16-mixed")
    fp32_model, _, _, _, fp32_logs = _train("fp32")
    # The first loss differs by bf16 rounding only; both runs learn the task.
    assert abs(bf16_logs[0]["loss/task"] - fp32_logs[0]["loss/task"]) < 0.02 * fp32_logs[0]["loss/task"]
    assert bf16_logs[-1]["loss/task"] < 0.5 * bf16_logs[0]["loss/task"]
    bf16 = evaluate_task(bf16_model, objective, method, test)
    fp32_acc = evaluate_task(fp32_model, objective, method, test)["accuracy"]
    assert fp32_acc >= 0.75 and abs(bf16["accuracy"] - fp32_acc) <= 0.1
    assert len(bf16["correct"]) == bf16["n"] == len(test) and sum(bf16["correct"]) / bf16["n"] == bf16["accuracy"]


def test_bf16_mixed_is_deterministic():
    first = _train("bf16-mixed")[0].bank_state_dict()
    second = _train("bf16-mixed")[0].bank_state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_precision_is_validated_and_deepspeed_json_cannot_override_it(tmp_path):
    with pytest.raises(ConfigError, match=r"training.precision: Input should be 'auto', 'fp32' or 'bf16-mixed'"):
        parse_config(tiny_run(training={"precision": "fp16"}), "run.yaml")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"deepspeed.config: .*ds.json: remove the 'bf16' section"):
        parse_config(tiny_run(deepspeed={"config": str(ds)}), "run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: model: dtype: the base model's dtype follows training.precision"):
        parse_config(tiny_run(model={"dtype": "bfloat16"}), "run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: model: attention: the base model's attention follows"):
        parse_config(tiny_run(model={"attention": "eager"}), "run.yaml")
    assert parse_config(tiny_run()).training.precision == "fp32"
    assert parse_config({"tasks": tiny_run()["tasks"]}).training.precision == "auto"
