"""Shared test fixtures: one real S3 endpoint (moto's server) and one local Ray cluster
per test session, so that tests pay their start-up cost once."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest

# Quiet, deterministic and CPU-only everywhere, before anything imports deepspeed.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds its C++ ops into TORCH_EXTENSIONS_DIR: one of the session's own (the Ray
# workers inherit it), so that a test can see whether a run built any (test_train_ray.py: none).
os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="imram-test-torch-extensions-")
atexit.register(shutil.rmtree, os.environ["TORCH_EXTENSIONS_DIR"], ignore_errors=True)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on a machine with few cores: torch's default of one thread per core would
    # have the model tests' OpenMP threads spin against the Ray processes of the other worker (whose
    # group is the suite's critical path); Ray's own workers default to one thread each anyway.
    import torch

    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 endpoint (moto, started on demand by the s3_endpoint fixture) and dummy credentials are
# in the environment from the start, so the session's Ray cluster, whose workers inherit the
# environment it was started with, reaches S3 the way a cluster with an instance role does:
# credentials from its own environment, never shipped inside a config or a Ray object. The
# secret is a marker that tests look for in everything a run leaves behind.
S3_PORT = free_port()
S3_URL = f"http://127.0.0.1:{S3_PORT}"
SECRET_MARKER = "imram-test-secret-9f2c41d7"
os.environ.update(AWS_ENDPOINT_URL=S3_URL, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET_MARKER,
                  AWS_DEFAULT_REGION="us-east-1")


# The xdist group of the tests on each fixture that starts Ray.
RAY_GROUPS = {"ray_cluster": "ray", "hand_cluster": "ray-nodes"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test on the session's Ray cluster goes to one xdist worker as one group, in file
    order, so the session still starts one cluster and those tests never compete for it
    (pyproject.toml: -n 2). The hand-started two-node cluster of test_zz_cluster_jobs.py is a
    group of its own: it shares nothing with the session's cluster, so it may run beside it.
    The grouping goes by fixture name: a test that starts Ray some other way must use one of
    these fixtures. claim_ray_for_this_worker() fails a run in which the grouping did not hold."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, group in RAY_GROUPS.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
                break


@pytest.fixture(autouse=True)
def isolated_mlflow_uris() -> Iterator[None]:
    """mlflow.set_tracking_uri / set_registry_uri change module globals and also export
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which every later subprocess inherits: without
    this one test's store would become the next test's default."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: os.environ.get(k) for k in names}
    loaded = "mlflow" in sys.modules
    if loaded:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        uris = tracking_utils._tracking_uri, registry_utils._registry_uri
    yield
    if loaded or "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._tracking_uri, registry_utils._registry_uri = uris if loaded else (None, None)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real HTTP S3 endpoint on 127.0.0.1 (moto's server) at S3_URL, which the environment
    already names (with the dummy credentials above). Yields the URL; create buckets with boto3."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(S3_URL + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    try:
        yield S3_URL
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the session's S3 endpoint."""
    import boto3

    name = "imram-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def claim_ray_for_this_worker(tmp_path_factory: pytest.TempPathFactory, fixture: str) -> None:
    """Under xdist, fail unless every test on this Ray fixture runs on one worker. The grouping above
    can stop working without a word (pytest-xdist 3.8 with pytest 9.2, pytest-xdist#1386: every
    worker then starts a cluster of its own on the same cores, and the suite is twice as slow)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    group = RAY_GROUPS[fixture]
    owner = tmp_path_factory.getbasetemp().parent / f"{group}-worker"  # this run's folder, shared by its workers
    try:
        with open(owner, "x") as f:
            f.write(worker)
    except FileExistsError:
        first = owner.read_text()
        if first != worker:
            pytest.fail(f"tests on {fixture} run on xdist workers {first} and {worker}: the xdist_group marks of "
                        "conftest.py did not take effect (check the pytest and pytest-xdist versions)")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray cluster for the whole session (ray.init costs seconds). Always a new one,
    never a `ray start` cluster that happens to run on this machine; RAY_ADDRESS points at it
    while the session runs, so CLI subprocesses of the tests join it too. It offers
    the search's trial-driver resource, and its dashboard (127.0.0.1) serves the state API that
    Train's placement-group cleaner needs when Tune stops a trial."""
    import ray

    from imram_dist.train.driver import start_local_ray

    claim_ray_for_this_worker(tmp_path_factory, "ray_cluster")
    saved = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        start_local_ray(num_cpus=4, resources={"trial_driver": 1.0}, dashboard=True)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = saved


def start_mlflow_server(root, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 with an sqlite backend under root (lean: one worker,
    no job execution). Returns (process, URL) once /health answers."""
    port = port or free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", f"{root}/artifacts", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(root, "server.log"), "ab"), env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start; see {root}/server.log") from None
            time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """One MLflow tracking server for the session: yields (URL, its folder)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    proc, url = start_mlflow_server(str(root))
    try:
        yield url, str(root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def assert_no_secret(*roots) -> int:
    """No file under roots holds SECRET_MARKER; returns how many files were read."""
    from pathlib import Path

    seen = 0
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if not path.is_file() or path.is_symlink() or path.stat().st_size > 512 * 1024 * 1024:
                    continue
                data = path.read_bytes()
            except OSError:  # sockets, files a live process just removed
                continue
            seen += 1
            assert SECRET_MARKER.encode() not in data, f"the secret is in {path}"
    return seen


def ray_session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()
