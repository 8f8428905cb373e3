"""docs/config.md is what `python -m pipelines.config_doc` writes, and every run-config field has its doc."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from pipelines.config import RunConfig, TrainingConfig
from pipelines.config_doc import DOC, config_doc, field_table, missing_descriptions, sections

REPO = Path(__file__).resolve().parents[1]


def test_committed_config_doc_is_current():
    assert (REPO / DOC).read_text() == config_doc(), "docs/config.md is stale: run `python -m pipelines.config_doc`"


def test_every_run_config_field_has_a_description():
    assert missing_descriptions() == []


def test_a_field_without_description_is_caught():
    class Training(TrainingConfig):
        warmup: int = 0  # added without its doc

    class Config(BaseModel):
        training: Training = Field(default_factory=Training, description="training")
        tasks: list[Training] = Field(description="a list of sections")

    assert missing_descriptions(Config) == ["training.warmup", "tasks[].warmup"]


def test_every_section_is_documented_with_its_fields():
    paths = [path for path, _ in sections()]
    assert paths[:4] == ["", "model", "tasks[]", "tasks[].data"] and "tasks[].data.hub" in paths and "eval" in paths
    text = config_doc()
    for path, model in sections():
        assert (f"## `{path}`" if path else "## Top level") in text
    assert len(paths) == 1 + len([f for f in RunConfig.model_fields if f not in ("name", "tasks", "objective")]) + 4
    row = next(r for r in field_table(TrainingConfig, "training") if r.startswith("| `lr` "))
    assert row == "| `lr` | float | `0.001` | AdamW learning rate |"
    row = next(r for r in field_table(RunConfig) if r.startswith("| `tasks` "))
    assert "section `tasks[]`" in row and "required" in row
