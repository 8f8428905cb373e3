"""Speed of the mixture FFN (cl_core.experts) against one peft LoRA, on SmolLM2-135M shapes.

One process on CPU with 2 threads, 8×128 tokens, LoRA r=8 alpha=16 dropout 0.05 in train mode.
Every timed call is forward + backward (gradients of the trainable LoRA/router parameters and of
the input); the model step also runs AdamW. Variants are timed interleaved, round by round, so
that load from other processes hits them alike; each figure is the median of the timed rounds
after warm-up. Float32 unless named bf16: bf16-mixed as `training.precision` runs it (the frozen
base in bfloat16, trainable tensors float32, compute under autocast; cl_core.precision).

    python -m benchmarks.expert_layer [--json] [--quick]

- fused: MixtureFFN, router "task", 1 shared + 1 task expert (MoE-CL, 2 active experts).
- naive: `naive_mixture` (each expert runs its whole FFN) on the same layer and gates.
- peft_lora: one peft LoRA on gate/up/down of an identical LlamaMLP.
- top2of8: MixtureFFN, router "learned", top-2 of 8 experts.
- fused_bf16, peft_lora_bf16: fused and peft LoRA again in bf16-mixed.
- model_step: one AdamW step of the whole SmolLM2-135M with the MoE-CL bank vs one peft LoRA,
  both with the LMObjective loss (LM head at the answer positions only); moe_cl_bf16_step the
  MoE-CL step in bf16-mixed. `--quick` skips the whole-model figures.
- eval: label scoring (`evaluate_task`, batch 16 as evaluation runs it) of SmolLM2-135M with the
  MoE-CL bank on prompts of 96 tokens and the five BBC topic labels, in each precision.

With --json the last line is one JSON object: the ratios the issue sets targets for and the
medians in ms.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from cl_core.bank import BankConfig
from cl_core.experts import ExpertMeta, MixtureFFN, RoutingContext, naive_mixture
from cl_core.methods import build_method
from cl_core.base_model import load_base_model, set_base_precision, smollm2_gguf_spec
from cl_core.continual_model import ContinualModel
from cl_core.objectives import LMObjective, TaskFormat
from cl_core.precision import base_settings, compute_autocast
from cl_core.routers import build_router
from cl_core.training import Learner, evaluate_task, to_device, trainable_parameters

THREADS = 2
HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M
BATCH, SEQ = 8, 128
RANK, ALPHA, DROPOUT = 8, 16.0, 0.05
LORA_TARGETS = ["gate_proj", "up_proj", "down_proj"]
LABELS = ("business", "entertainment", "politics", "sports", "tech")
TARGETS = {"fused_vs_peft_lora": 1.3, "fused_vs_naive": 0.65, "top2of8_vs_peft_lora": 1.5,
           "model_step_vs_peft_lora": 1.25, "fused_bf16_vs_peft_lora_bf16": 1.3, "model_step_bf16_vs_fp32": 0.6}
EVAL_EXAMPLES, EVAL_PROMPT_TOKENS, EVAL_BATCH = 64, 96, 16

Step = Callable[[], None]


def median_times(steps: dict[str, Step], warmup: int, repeats: int,
                 device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Median seconds per call of each step; interleaved so background load is shared fairly.
    On a GPU each call is timed until its kernels have finished."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=LORA_TARGETS)


# -- one FFN layer ---------------------------------------------------------------------------------
class MLPHost(nn.Module):
    """peft targets modules by attribute path, so the bare MLP needs a parent."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def mixture_layer(mlp: LlamaMLP, router: str, top_k: int | None, metas: list[ExpertMeta]) -> MixtureFFN:
    """A MixtureFFN built as ExpertBank builds it, with non-zero B so the expert deltas are real."""
    layer = MixtureFFN(copy.deepcopy(mlp), RANK, ALPHA, DROPOUT, build_router(router, HIDDEN, top_k, HIDDEN),
                       RoutingContext())
    for meta in metas:
        layer.add_expert(meta)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for expert in layer.experts:
            for name in ("B_gate", "B_up", "B_down"):
                p = getattr(expert, name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return layer.train()


def grad_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list[torch.Tensor],
              grad_out: torch.Tensor) -> Step:
    """Forward + backward to the input and the trainable parameters (autograd.grad: no accumulation),
    under autocast to the input's dtype when it is not float32 (as a bf16-mixed model runs a layer)."""
    inputs = [x, *params]

    def step() -> None:
        with compute_autocast(x):
            out = forward(x)
        torch.autograd.grad(out, inputs, grad_out)

    return step


def layer_steps(device: torch.device) -> dict[str, Step]:
    """The layer variants on one LlamaMLP's weights, one input and one output gradient."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu")).to(device)
    x = torch.randn(BATCH, SEQ, HIDDEN, device=device, requires_grad=True)
    grad_out = torch.randn(BATCH, SEQ, HIDDEN, device=device)
    task_ids = torch.zeros(BATCH, dtype=torch.long, device=device)

    fused = mixture_layer(mlp, "task", None, [ExpertMeta("shared0", "shared"), ExpertMeta("task0.0", "task", 0)])
    fused.context = RoutingContext(task_ids=task_ids)

    def naive_forward(inp: torch.Tensor) -> torch.Tensor:
        route = fused.router(inp, fused.context, fused)
        return naive_mixture(fused, inp, route.experts, route.gates)

    top2 = mixture_layer(mlp, "learned", 2, [ExpertMeta(f"e{k}", "task", k) for k in range(8)])

    def top2_forward(inp: torch.Tensor) -> torch.Tensor:
        top2.context = RoutingContext()  # the learned router appends its probabilities to the context
        return top2(inp)

    peft_mlp = get_peft_model(MLPHost(copy.deepcopy(mlp)), lora_config()).train()

    # bf16-mixed: the base MLP and the activations in bf16; experts and peft's LoRA float32.
    mlp_bf16 = copy.deepcopy(mlp).to(torch.bfloat16)
    x_bf16 = x.detach().to(torch.bfloat16).requires_grad_()
    fused_bf16 = mixture_layer(mlp_bf16, "task", None, [ExpertMeta("shared0", "shared"),
                                                         ExpertMeta("task0.0", "task", 0)])
    fused_bf16.context = RoutingContext(task_ids=task_ids)
    peft_bf16 = get_peft_model(MLPHost(copy.deepcopy(mlp_bf16)), lora_config()).train()
    return {
        "fused": grad_step(fused, x, trainable_parameters(fused), grad_out),
        "naive": grad_step(naive_forward, x, trainable_parameters(fused), grad_out),
        "top2of8": grad_step(top2_forward, x, trainable_parameters(top2), grad_out),
        "peft_lora": grad_step(peft_mlp, x, trainable_parameters(peft_mlp), grad_out),
        "fused_bf16": grad_step(fused_bf16, x_bf16, trainable_parameters(fused_bf16), grad_out.to(torch.bfloat16)),
        "peft_lora_bf16": grad_step(peft_bf16, x_bf16, trainable_parameters(peft_bf16), grad_out.to(torch.bfloat16)),
    }


# -- whole model -----------------------------------------------------------------------------------
class PeftLM:
    """The two calls LMObjective.loss makes, on a peft-wrapped LM: both sides get the same loss code."""

    def __init__(self, peft_lm: nn.Module):
        self.lm = peft_lm.get_base_model()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden)


def answer_batch(objective: LMObjective, vocab_size: int) -> dict[str, torch.Tensor]:
    """Random prompts each ending in a label's answer tokens: exactly BATCH × SEQ tokens, no padding."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(BATCH):
        label = i % len(LABELS)
        prompt = torch.randint(vocab_size, (SEQ - len(objective.answers[0][label]),), generator=g)
        examples.append({"prompt_ids": prompt.tolist(), "label": label, "task": 0})
    return objective.collate(examples)


def train_step(loss: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> Step:
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def moe_cl_models(lm: nn.Module, source: str) -> dict[str, tuple[ContinualModel, object]]:
    """Copies of SmolLM2 with a MoE-CL bank set up for task 0, by precision: "fp32", and "bf16"
    (the base stored and its attention run as bf16-mixed runs them on this device; the experts
    float32 in both)."""
    models = {}
    device = next(lm.parameters()).device
    for precision, settings in (("fp32", base_settings("fp32", device)), ("bf16", base_settings("bf16-mixed", device))):
        base = set_base_precision(copy.deepcopy(lm), **settings)
        method = build_method("moe_cl")
        model = ContinualModel(base, BankConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, router=method.router), source)
        method.setup_task(model, 0)
        models[precision] = model, method
    return models


def smollm2(device: torch.device) -> tuple[nn.Module, object, str]:
    spec = smollm2_gguf_spec()
    lm, tok = load_base_model(spec)
    return lm.to(device), tok, spec.source


def model_steps(lm: nn.Module, tok, source: str) -> dict[str, Step]:
    """MoE-CL training steps (float32 and bf16-mixed) and a peft LoRA training step of SmolLM2-135M
    on the same batch."""
    peft_lm = get_peft_model(copy.deepcopy(lm), lora_config()).train()
    objective = LMObjective(tok, [TaskFormat(name="bench", verbalizers=LABELS, max_length=SEQ)])
    batch = to_device(answer_batch(objective, lm.config.vocab_size), next(lm.parameters()).device)
    models = moe_cl_models(lm, source)
    learners = {name: Learner(models[precision][0], objective, models[precision][1]).train()
                for name, precision in (("moe_cl_step", "fp32"), ("moe_cl_bf16_step", "bf16"))}
    steps = {name: train_step(lambda learner=learner: learner(batch)[0], trainable_parameters(learner))
             for name, learner in learners.items()}
    steps["peft_lora_step"] = train_step(lambda: objective.loss(PeftLM(peft_lm), batch), trainable_parameters(peft_lm))
    return steps


def eval_passes(lm: nn.Module, tok, source: str) -> dict[str, Step]:
    """Label scoring of EVAL_EXAMPLES prompts by SmolLM2 + MoE-CL bank, float32 and bf16-mixed."""
    objective = LMObjective(tok, [TaskFormat(name="bench", verbalizers=LABELS, max_length=SEQ)])
    g = torch.Generator().manual_seed(1)
    examples = [{"prompt_ids": torch.randint(lm.config.vocab_size, (EVAL_PROMPT_TOKENS,), generator=g).tolist(),
                 "label": i % len(LABELS), "task": 0} for i in range(EVAL_EXAMPLES)]
    return {f"eval_{precision}": lambda model=model, method=method: evaluate_task(model, objective, method, examples,
                                                                                  EVAL_BATCH)
            for precision, (model, method) in moe_cl_models(lm, source).items()}


# -- report ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    parser.add_argument("--quick", action="store_true", help="skip the whole-model step (loads SmolLM2-135M)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds of the layer variants")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds of the layer variants")
    # A model step takes about 4 s per variant on an idle machine: 1 + 5 rounds keep the whole run
    # under 2 minutes there.
    parser.add_argument("--model-warmup", type=int, default=1)
    parser.add_argument("--model-repeats", type=int, default=5)
    parser.add_argument("--eval-repeats", type=int, default=3, help=f"timed label-scoring passes "
                        f"({EVAL_EXAMPLES} examples each) per precision")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU (benchmarks/gpu_check.sh)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(THREADS)

    t = median_times(layer_steps(device), args.warmup, args.repeats, device)
    result: dict[str, float | None] = {
        "fused_vs_peft_lora": t["fused"] / t["peft_lora"],
        "fused_vs_naive": t["fused"] / t["naive"],
        "top2of8_vs_peft_lora": t["top2of8"] / t["peft_lora"],
        "model_step_vs_peft_lora": None,
        "fused_bf16_vs_peft_lora_bf16": t["fused_bf16"] / t["peft_lora_bf16"],
        "model_step_bf16_vs_fp32": None,
    }
    times_ms = {f"{name}_ms": seconds * 1e3 for name, seconds in t.items()}
    throughput = {}
    if not args.quick:
        lm, tok, source = smollm2(device)
        m = median_times(model_steps(lm, tok, source), args.model_warmup, args.model_repeats, device)
        result["model_step_vs_peft_lora"] = m["moe_cl_step"] / m["peft_lora_step"]
        result["model_step_bf16_vs_fp32"] = m["moe_cl_bf16_step"] / m["moe_cl_step"]
        times_ms.update({f"{name}_ms": seconds * 1e3 for name, seconds in m.items()})
        e = median_times(eval_passes(lm, tok, source), args.model_warmup, args.eval_repeats, device)
        throughput = {"eval_examples_per_s": {"fp32": EVAL_EXAMPLES / e["eval_fp32"],
                                              "bf16-mixed": EVAL_EXAMPLES / e["eval_bf16"]},
                      "train_tokens_per_s": {"fp32": BATCH * SEQ / m["moe_cl_step"],
                                             "bf16-mixed": BATCH * SEQ / m["moe_cl_bf16_step"]}}

    for name, value in result.items():
        verdict = "skipped" if value is None else ("met" if value <= TARGETS[name] else "MISSED")
        shown = "-" if value is None else f"{value:.3f}"
        print(f"{name:<30} {shown:>7}  target <= {TARGETS[name]}  {verdict}")
    for name, ms in times_ms.items():
        print(f"{name:<30} {ms:9.1f}")
    for name, rates in throughput.items():
        for precision, rate in rates.items():
            print(f"{name + ' ' + precision:<30} {rate:9.1f}")
    # With other processes on the cores, 2-thread ops wait on descheduled threads: read the
    # figures against the load.
    load = os.getloadavg()[0]
    print(f"{'load_avg_1min':<30} {load:9.2f}  ({os.cpu_count()} cpus)")
    if args.json:
        rounded = {k: None if v is None else round(v, 3) for k, v in result.items()}
        rates = {k: {p: round(r, 1) for p, r in v.items()} for k, v in throughput.items()}
        memory = {"peak_gpu_mem_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)} if device.type == "cuda" else {}
        print(json.dumps(rounded | rates | {k: round(v, 1) for k, v in times_ms.items()} | memory
                         | {"device": str(device), "load_avg_1min": round(load, 2)}))


if __name__ == "__main__":
    main()
