"""Which part of a SETA run's final bank loses its earlier tasks: the shared experts' drift or the
later tasks' unique experts and router rows (`pipelines.compare.drift` says how it is split).

    python -m benchmarks.seta_drift RUN_DIR [--out benchmarks/results/seta_drift.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cl_core.atomic import atomic_write_text
from pipelines.compare.drift import drift_split
from pipelines.run.results import find_run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write {run, tasks: {task: accuracies}} here as JSON")
    args = parser.parse_args(argv)
    try:
        split = drift_split(find_run(args.run_dir.parent, args.run_dir.name))
    except ValueError as e:  # a PredictError too: a bad run or bank, named
        raise SystemExit(f"{args.run_dir}: {e}") from None
    for task, row in split.items():
        print(task, {k: round(v, 1) for k, v in row.items()})
    if args.out:
        atomic_write_text(args.out, json.dumps({"run": args.run_dir.name, "tasks": split}, indent=1))


if __name__ == "__main__":
    main()
