"""`docs/config.md`, written from the run config's pydantic models (pipelines/config.py) and the
methods' parameter models, so that the reference cannot drift from what `clpipe validate` checks.

    python -m pipelines.config_doc [--repo .]

A test regenerates the page in memory and fails when the committed one differs or when a field
of the run config or of a registered method's parameters has no description.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cl_core.atomic import atomic_write_text
from cl_core.methods import METHODS, MethodParams, RegisteredMethod
from pipelines.config import RunConfig
from pipelines.overrides import section_step

DOC = Path("docs") / "config.md"


def sections(model: type[BaseModel] = RunConfig, path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, model) of the run config and every section inside it, depth first; a list's
    items are `name[]`."""
    found = [(path, model)]
    for name, field in model.model_fields.items():
        inner, is_list = _section_model(field.annotation)
        if inner is not None:
            found += sections(inner, f"{path}.{name}".lstrip(".") + ("[]" if is_list else ""))
    return found


def _section_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The model a field's value is (or a list of), if any, and whether it is a list."""
    step, item = section_step(annotation)
    if step == "list":
        return item, True
    return (step, False) if isinstance(step, type) else (None, False)


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping {type_name(args[0])} → {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default)}`"  # as YAML reads it: null, false, "text"


def field_table(model: type[BaseModel], path: str = "") -> list[str]:
    rows = ["| field | type | default | what |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        inner, is_list = _section_model(field.annotation)
        kind = type_name(field.annotation)
        if inner is not None:  # the section's own table follows under its path
            kind = kind.replace("section", f"section `{path}.{name}".replace("`.", "`") + ("[]`" if is_list else "`"))
        rows.append(f"| `{name}` | {kind} | {default_text(field)} | {description} |")
    return rows


def method_param_models(methods: Mapping[str, RegisteredMethod] = METHODS) -> list[tuple[str, type[MethodParams]]]:
    """(method name, its parameter model) of every registered method, by name: the page's order."""
    return [(name, methods[name].params) for name in sorted(methods)]


def missing_descriptions(root: type[BaseModel] = RunConfig,
                         methods: Mapping[str, RegisteredMethod] = METHODS) -> list[str]:
    """Fields without a description, as dotted paths: of the config (and its sections), then of
    each method's parameters, as `method.params[<method>].<field>`."""
    missing = [f"{path}.{name}".lstrip(".") for path, model in sections(root)
               for name, field in model.model_fields.items() if not field.description]
    return missing + [f"method.params[{method}].{name}" for method, params in method_param_models(methods)
                      for name, field in params.model_fields.items() if not field.description]


def config_doc() -> str:
    text = ["# The run config", "",
            "Written by `python -m pipelines.config_doc` from the pydantic models in `pipelines/config.py` "
            "and the methods' parameter models; do not edit by hand.", "",
            "One YAML file (see `configs/tiny.yaml`, `configs/smollm2.yaml`), validated before anything starts: "
            "an unknown field or a bad value exits with code 2 and a message naming it "
            "(`run.yaml: training.epoch: unknown field`). Relative paths are relative to the config file. "
            "On the command line, `key=value` after the config sets a dotted path before validation "
            "(`clpipe run run.yaml training.lr=5e-4 tasks.0.max_train_examples=64`).", ""]
    for path, model in sections():
        title = f"`{path}`" if path else "Top level"
        doc = " ".join((model.__doc__ or "").split("\n\n")[0].split())
        text += [f"## {title}", ""] + ([doc, ""] if doc else []) + field_table(model, path) + [""]
    text += ["## `method.params` per method", "",
             "Each method's parameters, checked when the config is read (an unknown one is an error). "
             "What they do: docs/methods.md.", ""]
    for name, params in method_param_models():
        text += [f"### `{name}`", ""]
        text += field_table(params) if params.model_fields else ["No parameters."]
        text.append("")
    return "\n".join(text)


def write_config_doc(repo: Path) -> None:
    atomic_write_text(repo / DOC, config_doc())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the repository root (docs/)")
    args = parser.parse_args(argv)
    if not (args.repo / "docs").is_dir():
        raise SystemExit(f"--repo {args.repo}: no docs/ folder (give the repository root)")
    write_config_doc(args.repo)


if __name__ == "__main__":
    main()
