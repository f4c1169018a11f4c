"""The multi-node path, locally, the way a hand-started cluster runs it (cluster/README.md):
a Ray head from cluster/start_head.sh and a second node from cluster/start_worker.sh (both on
this machine, 1 CPU each, token auth), an MLflow server from cluster/start_mlflow.sh on
127.0.0.1, and jobs submitted through the Ray Jobs API (JobSubmissionClient) with the repository
as the job's working_dir. A tiny training run and a 2-trial tiny search must succeed, put their
two workers on the two nodes, and leave their runs and the registered champion in the server.

The test starts every process itself, in its own process session, and stops exactly those:
`ray start --block` takes its Ray processes down when terminated, so no `ray stop` (which would
stop every Ray process on the machine, other people's included) is needed. Ray's own temp dir is
private to the test. The Jobs API client runs in a subprocess because Ray reads RAY_AUTH_MODE
once, when it is first imported.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import claim_ray_for_this_worker, free_port
from train_helpers import TINY, as_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
TUNE_MAIN = REPO / "imram_dist" / "tune" / "__main__.py"
TWO_NODES = "[train] 2 worker(s) on 2 node(s)"

# Run in a subprocess: wait for the nodes, submit one job, wait for it, print what happened.
CLIENT = textwrap.dedent("""
    import json, sys, time
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes

    args = json.loads(sys.argv[1])
    deadline = time.monotonic() + args["node_wait_s"]
    while len([n for n in list_nodes(address=args["address"]) if n.state == "ALIVE"]) < args["nodes"]:
        if time.monotonic() > deadline:
            sys.exit(f"fewer than {args['nodes']} Ray nodes alive after {args['node_wait_s']} s")
        time.sleep(1)
    nodes = sorted(n.node_id for n in list_nodes(address=args["address"]) if n.state == "ALIVE")
    client = JobSubmissionClient(args["address"])
    t0 = time.monotonic()
    job = client.submit_job(entrypoint=args["entrypoint"], runtime_env=args["runtime_env"])
    status = client.get_job_status(job)
    while not status.is_terminal():
        if time.monotonic() - t0 > args["timeout_s"]:
            client.stop_job(job)
            break
        time.sleep(1)
        status = client.get_job_status(job)
    seconds = time.monotonic() - t0
    print("RESULT " + json.dumps({"status": str(status.value), "seconds": round(seconds, 1), "nodes": nodes,
                                  "logs": client.get_job_logs(job)}))
""")


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as e:  # refused while starting; 401 means it is up (token auth)
            if getattr(e, "code", None) == 401:
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up at {url} (exit code {proc.poll()})") from e
            time.sleep(0.5)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate what this test started (each in its own session), newest first; anything left
    in those sessions afterwards is killed by its process group id."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def hand_cluster(tmp_path_factory) -> Iterator[dict]:
    claim_ray_for_this_worker(tmp_path_factory, "hand_cluster")
    base = tmp_path_factory.mktemp("hand_cluster")
    # Short paths: Ray's unix sockets live under them (limit ~107 characters). One per node, as
    # on separate machines: nodes sharing a temp dir share runtime_resources/, and the worker
    # node deleting its copy of the job's working_dir would delete the head's too.
    ray_tmp = [tempfile.mkdtemp(prefix="imram-ray-", dir="/tmp") for _ in range(2)]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               DS_ACCELERATOR="cpu", RAY_DEDUP_LOGS="0", RAY_USAGE_STATS_ENABLED="0",
               # On SIGTERM, `ray start --block` (Ray 2.60) first drains its node for Serve, up to this
               # many seconds (default 30); the head never finished draining here, so every teardown
               # waited the full 30 s. This test stops its own cluster: no drain.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port, mlflow_port = free_port(), free_port(), free_port()
    per_node_ports = lambda: [f"--dashboard-agent-listen-port={free_port()}",  # noqa: E731
                              f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    procs: list[subprocess.Popen] = []
    logs = []

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        logs.append(open(base / log, "w"))
        p = subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        return p

    t0 = time.monotonic()
    try:
        mlflow = start(["bash", str(CLUSTER / "start_mlflow.sh"), str(base / "mlflow"),
                        str(base / "mlflow" / "artifacts"), str(mlflow_port)], "mlflow.log")
        # Ray turns a 127.0.0.1 node address into the machine's own IP, so none is given; the
        # dashboard (Jobs API) and MLflow listen on 127.0.0.1.
        head = start(["bash", str(CLUSTER / "start_head.sh"), f"--port={gcs_port}",
                      f"--dashboard-port={dash_port}", f"--ray-client-server-port={free_port()}", *per_node_ports(),
                      "--num-cpus=1", f"--temp-dir={ray_tmp[0]}", "--disable-usage-stats", "--block"], "head.log")
        dashboard = f"http://127.0.0.1:{dash_port}"
        _wait_http(f"{dashboard}/api/version", head, "the Ray head's dashboard")
        start(["bash", str(CLUSTER / "start_worker.sh"), f"127.0.0.1:{gcs_port}", *per_node_ports(),
               "--num-cpus=1", f"--temp-dir={ray_tmp[1]}", "--disable-usage-stats", "--block"], "worker.log")
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, "the MLflow server")
        yield {"dashboard": dashboard, "mlflow": f"http://127.0.0.1:{mlflow_port}", "env": env, "base": base,
               "started_s": time.monotonic() - t0}
    finally:
        _stop(procs)
        for f in logs:
            f.close()
        for d in ray_tmp:
            shutil.rmtree(d, ignore_errors=True)


def submit(cluster: dict, entrypoint: str, timeout_s: float) -> dict:
    args = {"address": cluster["dashboard"], "entrypoint": entrypoint, "nodes": 2, "node_wait_s": 90,
            "timeout_s": timeout_s,
            # The job ships this checkout, as `ray job submit --working-dir .` does.
            "runtime_env": {"working_dir": str(REPO),
                            "excludes": [".git", "runs", "exports", "mlruns", "mlartifacts", "*.db", ".whl", ".gl"]}}
    proc = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(args)], env=cluster["env"],
                          capture_output=True, text=True, timeout=timeout_s + 180)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    module = entrypoint.split()[2]
    (cluster["base"] / f"{module}.job.log").write_text(out["logs"])
    trained = re.findall(r"\[train\] finished in ([\d.]+)s", out["logs"])
    print(f"\n[cluster-jobs] job {module}: {out['status']} in {out['seconds']} s (submit to finish; cluster up in "
          f"{cluster['started_s']:.1f} s; Train runs reported in the job log: {trained or 'none'} s)")
    return out


def tiny_cli(cluster: dict, name: str) -> list[str]:
    base = cluster["base"]
    # Half of TINY's train split: 25 steps an epoch; the jobs' plumbing is under test, not learning.
    overrides = dict(TINY, **{"train.epochs": 1, "data.synth.train_images": 80, "data.cache_dir": str(base / "data"),
                              "run.storage": str(base / "runs"), "run.name": name})
    return as_cli(overrides)


def trained_nodes(folder: Path) -> dict[str, set[str]]:
    """Run folder under `folder` -> the Ray node ids its workers trained on, from the per-epoch
    history (metrics worker_nodes) in the train_state.json of each of its checkpoints."""
    out: dict[str, set[str]] = {}
    for state in folder.rglob("train_state.json"):
        run = state.relative_to(folder).parts[0]
        for epoch in json.loads(state.read_text())["history"]:
            out.setdefault(run, set()).update(epoch["worker_nodes"].split(","))
    return out


def mlflow_client(cluster: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cluster["mlflow"])


def test_training_job_on_two_nodes(hand_cluster):
    experiment = "cluster-train"
    entry = " ".join([sys.executable, "-m", "imram_dist.train", "--config", "default",
                      *tiny_cli(hand_cluster, "jobs-train"),
                      f"tracking.uri={hand_cluster['mlflow']}", f"tracking.experiment={experiment}"])
    out = submit(hand_cluster, entry, timeout_s=300)
    assert out["status"] == "SUCCEEDED", out["logs"][-4000:]
    assert len(out["nodes"]) == 2
    assert TWO_NODES in out["logs"], out["logs"][-4000:]
    assert "[train] exported inference checkpoint" in out["logs"]
    assert trained_nodes(hand_cluster["base"] / "runs")["jobs-train"] == set(out["nodes"])

    client = mlflow_client(hand_cluster)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in the server"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    assert "rsum" in runs[0].data.metrics


def test_search_job_on_two_nodes(hand_cluster):
    assert TUNE_MAIN.exists(), f"{TUNE_MAIN} is missing: the search CLI is not built"
    experiment, model = "cluster-search", "imram-cluster-test"
    # one trial: what the cluster adds (a trial's workers on both nodes, the driver's MLflow writes
    # and registry reach the server) does not change with the count; tests/test_tune_* cover many
    entry = " ".join([sys.executable, "-m", "imram_dist.tune", "--config", "default", "--trials", "1",
                      "--scheduler", "fifo", "--search", "random", "--max-concurrent", "1",
                      "--workers-per-trial", "2", "--tracking-uri", hand_cluster["mlflow"],
                      "--experiment", experiment, *tiny_cli(hand_cluster, "jobs-search"),
                      "tune.name=jobs-search", f"tracking.registered_model={model}"])
    out = submit(hand_cluster, entry, timeout_s=420)
    assert out["status"] == "SUCCEEDED", out["logs"][-4000:]
    # The trial trained with one worker on each node (its own Train run says so).
    from imram_dist.tune.search import TRIALS_DIR

    trials = trained_nodes(hand_cluster["base"] / "runs" / "jobs-search" / TRIALS_DIR)
    assert len(trials) == 1 and all(nodes == set(out["nodes"]) for nodes in trials.values()), (trials, out["nodes"])

    client = mlflow_client(hand_cluster)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in the server"
    runs = client.search_runs([exp.experiment_id])
    trial_runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trial_runs) == 1, [(r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in runs]
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.run_id in {r.info.run_id for r in runs}
