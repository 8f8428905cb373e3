"""Dotted run-config paths (`training.lr`, `method.params.adv_weight`, `tasks.0.max_train_examples`):
checked against the config's schema and set in a config's raw mapping before it is validated.

`clpipe run|validate|tune CONFIG key=value ...` sets them from the command line, and `clpipe tune`'s
search space names them, so an override and a searched value are validated as the file is and
change the run id where the field is part of it.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipelines.config import ConfigError, RunConfig, parse_config, read_yaml_mapping

# YAML 1.2 reads `5e-4` as a number; PyYAML (YAML 1.1) reads it as a string without a dot.
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def check_path(path: str) -> None:
    """The dotted path against the run config's schema: each part a field of its section (free-form
    sections such as method.params are left to the config check), digits index lists."""
    node: Any = RunConfig
    list_item: Any = None  # the item model of the list `node` stands for
    parts = path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if node is None:
            raise ConfigError(f"{'.'.join(parts[:i])}: is a value, not a section; {path} does not exist")
        if node == "list":
            node = list_item
            if not part.isdigit():
                raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a list; index it with a number")
            continue
        if node == "free":
            return
        if part not in node.model_fields:
            raise ConfigError(f"{where}: unknown field; {'.'.join(parts[:i]) or 'the run config'} has "
                              f"{', '.join(node.model_fields)}")
        node, list_item = section_step(node.model_fields[part].annotation)


def section_step(annotation) -> tuple[Any, Any]:
    """A field's type as a path step: (model class | "list" | "free" | None for a value, list item model)."""
    def is_model(a):
        return isinstance(a, type) and issubclass(a, BaseModel)

    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if is_model(annotation):
        return annotation, None
    if origin is list and args and is_model(args[0]):
        return "list", args[0]
    if origin is dict or annotation is dict:
        return "free", None
    if origin in (typing.Union, types.UnionType):
        for a in args:
            step = section_step(a)
            if step[0] is not None:
                return step
    return None, None


def set_path(data: dict, path: str, value: Any) -> None:
    """data[a][b][c] = value for path "a.b.c"; missing sections are created (the run config's schema
    then says whether they exist); digits index lists (`tasks.1.max_train_examples`)."""
    parts = path.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: no item {part} (the list has {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{where}: is a value ({node!r}), not a section")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{where}: is a value ({node!r}), not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{path}: no item {last} (the list has {len(node)})")
        node[int(last)] = value
    else:
        node[last] = value


def apply_params(base: dict, params: dict[str, Any]) -> dict:
    data = copy.deepcopy(base)
    for path, value in params.items():
        set_path(data, path, value)
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` arguments as {dotted path: value}, each value a YAML scalar (or flow list/mapping);
    each path checked against the run config's schema."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        path, sep, text = pair.partition("=")
        if not sep or not path:
            raise ConfigError(f"{pair!r}: an override is key=value with a dotted path (training.lr=5e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{pair}: the value is not valid YAML ({e})") from None
        if isinstance(value, str) and FLOAT.fullmatch(value):
            value = float(value)
        try:
            check_path(path)
        except ConfigError as e:
            raise ConfigError(f"override {pair}: {e}") from None
        overrides[path] = value
    return overrides


def override_source(path: str | Path, overrides: dict[str, Any]) -> str:
    """How errors name a config with overrides: the file and what was set."""
    return str(path) + "".join(f" {k}={v!r}" for k, v in overrides.items()) if overrides else str(path)


def read_config_data(path: str | Path, overrides: dict[str, Any] | None = None) -> dict:
    """The config file's mapping with the overrides set (not validated yet)."""
    return apply_params(read_yaml_mapping(path), overrides or {})


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """`pipelines.config.load_config` with dotted-path overrides applied before validation."""
    path = Path(path)
    return parse_config(read_config_data(path, overrides), override_source(path, overrides or {}), path.parent)
