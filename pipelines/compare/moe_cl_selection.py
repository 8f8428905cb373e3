"""MoE-CL's retention variants and the summary that pairs them on validation and test, for
`benchmarks.moe_cl_shared` (its docstring says how the choice is made)."""

from __future__ import annotations

from pipelines.compare import in_process

# MoE-CL's retention parameters, spelled out in full, so that a change of its defaults does not
# change what a name ran. "+mem16" trains with snapshot experts and 16 remembered rows per task
# and answers through the snapshots the rows choose; its "@paper" row is the same training
# answering in the paper's form (the current shared expert for every task).
GAME = {"adv_weight": 0.1, "adv_warmup_steps": 4, "feature_memory": 64, "shared_lr_scale": 1.0}
FREE = {**GAME, "shared_anchor": "none", "shared_inference": "current"}
SNAPSHOTS = {"shared_inference": "snapshot", "snapshot_choice": "memory", "choice_memory": 16}
LOSS_RISE = {"shared_anchor": "fisher", "shared_anchor_on": "loss_rise", "shared_anchor_weight": 10.0}
PAPER = {"paper": {"shared_inference": "current"}}
VARIANTS: dict[str, tuple[str, dict, dict | None]] = {
    "seq_lora": ("seq_lora", {}, None),
    "free+mem16": ("moe_cl", {**FREE, **SNAPSHOTS}, PAPER),
    "loss_rise10+mem16": ("moe_cl", {**FREE, **LOSS_RISE, **SNAPSHOTS}, PAPER),
    "fisher10": ("moe_cl", {**FREE, "shared_anchor": "fisher", "shared_anchor_on": "every_task",
                            "shared_anchor_weight": 10.0}, None),
    "label_rule": ("moe_cl", {**FREE, "shared_anchor": "fisher", "shared_anchor_on": "new_labels",
                              "shared_anchor_weight": 10.0}, None),
}
REFERENCES = ("seq_lora", "free+mem16@paper")


def summary(rows: list[dict]) -> dict:
    """Per sequence and variant: each seed's AA and BwT on validation and test, and the paired
    differences against each reference."""
    by = {}
    for row in rows:
        by.setdefault(row["sequence"], {}).setdefault(row["label"], []).append(row)
    out = {}
    for sequence, labels in by.items():
        for label, runs in labels.items():
            entry = {split: {m: [round(r[split]["oracle"][m], 2) for r in sorted(runs, key=lambda r: r["seed"])]
                             for m in ("AA", "BwT")} for split in ("validation", "test")}
            entry["seeds"] = sorted(r["seed"] for r in runs)
            for ref in REFERENCES:
                if ref != label and ref in labels:
                    entry[f"vs_{ref}"] = {split: {m: in_process.paired(runs, labels[ref], m, split) for m in ("AA", "BwT")}
                                          for split in ("validation", "test")}
            out[f"{sequence}/{label}"] = entry
    return out
