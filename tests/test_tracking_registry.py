"""The registry's champion rule on a real sqlite store, and that the registry is the tracking
store's own even when the shell names another one (MLFLOW_REGISTRY_URI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imram_dist.tracking.registry import register_and_promote
from imram_dist.tracking.store import connect
from imram_dist.tracking.writer import RunWriter


def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stray = tmp_path / "stray.db"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{stray}")
    monkeypatch.chdir(tmp_path)
    uri, exp_id = connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "registry-test")
    writer = RunWriter(uri)
    run_id = writer.client.create_run(exp_id).info.run_id

    def register(rsum: float, dataset: str = "synth-abc", protocol: str = "1k"):
        tags = {"dataset": dataset, "protocol": protocol, "test_rsum": f"{rsum:.4f}"}
        return register_and_promote(writer.client, "imram-unit", f"runs:/{run_id}/model", run_id, tags)

    return writer.client, register, stray


def test_champion_moves_only_to_a_better_comparable_model(tmp_path, monkeypatch):
    client, register, stray = registered(tmp_path, monkeypatch)
    first = register(300.0)
    assert (first.version, first.promoted, first.previous) == ("1", True, None)
    worse = register(250.0)
    assert (worse.version, worse.promoted, worse.previous) == ("2", False, "1")
    assert "does not beat the champion version 1 (300.0)" in worse.reason
    other = register(400.0, dataset="synth-other")  # higher, but measured on other data
    assert not other.promoted and "not comparable" in other.reason
    assert str(client.get_model_version_by_alias("imram-unit", "champion").version) == "1"
    better = register(310.5)
    assert (better.version, better.promoted, better.previous) == ("4", True, "1")
    holder = client.get_model_version_by_alias("imram-unit", "champion")
    assert str(holder.version) == "4" and holder.tags["test_rsum"] == "310.5000"
    # every version went to the tracking store, none to the registry named in the environment
    assert sorted(int(v.version) for v in client.search_model_versions("name='imram-unit'")) == [1, 2, 3, 4]
    assert not stray.exists()


def test_connect_points_both_uris_at_the_tracking_store(tmp_path, monkeypatch):
    import mlflow

    registered(tmp_path, monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
