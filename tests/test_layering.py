"""The import picture: cluster → pipelines → cl_core, and inside pipelines search → run → data and
serve → run → data. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (importing package, imported prefixes it must not use)
RULES = [
    ("pipelines/data", ("pipelines.run", "pipelines.serve", "pipelines.search", "pipelines.compare")),
    ("pipelines/run", ("pipelines.serve", "pipelines.search", "pipelines.compare")),
    ("pipelines/serve", ("pipelines.search", "pipelines.compare")),
    ("pipelines/search", ("pipelines.serve", "pipelines.compare")),
    ("pipelines", ("benchmarks", "cluster")),
    ("cl_core", ("ray", "mlflow", "deepspeed", "pipelines", "benchmarks", "cluster")),
]
# Arrows that go the wrong way today, named so that a new one fails: the driver registers each
# evaluated bank as an MLflow model (pipelines/serve/mlflow_model.py) when it records the stage.
KNOWN = {("pipelines/run/driver.py", "pipelines.serve.mlflow_model")}


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def violations(rules=RULES, root: Path = ROOT) -> set[tuple[str, str]]:
    found = set()
    for package, banned in rules:
        for path in sorted((root / package).rglob("*.py")):
            for name in imports(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    found.add((path.relative_to(root).as_posix(), name))
    return found


def test_no_import_goes_against_the_layers():
    assert violations() == KNOWN


def test_a_wrong_way_import_is_found(tmp_path):
    (tmp_path / "pipelines" / "data").mkdir(parents=True)
    (tmp_path / "pipelines" / "data" / "tasks.py").write_text(
        "import json\n\ndef f():\n    from pipelines.run.ledger import Ledger\n    import ray.train\n")
    rules = [("pipelines/data", ("pipelines.run",)), ("pipelines/data", ("ray",))]
    assert violations(rules, tmp_path) == {("pipelines/data/tasks.py", "pipelines.run.ledger"),
                                           ("pipelines/data/tasks.py", "ray.train")}
