"""The baseline methods on a tiny Llama, run the way the pipeline runs them.

Every task is a stage of its own: a fresh model and a fresh method object, the parent bank
loaded, `setup_task`, `training_examples`, training, `after_task`, the bank saved. So anything a
method keeps only on its Python object is lost between tasks, as in the pipeline, and the
defining behaviour of each method is checked on the bank the last stage wrote.
"""

from __future__ import annotations

import pytest
import torch

from cl_core.methods import METHODS, Method, build_method
from cl_core.methods.ewc import PREFIX

FISHER, ANCHOR = PREFIX + "fisher.", PREFIX + "anchor."
from cl_core.methods.olora import olora_terms
from cl_core.methods.replay import replay_buffer
from cl_core.objectives import LMObjective
from cl_core.training import Learner, evaluate_task, task_loss_fn, train_steps
from tests.conftest import batches, synthetic_task, tiny_model

EPOCHS, LR, BATCH = 4, 1e-2, 8
TASK1_LABELS = ("w3", "w4", "w5")
PARAMS = {
    "seq_lora": {},
    "per_task_lora": {},
    "replay": {"buffer_share": 0.25},
    "ewc": {"lam": 100.0},
    "olora": {"lam_orth": 0.5},
    "mocl": {},
    "mtl": {},
}
BASELINES = sorted(PARAMS)
# Held-out accuracy that shows a task was learned (chance: 1/2 for task 0, 1/3 for task 1).
LEARNED = (0.75, 0.6)


def _data(tok):
    fmt0, train0 = synthetic_task(tok, 0, 48, seed=1)
    fmt1, train1 = synthetic_task(tok, 1, 48, seed=2, labels=TASK1_LABELS)
    _, test0 = synthetic_task(tok, 0, 24, seed=11)
    _, test1 = synthetic_task(tok, 1, 24, seed=12, labels=TASK1_LABELS)
    return [fmt0, fmt1], [train0, train1], [test0, test1]


def _train(learner: Learner, stream) -> list[dict]:
    return train_steps(learner, stream, lr=LR)


def run_stage(name: str, params: dict, task: int, parent, out, seed: int = 0) -> dict:
    """One pipeline stage: build, load the parent bank, set up, train, after_task, save."""
    torch.manual_seed(seed)
    method = build_method(name, **params)
    model, tok = tiny_model(method.router)
    formats, train, test = _data(tok)
    objective = LMObjective(tok, formats)
    if parent is not None:
        model.load(parent)
    torch.manual_seed(seed * 1000 + task)
    method.setup_task(model, task)
    examples = method.training_examples(task, train[task], train[:task], seed)
    learner = Learner(model, objective, method)
    before = {k: v.clone() for k, v in model.bank_state_dict().items()}
    logs = _train(learner, batches(objective.collate, examples, BATCH, epochs=EPOCHS, seed=task))
    model.eval()

    method.after_task(model, task, lambda: batches(objective.collate, train[task], BATCH),
                      task_loss_fn(model, objective, method))
    model.tasks.append(f"t{task}")
    model.save(out)
    acc = [evaluate_task(model, objective, method, test[t])["accuracy"] for t in range(task + 1)]
    return {"model": model, "method": method, "objective": objective, "examples": examples, "logs": logs,
            "before": before, "acc": acc, "train": train, "test": test, "bank": out}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: a second intra-op thread only adds synchronisation (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """name → [stage 0, stage 1] results, trained once per module."""
    runs: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in runs:
            root = tmp_path_factory.mktemp(name)
            s0 = run_stage(name, PARAMS[name], 0, None, root / "bank0")
            s1 = run_stage(name, PARAMS[name], 1, root / "bank0", root / "bank1")
            runs[name] = [s0, s1]
        return runs[name]
    return get


def _experts(state: dict, index: int) -> dict:
    return {k: v for k, v in state.items() if f".experts.{index}." in k}


def _n_experts(model) -> list[int]:
    return [len(layer.experts) for layer in model.bank.layers]


# -- per-method checks -------------------------------------------------------------------------
def check_seq_lora(s0, s1, tmp_path, two_tasks):
    assert _n_experts(s1["model"]) == [1, 1] and s1["model"].bank.expert_names() == ["shared"]
    assert s0["acc"][0] >= LEARNED[0]
    # the one LoRA keeps training on task 1, and nothing keeps task 0 (measured 0.88 -> 0.50)
    assert not all(torch.equal(v, s1["model"].bank_state_dict()[k]) for k, v in _experts(s1["before"], 0).items())
    assert s1["acc"][1] >= LEARNED[1] and s1["acc"][0] < s0["acc"][0] - 0.2
    print(f"seq_lora: task-0 accuracy {s0['acc'][0]:.2f} after task 0, {s1['acc'][0]:.2f} after task 1")
    # no task id needed: the inferred mode (task ids -1) gives the oracle's accuracy
    inferred = evaluate_task(s1["model"], s1["objective"], s1["method"], s1["test"][0], task_id_mode="inferred")
    assert inferred["accuracy"] == s1["acc"][0]


def check_per_task_lora(s0, s1, tmp_path, two_tasks):
    assert _n_experts(s1["model"]) == [2, 2]
    state = s1["model"].bank_state_dict()
    frozen = _experts(s0["model"].bank_state_dict(), 0)
    assert frozen and all(torch.equal(state[k], v) for k, v in frozen.items())
    assert s1["acc"][0] == s0["acc"][0] >= LEARNED[0]  # task 0 untouched by task 1
    assert s1["acc"][1] >= LEARNED[1]


def check_replay(s0, s1, tmp_path, two_tasks):
    method, train = s1["method"], s1["train"]
    examples = s1["examples"]
    replayed = [ex for ex in examples if ex["task"] == 0]
    assert len(replayed) == 12 and len(examples) == 48 + 12
    assert all(ex in train[0] for ex in replayed)
    # deterministic, and a task's buffer does not depend on the task being trained
    assert method.training_examples(1, train[1], train[:1], 0) == examples
    assert replay_buffer(train[0], 12, 0, 0) == replay_buffer(train[0], 12, 0, 0) != replay_buffer(train[0], 12, 1, 0)
    default = build_method("replay").training_examples(1, train[1], train[:1], 0)
    assert sum(ex["task"] == 0 for ex in default) == 5  # 10% of task 0's 48 examples
    assert sorted(map(repr, s0["examples"])) == sorted(map(repr, train[0]))  # task 0: nothing to replay
    # replaying 12 examples of task 0 keeps more of it than plain sequential LoRA
    seq = two_tasks("seq_lora")[1]
    print(f"replay: task-0 accuracy {s0['acc'][0]:.2f} after task 0, {s1['acc'][0]:.2f} after task 1 "
          f"(seq_lora: {seq['acc'][0]:.2f})")
    assert s1["acc"][0] > seq["acc"][0] + 0.1


def check_ewc(s0, s1, tmp_path, two_tasks):
    state = s0["model"].method_state
    fishers = {k[len(FISHER):]: v for k, v in state.items() if k.startswith(FISHER)}
    assert len(fishers) == 12 and all(ANCHOR + k in state for k in fishers)  # 2 layers × 6 factors
    assert all((f >= 0).all() for f in fishers.values()) and sum(float(f.sum()) for f in fishers.values()) > 0
    # task 1 trained from the same bank with lam = 0 ...
    free = run_stage("ewc", {"lam": 0.0}, 1, s0["bank"], tmp_path / "free")
    anchors = {k: state[ANCHOR + k] for k in fishers}

    def distance(model, weighted):
        params = model.bank.expert_parameters()
        return sum(float(((fishers[k] if weighted else 1) * (params[k].detach() - a).pow(2)).sum())
                   for k, a in anchors.items())

    for weighted in (True, False):
        held, loose = distance(s1["model"], weighted), distance(free["model"], weighted)
        print(f"ewc: {'Fisher-weighted' if weighted else 'L2'} distance to θ*: lam=100 {held:.4g}, lam=0 {loose:.4g}")
    assert distance(s1["model"], True) < 0.7 * distance(free["model"], True)
    seq = two_tasks("seq_lora")[1]
    print(f"ewc: task-0 accuracy after task 1: lam=100 {s1['acc'][0]:.2f}, lam=0 {free['acc'][0]:.2f}, "
          f"seq_lora {seq['acc'][0]:.2f}")
    assert distance(s1["model"], False) < distance(free["model"], False)
    # the penalty changes the result: with the batch-mean Fisher EWC kept task 0 no better than
    # sequential LoRA (0.50 and 0.50); with the per-sample Fisher it keeps it (measured 0.92)
    assert s1["acc"][0] > seq["acc"][0] + 0.2 and s1["acc"][1] >= LEARNED[1]
    assert s1["logs"][0]["loss/ewc"] == 0 < s1["logs"][1]["loss/ewc"] and "loss/ewc" not in s0["logs"][0]
    # Fishers accumulate: after task 1 each is the task-0 Fisher plus a non-negative one
    after = s1["model"].method_state
    assert all((after[FISHER + k] >= f).all() for k, f in fishers.items())


def _logits(model, method, batch, fields=None):
    fields = method.routing_fields(model, batch, training=False) if fields is None else fields
    with model.bank.routing(attention_mask=batch["attention_mask"], **fields), torch.no_grad():
        return model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def check_olora(s0, s1, tmp_path, two_tasks):
    model, objective, method, test = s1["model"], s1["objective"], s1["method"], s1["test"]
    assert _n_experts(model) == [2, 2]
    assert s0["logs"][0]["loss/orth"] == 0
    orth = [log["loss/orth"] for log in s1["logs"]]
    print(f"olora: orthogonality loss {orth[0]:.4f} at the first step of task 1, {orth[-1]:.4f} at the last")
    assert orth[0] > 0.05 and orth[-1] < 0.5 * orth[0]
    state = model.bank_state_dict()
    frozen = _experts(s0["model"].bank_state_dict(), 0)
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    # the bank's final LoRAs: task 1's A factors nearly orthogonal to task 0's
    with torch.no_grad():
        assert PARAMS["olora"]["lam_orth"] * float(olora_terms(model)[0]) < 0.5 * orth[0]
    # answers without a task id: the inferred mode (ids -1) and any id give the same predictions
    batch = objective.collate(test[0][:4] + test[1][:4])
    assert torch.equal(_logits(model, method, batch), _logits(model, method, batch, {"task_ids": batch["task_ids"] * 0}))
    acc = [evaluate_task(model, objective, method, test[t], task_id_mode="inferred")["accuracy"] for t in (0, 1)]
    assert acc == s1["acc"]
    # both LoRAs act on every input at once: without task 0's delta, task 1's inputs get other logits
    without0, _ = tiny_model(method.router)
    without0.load(s1["bank"])
    for layer in without0.bank.layers:
        for factor in ("B_gate", "B_up", "B_down"):
            getattr(layer.experts[0], factor).data.zero_()
    task1 = objective.collate(test[1][:4])
    assert (_logits(model, method, task1) - _logits(without0, method, task1)).abs().max() > 1e-3
    seq = two_tasks("seq_lora")[1]
    print(f"olora: accuracy after task 1 {acc} (seq_lora {seq['acc']}); after task 0 {s0['acc']}")
    assert acc[1] >= LEARNED[1]


def check_mocl(s0, s1, tmp_path, two_tasks):
    model, objective, method, test = s1["model"], s1["objective"], s1["method"], s1["test"]
    assert _n_experts(model) == [2, 2]
    task_acc = []
    for t in (0, 1):
        batch = objective.collate(test[t])
        task_acc.append(float((method.infer_task_ids(model, batch) == t).float().mean()))
    match = [log["loss/match"] for log in s1["logs"]]
    print(f"mocl: task-id accuracy {task_acc}; match loss {match[0]:.3f} → {match[-1]:.3f}")
    assert min(task_acc) > 0.5 and match[-1] < match[0]
    # routing uses no task id: the same predictions with ids absent, oracle or inferred
    for t in (0, 1):
        inferred = evaluate_task(model, objective, method, test[t], task_id_mode="inferred")
        assert inferred["accuracy"] == s1["acc"][t]
    # with a given task id only modules up to that task take part: moving task 1's expert and key
    # leaves task 0's logits unchanged, while without the id (-1) they change
    moved, _ = tiny_model(method.router)
    moved.load(s1["bank"])
    with torch.no_grad():
        for layer in moved.bank.layers:
            for p in layer.experts[1].parameters():
                p.add_(0.5)
            layer.router.keys[1].copy_(layer.router.keys[0])
    batch0 = objective.collate(test[0][:8])
    assert torch.equal(_logits(model, method, batch0), _logits(moved, method, batch0))
    no_id = {**method.routing_fields(model, batch0, training=False), "task_ids": batch0["task_ids"] * 0 - 1}
    assert (_logits(model, method, batch0, no_id) - _logits(moved, method, batch0, no_id)).abs().max() > 1e-3
    # task 0's expert and keys did not move while task 1 trained
    state = model.bank_state_dict()
    frozen = {k: v for k, v in s0["model"].bank_state_dict().items() if ".experts.0." in k or ".keys.0" in k}
    assert frozen and all(torch.equal(state[k], v) for k, v in frozen.items())


def check_mtl(s0, s1, tmp_path, two_tasks):
    train, examples = s1["train"], s1["examples"]
    assert sorted(map(repr, examples)) == sorted(map(repr, train[0] + train[1]))
    assert [ex["task"] for ex in examples] != sorted(ex["task"] for ex in examples)  # shuffled
    assert s1["method"].training_examples(1, train[1], train[:1], 0) == examples
    assert _n_experts(s1["model"]) == [1, 1]
    assert s1["method"].oracle
    print(f"mtl: accuracy after task 1 {s1['acc']}")
    assert s1["acc"][0] >= LEARNED[0] and s1["acc"][1] >= LEARNED[1]


CHECKS = {name[len("check_"):]: f for name, f in globals().items() if name.startswith("check_")}


@pytest.mark.parametrize("name", BASELINES)
def test_defining_behaviour(name, two_tasks, tmp_path):
    s0, s1 = two_tasks(name)
    CHECKS[name](s0, s1, tmp_path, two_tasks)


@pytest.mark.parametrize("name", BASELINES)
def test_bank_round_trip(name, two_tasks):
    """The last stage's bank, loaded into a fresh model, gives identical logits and method state."""
    s1 = two_tasks(name)[1]
    model, objective = s1["model"], s1["objective"]
    fresh, _ = tiny_model(s1["method"].router)
    fresh.load(s1["bank"])
    fresh.eval()
    assert fresh.structure() == model.structure() and fresh.tasks == ["t0", "t1"]
    assert set(fresh.method_state) == set(model.method_state)
    assert all(torch.equal(fresh.method_state[k], v) for k, v in model.method_state.items())
    batch = objective.collate(s1["test"][0][:4] + s1["test"][1][:4])
    out = []
    for m in (model, fresh):  # a batch of both tasks; a fresh method object, as in a new stage
        fields = build_method(name, **PARAMS[name]).routing_fields(m, batch, training=False)
        with m.bank.routing(attention_mask=batch["attention_mask"], **fields), torch.no_grad():
            out.append(m.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    assert torch.equal(out[0], out[1])


def test_registered_with_oracle_and_routable_flags():
    flags = {name: (METHODS[name].method.oracle, METHODS[name].method.routable, METHODS[name].method.router) for name in BASELINES}
    assert flags == {
        "ewc": (False, True, "learned"),
        "mocl": (False, True, "similarity"),
        "mtl": (True, True, "learned"),
        "olora": (False, True, "merged"),
        "per_task_lora": (True, False, "task"),
        "replay": (False, True, "learned"),
        "seq_lora": (False, True, "learned"),
    }
    assert {name for name in BASELINES if METHODS[name].method.mixes_tasks} == {"replay", "mtl"}
    # the train worker loads earlier tasks' examples only for these: every method that reads them says so
    assert {name for name in METHODS if METHODS[name].method.uses_earlier_examples} == {"replay", "mtl"}
    # moe_cl's own reads only the current task's rows (it holds out its declared choice memory)
    assert {name for name, (cls, _) in METHODS.items() if cls.training_examples is not Method.training_examples} \
        == {"replay", "mtl", "moe_cl"}
    for name, bad in [("ewc", {"lam": -1}), ("olora", {"lam_orth": -1}), ("replay", {"buffer_share": 0}),
                      ("mocl", {"match_weight": -1}), ("mocl", {"key_scale": 0})]:
        with pytest.raises(ValueError):
            build_method(name, **bad)


def test_register_refuses_a_name_taken_by_another_class():
    from cl_core.methods import register
    from cl_core.methods.seq_lora import SeqLoRA

    registered = dict(METHODS)

    class Impostor(Method):
        name = "seq_lora"

    with pytest.raises(ValueError, match=r"'seq_lora' is registered twice: by cl_core\.methods\.seq_lora\.SeqLoRA "
                                         r"and by tests\.test_methods_baselines\..*Impostor"):
        register()(Impostor)

    class Nameless(SeqLoRA):  # inherits seq_lora's name: would have replaced it silently
        pass

    with pytest.raises(ValueError, match="Nameless sets no `name` of its own"):
        register()(Nameless)
    assert METHODS == registered
    assert register()(SeqLoRA) is SeqLoRA and METHODS == registered  # the same class again: no change


def test_method_files_import_no_other_method_file():
    """Methods share code through cl_core.methods (Method, register) and cl_core.methods.common only."""
    import ast
    from pathlib import Path

    import cl_core.methods as package

    allowed = {"cl_core.methods", "cl_core.methods.common"}
    offenders = {}
    for path in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        wrong = {m for m in imported if m.startswith("cl_core.methods") and m not in allowed}
        if wrong:
            offenders[path.name] = sorted(wrong)
    assert offenders == {}


def test_setup_task_is_idempotent_and_freezes_earlier_tasks():
    for name in BASELINES:
        method = build_method(name, **PARAMS[name])
        model, _ = tiny_model(method.router)
        for task in (0, 1, 1):
            method.setup_task(model, task)
        per_task = name in ("per_task_lora", "olora", "mocl")
        assert _n_experts(model) == ([2, 2] if per_task else [1, 1])
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".experts." in n or ".keys." in n for n in trainable)
        if per_task:
            assert all(".experts.1." in n or ".keys.1" in n for n in trainable), trainable


@pytest.mark.parametrize("world", [1, 2])
def test_every_method_gets_the_same_optimizer_steps_per_task(world):
    """Replay's and MTL's extra examples come within the task's steps: an epoch is the task's own size."""
    from pipelines.config import parse_config
    from pipelines.run.worker import micro_batches
    from tests.conftest import tiny_run

    cfg = parse_config(tiny_run(training={"batch_size": 8, "grad_accum": 2, "epochs": 2}))
    _, tok = tiny_model("learned")
    _, train, _ = _data(tok)
    steps = {}
    for name in ("seq_lora", "replay", "mtl"):
        examples = build_method(name).training_examples(1, train[1], train[:1], 0)
        schedule = micro_batches(len(examples), cfg, 1, 0, world, n_task=len(train[1]))
        steps[name] = len(schedule) // cfg.training.grad_accum
        drawn = {i for batch in schedule for i in batch}
        if name == "mtl":  # 96 examples, 48 an epoch, drawn from both tasks
            assert {examples[i]["task"] for i in drawn} == {0, 1}
    # world 1: 48 / 8 = 6 micro batches an epoch; world 2: 24 / 8 = 3 per rank, padded to 4 for whole
    # accumulation cycles; 2 epochs, 2 micro batches per optimizer step
    expected = {1: 6, 2: 4}[world]
    assert steps == {"seq_lora": expected, "replay": expected, "mtl": expected}
