"""The search file of `clpipe tune`: its schema, its check against the run config, and the run
config of each trial (see pipelines/search/tune.py for the file format and the search).

Every path and every value a trial can get is applied to the run config and parsed before
anything starts, so a bad search file fails like a bad run config: exit code 2, the path named.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipelines.config import ConfigError, RunConfig, Strict, _format_error, parse_config
from pipelines.overrides import apply_params, check_path, load_config, override_source, read_config_data

GRID_CHECKS_MAX = 256  # full grid combinations validated before the search starts


class Domain(Strict):
    """One searched field: exactly one of the keys."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None
    randint: list[int] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform, randint"
                             + (f" (got {', '.join(given)})" if given else ""))
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice"):
            if not values:
                raise ValueError(f"{kind}: empty list; give at least one value")
        else:
            if len(values) != 2:
                raise ValueError(f"{kind}: give [low, high], got {values}")
            lo, hi = values
            if not lo < hi:
                raise ValueError(f"{kind}: low {lo} must be below high {hi}")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: low {lo} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that every sample lies between or among: each is tried on the run config."""
        v = getattr(self, self.kind)
        return list(v) if self.kind in ("grid", "choice") else [v[0], v[1] - 1] if self.kind == "randint" else list(v)

    def to_tune(self):
        from ray import tune

        v = getattr(self, self.kind)
        if self.kind == "grid":
            return tune.grid_search(list(v))
        if self.kind == "choice":
            return tune.choice(list(v))
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](*v)


class SearchConfig(Strict):
    space: dict[str, Domain] = Field(min_length=1)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0)
    metric: Literal["AA", "weighted"] = "AA"
    bwt_weight: float | None = None
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "none"
    grace_period: int | None = Field(None, gt=0)
    reduction_factor: float | None = Field(None, gt=1)
    max_concurrent_trials: int | None = Field(None, gt=0)
    resources_per_trial: float = Field(0.0, ge=0)
    trial_workers: int = Field(1, gt=0)
    trial_cpus_per_worker: float = Field(0.5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        kinds = {path: d.kind for path, d in self.space.items()}
        if self.search == "grid":
            other = {p: k for p, k in kinds.items() if k != "grid"}
            if other:
                path, kind = next(iter(other.items()))
                raise ValueError(f"search: grid needs {{grid: [...]}} for every path; space.{path} is {kind} "
                                 f"(use search: random or optuna)")
            if self.num_samples != 1:
                raise ValueError("num_samples: a grid is run once (num_samples: 1); its trials are deterministic")
        if self.search == "optuna":
            grids = [p for p, k in kinds.items() if k == "grid"]
            if grids:
                raise ValueError(f"search: optuna cannot search a grid; space.{grids[0]}: use choice instead")
        if self.metric == "AA" and self.bwt_weight is not None:
            raise ValueError("bwt_weight: only used with metric: weighted")
        if self.scheduler != "asha" and (self.grace_period is not None or self.reduction_factor is not None):
            raise ValueError("grace_period/reduction_factor: only used with scheduler: asha")
        for path in self.space:
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"space.{path}: not a dotted run-config path such as training.lr")
            top = path.split(".")[0]
            if top == "name":
                raise ValueError("space.name: clpipe tune names each trial itself (<name>-trial-<params hash>)")
            if top == "mlflow":
                raise ValueError(f"space.{path}: mlflow.* does not change a run's results; nothing to search")
            if top == "ray":
                raise ValueError(f"space.{path}: set the trials' Ray resources with trial_workers and "
                                 f"trial_cpus_per_worker (they decide how many trials fit at once)")
        return self

    @property
    def weight(self) -> float:
        return (1.0 if self.bwt_weight is None else self.bwt_weight) if self.metric == "weighted" else 0.0

    def per_trial_cpus(self) -> float:
        return self.resources_per_trial + (1 + self.trial_workers) * self.trial_cpus_per_worker

    def identity(self) -> dict:
        """What shapes the trials (not how many run at once: a rerun with another limit resumes)."""
        return self.model_dump(mode="json", exclude={"max_concurrent_trials"})


def param_space(search: SearchConfig) -> dict:
    """The space as Tune's nested param_space: method.params.adv_weight → {method: {params: {adv_weight: …}}}."""
    space: dict = {}
    for path, domain in search.space.items():
        *sections, leaf = path.split(".")
        node = space
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = domain.to_tune()
    return space


def trial_params(config: dict) -> dict[str, Any]:
    """A trial's config from Tune (nested, as `param_space`) as dotted run-config paths."""
    from ray.tune.utils import flatten_dict

    return flatten_dict(config, delimiter=".")


def validate_search(search_data: Any, base_data: dict, search_source: str = "<search>",
                    run_source: str = "<run>", base_dir: Path | None = None) -> SearchConfig:
    """The search file, checked against the run config before any compute: every value a trial can
    get is applied to the run config and parsed; errors name the search path."""
    if not isinstance(search_data, dict):
        raise ConfigError(f"{search_source}: expected a mapping at the top level")
    try:
        search = SearchConfig.model_validate(search_data)
    except ValidationError as e:
        raise ConfigError(_format_error(search_source, e)) from None
    base_dir = base_dir or Path.cwd()
    base_cfg = parse_config(copy.deepcopy(base_data), run_source, base_dir)
    for path, domain in search.space.items():
        try:
            check_path(path)
        except ConfigError as e:
            raise ConfigError(f"{search_source}: space.{path}: not a field of the run config: {e}") from None
        for value in domain.probe_values():
            try:
                parse_config(apply_params(base_data, {path: value}), f"{run_source} with {path}={value!r}",
                                  base_dir)
            except ConfigError as e:
                raise ConfigError(f"{search_source}: space.{path}: value {value!r} does not fit the run config: "
                                  f"{e}") from None
    if search.search == "grid":  # the trials themselves, when there are not too many
        combos = _grid_combinations(search)
        for params in combos[:GRID_CHECKS_MAX]:
            try:
                parse_config(_trial_data(base_data, base_cfg.name, params, search), run_source, base_dir)
            except ConfigError as e:
                raise ConfigError(f"{search_source}: the trial {params} does not fit the run config: {e}") from None
    n_tasks = len(base_cfg.tasks)
    if search.scheduler == "asha" and (search.grace_period or 1) >= n_tasks:
        raise ConfigError(f"{search_source}: grace_period: {search.grace_period or 1} is not below the number of "
                          f"tasks ({n_tasks}); ASHA could never stop a trial early")
    return search


def _grid_combinations(search: SearchConfig) -> list[dict]:
    combos: list[dict] = [{}]
    for path, domain in search.space.items():
        combos = [{**c, path: v} for c in combos for v in domain.grid]
    return combos


def load_search(path: Path, run_path: Path, overrides: dict | None = None) -> tuple[SearchConfig, dict, RunConfig]:
    """(search, the run config's raw dict with the overrides set, the parsed run config); ConfigError
    on any problem."""
    from pipelines.config import read_yaml_mapping

    base_cfg = load_config(run_path, overrides)
    base_data = read_config_data(run_path, overrides)
    path = Path(path)
    data = read_yaml_mapping(path, "search")
    search = validate_search(data, base_data, str(path), override_source(run_path, overrides or {}),
                             Path(run_path).resolve().parent)
    return search, base_data, base_cfg


def plan_concurrency(search: SearchConfig, cluster_cpus: float) -> int:
    """How many trials may run at once without starving their workers of CPUs."""
    need = search.per_trial_cpus()
    fits = int(math.floor(cluster_cpus / need + 1e-9))
    if fits < 1:
        raise ConfigError(f"resources_per_trial + (1 + trial_workers) × trial_cpus_per_worker = "
                          f"{search.resources_per_trial:g} + {1 + search.trial_workers} × "
                          f"{search.trial_cpus_per_worker:g} = {need:g} CPUs per trial; the cluster has "
                          f"{cluster_cpus:g}")
    if search.max_concurrent_trials is None:
        return fits
    if search.max_concurrent_trials > fits:
        print(f"[clpipe] max_concurrent_trials {search.max_concurrent_trials} lowered to {fits}: each trial needs "
              f"{need:g} CPUs and the cluster has {cluster_cpus:g}", file=sys.stderr)
    return min(search.max_concurrent_trials, fits)


def search_id(base_cfg: RunConfig, search: SearchConfig) -> str:
    payload = json.dumps({"run": base_cfg.identity_hash(), "tasks": [t.model_dump() for t in base_cfg.tasks],
                          "search": search.identity()}, sort_keys=True)
    return f"{base_cfg.name}-search-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _trial_data(base_data: dict, base_name: str, params: dict, search: SearchConfig | dict) -> dict:
    s = search if isinstance(search, dict) else {"trial_workers": search.trial_workers,
                                                  "trial_cpus_per_worker": search.trial_cpus_per_worker}
    data = copy.deepcopy(base_data)
    data["name"] = f"{base_name}-trial-{params_hash(params)}"
    ray_section = data.get("ray") or {}
    data["ray"] = {**ray_section, "num_workers": s["trial_workers"], "cpus_per_worker": s["trial_cpus_per_worker"]}
    return apply_params(data, params)


def trial_config(ctx: dict, params: dict) -> RunConfig:
    data = _trial_data(ctx["base_data"], ctx["base_name"], params, ctx)
    data.setdefault("mlflow", {})
    data["mlflow"] = {**(data["mlflow"] or {}), "tracking_uri": ctx["tracking_uri"]}
    return parse_config(data, ctx["run_source"], Path(ctx["base_dir"]))
