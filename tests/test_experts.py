"""The mixture FFN: fused compute equals the naive formulation; LoRA-B zero leaves the model as it was."""

import pytest
import torch
from torch import nn

from cl_core.bank import BankConfig, ExpertBank
from cl_core.experts import ExpertMeta, naive_mixture
from cl_core.base_model import load_base_model
from cl_core.continual_model import ContinualModel
from tests.conftest import tiny_model, TINY


def _randomise_b(model: ContinualModel) -> None:
    """B starts at zero (LoRA init); give it values so the deltas are not trivially zero."""
    g = torch.Generator().manual_seed(1)
    for layer in model.bank.layers:
        for ex in layer.experts:
            for name in ("B_gate", "B_up", "B_down"):
                p = getattr(ex, name)
                p.data = torch.randn(p.shape, generator=g) * 0.1


def test_fused_dense_equals_naive():
    model, _ = tiny_model("task")
    model.bank.add_expert(ExpertMeta("shared0", "shared"))
    model.bank.add_expert(ExpertMeta("task0.0", "task", 0))
    _randomise_b(model)
    layer = model.bank.layers[0]
    x = torch.randn(3, 7, 64)
    with model.bank.routing(task_ids=torch.zeros(3, dtype=torch.long)):
        fused = layer(x)
        route = layer.router(x, layer.context, layer)
    naive = naive_mixture(layer, x, route.experts, route.gates)
    assert torch.allclose(fused, naive, atol=1e-5)
    assert (fused - layer.base(x)).abs().max() > 1e-3  # the experts really contribute


def test_merged_route_is_the_ffn_with_every_delta_summed_into_its_weights():
    """O-LoRA's route: W + s·Σ_k B_k A_k on gate, up and down, one FFN, no task id."""
    model, _ = tiny_model("merged")
    for t in range(3):
        model.bank.add_expert(ExpertMeta(f"task{t}", "task", t))
    _randomise_b(model)
    layer = model.bank.layers[0]
    x = torch.randn(3, 7, 64)
    with model.bank.routing():
        merged = layer(x)
    s, base = layer.scaling, layer.base
    delta = {name: s * sum(getattr(e, f"B_{name}") @ getattr(e, f"A_{name}") for e in layer.experts)
             for name in ("gate", "up", "down")}
    h = base.act_fn(x @ (base.gate_proj.weight + delta["gate"]).T) * (x @ (base.up_proj.weight + delta["up"]).T)
    assert torch.allclose(merged, h @ (base.down_proj.weight + delta["down"]).T, atol=1e-5)
    assert (merged - base(x)).abs().max() > 1e-3


def test_fused_top2_of_8_equals_naive():
    model, _ = tiny_model("learned", top_k=2)
    for k in range(8):
        model.bank.add_expert(ExpertMeta(f"e{k}", "task", k))
    _randomise_b(model)
    layer = model.bank.layers[1]
    x = torch.randn(4, 9, 64)
    fused = layer(x)
    probs = torch.softmax(layer.router.logits(x.reshape(-1, 64)), -1)
    top, idx = probs.topk(2, -1)
    dense = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))
    naive = naive_mixture(layer, x, list(range(8)), dense)
    assert torch.allclose(fused, naive, atol=1e-5)


def test_mixed_task_batch_routes_each_sample_to_its_task():
    model, _ = tiny_model("task")
    for meta in (ExpertMeta("shared0", "shared"), ExpertMeta("task0.0", "task", 0), ExpertMeta("task1.0", "task", 1)):
        model.bank.add_expert(meta)
    _randomise_b(model)
    layer = model.bank.layers[0]
    x = torch.randn(2, 5, 64)
    with model.bank.routing(task_ids=torch.tensor([0, 1])):
        mixed = layer(x)
    for i, task in enumerate((0, 1)):
        with model.bank.routing(task_ids=torch.tensor([task])):
            alone = layer(x[i:i + 1])
        assert torch.allclose(mixed[i], alone[0], atol=1e-5)


def test_zero_b_leaves_logits_unchanged():
    lm, _ = load_base_model(TINY)
    ids = torch.randint(0, 256, (2, 11))
    before = lm(input_ids=ids).logits
    model = ContinualModel(lm, BankConfig(router="task"), TINY.source)
    model.bank.add_expert(ExpertMeta("shared0", "shared"))
    model.bank.add_expert(ExpertMeta("task0.0", "task", 0))
    with model.bank.routing(task_ids=torch.zeros(2, dtype=torch.long)):
        after = model.lm(input_ids=ids).logits
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_named():
    class NotGated(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 4))

        def get_input_embeddings(self):
            return nn.Embedding(4, 4)

    with pytest.raises(ValueError, match="supported families: Llama, Mistral"):
        ExpertBank(NotGated(), BankConfig())


def test_an_empty_bank_is_the_base_model_and_scores_as_every_untrained_bank():
    """The untrained baseline scores the base model alone (pipelines.run.stages.evaluate_untrained):
    every method's experts start with B = 0, so its untrained bank answers the same."""
    from cl_core.methods import METHODS, build_method
    from cl_core.objectives import LMObjective
    from cl_core.training import predict_probs
    from tests.conftest import synthetic_task

    empty, tok = tiny_model()
    x = torch.randn(3, 7, 64)
    assert torch.equal(empty.bank.layers[0](x), empty.bank.layers[0].base(x))
    formats, examples = zip(*(synthetic_task(tok, t, 12, seed=t, labels=(f"w{2 * t + 1}", f"w{2 * t + 2}"))
                              for t in (0, 1)))
    objective = LMObjective(tok, list(formats))
    base = [predict_probs(empty, objective, None, examples[t]) for t in (0, 1)]
    assert not torch.allclose(base[0], torch.full_like(base[0], 0.5), atol=1e-3)  # the base model has opinions
    for name in sorted(set(METHODS) - {"cmoe"}):  # CMoE adds its experts only once its probe has trained
        method = build_method(name)
        model, _ = tiny_model(method.router)
        for t in (0, 1):
            method.setup_task(model, t)
        for t in (0, 1):
            assert torch.allclose(predict_probs(model, objective, method, examples[t]), base[t], atol=1e-6), name
