"""docs/config.md is what `python -m pipelines.config_doc` writes, and every field of the run config and of
the methods' parameters has its doc."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from cl_core.methods import METHODS, Method, MethodParams, RegisteredMethod
from pipelines.config import RunConfig, TrainingConfig
from pipelines.config_doc import DOC, config_doc, field_table, method_param_models, missing_descriptions, sections

REPO = Path(__file__).resolve().parents[1]


def test_committed_config_doc_is_current():
    assert (REPO / DOC).read_text() == config_doc(), "docs/config.md is stale: run `python -m pipelines.config_doc`"


def test_every_run_config_field_has_a_description():
    # and every registered method's parameters: the check reads each method's model
    assert [name for name, _ in method_param_models()] == sorted(METHODS)
    assert {"moe_cl", "cmoe", "dual_router", "ewc", "mocl", "olora", "replay", "seta"} <= set(METHODS)
    assert missing_descriptions() == []


def test_a_field_without_description_is_caught():
    class Training(TrainingConfig):
        warmup: int = 0  # added without its doc

    class Config(BaseModel):
        training: Training = Field(default_factory=Training, description="training")
        tasks: list[Training] = Field(description="a list of sections")

    assert missing_descriptions(Config) == ["training.warmup", "tasks[].warmup"]


def test_a_method_param_without_description_is_caught():
    class Params(MethodParams):
        weight: float = Field(1.0, ge=0, description="documented")
        steps: int = Field(4, ge=0)  # added without its doc
        mode: str = "a"

    class Documented(BaseModel):
        x: int = Field(0, description="x")

    methods = {**METHODS, "aaa": RegisteredMethod(Method, Params)}
    assert missing_descriptions(Documented, methods) == ["method.params[aaa].steps", "method.params[aaa].mode"]
    assert missing_descriptions(Documented) == []  # the registered methods themselves


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
