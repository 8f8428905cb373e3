"""A frozen causal LM with an expert bank and the small modules methods add (heads, discriminators)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from cl_core.bank import BankConfig, BankError, ExpertBank, load_bank, save_bank


def base_model_identity(lm: nn.Module, source: str) -> dict:
    """What a bank must match to be loaded on a base model: its source and full config."""
    config = lm.config.to_dict()
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "source": source,
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "config_sha256": digest,
    }


class ContinualModel(nn.Module):
    """Base LM (frozen) + expert bank + `extras` (method modules) + `method_state` (method tensors).

    Only the bank, extras and method state are ever saved: see `save`/`load`.
    """

    def __init__(self, lm: nn.Module, bank_config: BankConfig, source: str | None = "unknown",
                 also_source: str | None = None):
        """`source` names the base model in the banks this model saves (None: unknown here, not
        checked when a bank loads); a bank that names it `also_source` instead (an older spelling of
        the same model) loads too."""
        super().__init__()
        self.also_source = also_source
        for p in lm.parameters():
            p.requires_grad_(False)
        self.lm = lm
        self.identity = base_model_identity(lm, source)
        self.bank = ExpertBank(lm, bank_config)
        self.extras = nn.ModuleDict()
        self.extra_specs: dict[str, dict] = {}
        self.method_state: dict[str, torch.Tensor] = {}
        self.tasks: list[str] = []

    def _apply(self, fn, recurse=True):
        """`.to()`/`.cuda()` also move method_state (a plain dict, so nn.Module would not)."""
        self.method_state = {k: fn(v) for k, v in self.method_state.items()}
        return super()._apply(fn, recurse)

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().embedding_dim

    def add_linear(self, name: str, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        """A method module (float32, as everything that trains); described by a spec so that a
        saved bank can rebuild it."""
        linear = nn.Linear(in_features, out_features, bias=bias).to(device=next(self.lm.parameters()).device)
        self.extras[name] = linear
        self.extra_specs[name] = {"in": in_features, "out": out_features, "bias": bias}
        return linear

    def widen_linear(self, name: str, out_features: int) -> nn.Linear:
        """A method module with more output rows (e.g. a classifier over the tasks seen so far):
        its existing rows are kept, the new ones freshly initialised."""
        old, spec = self.extras[name], self.extra_specs[name]
        new = self.add_linear(name, spec["in"], out_features, spec["bias"])
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            if spec["bias"]:
                new.bias[: old.out_features] = old.bias
        return new

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None, **kwargs):
        """Last hidden states of the decoder; the LM head is applied by the objective only where needed."""
        return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, **kwargs)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden)

    # -- bank tensors --------------------------------------------------------------------------
    def bank_parameters(self) -> list[nn.Parameter]:
        """Every parameter that a bank file holds: experts, routers, method modules."""
        params = [p for layer in self.bank.layers for part in (layer.experts, layer.router) for p in part.parameters()]
        return params + list(self.extras.parameters())

    def bank_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.bank.state_dict()
        state.update({f"extras.{k}": v for k, v in self.extras.state_dict().items()})
        state.update({f"state.{k}": v for k, v in self.method_state.items()})
        return state

    def load_bank_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ref = next(self.lm.parameters())
        self.bank.load_state_dict({k: v for k, v in state.items() if k.startswith("layers.")})
        self.extras.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("extras.")}, strict=True)
        self.method_state = {k[6:]: v.to(ref.device) for k, v in state.items() if k.startswith("state.")}

    def structure(self) -> dict:
        return {"bank": self.bank.structure(), "extras": self.extra_specs}

    def save(self, directory: Path, parent: str | None = None, extra: dict | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> dict:
        """Save the bank; `tensors` overrides the live state (e.g. gathered from ZeRO-3 partitions)."""
        return save_bank(directory, self.bank_state_dict() if tensors is None else tensors,
                         structure=self.structure(), base_model=self.identity, tasks=list(self.tasks),
                         parent=parent, extra=extra)

    def load(self, directory: Path) -> dict:
        """Verify a saved bank against this base model, rebuild its structure, load its tensors."""
        manifest, tensors = load_bank(directory, self.identity, self.also_source)
        structure = manifest["structure"]
        if structure["bank"]["config"] != self.bank.structure()["config"]:
            raise BankError(f"{directory}: bank config {structure['bank']['config']} differs from "
                            f"{self.bank.structure()['config']}")
        self.bank.rebuild(structure["bank"])
        for name, spec in structure["extras"].items():
            if name not in self.extras:
                self.add_linear(name, spec["in"], spec["out"], spec["bias"])
        ref = next(self.lm.parameters())
        self.load_bank_state_dict({k: v.to(ref.device) for k, v in tensors.items()})
        self.tasks = list(manifest["tasks"])
        return manifest
