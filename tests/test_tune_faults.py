"""Faults a search must survive: a trial that diverges to NaN, and a tracking server that goes away
in the middle of the search and comes back."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mlflow_server
from test_tune_search import children, parent_of, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults_cache")


def test_a_diverging_trial_fails_alone_and_leaves_no_checkpoint(ray_cluster, cache, tmp_path):
    from mlflow.tracking import MlflowClient

    from imram_dist.train.checkpoints import scan_checkpoints
    from imram_dist.train.plan import resolve_storage

    # lambda 1e39 passes validation (a positive float) but overflows float32: NaN scores, NaN loss
    space = tmp_path / "space.yaml"
    space.write_text("model.lambda_softmax: {choice: [9.0, 1.0e39]}\nmodel.margin: {uniform: [0.1, 0.3]}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "imram_dist.tune", "--space", str(space), "--trials", "2", "--max-concurrent", "2",
         "--workers-per-trial", "1", "--scheduler", "fifo", "--tracking-uri", uri, "--name", "search-nan",
         "tune.seed=1", "run.max_failures=0", "tracking.log_model=false",
         *tiny_args(tmp_path, cache, **{"train.lr": 5e-3, "train.epochs": 1})],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    parent = parent_of(client, "search-nan")
    kids = {float(k.data.params["model.lambda_softmax"]): k for k in children(client, parent.info.run_id)}
    assert sorted(kids) == [9.0, 1e39]
    bad, good = kids[1e39], kids[9.0]
    assert bad.info.status == "FAILED" and bad.data.tags["imram.status"] == "failed"
    assert "non-finite training loss (nan) at epoch 1, step 1 (global step 1)" in bad.data.tags["imram.error"]
    assert good.info.status == "FINISHED" and good.data.tags["imram.status"] == "finished"
    assert good.data.tags.get("imram.best") == "true"
    assert "failed: " in proc.stdout and "non-finite training loss" in proc.stdout
    trials = resolve_storage(str(tmp_path / "runs" / "search-nan" / "trials"))
    assert scan_checkpoints(trials, f"trial-{bad.data.tags['imram.trial_id']}") == []
    assert len(scan_checkpoints(trials, f"trial-{good.data.tags['imram.trial_id']}")) == 1


def test_tracking_server_restart_mid_search_loses_nothing(ray_cluster, cache, tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    server, url = start_mlflow_server(str(root), port)
    space = tmp_path / "space.yaml"
    space.write_text("model.margin: {uniform: [0.1, 0.3]}\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "imram_dist.tune", "--space", str(space), "--trials", "2", "--max-concurrent", "1",
         "--workers-per-trial", "1", "--scheduler", "fifo", "--tracking-uri", url, "--name", "search-outage",
         *tiny_args(tmp_path, cache, **{"train.lr": 5e-3, "tracking.registered_model": "imram-outage"})],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 400
        for line in driver.stdout:  # take the server away after the first epoch of the first trial
            lines.append(line)
            if " epoch 1/2 " in line:
                break
            assert time.time() < deadline, "".join(lines[-40:])
        server.terminate()
        server.wait(timeout=30)
        down_at = time.time()
        for line in driver.stdout:  # the search goes on without it: the next trial starts
            lines.append(line)
            if "1 done" in line and " epoch 1/2 " in line:
                break
        assert time.time() - down_at > 5
        server, _ = start_mlflow_server(str(root), port)  # same store, same address
        rest, _ = driver.communicate(timeout=600)
        lines.append(rest)
    finally:
        if driver.poll() is None:
            driver.kill()
        server.terminate()
        server.wait(timeout=30)
    out = "".join(lines)
    assert driver.returncode == 0, out[-4000:]
    assert "does not answer" in out and "answers again" in out

    server, url = start_mlflow_server(str(root), port)
    try:
        client = MlflowClient(url)
        parent = parent_of(client, "search-outage")
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 2
        kids = children(client, parent.info.run_id)
        assert len(kids) == 2
        for k in kids:
            for key in ("rsum", "loss", "i2t_r1"):
                assert sorted(m.step for m in client.get_metric_history(k.info.run_id, key)) == [1, 2], key
            assert k.data.tags["imram.status"] == "finished" and k.info.status == "FINISHED"
            assert {"config.yaml", "curves.png"} <= {a.path for a in client.list_artifacts(k.info.run_id)}
        assert client.get_model_version_by_alias("imram-outage", "champion").run_id in {k.info.run_id for k in kids}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_worker_killed_mid_epoch_resumes_its_trial(ray_cluster, cache, tmp_path):
    """The fault drill inside a search (Optuna's TPE choosing the trials): each trial's only worker
    is killed once, in its second epoch; Ray Train restarts it from the trial's epoch-1 checkpoint
    and the search finishes."""
    from mlflow.tracking import MlflowClient

    from imram_dist.train.checkpoints import scan_checkpoints
    from imram_dist.train.plan import resolve_storage

    space = tmp_path / "space.yaml"
    # 800 pairs / batch 16 = 50 steps an epoch: global step 60 is in epoch 2
    space.write_text("model.margin: {uniform: [0.1, 0.3]}\ntrain.fail_at_step: 60\ntrain.fail_rank: 0\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "imram_dist.tune", "--space", str(space), "--trials", "2", "--max-concurrent", "2",
         "--workers-per-trial", "1", "--scheduler", "fifo", "--search", "optuna", "--tracking-uri", uri,
         "--name", "search-kill",
         "tracking.log_model=false", "run.max_failures=1", *tiny_args(tmp_path, cache, **{"train.lr": 5e-3})],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    kids = children(client, parent_of(client, "search-kill").info.run_id)
    assert len(kids) == 2
    trials = resolve_storage(str(tmp_path / "runs" / "search-kill" / "trials"))
    for k in kids:
        assert k.data.tags["imram.status"] == "finished"
        assert sorted(m.step for m in client.get_metric_history(k.info.run_id, "rsum")) == [1, 2]
        name = f"trial-{k.data.tags['imram.trial_id']}"
        state = scan_checkpoints(trials, name)[-1]["state"]
        assert state["resumed_at"] == [1] and state["epochs_done"] == 2  # restarted once, from epoch 1
        marker = trials.filesystem().get_file_info(f"{trials.run_path(name)}/fault_drill/step60_rank0.fired")
        assert marker.size > 0
