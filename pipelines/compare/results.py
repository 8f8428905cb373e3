"""A benchmark's results file, written as each run finishes, so that a rerun continues it.

`<out>/<name>.json` holds the budget every run shared, the rows, and the aggregate (means,
intervals, paired verdicts: `pipelines.compare.stats.aggregate`); `<out>/<name>_examples.json`
holds each run's per-example correctness by task-id mode. The correctness is written first: a row
without it does not count as finished when the file is read back. A results file made with another
budget is refused, so that every row of one file had the same budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from cl_core.atomic import atomic_write_text
from pipelines.compare.stats import DRAWS, aggregate, run_key

# What a report writer gets after each write: the rows and their aggregate.
Report = Callable[[list[dict], dict], None]


class Results:
    """The results file and the per-example file beside it; each finished run is written as it
    finishes. `report(rows, aggregate)` runs after every write (the benchmark's report)."""

    def __init__(self, out: Path, budget: dict, name: str = "cl_quality", draws: int = DRAWS,
                 pooled: dict[str, tuple[str, ...]] | None = None, report: Report | None = None):
        self.out, self.budget, self.name, self.draws, self.pooled, self.report = out, budget, name, draws, pooled, report
        self.path, self.examples_path = out / f"{name}.json", out / f"{name}_examples.json"
        self.rows, self.examples, self.stats_cache = [], {}, {}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if not isinstance(saved, dict) or "budget" not in saved:
                raise SystemExit(f"{self.path} is not a results file of this benchmark (no budget): move it away, "
                                 f"or give another --out")
            if saved["budget"] != budget:
                raise SystemExit(f"{self.path} was made with budget {saved['budget']}, not {budget}: "
                                 f"give the same budget to continue it, or another --out")
            self.examples = json.loads(self.examples_path.read_text()) if self.examples_path.exists() else {}
            self.rows = [r for r in saved["rows"] if run_key(r) in self.examples]

    def finished(self, label: str, sequence: str, tasks: list[str], seed: int) -> dict | None:
        key = run_key({"method": label, "sequence": sequence, "order": tasks, "seed": seed})
        return next((r for r in self.rows if run_key(r) == key), None)

    def check_order(self, sequence: str, tasks: list[str]) -> None:
        """One order per sequence name in a results file: its aggregates pool the seeds."""
        for r in self.rows:
            if r["sequence"] == sequence and r["order"] != tasks:
                raise SystemExit(f"{self.path}: sequence {sequence!r} was run as {' → '.join(r['order'])}; "
                                 f"give this order another --sequence name")

    def add(self, row: dict, examples: dict) -> None:
        self.examples[run_key(row)] = examples
        self.rows.append(row)
        self._save()

    def supersede(self, row: dict) -> None:
        """Moves a finished row and its correctness to `<name>_superseded.json` beside the results
        (written first, so that a crash between the writes loses nothing)."""
        key = run_key(row)
        path = self.out / f"{self.name}_superseded.json"
        kept = json.loads(path.read_text()) if path.exists() else []
        kept.append({"row": row, "examples": self.examples[key], "superseded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        atomic_write_text(path, json.dumps(kept))
        self.rows.remove(row)
        del self.examples[key]
        # Its rerun has the same key: stats cached from the old correctness would stand in for the new.
        for cached in [k for k in self.stats_cache if k[0] == key]:
            del self.stats_cache[cached]
        self._save()

    def _save(self) -> None:
        """The correctness first: a row without it does not count as finished when read back."""
        atomic_write_text(self.examples_path, json.dumps(self.examples))
        self.write()

    def write(self) -> None:
        summary = aggregate(self.rows, self.examples, draws=self.draws, cache=self.stats_cache, pooled=self.pooled)
        atomic_write_text(self.path, json.dumps({"budget": self.budget, "rows": self.rows, "aggregate": summary}, indent=1))
        if self.report is not None:
            self.report(self.rows, summary)
