"""Search spaces: YAML files that map dotted config keys to distributions.

    model.margin: {uniform: [0.05, 0.5]}
    train.lr: {loguniform: [3.0e-4, 1.0e-2]}
    model.steps: {choice: [1, 2, 3]}
    train.lr_update: {randint: [2, 5]}     # Ray's convention: upper bound excluded
    train.epochs: 4                        # a plain value fixes the key for every trial

Any leaf key of the config can be searched by naming it (except the tune, tracking and run
sections, which describe the search itself). Every value a distribution can produce is checked
against the key's declared type when the file is read, so a space that cannot work fails before
any trial starts, with the file and the key in the message.
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from imram_dist.config import Config, ConfigError, _coerce, apply_overrides, flat_keys, named_yaml, read_yaml, validate

# the repository's tune/, installed as the data package imram_dist.spaces (pyproject.toml)
SPACES_DIR = Path(str(importlib.resources.files("imram_dist.spaces")))

# name -> (number of arguments, what the arguments are)
DISTRIBUTIONS: dict[str, tuple[int | None, str]] = {
    "uniform": (2, "[low, high]"),
    "quniform": (3, "[low, high, q]"),
    "loguniform": (2, "[low, high], low > 0"),
    "qloguniform": (3, "[low, high, q], low > 0"),
    "randint": (2, "[low, high) integers, high excluded"),
    "qrandint": (3, "[low, high, q] integers, high included"),
    "lograndint": (2, "[low, high) integers, low > 0"),
    "choice": (None, "[value, ...] (non-empty)"),
}
INTEGER_DISTRIBUTIONS = ("randint", "qrandint", "lograndint")
NOT_SEARCHABLE = ("tune.", "tracking.", "run.")


class SearchSpace:
    """A parsed, checked space: ``dists`` maps dotted keys to (distribution, args) and
    ``fixed`` to plain values; ``to_ray()`` gives the Ray Tune param_space."""

    def __init__(self, source: str, dists: dict[str, tuple[str, list[Any]]], fixed: dict[str, Any]):
        self.source = source
        self.dists = dists
        self.fixed = fixed

    @property
    def searched_keys(self) -> list[str]:
        return list(self.dists)

    def to_ray(self) -> dict[str, Any]:
        """The distributions only: fixed values belong in the base config (apply_fixed), since
        searchers such as Optuna drop constants from the configs they suggest."""
        from ray import tune

        space: dict[str, Any] = {}
        for key, (name, args) in self.dists.items():
            space[key] = getattr(tune, name)(args) if name == "choice" else getattr(tune, name)(*args)
        return space

    def apply_fixed(self, cfg: Config) -> None:
        """Set the space's plain values in cfg (in place, type-checked)."""
        apply_overrides(cfg, self.fixed)
        validate(cfg)

    def sample(self, rng: Any) -> dict[str, Any]:
        """One configuration drawn with numpy's Generator ``rng`` (for checks; trials use Ray's)."""
        out = dict(self.fixed)
        for key, (name, args) in self.dists.items():
            if name == "choice":
                out[key] = args[int(rng.integers(len(args)))]
            elif name in ("uniform", "quniform"):
                out[key] = _quantise(float(rng.uniform(args[0], args[1])), args[2] if len(args) > 2 else None)
            elif name in ("loguniform", "qloguniform"):
                v = math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
                out[key] = _quantise(v, args[2] if len(args) > 2 else None)
            elif name == "randint":
                out[key] = int(rng.integers(args[0], args[1]))
            elif name == "qrandint":
                out[key] = int(rng.integers(args[0] // args[2], args[1] // args[2] + 1) * args[2])
            else:  # lograndint
                out[key] = int(math.exp(rng.uniform(math.log(args[0]), math.log(args[1] - 1))))
        return out

    def to_yaml(self) -> str:
        data: dict[str, Any] = {k: {name: args} for k, (name, args) in self.dists.items()}
        data.update(self.fixed)
        return yaml.safe_dump(data, sort_keys=False)


def _quantise(value: float, q: float | None) -> float:
    return value if q is None else round(value / q) * q


def space_path(name_or_path: str) -> Path:
    """A space name in tune/ (``default``) or a YAML file path."""
    return named_yaml(name_or_path, SPACES_DIR, "tune.space")


def load_space(name_or_path: str) -> SearchSpace:
    """Read and check a space file; ConfigError naming the file and the key otherwise."""
    path = space_path(name_or_path)
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of dotted config keys to distributions")
    keys = flat_keys()
    dists: dict[str, tuple[str, list[Any]]] = {}
    fixed: dict[str, Any] = {}
    for key, spec in data.items():
        key = str(key)
        where = f"{path}: {key}"
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=3)
            raise ConfigError(f"{path}: unknown config key {key!r}"
                              + (f" (did you mean {', '.join(near)}?)" if near else ""))
        if key.startswith(NOT_SEARCHABLE):
            raise ConfigError(f"{where}: the {key.split('.')[0]} section describes the search itself "
                              "and cannot be searched")
        tp = keys[key][2]
        if isinstance(spec, dict):
            dists[key] = _check_distribution(where, key, spec, tp)
        else:
            fixed[key] = _coerce(where, spec, tp)
    return SearchSpace(str(path), dists, fixed)


def _check_distribution(where: str, key: str, spec: dict, tp: Any) -> tuple[str, list[Any]]:
    if len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution ({', '.join(DISTRIBUTIONS)}), got {sorted(spec)}")
    name, args = next(iter(spec.items()))
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {name!r} (known: {', '.join(DISTRIBUTIONS)})")
    nargs, shape = DISTRIBUTIONS[name]
    if not isinstance(args, list) or (nargs is not None and len(args) != nargs) or not args:
        raise ConfigError(f"{where}: {name} expects {shape}, got {args!r}")
    if name == "choice":
        return name, [_coerce(where, v, tp) for v in args]
    is_int = tp is int
    if tp not in (int, float):
        raise ConfigError(f"{where}: {name} needs a numeric key, but {key} is {_type_name(tp)}: use choice")
    if is_int and name not in INTEGER_DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key} is an integer: use randint, qrandint, lograndint or choice, not {name}")
    for v in args:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {name} expects numbers {shape}, got {args!r}")
        if name in INTEGER_DISTRIBUTIONS and not isinstance(v, int):
            raise ConfigError(f"{where}: {name} expects integers {shape}, got {args!r}")
    low, high = args[0], args[1]
    empty = high <= low if name not in ("randint", "lograndint") else high - 1 < low
    if empty:
        raise ConfigError(f"{where}: empty range {name}{args!r}: expected low < high ({shape})")
    if name.startswith(("log", "qlog")) and low <= 0:
        raise ConfigError(f"{where}: {name} needs low > 0, got {args!r}")
    if len(args) == 3 and args[2] <= 0:
        raise ConfigError(f"{where}: {name} needs q > 0, got {args!r}")
    return name, [float(a) for a in args] if not is_int else [int(a) for a in args]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return getattr(tp, "__name__", str(tp))


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The resolved config of one trial: the search's base config with the sampled values."""
    from imram_dist.config import from_dict

    cfg = from_dict(base)
    apply_overrides(cfg, params)
    validate(cfg)
    return cfg


def check_samples(space: SearchSpace, base: dict[str, Any], n: int = 20, seed: int = 0) -> None:
    """Draw n configurations and validate each as a trial would (config checks and the static
    training checks), so a space with impossible corners fails before any trial starts."""
    import numpy as np

    from imram_dist.train.plan import check_static

    rng = np.random.default_rng(seed)
    for _ in range(n):
        params = space.sample(rng)
        try:
            check_static(trial_config(base, params))
        except ConfigError as e:
            raise ConfigError(f"{space.source}: a sampled configuration {params} is invalid: {e}") from None
