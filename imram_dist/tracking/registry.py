"""The model registry: register a search's best model and move the champion alias only to a
model that beats the current champion on the same dataset and protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ChampionDecision:
    """What happened to the champion alias when a version was registered."""

    name: str
    version: str
    promoted: bool
    reason: str
    previous: str | None = None
    """The version that held the alias before (None if there was none)."""


def register_and_promote(client: Any, name: str, model_uri: str, run_id: str, tags: dict[str, Any],
                         alias: str = "champion") -> ChampionDecision:
    """Register model_uri under name with tags (they must include dataset, protocol and
    test_rsum); give it the alias if it beats the alias holder there, never take it from a
    better model."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="IMRAM image-text retrieval models (imram-dist)")
    # through the given client, not mlflow.register_model: that one writes to the process-wide
    # registry URI, which MLFLOW_REGISTRY_URI in the environment can point at another store
    logged_model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                          model_id=logged_model_id).version
    new_rsum = float(tags["test_rsum"])
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is None:
        client.set_registered_model_alias(name, alias, version)
        return ChampionDecision(name, str(version), True, f"no {alias} yet: version {version} "
                                f"(test rsum {new_rsum:.1f}) becomes {alias}")
    old = holder.tags
    same = old.get("dataset") == str(tags["dataset"]) and old.get("protocol") == str(tags["protocol"])
    if not same:
        return ChampionDecision(name, str(version), False, (
            f"the {alias} (version {holder.version}) was measured on dataset {old.get('dataset')!r} with "
            f"protocol {old.get('protocol')!r}, not {tags['dataset']!r}/{tags['protocol']!r}: not comparable, "
            f"alias left where it is (use another tracking.registered_model for this dataset)"), str(holder.version))
    old_rsum = float(old.get("test_rsum", "-inf"))
    if new_rsum > old_rsum:
        client.set_registered_model_alias(name, alias, version)
        return ChampionDecision(name, str(version), True, (
            f"version {version} (test rsum {new_rsum:.1f}) beats the {alias} version {holder.version} "
            f"({old_rsum:.1f}) and becomes {alias}"), str(holder.version))
    return ChampionDecision(name, str(version), False, (
        f"version {version} (test rsum {new_rsum:.1f}) does not beat the {alias} version {holder.version} "
        f"({old_rsum:.1f}); registered without the alias"), str(holder.version))
