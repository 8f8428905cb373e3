"""The expert bank: mixture FFNs attached to a causal LM, and its files.

A bank on disk is `bank.safetensors` (only bank tensors: experts, routers, method modules and
state; never the frozen base model) and `manifest.json` (format version, base model identity,
structure, sha256 of the tensor file, parent bank). Files are written atomically and verified
on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cl_core.atomic import atomic_write, atomic_write_text
from cl_core.experts import ExpertMeta, MixtureFFN, RoutingContext, check_gated_mlp
from cl_core.precision import compute_autocast
from cl_core.routers import build_router

FORMAT_VERSION = 1
TENSORS_FILE = "bank.safetensors"
MANIFEST_FILE = "manifest.json"


class BankError(ValueError):
    """A bank file is missing, corrupt, or made for another base model."""


@dataclass(frozen=True)
class BankConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    router: str = "task"
    top_k: int | None = None


def find_gated_mlps(lm: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every decoder block's MLP."""
    found = []
    for name, module in lm.named_modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Module) and not isinstance(mlp, MixtureFFN):
            check_gated_mlp(mlp, f"{name}.mlp")
            found.append((module, "mlp"))
    if not found:
        raise ValueError(f"{type(lm).__name__} has no decoder blocks with an 'mlp' module: unsupported "
                         f"architecture; supported families: Llama, Mistral, Qwen2, Qwen3, Gemma")
    return found


class ExpertBank:
    """Handle over the MixtureFFN layers of one model; the layers themselves live in the model."""

    def __init__(self, lm: nn.Module, config: BankConfig):
        self.config = config
        self.context = RoutingContext()
        embeddings = lm.get_input_embeddings()
        self._embeddings = embeddings
        self.layers: list[MixtureFFN] = []
        for parent, attr in find_gated_mlps(lm):
            base = getattr(parent, attr)
            router = build_router(config.router, base.gate_proj.in_features, config.top_k,
                                  embeddings.embedding_dim)
            layer = MixtureFFN(base, config.rank, config.alpha, config.dropout, router, self.context)
            setattr(parent, attr, layer)
            self.layers.append(layer)

    # -- structure ---------------------------------------------------------------------------
    def add_expert(self, meta: ExpertMeta, layers: list[int] | None = None,
                   init_from: dict[int, int] | None = None) -> None:
        """Add an expert to the given layers (default all); optionally copy another expert's weights."""
        for i in range(len(self.layers)) if layers is None else layers:
            self.layers[i].add_expert(meta, None if init_from is None else init_from.get(i))

    def expert_names(self) -> list[str]:
        return sorted({m.name for layer in self.layers for m in layer.expert_meta})

    def expert_parameters(self, kind: str | None = None) -> dict[str, nn.Parameter]:
        """The experts' parameters (those of one `kind`, or all) by their bank-file key."""
        return {f"layers.{i}.experts.{e}.{n}": p for i, layer in enumerate(self.layers)
                for e, meta in enumerate(layer.expert_meta) if kind is None or meta.kind == kind
                for n, p in layer.experts[e].named_parameters()}

    def set_trainable(self, trainable: bool, *, kind: str | None = None, task: int | None = None,
                      name: str | None = None) -> None:
        for layer in self.layers:
            for expert, meta in zip(layer.experts, layer.expert_meta):
                if (kind is None or meta.kind == kind) and (task is None or meta.task == task) and (
                        name is None or meta.name == name):
                    expert.requires_grad_(trainable)

    def structure(self) -> dict:
        return {"config": asdict(self.config),
                "layers": [[asdict(m) for m in layer.expert_meta] for layer in self.layers]}

    def rebuild(self, structure: dict) -> None:
        """Recreate the experts (and so the routers) listed in a manifest's structure."""
        if len(structure["layers"]) != len(self.layers):
            raise BankError(f"bank has {len(structure['layers'])} layers, model has {len(self.layers)}")
        for layer, metas in zip(self.layers, structure["layers"]):
            for meta in metas[len(layer.expert_meta):]:
                layer.add_expert(ExpertMeta(**meta))

    # -- routing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def routing(self, **fields) -> Iterator[RoutingContext]:
        """Set what the routers see for the forwards inside the block; yields what the layers record.

        Every forward of the model runs inside this block, so it also sets the compute precision:
        autocast to the base model's dtype (nothing in float32; see cl_core.precision).
        """
        ctx = RoutingContext(**fields)
        for layer in self.layers:
            layer.context = ctx
        try:
            with compute_autocast(self._embeddings.weight):
                yield ctx
        finally:
            for layer in self.layers:
                layer.context = self.context

    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen per-sample features: attention-masked mean of the input embeddings, in float32
        (the statistics methods keep of them are float32 whatever the base model's dtype)."""
        with torch.no_grad():
            emb = self._embeddings(input_ids).float()
            mask = attention_mask.to(emb.dtype).unsqueeze(-1)
            return (emb * mask).sum(1) / mask.sum(1).clamp(min=1)

    # -- tensors -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, layer in enumerate(self.layers):
            for part in ("experts", "router"):
                for key, value in getattr(layer, part).state_dict().items():
                    state[f"layers.{i}.{part}.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.layers):
            for part in ("experts", "router"):
                prefix = f"layers.{i}.{part}."
                sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                getattr(layer, part).load_state_dict(sub, strict=True)


# -- files -------------------------------------------------------------------------------------
def growth_by_owner(structure: dict, shapes: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """How the bank grew: per owner ("shared", or the task index as a string), the experts it holds
    (an expert present in k layers counts k times) and their parameters: LoRA factors, and a
    learned router's row of each (other routers' gates are not counted). From a bank's
    `structure()` and its tensors' shapes (a manifest's "shapes", or a live state dict's)."""
    out: dict[str, dict[str, int]] = {}
    for i, metas in enumerate(structure["layers"]):
        for e, meta in enumerate(metas):
            owner = "shared" if meta["kind"] == "shared" else str(meta["task"])
            prefixes = (f"layers.{i}.experts.{e}.", f"layers.{i}.router.rows.{e}")
            params = sum(math.prod(shape) for key, shape in shapes.items()
                         if key.startswith(prefixes[0]) or key == prefixes[1])
            entry = out.setdefault(owner, {"experts": 0, "params": 0})
            entry["experts"] += 1
            entry["params"] += int(params)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bank(directory: Path, tensors: dict[str, torch.Tensor], *, structure: dict, base_model: dict,
              tasks: list[str], parent: str | None = None, extra: dict | None = None) -> dict:
    """Write tensors then manifest (the manifest's presence marks a complete bank)."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(directory / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    manifest = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "tasks": tasks,
        "structure": structure,
        "parent": parent,
        "files": {TENSORS_FILE: {"sha256": sha256_file(directory / TENSORS_FILE)}},
        "shapes": {k: list(v.shape) for k, v in sorted(tensors.items())},
        "extra": extra or {},
    }
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise BankError(f"{path}: no manifest (bank missing or never completed)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: unreadable manifest ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BankError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def load_bank(directory: Path, base_model: dict | None = None,
              also_source: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Verify and read a bank: manifest, sha256, shapes, and (if given) the base model identity;
    `also_source` is a second base-model source accepted (how older banks recorded the same model),
    and a `source` of None in `base_model` (the model's content cannot be read here) is not checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if base_model is not None:
        for key in sorted(set(base_model) | set(manifest["base_model"])):
            theirs = manifest["base_model"].get(key)
            ours = base_model.get(key)
            if key == "source" and (ours is None or (theirs is not None and theirs == also_source)):
                continue
            if ours != theirs:
                raise BankError(f"{directory}: bank was made for another base model: field '{key}' is "
                                f"{theirs!r} in the bank, {ours!r} here")
    path = directory / TENSORS_FILE
    if not path.exists():
        raise BankError(f"{path}: missing")
    digest = sha256_file(path)
    if digest != manifest["files"][TENSORS_FILE]["sha256"]:
        raise BankError(f"{path}: sha256 mismatch (file altered or truncated)")
    tensors = load_file(str(path))
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if shapes != manifest["shapes"]:
        raise BankError(f"{path}: tensor names or shapes differ from the manifest")
    return manifest, tensors
