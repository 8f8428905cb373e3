"""Numeric precision of a run.

- `fp32`: everything in float32.
- `bf16-mixed`: the frozen base model is stored in bfloat16 (half the memory) and every forward
  computes under `torch.autocast` in bfloat16; what trains (LoRA experts, gates, discriminators,
  heads) and the optimizer state stay float32, and losses are computed in float32.
- `auto`: bf16-mixed where the device computes bfloat16 natively (a CUDA GPU with bf16 support,
  a CPU with AVX512-BF16 or AMX-BF16), fp32 elsewhere. Resolved where the work runs, once per run.

The compute dtype is the base model's storage dtype: `compute_autocast` reads it off a parameter,
so a model loaded for a precision computes in it without being told again.

Attention runs as transformers' `sdpa` except in bf16 on a CPU, where it runs `eager` (bf16
matmuls, softmax in float32): PyTorch's CPU flash-attention kernel in bf16 is slower than
float32 there, eager faster (figures: docs/running.md, Precision).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16-mixed")
BASE_DTYPES = {"fp32": "float32", "bf16-mixed": "bfloat16"}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bfloat16 arithmetic in hardware (emulated bf16 is slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' → the precision this device runs best; an explicit precision is kept as asked."""
    if requested == "auto":
        return "bf16-mixed" if native_bf16(device) else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"training.precision {requested!r}: expected auto or one of {PRECISIONS}")
    return requested


def base_settings(precision: str, device: torch.device) -> dict[str, str]:
    """How the frozen base model is loaded for `precision` on `device`: the ModelSpec fields
    `dtype` (its storage dtype, a torch dtype name) and `attention` (transformers' implementation)."""
    dtype = BASE_DTYPES[precision]
    attention = "eager" if dtype == "bfloat16" and device.type == "cpu" else "sdpa"
    return {"dtype": dtype, "attention": attention}


def compute_autocast(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast to the dtype of `reference` (a frozen base weight) on its device; a no-op in float32."""
    if reference.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(reference.device.type, dtype=reference.dtype)
