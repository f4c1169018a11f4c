"""Hyper-parameter search: Ray Tune over distributed IMRAM training runs, tracked in MLflow.

``search(cfg)`` runs (or resumes) a search; ``python -m imram_dist.tune`` is the CLI; search
spaces are YAML files in tune/ (imram_dist/tune/space.py). See docs/tuning.md."""

from __future__ import annotations

from imram_dist.tune.space import SearchSpace, check_samples, load_space, space_path, trial_config

__all__ = ["SearchSpace", "check_samples", "load_space", "search", "space_path", "trial_config"]


def __getattr__(name: str):
    if name in ("search", "SearchOutcome"):
        from imram_dist.tune import search as module

        return getattr(module, name)
    raise AttributeError(name)
