"""SETA's split-on-share on the tiny model: the share a task takes of each layer's shared expert,
the split it decides, and what a split does to the bank and to training (cl_core/methods/seta.py)."""

import copy

import pytest
import torch

from cl_core.bank import growth_by_owner
from cl_core.methods import build_method
from cl_core.methods.seta import PREFIX, SHARE, SPLIT, shared_parameters
from cl_core.objectives import LMObjective
from cl_core.training import Learner, evaluate_task, task_loss_fn, train_steps
from tests.conftest import batches, synthetic_task, tiny_model
from tests.test_methods_routed import (  # noqa: F401 (_one_thread: a fixture)
    TINY_SETA,
    _one_thread,
    _round_trip,
    train_seta_task0,
)


@pytest.fixture(scope="module")
def seta_task0():
    return train_seta_task0()


# Between the shares measured below for a new task (0.49, 0.38) and for task 0's data again (0.61, 0.99).
SPLIT_SHARE = 0.55


def _second_task(seta_task0, which: str):
    """(objective, examples) of task 1: a new task, or task 0's task drawn again."""
    _, objective, examples = seta_task0
    if which == "new":
        return objective, examples[1]
    _, tok = tiny_model("learned")
    fmt0, again = synthetic_task(tok, 0, 48, seed=3)
    return LMObjective(tok, [fmt0, fmt0]), [dict(e, task=1) for e in again]


def _planned(seta_task0, which: str, split_share: float = SPLIT_SHARE):
    model = copy.deepcopy(seta_task0[0])
    objective, examples = _second_task(seta_task0, which)
    method = build_method("seta", split_share=split_share, **TINY_SETA)
    method.plan_task(model, 1, lambda: batches(objective.collate, examples, 8), task_loss_fn(model, objective, method))
    return model, method, objective, examples


def test_a_task_that_competes_for_the_shared_expert_takes_a_larger_share_and_splits_it(seta_task0):
    shares = {}
    for which in ("new", "again"):
        model, _, _, _ = _planned(seta_task0, which)
        shares[which] = model.method_state[SHARE + "1"][:, 0].tolist()
        print(f"task 1 = {which}: share of the shared expert per layer {[round(s, 3) for s in shares[which]]}, "
              f"split {model.method_state[SPLIT + '1'][:, 0].tolist()}")
        assert model.method_state[SPLIT + "1"][:, 0].tolist() == [int(s >= SPLIT_SHARE) for s in shares[which]]
    # task 0's data again depends on the coordinates task 0 depends on: measured 0.61 / 0.99 per layer,
    # a new task 0.49 / 0.38
    assert all(a > n for a, n in zip(shares["again"], shares["new"]))
    assert min(shares["again"]) >= SPLIT_SHARE > max(shares["new"])
    # task 0 plans nothing, and a split_share above 1 never splits
    model = copy.deepcopy(seta_task0[0])
    build_method("seta", split_share=1.5).plan_task(model, 1, None, None)
    assert not any(k.startswith((SHARE, SPLIT)) for k in model.method_state)


def test_a_split_freezes_the_shared_expert_and_trains_its_copy(seta_task0, tmp_path):
    model, method, objective, examples = _planned(seta_task0, "again")
    method.setup_task(model, 1)
    method.setup_task(model, 1)  # a later stage sets the task up again: nothing added twice
    layer = model.bank.layers[0]
    assert [m.name for m in layer.expert_meta] == ["shared0", "task0.0", "task1.0", "task1.split0"]
    assert all(torch.equal(a, b) for a, b in zip(layer.experts[0].parameters(), layer.experts[3].parameters()))
    assert torch.equal(layer.router.rows[0], layer.router.rows[3])  # the expert and its gate, split in two
    for layer in model.bank.layers:
        assert not any(p.requires_grad for p in layer.experts[0].parameters()) and not layer.router.rows[0].requires_grad
        assert all(p.requires_grad for e in (2, 3) for p in layer.experts[e].parameters())
    before = {k: p.detach().clone() for k, p in shared_parameters(model).items()}
    copy_before = [p.detach().clone() for p in model.bank.layers[1].experts[3].parameters()]
    train_steps(Learner(model, objective, method), batches(objective.collate, examples, 8, epochs=2), lr=1e-2)
    assert all(torch.equal(p, before[k]) for k, p in shared_parameters(model).items())  # as task 0 left it
    moved = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.bank.layers[1].experts[3].parameters(), copy_before))
    assert moved > 1e-3
    method.after_task(model, 1, lambda: batches(objective.collate, examples, 8), task_loss_fn(model, objective, method))
    # 2 layers, hidden 64, intermediate of the tiny Llama, rank 8: an expert's factors and its router row
    per_expert = sum(p.numel() for p in model.bank.layers[0].experts[0].parameters()) + 64
    growth = growth_by_owner(model.bank.structure(), {k: list(v.shape) for k, v in model.bank.state_dict().items()})
    assert growth == {"shared": {"experts": 2, "params": 2 * per_expert}, "0": {"experts": 2, "params": 2 * per_expert},
                      "1": {"experts": 4, "params": 4 * per_expert}}
    _round_trip(model, method, lambda: tiny_model("learned")[0], objective.collate(examples[:6]), tmp_path)


def _run_two_tasks(split_share: float, seed: int) -> tuple[list[float], float]:
    """Task 0 then a new task 1 through plan, setup, training and after_task: accuracy on both
    (task-agnostic) and how far the shared parameters moved from task 0's anchor, Fisher-weighted."""
    model, tok = tiny_model("learned")
    torch.manual_seed(seed)  # after the model: loading the tiny base model seeds the generator itself
    data = [synthetic_task(tok, 0, 48, seed=1), synthetic_task(tok, 1, 48, seed=2, labels=("w3", "w4"))]
    tests = [synthetic_task(tok, 0, 48, seed=11)[1], synthetic_task(tok, 1, 48, seed=12, labels=("w3", "w4"))[1]]
    objective = LMObjective(tok, [fmt for fmt, _ in data])
    method = build_method("seta", split_share=split_share, **TINY_SETA)
    for t, (_, examples) in enumerate(data):
        def task_batches(examples=examples):
            return batches(objective.collate, examples, 8)
        method.plan_task(model, t, task_batches, task_loss_fn(model, objective, method))
        method.setup_task(model, t)
        if t == 1:
            anchors = {k: model.method_state[f"{PREFIX}anchor.{k}"].clone() for k in shared_parameters(model)}
        train_steps(Learner(model, objective, method), batches(objective.collate, examples, 8, epochs=3, seed=t), lr=1e-2)
        model.eval()
        method.after_task(model, t, task_batches, task_loss_fn(model, objective, method))
    params = shared_parameters(model)
    drift = sum(float((model.method_state[f"{PREFIX}fisher.{k}"] * (params[k].detach() - a).pow(2)).sum())
                for k, a in anchors.items())
    return [evaluate_task(model, objective, method, tests[t], task_id_mode="inferred")["accuracy"] for t in (0, 1)], drift


def test_splitting_every_layer_leaves_task_0s_shared_expert_where_it_was_and_keeps_task_0():
    runs = {split_share: [_run_two_tasks(split_share, seed) for seed in range(4)] for split_share in (0.0, 2.0)}
    for split_share, label in ((0.0, "split everywhere"), (2.0, "never split")):
        print(f"{label}: task 0 after task 1 {[round(acc[0], 2) for acc, _ in runs[split_share]]}, "
              f"task 1 {[round(acc[1], 2) for acc, _ in runs[split_share]]}, "
              f"shared drift {[round(d, 3) for _, d in runs[split_share]]}")
    assert all(d == 0 for _, d in runs[0.0]) and all(d > 0 for _, d in runs[2.0])
    mean = {k: [sum(acc[t] for acc, _ in r) / len(r) for t in (0, 1)] for k, r in runs.items()}
    # One seed is noise here (seed 1 keeps task 0 at 0.50 split, 0.83 not). Over seeds 0-3, measured:
    # task 0 kept 0.81 split against 0.67 not, task 1 0.78 and 0.78 (over 8 seeds: 0.85 / 0.65, 0.85 / 0.85).
    assert mean[0.0][0] > mean[2.0][0] + 0.05 and mean[0.0][1] > mean[2.0][1] - 0.05
