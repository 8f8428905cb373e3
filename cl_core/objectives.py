"""Training objectives and evaluation for classification tasks cast as instruction tuning.

- `lm`: a prompt template and verbalised labels; the loss covers the answer tokens only.
  Evaluation scores every label by the summed log-likelihood of its tokens after the prompt
  (the prompt runs once; the labels continue from its KV cache) and predicts the best.
- `head`: a per-task classification head on the last non-pad token; evaluation is argmax.

An encoded example is {"prompt_ids": list[int], "label": int, "task": int}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cl_core.continual_model import ContinualModel

DEFAULT_TEMPLATE = "{text}\nCategory (one of: {labels}):"
OBJECTIVES = ("lm", "head")


@dataclass(frozen=True)
class TaskFormat:
    """How one task's examples become tokens."""

    name: str
    verbalizers: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    max_length: int = 128


def encode_prompt(tokenizer, fmt: TaskFormat, text: str) -> list[int]:
    """Prompt token ids, the text truncated so that prompt + longest answer fit in max_length."""
    if "{text}" not in fmt.template:
        raise ValueError(f"task {fmt.name}: prompt template must contain '{{text}}'")
    prefix, suffix = fmt.template.split("{text}", 1)
    labels = ", ".join(fmt.verbalizers)
    ids_prefix = tokenizer.encode(prefix.format(labels=labels), add_special_tokens=False) if prefix else []
    ids_suffix = tokenizer.encode(suffix.format(labels=labels), add_special_tokens=False)
    longest_answer = max(len(a) for a in answer_ids(tokenizer, fmt))
    budget = fmt.max_length - len(ids_prefix) - len(ids_suffix) - longest_answer
    if budget < 1:
        raise ValueError(f"task {fmt.name}: max_length {fmt.max_length} leaves no room for text "
                         f"after the template and labels")
    ids_text = tokenizer.encode(text, add_special_tokens=False)[:budget]
    return ids_prefix + ids_text + ids_suffix


def answer_ids(tokenizer, fmt: TaskFormat) -> list[list[int]]:
    return [tokenizer.encode(" " + v, add_special_tokens=False) for v in fmt.verbalizers]


def _pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompts without answers, with task and class ids: what evaluation routes on."""
    ids, mask = _pad([ex["prompt_ids"] for ex in examples], pad_id)
    return {"input_ids": ids, "attention_mask": mask,
            "task_ids": torch.tensor([ex["task"] for ex in examples]),
            "class_ids": torch.tensor([ex["label"] for ex in examples])}


def positions(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding does not shift them."""
    return (offset + mask.cumsum(-1) - 1).clamp(min=0)


def at_last_token(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[b, t] at each row's last position where `mask` is 1 ([B, T, ...] → [B, ...]), with left
    or right padding: the first position where the running count of masked tokens peaks."""
    return x[torch.arange(len(x), device=x.device), mask.long().cumsum(-1).argmax(-1)]


class LMObjective:
    name = "lm"

    def __init__(self, tokenizer, formats: list[TaskFormat]):
        self.pad_id = tokenizer.pad_token_id
        self.answers = [answer_ids(tokenizer, f) for f in formats]

    def setup_task(self, model: ContinualModel, task: int) -> None:
        """Nothing to add: the LM head answers every task."""

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows, targets = [], []
        for ex in examples:
            answer = self.answers[ex["task"]][ex["label"]]
            rows.append(ex["prompt_ids"] + answer)
            targets.append([-100] * len(ex["prompt_ids"]) + answer)
        ids, mask = _pad(rows, self.pad_id)
        labels = torch.full_like(ids, -100)
        for i, t in enumerate(targets):
            labels[i, : len(t)] = torch.tensor(t)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "task_ids": torch.tensor([ex["task"] for ex in examples]),
                "class_ids": torch.tensor([ex["label"] for ex in examples])}

    def loss(self, model: ContinualModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        # Token p predicts token p+1: keep the positions whose next token is an answer token, and
        # run the (large) LM head there only.
        next_labels = batch["labels"][:, 1:]
        where = next_labels != -100
        logits = model.lm_head(hidden[:, :-1][where])
        return F.cross_entropy(logits.float(), next_labels[where])

    @torch.no_grad()
    def label_log_likelihoods(self, model: ContinualModel, prompts: list[list[int]], task: int,
                              routing: dict) -> torch.Tensor:
        """[B, C] summed log-likelihood of each label's tokens after each prompt.

        `routing` holds the per-sample routing fields (task_ids, query) for the B prompts.
        """
        answers = self.answers[task]
        ids, mask = _pad(prompts, self.pad_id, left=True)
        device = next(model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        with model.bank.routing(attention_mask=mask, **routing):
            out = model.hidden_states(ids, mask, positions(mask), use_cache=True)
        last_logp = torch.log_softmax(model.lm_head(out.last_hidden_state[:, -1]).float(), -1)  # [B, V]
        first = torch.tensor([a[0] for a in answers], device=device)
        scores = last_logp[:, first]  # [B, C]
        longer = [c for c, a in enumerate(answers) if len(a) > 1]
        if not longer:
            return scores
        # Continue every prompt with the remaining tokens of each label longer than one token, from
        # the prompt's KV cache: repeating the cache for every label cost 10x on a 10-label task
        # with one two-token label.
        n = len(longer)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        cont, cont_mask = _pad([answers[c] for c in longer], self.pad_id)
        b = ids.shape[0]
        cont = cont.to(device).repeat(b, 1)
        cont_mask = cont_mask.to(device).repeat(b, 1)
        full_mask = torch.cat([mask.repeat_interleave(n, 0), cont_mask], 1)
        pos = positions(cont_mask, mask.sum(1, keepdim=True).repeat_interleave(n, 0))
        repeated = {k: v.repeat_interleave(n, 0) if torch.is_tensor(v) else v for k, v in routing.items()}
        with model.bank.routing(attention_mask=full_mask, **repeated):
            h = model.hidden_states(cont, full_mask, pos, past_key_values=cache, use_cache=True).last_hidden_state
        logp = torch.log_softmax(model.lm_head(h[:, :-1]).float(), -1)  # predicts tokens 1..L-1
        tok_logp = logp.gather(-1, cont[:, 1:].unsqueeze(-1)).squeeze(-1) * cont_mask[:, 1:]
        return scores.index_add(1, torch.tensor(longer, device=device), tok_logp.sum(-1).reshape(b, n))

    def predict(self, model: ContinualModel, examples: list[dict], routing: dict) -> torch.Tensor:
        """[B, C] probabilities over the task's labels (softmax of the label log-likelihoods)."""
        task = examples[0]["task"]
        scores = self.label_log_likelihoods(model, [ex["prompt_ids"] for ex in examples], task, routing)
        return torch.softmax(scores, -1)


class HeadObjective:
    name = "head"

    def __init__(self, tokenizer, formats: list[TaskFormat]):
        self.pad_id = tokenizer.pad_token_id
        self.num_labels = [len(f.verbalizers) for f in formats]

    @staticmethod
    def head_name(task: int) -> str:
        return f"head_{task}"

    def setup_task(self, model: ContinualModel, task: int) -> None:
        """A fresh classification head for the task."""
        if self.head_name(task) not in model.extras:
            model.add_linear(self.head_name(task), model.hidden_size, self.num_labels[task])

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_prompts(examples, self.pad_id)

    def _logits(self, model: ContinualModel, ids, mask, task_ids) -> torch.Tensor:
        hidden = model.hidden_states(ids, mask).last_hidden_state
        last = at_last_token(hidden, mask)
        tasks = task_ids.unique().tolist()
        if len(tasks) != 1:
            raise ValueError("the head objective needs batches of one task (per-task heads differ in size)")
        return model.extras[self.head_name(tasks[0])](last)

    def loss(self, model: ContinualModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self._logits(model, batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        return F.cross_entropy(logits.float(), batch["class_ids"])

    @torch.no_grad()
    def predict(self, model: ContinualModel, examples: list[dict], routing: dict) -> torch.Tensor:
        batch = collate_prompts(examples, self.pad_id)
        device = next(model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with model.bank.routing(attention_mask=mask, **routing):
            return torch.softmax(self._logits(model, ids, mask, batch["task_ids"].to(device)).float(), -1)


def build_objective(kind: str, tokenizer, formats: list[TaskFormat]):
    if kind == "lm":
        return LMObjective(tokenizer, formats)
    if kind == "head":
        return HeadObjective(tokenizer, formats)
    raise ValueError(f"objective {kind!r}: expected one of {OBJECTIVES}")
