"""A mixture of LoRA experts inside the gated FFN of a decoder block.

Expert k is the FFN with LoRA on all three projections:

    E_k(x) = (W2 + s·B2k·A2k) [ act((W1 + s·B1k·A1k) x) ⊙ ((W3 + s·B3k·A3k) x) ],   s = alpha / r

The frozen base projections W1 (gate) and W3 (up) run once per token. The experts' low-rank
deltas run batched, one op for all active experts. Because W2 is linear,

    Σ_k g_k (W2 + s·B2k·A2k) h_k = W2 (Σ_k g_k h_k) + s Σ_k g_k B2k A2k h_k,

so the base down projection also runs once, however many experts are active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 (gated MLP with gate_proj/up_proj/down_proj)"


@dataclass(frozen=True)
class ExpertMeta:
    """Who an expert belongs to: `kind` is "shared" or "task"; `task` is the task index or None."""

    name: str
    kind: str
    task: int | None = None


@dataclass
class RoutingContext:
    """Per-forward information the routers need, set by the caller around each forward.

    task_ids: [B] task index of each sample, or None when the task is unknown (inference).
    attention_mask: [B, T], for pooling over real tokens.
    query: [B, q] frozen per-sample features, for similarity routing.
    snapshot_tasks: the tasks that read their own snapshot of the shared experts (MoE-CL's
    snapshot inference) instead of the current shared experts.
    The layers append what methods read after the forward (each layer's attention-masked mean
    FFN input per sample where `capture_inputs`, router probabilities for balancing losses).
    """

    task_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    query: torch.Tensor | None = None
    snapshot_tasks: frozenset[int] = frozenset()
    capture_inputs: bool = False
    pooled_inputs: list[torch.Tensor] = field(default_factory=list)
    router_probs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Route:
    """Routing decision for N tokens.

    Dense: every token mixes the experts in `experts` with weights `gates` [N, E].
    Sparse (top-k): token n uses experts `topk_experts[n]` with weights `gates[n]` [N, k].
    Merged (`merged`, no gates): every expert's LoRA delta is added to the weights, W + Σ_k ΔW_k.
    """

    gates: torch.Tensor | None = None
    experts: list[int] | None = None
    topk_experts: torch.Tensor | None = None
    merged: bool = False


class LoRAExpert(nn.Module):
    """LoRA factors for gate, up and down projections. A: kaiming-uniform(a=√5), B: zero."""

    def __init__(self, hidden: int, intermediate: int, rank: int):
        super().__init__()
        self.A_gate = nn.Parameter(torch.empty(rank, hidden))
        self.B_gate = nn.Parameter(torch.zeros(intermediate, rank))
        self.A_up = nn.Parameter(torch.empty(rank, hidden))
        self.B_up = nn.Parameter(torch.zeros(intermediate, rank))
        self.A_down = nn.Parameter(torch.empty(rank, intermediate))
        self.B_down = nn.Parameter(torch.zeros(hidden, rank))
        for a in (self.A_gate, self.A_up, self.A_down):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def check_gated_mlp(mlp: nn.Module, where: str) -> None:
    for proj in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, proj, None), nn.Linear):
            raise ValueError(
                f"{where} ({type(mlp).__name__}) has no nn.Linear '{proj}': unsupported architecture; "
                f"supported families: {SUPPORTED_FAMILIES}"
            )


class MixtureFFN(nn.Module):
    """Replaces a gated MLP; holds the frozen base MLP, its experts and a router."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, router: nn.Module,
                 context: RoutingContext):
        super().__init__()
        check_gated_mlp(base, "MLP")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.hidden = base.gate_proj.in_features
        self.intermediate = base.gate_proj.out_features
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.experts = nn.ModuleList()
        self.expert_meta: list[ExpertMeta] = []
        self.router = router
        # Shared with every layer of the bank; replaced as a whole by ExpertBank.routing().
        self.context = context

    # -- structure ---------------------------------------------------------------------------
    def add_expert(self, meta: ExpertMeta, init_from: int | None = None) -> int:
        expert = LoRAExpert(self.hidden, self.intermediate, self.rank)
        # Trainable tensors stay float32 whatever the frozen base's dtype (cl_core.precision).
        expert.to(device=next(self.base.parameters()).device)
        if init_from is not None:
            expert.load_state_dict(self.experts[init_from].state_dict())
        self.experts.append(expert)
        self.expert_meta.append(meta)
        self.router.on_expert_added(len(self.experts) - 1, meta)
        return len(self.experts) - 1

    def experts_of(self, kind: str | None = None, task: int | None = None) -> list[int]:
        return [i for i, m in enumerate(self.expert_meta)
                if (kind is None or m.kind == kind) and (task is None or m.task == task)]

    # -- compute -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.experts:  # an empty bank is the base model (what the untrained baseline scores)
            return self.base(x)
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        if self.context.capture_inputs:
            self.context.pooled_inputs.append(self._pooled(x.detach()))
        route = self.router(x, self.context, self)
        gate_base = self.base.gate_proj(xf)
        up_base = self.base.up_proj(xf)
        xd = self.dropout(xf)
        if route.merged:
            out = self._merged(xd, gate_base, up_base)
        elif route.topk_experts is None:
            out = self._dense(xd, gate_base, up_base, route, shape)
        else:
            out = self._topk(xd, gate_base, up_base, route)
        return out.reshape(shape)

    def _stack(self, experts: list[int], name: str, transpose: bool = False) -> torch.Tensor:
        return torch.stack([getattr(self.experts[e], name).T if transpose else getattr(self.experts[e], name)
                            for e in experts])

    def _expert_hidden(self, xd, gate_base, up_base, experts: list[int]) -> torch.Tensor:
        """h_k for each listed expert, batched: [E, N, I].

        The scaling goes on the [E, N, r] rank activations and baddbmm adds the base inside the
        matmul: no extra passes over [E, N, I]. B is stacked transposed ([E, r, I], contiguous) so
        that the backward's [E, N, I] @ [E, I, r] product gets the fast transposed-operand layout.
        """
        s = self.scaling
        gate = torch.baddbmm(gate_base, s * (xd @ self._stack(experts, "A_gate").transpose(1, 2)),
                             self._stack(experts, "B_gate", transpose=True))
        up = torch.baddbmm(up_base, s * (xd @ self._stack(experts, "A_up").transpose(1, 2)),
                           self._stack(experts, "B_up", transpose=True))
        return self.base.act_fn(gate) * up

    def _shared_dropout(self, h: torch.Tensor) -> torch.Tensor:
        """Dropout of h [E, N, I] with one mask for all experts, as xd is one input for all experts.

        Each expert still sees dropout p on its input; drawing one [N, I] mask instead of
        [E, N, I] matters because the random draw is the costliest elementwise op on CPU.
        """
        return h * self.dropout(h.new_ones(h.shape[1:])) if self.training and self.dropout.p else h

    def _down_delta(self, h: torch.Tensor, experts: list[int], gates: torch.Tensor) -> torch.Tensor:
        """s · Σ_k g_k B2k A2k h_k for h [E, N, I] and gates [E, N] → [N, d]."""
        z = (self._shared_dropout(h) @ self._stack(experts, "A_down").transpose(1, 2)) * (self.scaling * gates.unsqueeze(-1))
        return torch.einsum("enr,edr->nd", z, self._stack(experts, "B_down"))

    def _dense(self, xd, gate_base, up_base, route: Route, shape) -> torch.Tensor:
        experts = route.experts
        h = self._expert_hidden(xd, gate_base, up_base, experts)  # [E, N, I]
        gates = route.gates.transpose(0, 1)  # [E, N]
        mixed = torch.einsum("en,eni->ni", gates, h)
        return self.base.down_proj(mixed) + self._down_delta(h, experts, gates)

    def _cat(self, name: str, transpose: bool = False) -> torch.Tensor:
        """All experts' factors side by side along the rank: A as [E·r, in], B as [E·r, out]."""
        return torch.cat([getattr(expert, name).T if transpose else getattr(expert, name)
                          for expert in self.experts])

    def _merged(self, xd, gate_base, up_base) -> torch.Tensor:
        """Every expert's delta summed into the weights, W + s·Σ_k B_k A_k on gate, up and down (one
        FFN, no gates): the experts' factors side by side along the rank are one LoRA of rank E·r."""
        s = self.scaling
        gate = gate_base + (s * (xd @ self._cat("A_gate").T)) @ self._cat("B_gate", transpose=True)
        up = up_base + (s * (xd @ self._cat("A_up").T)) @ self._cat("B_up", transpose=True)
        h = self.base.act_fn(gate) * up
        return self.base.down_proj(h) + (s * (self.dropout(h) @ self._cat("A_down").T)) @ self._cat("B_down", transpose=True)

    def _topk(self, xd, gate_base, up_base, route: Route) -> torch.Tensor:
        """Top-k routing as k dense slots: slot j of token n runs expert topk_experts[n, j].

        The experts' factors are concatenated (E·r wide) and each slot's rank activations are
        masked to its expert's block, so each LoRA product is one matmul over all tokens: no
        gathers or scatters at the intermediate width, no per-expert loop, no host sync. Every
        expert's parameters take part in every call, as ZeRO-3 needs (ranks must call the same
        code on the same parameters). The masked matmuls cost E·r instead of r multiply-adds per
        slot and width, small next to the base projections while E·r is small.
        """
        s = self.scaling
        k = route.topk_experts.shape[1]
        mask = F.one_hot(route.topk_experts.T, len(self.experts)).to(xd.dtype)  # [k, N, E]
        mask = mask.repeat_interleave(self.rank, dim=-1)  # [k, N, E·r]
        gate = torch.baddbmm(gate_base, (s * (xd @ self._cat("A_gate").T)) * mask,
                             self._cat("B_gate", transpose=True).expand(k, -1, -1))  # [k, N, I]
        up = torch.baddbmm(up_base, (s * (xd @ self._cat("A_up").T)) * mask,
                           self._cat("B_up", transpose=True).expand(k, -1, -1))
        h = self.base.act_fn(gate) * up
        gates = route.gates.T  # [k, N]
        mixed = torch.einsum("kn,kni->ni", gates, h)
        z = (self._shared_dropout(h) @ self._cat("A_down").T) * (mask * (s * gates).unsqueeze(-1))  # [k, N, E·r]
        return self.base.down_proj(mixed) + z.sum(0) @ self._cat("B_down", transpose=True)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-masked mean over tokens of x [B, T, d] → [B, d], float32."""
        mask = self.context.attention_mask
        mask = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
        return (x.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def shared_delta(self, x: torch.Tensor) -> torch.Tensor:
        """What the shared experts add to the base FFN at inputs x [B, d], averaged over them:
        [B, d]. Differentiable in the shared experts only where x is detached."""
        shared = self.experts_of("shared")
        gate_base, up_base = self.base.gate_proj(x), self.base.up_proj(x)
        h = self._expert_hidden(x, gate_base, up_base, shared)  # [S, B, I]
        delta = self.base.down_proj(h - self.base.act_fn(gate_base) * up_base) + self.scaling * torch.einsum(
            "ebr,edr->ebd", h @ self._stack(shared, "A_down").transpose(1, 2), self._stack(shared, "B_down"))
        return delta.mean(0)


def naive_mixture(layer: MixtureFFN, x: torch.Tensor, experts: list[int], gates: torch.Tensor) -> torch.Tensor:
    """Reference formulation: every active expert runs its whole FFN, outputs mixed by gates [N, E].

    Used by tests and the benchmark to check and time the fused path; dropout is not applied.
    """
    xf = x.reshape(-1, x.shape[-1])
    s = layer.scaling
    base = layer.base
    out = torch.zeros_like(xf)
    for j, e in enumerate(experts):
        ex = layer.experts[e]
        w_gate = base.gate_proj.weight + s * ex.B_gate @ ex.A_gate
        w_up = base.up_proj.weight + s * ex.B_up @ ex.A_up
        w_down = base.down_proj.weight + s * ex.B_down @ ex.A_down
        h = base.act_fn(F.linear(xf, w_gate, base.gate_proj.bias)) * F.linear(xf, w_up, base.up_proj.bias)
        out = out + gates[:, j : j + 1] * F.linear(h, w_down, base.down_proj.bias)
    return out.reshape(x.shape)
