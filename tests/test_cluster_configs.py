"""Every Ray cluster launcher YAML in the repository (ray_cluster.yaml, cluster/*.yaml) passes
Ray's own offline validation (ray.autoscaler._private.util: prepare_config, then validate_config,
the jsonschema check `ray up` runs) and keeps the invariants the project relies on: GPUs on the
worker types and none on the head, the trial-driver resource on the head only, setup pins equal
to pyproject.toml's, the image's Ray equal to the pinned Ray, no credentials anywhere, MLflow and
the dashboard bound to 127.0.0.1. The hand-started cluster scripts are checked the same way."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from imram_dist.config import Config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = [REPO / "ray_cluster.yaml", *sorted(CLUSTER.glob("*.yaml"))]
DRIVER_RESOURCE = Config().tune.driver_resource
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)-(?P<kind>gpu|cpu)$")


# ------------------------------------------------------------------ shared with test_cluster_kuberay

def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def normalized(req: str | Requirement) -> tuple[str, tuple[str, ...], str]:
    r = Requirement(req) if isinstance(req, str) else req
    return canonicalize_name(r.name), tuple(sorted(r.extras)), str(SpecifierSet(str(r.specifier)))


def pinned_deps() -> set[tuple[str, tuple[str, ...], str]]:
    return {normalized(d) for d in pyproject()["dependencies"]}


def pinned_ray_version() -> str:
    (ray,) = [Requirement(d) for d in pyproject()["dependencies"] if canonicalize_name(Requirement(d).name) == "ray"]
    (spec,) = list(ray.specifier)
    assert spec.operator == "==", f"pyproject.toml pins ray with {spec}; the cluster images need an exact pin"
    return spec.version


def check_image(image: str, where: str) -> None:
    """rayproject/ray:<the pinned Ray>-py3XX-(gpu|cpu), with a Python the project supports."""
    assert "ray-ml" not in image, f"{where}: {image}: the ray-ml images are frozen at old Ray versions"
    m = IMAGE.match(image)
    assert m, f"{where}: image {image!r} is not rayproject/ray:<version>-py3XX-(gpu|cpu)"
    assert m["ray"] == pinned_ray_version(), (
        f"{where}: image {image} runs Ray {m['ray']}, pyproject.toml pins ray=={pinned_ray_version()}")
    python = Version(f"{m['py']}.{m['minor']}")
    assert python in SpecifierSet(pyproject()["requires-python"]), (
        f"{where}: image Python {python} is outside requires-python {pyproject()['requires-python']}")


def pip_requirements(command: str) -> list[Requirement]:
    """The requirement specifiers of one `pip install ...` command (options and paths left out)."""
    words = shlex.split(command)
    out: list[Requirement] = []
    for i, w in enumerate(words):
        if w == "install" and i > 0 and words[i - 1] == "pip":
            for arg in words[i + 1:]:
                if arg in ("&&", ";", "||"):
                    break
                if arg.startswith("-") or "/" in arg or arg.startswith("."):
                    continue
                out.append(Requirement(arg))
    return out


CREDENTIALS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                       # AWS access key id
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"aws_access_key_id", re.I),
    re.compile(r"aws_session_token", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(password|passwd|secret)\s*[:=]\s*\S", re.I),
    re.compile(r"RAY_AUTH_TOKEN=[0-9a-f]{16,}", re.I),     # a literal Ray token
]


def credential_hits(text: str) -> list[str]:
    return [m.group(0) for pat in CREDENTIALS for m in pat.finditer(text)]


# ------------------------------------------------------------------ launcher configs


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(load(path)))
    validate_config(cfg)
    return cfg


def test_the_launcher_configs_are_the_expected_ones():
    names = {p.relative_to(REPO).as_posix() for p in LAUNCHER_YAMLS}
    assert names == {"ray_cluster.yaml", "cluster/onprem.yaml"}, names


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_ray_validates_the_config(path):
    cfg = prepared(path)
    assert cfg["head_node_type"] in cfg["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_ray_validation_catches_a_typo(path):
    """The validation is real: one misspelt key anywhere Ray's schema is closed fails it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = load(path)
    bad["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(copy.deepcopy(bad)))
    bad = load(path)
    bad["docker"]["run_option"] = []
    with pytest.raises(jsonschema.ValidationError, match="run_option"):
        validate_config(prepare_config(copy.deepcopy(bad)))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_images_run_the_pinned_ray(path):
    docker = load(path)["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images, f"{path.name}: no docker image"
    for image in images:
        check_image(image, path.name)
    assert IMAGE.match(docker["image"])["kind"] == "gpu"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_setup_installs_the_pinned_project_on_every_node(path):
    cfg = prepared(path)
    version = pyproject()["version"]
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = cfg[role]
        reqs = [r for c in commands for r in pip_requirements(c)]
        assert {normalized(r) for r in reqs} == pinned_deps(), (
            f"{path.name} {role}: pins differ from pyproject.toml's [project].dependencies:\n"
            f"  only in the config: {sorted({normalized(r) for r in reqs} - pinned_deps())}\n"
            f"  only in pyproject:  {sorted(pinned_deps() - {normalized(r) for r in reqs})}")
        assert len(reqs) == len(pinned_deps()), f"{path.name} {role}: a requirement is listed twice"
        # The mounted checkout, installed without touching those pins, at the version named here.
        joined = "\n".join(commands)
        m = re.search(r"pip install --no-deps -e (\S+)", joined)
        assert m, f"{path.name} {role}: the project checkout is not installed"
        assert cfg["file_mounts"].get(m.group(1)) == ".", (
            f"{path.name}: {m.group(1)} is not the repository checkout in file_mounts")
        assert re.search(rf"IMRAM_DIST_VERSION={re.escape(version)}\b", joined), (
            f"{path.name} {role}: the setup must check imram-dist {version} (pyproject.toml's version)")
    assert ".gitignore" in cfg["rsync_filter"], f"{path.name}: rsync would ship .venv and runs/"


def _resources_flag(command: str) -> dict | None:
    m = re.search(r"--resources='([^']*)'", command)
    return json.loads(m.group(1)) if m else None


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_gpus_on_workers_only_and_trial_drivers_on_the_head(path):
    raw = load(path)
    cfg = prepared(path)
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    if raw["provider"]["type"] == "local":
        # One node type: the head's resources are given to `ray start` itself.
        assert "--num-gpus=0" in head_start, f"{path.name}: the head must offer no GPUs to Ray"
        assert _resources_flag(head_start).get(DRIVER_RESOURCE, 0) > 0, f"{path.name}: no {DRIVER_RESOURCE} on the head"
        assert "--num-gpus" not in worker_start and DRIVER_RESOURCE not in worker_start, (
            f"{path.name}: workers must offer their detected GPUs and no {DRIVER_RESOURCE}")
        return
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0, f"{path.name}: the head declares GPUs {head['resources']}"
    assert head["resources"].get(DRIVER_RESOURCE, 0) > 0, f"{path.name}: no {DRIVER_RESOURCE} on the head"
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "the head is a GPU instance"
    assert "InstanceMarketOptions" not in head["node_config"], "the head (trial drivers, MLflow) must be on-demand"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert len(workers) >= 2
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) > 0, f"{path.name}: worker type {name} declares no GPUs"
        assert DRIVER_RESOURCE not in t["resources"], f"{path.name}: worker type {name} offers {DRIVER_RESOURCE}"
        assert t["max_workers"] > t["min_workers"] >= 0, f"{path.name}: {name} does not autoscale"
        assert t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert "--num-gpus" not in head_start  # the node type's resources reach `ray start` through Ray


def test_aws_nodes_get_s3_by_instance_profile_behind_a_given_security_group():
    cfg = prepared(REPO / "ray_cluster.yaml")
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        assert nc.get("IamInstanceProfile", {}).get("Name") or nc.get("IamInstanceProfile", {}).get("Arn"), (
            f"node type {name} has no IamInstanceProfile: it would fail with 'Unable to locate credentials'")
        # Without SecurityGroupIds Ray creates a group that opens SSH to 0.0.0.0/0.
        assert nc.get("SecurityGroupIds"), f"node type {name}: Ray would create a security group open to the world"
    assert "security_group" not in cfg["provider"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_mlflow_and_dashboard_listen_on_localhost_only(path):
    cfg = prepared(path)
    head_start = "\n".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    servers = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1, f"{path.name}: MLflow is not started on the head"
    words = shlex.split(servers[0].split("||", 1)[1].strip(" ()&"))
    assert words[words.index("--host") + 1] == "127.0.0.1"
    assert words[words.index("--workers") + 1] == "1"
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in servers[0]
    store = words[words.index("--backend-store-uri") + 1]
    assert store.startswith("sqlite:////home/ray/mlflow/"), store
    # The backend store is on the head's disk, outside the container.
    assert any(o.endswith(":/home/ray/mlflow") for o in cfg["docker"]["head_run_options"])
    for c in cfg["worker_start_ray_commands"] + cfg["worker_setup_commands"]:
        assert "mlflow server" not in c


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_wide_token_auth_and_nccl_settings(path):
    cfg = prepared(path)
    run = " ".join(cfg["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run
    assert cfg["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        assert f"--env {key}=" in run, f"{path.name}: {key} missing for multi-node NCCL"


def test_no_credentials_in_any_cluster_file():
    files = [REPO / "ray_cluster.yaml", *sorted(p for p in CLUSTER.rglob("*") if p.is_file())]
    hits = {p.relative_to(REPO).as_posix(): credential_hits(p.read_text()) for p in files}
    assert not {k: v for k, v in hits.items() if v}, hits
    # The checker finds what it is for.
    assert credential_hits("aws_secret_access_key: x") and credential_hits("key AKIAABCDEFGHIJKLMNOP")


def test_hand_started_scripts_keep_the_same_layout():
    head = (CLUSTER / "start_head.sh").read_text()
    assert "--num-gpus=0" in head and "--dashboard-host=127.0.0.1" in head
    assert _resources_flag(head).get(DRIVER_RESOURCE, 0) > 0
    assert DRIVER_RESOURCE not in (CLUSTER / "start_worker.sh").read_text()
    mlflow = (CLUSTER / "start_mlflow.sh").read_text()
    assert "--host 127.0.0.1" in mlflow and "--workers 1" in mlflow
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in mlflow


def test_pip_requirement_parser():
    reqs = pip_requirements('pip install --no-cache-dir "torch>=2.4,<2.15" "ray[train,default]==2.60.0" '
                            '/x/y.whl ./z && pip install --no-deps -e /home/ray/imram-dist')
    assert [normalized(r) for r in reqs] == [("torch", (), "<2.15,>=2.4"), ("ray", ("default", "train"), "==2.60.0")]
