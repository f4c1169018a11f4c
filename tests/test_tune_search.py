"""The real search end to end: `python -m imram_dist.tune` as a user runs it (a subprocess that
joins the session's Ray cluster), with a real `mlflow server` on 127.0.0.1, ASHA stopping a
trial, the registry's champion rule, the pyfunc model, resume after a killed driver, and no
credential in the tracking store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_no_secret, ray_session_dir
from train_helpers import TINY

pytestmark = pytest.mark.slow

MODEL = "imram-tune-test"
# train.lr is the knob that matters: with random_state 1 the three trials draw [5e-3, 1e-7, 1e-7]
# (Ray's BasicVariantGenerator is deterministic for a seed), so whichever trial reaches ASHA's rung
# first, a 1e-7 trial lands below the cutoff there and is stopped. The rung is at epoch 2 (grace 2):
# after one tiny epoch the learner can still be at chance (on an Intel Xeon its dev rsum was 46.8
# after epoch 1 against the frozen trials' 55.2, and 76.0 after epoch 2), so an epoch-1 rung made
# the outcome depend on the machine's rounding.
SPACE = "train.lr: {choice: [5.0e-3, 1.0e-7]}\nmodel.margin: {uniform: [0.1, 0.3]}\n"
LEARNS, FROZEN = 5e-3, 1e-7


def tiny_args(tmp: Path, cache: Path, **extra) -> list[str]:
    ov = {k: v for k, v in TINY.items() if k not in ("train.lr", "cluster.num_workers")}
    ov.update({"train.epochs": 2, "train.log_every": 0, "data.cache_dir": str(cache), "run.storage": str(tmp / "runs"),
               "tracking.registered_model": MODEL, "eval.split": "dev"})
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def run_tune(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "imram_dist.tune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:])
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune_cache")


def children(client, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parent_of(client, search_name: str):
    runs = [r for e in client.search_experiments() for r in client.search_runs(
        [e.experiment_id], filter_string=f"tags.`imram.kind` = 'search' and attributes.run_name = '{search_name}'")]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_search_asha_mlflow_registry_and_pyfunc(ray_cluster, mlflow_server, cache, tmp_path):
    from mlflow.tracking import MlflowClient

    url, server_root = mlflow_server
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    # 2 CPUs a trial on the session's 4-CPU cluster: two trials fill it, so the third can start only
    # if the trial ASHA stopped gave its workers and placement group back (Train V2 under Tune leaked
    # them without ray[default]: the third trial then timed out waiting for its workers).
    args = ["--space", str(space), "--trials", "3", "--max-concurrent", "2", "--workers-per-trial", "1",
            "--tracking-uri", url, "--experiment", "tune-test", "--name", "search-a", "tune.seed=1",
            *tiny_args(tmp_path, cache, **{"cluster.cpus_per_worker": 2, "cluster.torch_threads": 1,
                                           "train.epochs": 3, "tune.grace_epochs": 2})]
    proc = run_tune(args, tmp_path)  # AWS_SECRET_ACCESS_KEY holds conftest.SECRET_MARKER
    assert proc.returncode == 0
    out = proc.stdout

    client = MlflowClient(url)
    parent = parent_of(client, "search-a")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.trials"] == "3" and parent.data.params["tune.scheduler"] == "asha"
    assert parent.data.params["searched"] == "train.lr,model.margin"
    assert parent.data.tags["imram.search_path"] == str(tmp_path / "runs" / "search-a")
    kids = children(client, parent.info.run_id)
    assert len(kids) == 3
    lrs = sorted(float(k.data.params["train.lr"]) for k in kids)
    assert lrs == [FROZEN, FROZEN, LEARNS]
    stopped = []
    for k in kids:
        p = k.data.params
        assert p["model.embed_size"] == "32" and p["train.epochs"] == "3" and p["cluster.num_workers"] == "1"
        assert p["cluster.cpus_per_worker"] == "2"
        assert 0.1 <= float(p["model.margin"]) <= 0.3
        assert p["run.name"] == f"trial-{k.data.tags['imram.trial_id']}"
        rsum = client.get_metric_history(k.info.run_id, "rsum")
        steps = sorted(m.step for m in rsum)
        for key in ("loss", "lr", "pairs_per_s", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
            assert sorted(m.step for m in client.get_metric_history(k.info.run_id, key)) == steps, key
        assert [m.value for m in client.get_metric_history(k.info.run_id, "lr")] == [float(p["train.lr"])] * len(steps)
        artifacts = {a.path for a in client.list_artifacts(k.info.run_id)}
        assert {"config.yaml", "curves.png"} <= artifacts
        if k.data.tags["imram.status"] == "stopped":
            stopped.append(k)
            assert k.data.tags["imram.stopped_at_epoch"] == "2" and steps == [1, 2]
            assert float(p["train.lr"]) == FROZEN
        else:
            assert k.data.tags["imram.status"] == "finished" and steps == [1, 2, 3]
        assert k.info.status == "FINISHED"
    assert stopped, "ASHA stopped no trial"
    assert "stopped by the scheduler after epoch 2" in out

    # the best (the only trial that learns) was evaluated and registered as the champion
    best = [k for k in kids if k.data.tags.get("imram.best") == "true"]
    assert len(best) == 1 and float(best[0].data.params["train.lr"]) == LEARNS
    test_rsum = best[0].data.metrics["test_rsum"]
    assert parent.data.metrics["best_test_rsum"] == pytest.approx(test_rsum)
    assert parent.data.metrics["trials_stopped"] == len(stopped)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == best[0].info.run_id
    assert version.tags["protocol"] == "5x" and version.tags["search_run_id"] == parent.info.run_id
    assert float(version.tags["test_rsum"]) == pytest.approx(test_rsum, abs=1e-3)
    assert version.tags["dataset"].startswith("synthetic:dev@")
    assert "becomes champion" in out and "mlflow" in out and "--host 127.0.0.1" not in out  # a server: its URL
    assert f"open {url}" in out
    rows = [ln for ln in out.splitlines() if ln.split()[:1] and ln.split()[0].count("_") == 1 and "finished" in ln]
    assert rows and rows[0].split()[1] == "0.005"  # the table is sorted best first

    # the registered pyfunc scores exactly what the exported checkpoint scores
    import mlflow.pyfunc
    import torch

    from imram_dist.data import load_eval_split, read_manifest
    from imram_dist.model import load_inference_checkpoint

    mlflow.set_tracking_uri(url)  # undone after the test by conftest's isolated_mlflow_uris
    scorer = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    root = str(next(cache.glob("synth-*")))
    split = load_eval_split(root, "dev")
    regions = np.asarray(split.regions[:6], dtype=np.float32)
    captions = split.captions[:9]
    scores = scorer.predict({"regions": regions, "captions": np.array(captions)})
    trial = best[0].data.tags["imram.trial_id"]
    model, meta = load_inference_checkpoint(tmp_path / "runs" / "search-a" / "trials" / f"trial-{trial}" / "model_best.pt")
    vocab = read_manifest(root).load_vocab()
    with torch.no_grad():
        expected = model(torch.from_numpy(regions), split.tokens[:9, : int(split.lengths[:9].max())],
                         split.lengths[:9]).numpy()
    assert meta["vocab"] == vocab.to_json()
    assert scores.shape == (6, 9)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)

    # python -m imram_dist.evaluate --model models:/NAME@champion keeps working
    ev = subprocess.run([sys.executable, "-m", "imram_dist.evaluate", "--model", f"models:/{MODEL}@champion",
                         "--data", root, "--split", "dev", "--json", str(tmp_path / "ev.json")],
                        capture_output=True, text=True, env=dict(os.environ, MLFLOW_TRACKING_URI=url),
                        timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "ev.json").read_text())["metrics"]["rsum"] == pytest.approx(test_rsum, abs=1e-3)

    # no credential reached the tracking store, its artifacts, the search's storage or Ray's session folder
    assert assert_no_secret(server_root, tmp_path / "runs", ray_session_dir()) > 50

    # a worse search registers its model but does not take the champion alias; the registry is
    # the tracking store's, even with another registry named in the shell (mlflow's default)
    stray = tmp_path / "stray-registry.db"
    proc = run_tune(["--space", str(space), "--trials", "1", "--workers-per-trial", "1", "--tracking-uri", url,
                     "--experiment", "tune-test", "--name", "search-b", "--scheduler", "fifo",
                     *tiny_args(tmp_path, cache, **{"train.lr": FROZEN, "train.epochs": 1})], tmp_path,
                    env={"MLFLOW_REGISTRY_URI": f"sqlite:///{stray}"})
    assert proc.returncode == 0
    assert not stray.exists()
    assert "does not beat the champion version 1" in proc.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_resume_after_the_driver_is_killed(ray_cluster, cache, tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text("model.margin: {uniform: [0.1, 0.3]}\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--space", str(space), "--trials", "2", "--max-concurrent", "1", "--workers-per-trial", "1",
            "--tracking-uri", uri, "--name", "search-r", "--scheduler", "fifo", "tracking.log_model=false",
            *tiny_args(tmp_path, cache, **{"train.lr": 5e-3})]
    driver = subprocess.Popen([sys.executable, "-m", "imram_dist.tune", *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 400
    for line in driver.stdout:  # kill the driver once the first trial has ended and the second started
        lines.append(line)
        if "epoch 1/2" in line and "1 done" in line:
            break
        assert time.time() < deadline, "".join(lines[-50:])
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)

    client = MlflowClient(uri)
    first = children(client, parent_of(client, "search-r").info.run_id)
    finished_before = {k.data.tags["imram.trial_id"] for k in first if k.data.tags.get("imram.status") == "finished"}
    assert len(finished_before) == 1

    proc = run_tune(args + ["--resume"], tmp_path)
    print("".join(lines), proc.stdout)
    assert proc.returncode == 0
    assert "resuming search 'search-r'" in proc.stdout
    parent = parent_of(client, "search-r")
    kids = children(client, parent.info.run_id)
    assert len(kids) == 2  # one child run per trial, the resumed one included
    for k in kids:
        steps = [m.step for m in client.get_metric_history(k.info.run_id, "rsum")]
        assert sorted(steps) == [1, 2], steps  # every epoch once, no duplicate points
        assert k.data.tags["imram.status"] == "finished"
    # the finished trial was not run again: the resumed driver printed no epoch of it
    (done,) = finished_before
    assert f"trial {done} epoch" not in proc.stdout
    assert parent.data.metrics["trials_finished"] == 2


def test_train_cli_is_tracked_as_one_run(ray_cluster, cache, tmp_path):
    """`python -m imram_dist.train` is tracked like a trial: params, per-epoch metrics, artifacts, model;
    rerunning the finished run attaches to the same MLflow run without duplicate points."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ov = {k: v for k, v in TINY.items()}
    ov.update({"train.epochs": 2, "train.log_every": 0, "data.cache_dir": str(cache), "run.storage": str(tmp_path / "runs"),
               "run.name": "tracked", "tracking.uri": uri, "tracking.experiment": "train-test"})
    cmd = [sys.executable, "-m", "imram_dist.train", *[f"{k}={v}" for k, v in ov.items()]]
    for _attempt in range(2):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "tracked in MLflow run" in proc.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("train-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["cluster.num_workers"] == "2" and run.data.params["model.steps"] == "1"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "rsum")) == [1, 2]
    assert {"config.yaml", "curves.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.tags["imram.model_uri"].startswith("models:/")
    assert run.data.metrics["best_rsum"] == max(m.value for m in client.get_metric_history(run.info.run_id, "rsum"))
