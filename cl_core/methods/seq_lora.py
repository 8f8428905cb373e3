"""Sequential LoRA fine-tuning: one LoRA carried across every task, nothing against forgetting.

The plain continual-learning baseline ("peft LoRA, trained on each task in turn"): exactly the
shared LoRA of `common.SharedLoRAMethod` (why that is a peft LoRA is said there), and nothing else.
"""

from __future__ import annotations

from cl_core.methods import register
from cl_core.methods.common import SharedLoRAMethod


@register()
class SeqLoRA(SharedLoRAMethod):
    name = "seq_lora"
