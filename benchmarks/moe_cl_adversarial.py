"""The adversarial term's effect on MoE-CL, with its interval over five seeds or more.

    python -m benchmarks.moe_cl_adversarial [--variant NAME] [--sequences order1] [--seeds 0,1,2,3,4]
                                            [--lock /tmp/clpipe-heavy.lock]
    python -m benchmarks.moe_cl_adversarial --summarise     # runs nothing: the pairs so far

Trains MoE-CL as the selection chose it (label `moe_cl_default`: its parameters and answer form,
read from `benchmarks/results/moe_cl_selection_summary.json`, which the frozen default spells
out), or a retention variant of `benchmarks.moe_cl_shared` named by `--variant`, twice per
sequence and seed, in process, with the selection's budget: as it is (`adv_weight` 0.1) and
without the game (`adv_weight` 0, the no-GAN ablation, everything else equal), into
`benchmarks/results/moe_cl_adversarial.json`. A named variant that answers through snapshots
also gets its paper-form rows, as in the selection. The summary
(`moe_cl_adversarial_summary.json`) pairs each row with its no-GAN twin seed by seed (same seed,
same examples): the mean difference in AA and BwT on validation and test, its 95% t-interval
over the seeds, and the verdict. Nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cl_core.atomic import atomic_write_text
from pipelines.compare import in_process
from pipelines.compare.moe_cl_selection import NO_GAME, VARIANTS, game_pairs
from pipelines.compare.sequences import Budget

RESULTS = Path(__file__).resolve().parent / "results" / "moe_cl_adversarial.json"
SUMMARY = RESULTS.with_name("moe_cl_adversarial_summary.json")
SELECTION_SUMMARY = RESULTS.with_name("moe_cl_selection_summary.json")
DEFAULT_LABEL = "moe_cl_default"


def chosen_params() -> dict:
    """The parameters the selection's choice trains and answers with (what the frozen default spells out)."""
    choice = json.loads(SELECTION_SUMMARY.read_text())["choice"] if SELECTION_SUMMARY.exists() else {"chosen": None}
    if choice["chosen"] is None:
        raise SystemExit("--variant: the MoE-CL selection has chosen nothing yet "
                         f"({SELECTION_SUMMARY.name}); name a variant: {sorted(VARIANTS)}")
    return choice["params"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", help=f"one of {sorted(VARIANTS)} (default: the selection's choice)")
    parser.add_argument("--sequences", default="order1")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--lock", type=Path)
    parser.add_argument("--summarise", action="store_true", help="run nothing: write the pairs so far")
    args = parser.parse_args(argv)
    budget = Budget(test_examples=100)
    results = in_process.Results(RESULTS, budget, validation_examples=100)
    if not args.summarise:
        if args.variant is None:  # the choice as the default runs it (its answer form only), whatever its name
            variant, params, inference = DEFAULT_LABEL, chosen_params(), None
        elif args.variant in VARIANTS and VARIANTS[args.variant][0] == "moe_cl":
            variant, (_, params, inference) = args.variant, VARIANTS[args.variant]
        else:
            raise SystemExit(f"--variant: {args.variant!r} is not a MoE-CL variant of {sorted(VARIANTS)}")
        if params.get("adv_weight", 0) <= 0:
            raise SystemExit(f"--variant: {variant} trains without the game: nothing to compare")
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds:  # the twins seed by seed, so that an interrupted run leaves whole pairs
            for label, weight in ((variant, params["adv_weight"]), (variant + NO_GAME, 0.0)):
                in_process.run_missing(results, label, "moe_cl", {**params, "adv_weight": weight},
                                       args.sequences.split(","), [seed], budget, args.lock, inference)
            atomic_write_text(SUMMARY, json.dumps(game_pairs(results.rows), indent=1))
    summary = game_pairs(results.rows)
    atomic_write_text(SUMMARY, json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
