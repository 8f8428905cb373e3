"""MoE-CL's retention variants, the summary that pairs them on validation and test, and the choice
of the default by the rule stated in docs/methods.md (MoE-CL), for `benchmarks.moe_cl_shared`."""

from __future__ import annotations

import numpy as np

from pipelines.compare import in_process
from pipelines.compare.stats import t_interval

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
NOT_CANDIDATES = ("seq_lora", "label_rule")  # a reference, and the rule that reads label names
NO_GAME = "-noadv"  # benchmarks.moe_cl_adversarial: a variant's twin trained with adv_weight 0
CHOICE_RUNS = [(sequence, seed) for sequence in ("order1", "multiemo") for seed in (0, 1)]


def by_sequence(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Rows by sequence, then by label."""
    by = {}
    for row in rows:
        by.setdefault(row["sequence"], {}).setdefault(row["label"], []).append(row)
    return by


def paired_splits(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """a − b of AA and BwT on validation and test, seed by seed (`in_process.paired`)."""
    return {split: {m: in_process.paired(rows_a, rows_b, m, split) for m in ("AA", "BwT")}
            for split in ("validation", "test")}


def summary(rows: list[dict]) -> dict:
    """Per sequence and variant: each seed's AA and BwT on validation and test, and the paired
    differences against each reference."""
    out = {}
    for sequence, labels in by_sequence(rows).items():
        for label, runs in labels.items():
            entry = {split: {m: [round(r[split]["oracle"][m], 2) for r in sorted(runs, key=lambda r: r["seed"])]
                             for m in ("AA", "BwT")} for split in ("validation", "test")}
            entry["seeds"] = sorted(r["seed"] for r in runs)
            for ref in REFERENCES:
                if ref != label and ref in labels:
                    entry[f"vs_{ref}"] = paired_splits(runs, labels[ref])
            out[f"{sequence}/{label}"] = entry
    return out


def candidates() -> list[str]:
    """Every row label the choice reads: each variant but the two references, and its paper form."""
    return [name for label, (_, _, inference) in VARIANTS.items() if label not in NOT_CANDIDATES
            for name in [label] + [f"{label}@{form}" for form in inference or {}]]


def choice(rows: list[dict]) -> dict:
    """The default by the rule, read on validation AA only: the candidate with the highest mean over
    the four (sequence, seed) runs; one that answers through snapshots stands only where it beats its
    own training's paper form by a paired 95% t-interval over those runs that excludes 0, else that
    paper form stands. None until every candidate has its four runs."""
    aa = {}
    for row in rows:
        aa.setdefault(row["label"], {})[(row["sequence"], row["seed"])] = row["validation"]["oracle"]["AA"]
    waiting = {label: [f"{s} seed {seed}" for s, seed in CHOICE_RUNS if (s, seed) not in aa.get(label, {})]
               for label in candidates()}
    waiting = {label: runs for label, runs in waiting.items() if runs}
    if waiting:
        return {"chosen": None, "waiting_for": waiting}
    means = {label: round(float(np.mean([aa[label][run] for run in CHOICE_RUNS])), 2) for label in candidates()}
    best = max(means, key=means.get)
    out = {"mean_validation_AA": means, "highest": best}
    paper = f"{best}@paper"
    if paper in means:  # the best answers through snapshots: it has to beat its paper form
        differences = [aa[best][run] - aa[paper][run] for run in CHOICE_RUNS]
        low, high = t_interval(differences)
        out["snapshots_vs_paper"] = {"per_run": [round(d, 2) for d in differences], "ci95": [round(low, 2), round(high, 2)]}
        best = best if low > 0 else paper
    trained_as = best.split("@")[0]
    method, params, inference = VARIANTS[trained_as]
    chosen_params = {**params, **(inference or {}).get(best.partition("@")[2], {})}
    return {"chosen": best, "method": method, "params": chosen_params, **out}


def game_pairs(rows: list[dict]) -> dict:
    """Each row against its no-GAN twin (label + NO_GAME, same answer form), per sequence: the
    paired differences in AA and BwT on both splits, seed by seed."""
    out = {}
    for sequence, labels in sorted(by_sequence(rows).items()):
        for label, game in sorted(labels.items()):
            trained, at, form = label.partition("@")
            twin = labels.get(f"{trained}{NO_GAME}{at}{form}")
            if not trained.endswith(NO_GAME) and twin:
                out[f"{sequence}/{label}"] = paired_splits(game, twin)
    return out
