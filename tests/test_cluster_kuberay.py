"""The KubeRay manifests (cluster/kuberay/) parse and carry what the KubeRay operator requires
and validates, with field names checked against the CRD types, because the API server silently
drops unknown fields: a misspelt `minReplica` would be no error there, just a different cluster.

Field lists: ray-project/kuberay ray-operator/apis/ray/v1 (raycluster_types.go, rayjob_types.go)
and Kubernetes core/v1 for the parts of pod templates these manifests use. Operator checks: the
ones in ray-operator/controllers/ray/utils/validation.go (ValidateRayClusterSpec,
ValidateRayJobSpec, the metadata name checks)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from test_cluster_configs import (
    check_image,
    credential_hits,
    normalized,
    pinned_deps,
    pinned_ray_version,
    pip_requirements,
    pyproject,
)

from imram_dist.config import Config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
DRIVER_RESOURCE = Config().tune.driver_resource
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # KubeRay's MaxRayClusterNameLength, MaxRayJobNameLength

# ------------------------------------------------------------------ field names (the CRD's and core/v1's)
ANY = None  # a map with free keys (labels, annotations, resource names, rayStartParams)
OBJECT_META = {"name": str, "namespace": str, "labels": ANY, "annotations": ANY}
RESOURCES = {"requests": ANY, "limits": ANY, "claims": list}
ENV_VAR = {"name": str, "value": str, "valueFrom": dict}
CONTAINER = {
    "name": str, "image": str, "imagePullPolicy": str, "command": list, "args": list, "workingDir": str,
    "env": [ENV_VAR], "envFrom": list, "ports": [{"containerPort": int, "name": str, "protocol": str, "hostPort": int,
                                                 "hostIP": str}],
    "resources": RESOURCES, "volumeMounts": [{"name": str, "mountPath": str, "readOnly": bool, "subPath": str,
                                             "mountPropagation": str, "subPathExpr": str}],
    "livenessProbe": dict, "readinessProbe": dict, "startupProbe": dict, "lifecycle": dict,
    "securityContext": dict, "stdin": bool, "tty": bool, "terminationMessagePath": str,
    "terminationMessagePolicy": str, "volumeDevices": list, "resizePolicy": list, "restartPolicy": str,
}
VOLUME = {"name": str, "emptyDir": {"medium": str, "sizeLimit": (str, int)}, "persistentVolumeClaim": dict,
          "configMap": dict, "secret": dict, "hostPath": dict, "projected": dict, "ephemeral": dict, "csi": dict}
POD_SPEC = {
    "containers": [CONTAINER], "initContainers": [CONTAINER], "volumes": [VOLUME], "serviceAccountName": str,
    "nodeSelector": ANY, "tolerations": [{"key": str, "operator": str, "value": str, "effect": str,
                                          "tolerationSeconds": int}],
    "affinity": dict, "securityContext": dict, "restartPolicy": str, "priorityClassName": str,
    "terminationGracePeriodSeconds": int, "imagePullSecrets": list, "schedulerName": str, "hostNetwork": bool,
    "dnsPolicy": str, "topologySpreadConstraints": list, "runtimeClassName": str, "shareProcessNamespace": bool,
    "enableServiceLinks": bool, "automountServiceAccountToken": bool, "hostname": str, "subdomain": str,
    "activeDeadlineSeconds": int, "hostIPC": bool, "hostPID": bool, "nodeName": str, "overhead": ANY,
    "preemptionPolicy": str, "priority": int, "readinessGates": list, "resourceClaims": list, "dnsConfig": dict,
    "hostAliases": list, "os": dict, "schedulingGates": list, "setHostnameAsFQDN": bool, "hostUsers": bool,
}
POD_TEMPLATE = {"metadata": OBJECT_META, "spec": POD_SPEC}
AUTOSCALER_OPTIONS = {"resources": RESOURCES, "image": str, "imagePullPolicy": str, "securityContext": dict,
                      "idleTimeoutSeconds": int, "upscalingMode": str, "version": str, "env": [ENV_VAR],
                      "envFrom": list, "volumeMounts": list, "command": list, "args": list}
HEAD_GROUP = {"template": POD_TEMPLATE, "headService": dict, "enableIngress": bool, "ingressOptions": dict,
              "resources": ANY, "labels": ANY, "rayStartParams": ANY, "serviceType": str}
WORKER_GROUP = {"suspend": bool, "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                "idleTimeoutSeconds": int, "priority": int, "resources": ANY, "labels": ANY, "rayStartParams": ANY,
                "template": POD_TEMPLATE, "scaleStrategy": {"workersToDelete": list}, "numOfHosts": int}
RAY_CLUSTER_SPEC = {
    "upgradeStrategy": dict, "authOptions": {"enableK8sTokenAuth": bool, "secretName": str, "mode": str},
    "suspend": bool, "managedBy": str, "autoscalerOptions": AUTOSCALER_OPTIONS, "headServiceAnnotations": ANY,
    "enableInTreeAutoscaling": bool, "gcsFaultToleranceOptions": dict, "historyServerOptions": dict,
    "networkPolicy": dict, "tlsOptions": dict, "headGroupSpec": HEAD_GROUP, "rayVersion": str,
    "workerGroupSpecs": [WORKER_GROUP],
}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE, "metadata": ANY, "clusterSelector": ANY,
    "submitterConfig": {"backoffLimit": int}, "managedBy": str, "deletionStrategy": dict, "entrypoint": str,
    "runtimeEnvYAML": str, "jobId": str, "submissionMode": str, "entrypointResources": str,
    "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float), "ttlSecondsAfterFinished": int,
    "shutdownAfterJobFinishes": bool, "suspend": bool,
}
TOP = {"apiVersion": str, "kind": str, "metadata": OBJECT_META}
SCHEMAS = {"RayCluster": dict(TOP, spec=RAY_CLUSTER_SPEC), "RayJob": dict(TOP, spec=RAY_JOB_SPEC)}


def field_errors(value, schema, where: str) -> list[str]:
    """Unknown fields and wrong kinds of value, the API server's pruning made visible."""
    if schema is ANY:
        return [] if isinstance(value, dict) else [f"{where}: expected a map, got {value!r}"]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {value!r}"]
        errors = [f"{where}.{k}: unknown field (the API server would drop it)" for k in value if k not in schema]
        for k, v in value.items():
            if k in schema:
                errors += field_errors(v, schema[k], f"{where}.{k}")
        return errors
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [e for i, item in enumerate(value) for e in field_errors(item, schema[0], f"{where}[{i}]")]
    kinds = schema if isinstance(schema, tuple) else (schema,)
    if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
        return [f"{where}: expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}"]
    return []


# ------------------------------------------------------------------ the operator's own checks

def operator_errors(doc: dict) -> list[str]:
    kind, name = doc["kind"], doc["metadata"].get("name", "")
    errors = []
    if len(name) > MAX_NAME[kind]:
        errors.append(f"{kind} name {name!r} is longer than {MAX_NAME[kind]} characters")
    if not DNS1035.match(name):
        errors.append(f"{kind} name {name!r} is not a DNS-1035 label")
    spec = doc["spec"]
    if kind == "RayJob":
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("suspend needs shutdownAfterJobFinishes")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("ttlSecondsAfterFinished must be >= 0")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            errors.append("activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("backoffLimit must be >= 0")
        try:
            yaml.safe_load(spec.get("runtimeEnvYAML", ""))
        except yaml.YAMLError as e:
            errors.append(f"runtimeEnvYAML is not YAML: {e}")
        spec = spec.get("rayClusterSpec") or {}
        if not spec:
            return errors
    groups = [("Head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    for gname, g in groups:
        if not g.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{gname} group should have at least one container")
        params = g.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errors.append(f"{gname}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{gname}: rayStartParams['labels'] is not supported")
        if any(not isinstance(v, str) for v in params.values()):
            errors.append(f"{gname}: rayStartParams values must be strings: {params}")
    for g in spec.get("workerGroupSpecs", []):
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            if key not in g:
                errors.append(f"worker group {g.get('groupName', '?')} has no {key}")
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 0)
        if not 0 <= lo <= g.get("replicas", lo) <= hi:
            errors.append(f"worker group {g.get('groupName')}: replicas not within minReplicas..maxReplicas")
    if spec.get("authOptions", {}).get("mode", "token") == "token" and "authOptions" in spec:
        if tuple(int(x) for x in spec.get("rayVersion", "0").split(".")[:3]) < (2, 52, 0):
            errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return errors


# ------------------------------------------------------------------ helpers

def docs() -> list[dict]:
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        if path.name == "runtime_env.yaml":  # a Ray runtime environment, not a manifest
            continue
        with open(path) as f:
            out += [dict(d, _file=path.name) for d in yaml.safe_load_all(f) if d]
    return out


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in cluster/kuberay, found {len(found)}"
    return found[0]


def ray_manifests() -> list[dict]:
    return [d for d in docs() if d["kind"] in SCHEMAS]


def cluster_specs() -> list[tuple[str, dict]]:
    return [("RayCluster", one("RayCluster")["spec"]), ("RayJob", one("RayJob")["spec"]["rayClusterSpec"])]


def start_resources(params: dict) -> dict:
    """rayStartParams' resources: KubeRay's quoted JSON ('"{\\"x\\": 1}"')."""
    raw = params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"rayStartParams.resources {raw!r} is not KubeRay's quoted JSON"
    return json.loads(raw[1:-1].replace('\\"', '"'))


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_file"}


# ------------------------------------------------------------------ tests

def test_manifests_present():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs())
    assert kinds == [("Deployment", "imram-mlflow"), ("NetworkPolicy", "imram-mlflow"),
                     ("PersistentVolumeClaim", "imram-mlflow"), ("RayCluster", "imram-dist"),
                     ("RayJob", "imram-search"), ("Service", "imram-mlflow"), ("ServiceAccount", "imram-dist")], kinds


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_field_names_are_the_crds(kind):
    doc = one(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert field_errors(strip(doc), SCHEMAS[kind], kind) == []


def test_field_check_catches_typos():
    bad = strip(copy.deepcopy(one("RayJob")))
    bad["spec"]["shutdownAfterJobFinish"] = True
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 1
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"] = "2"
    errors = field_errors(bad, SCHEMAS["RayJob"], "RayJob")
    assert len(errors) == 4, errors
    assert any("shutdownAfterJobFinish:" in e for e in errors) and any("minReplica:" in e for e in errors)


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_operator_validation_passes(kind):
    assert operator_errors(one(kind)) == []


def test_operator_checks_catch_what_the_operator_refuses():
    job = copy.deepcopy(one("RayJob"))
    job["metadata"]["name"] = "Imram_Search"
    job["spec"].update(suspend=True, shutdownAfterJobFinishes=False)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 4
    errors = operator_errors(job)
    assert len(errors) == 4, errors
    assert [e.split(" ")[0] for e in errors] == ["RayJob", "suspend", "Head:", "worker"], errors
    job = copy.deepcopy(one("RayJob"))
    del job["spec"]["rayClusterSpec"]
    assert operator_errors(job) == ["one of rayClusterSpec or clusterSelector must be set"]
    cluster = copy.deepcopy(one("RayCluster"))
    cluster["metadata"]["name"] = "x" * 54
    assert operator_errors(cluster) == ["RayCluster name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' "
                                        "is longer than 53 characters"]


def test_rayjob_runs_the_raycluster_spec_and_shuts_it_down():
    job = one("RayJob")["spec"]
    assert job["rayClusterSpec"] == one("RayCluster")["spec"], "rayjob.yaml and raycluster.yaml have drifted apart"
    assert job["shutdownAfterJobFinishes"] is True and job.get("suspend", False) is False
    assert job["submissionMode"] == "K8sJobMode"


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_images_and_ray_version(which):
    spec = dict(cluster_specs())[which]
    assert spec["rayVersion"] == pinned_ray_version()
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            check_image(c["image"], f"{which} {g.get('groupName', 'head')}/{c['name']}")
            assert c["image"].endswith("-gpu")
    mlflow = one("Deployment", "imram-mlflow")["spec"]["template"]["spec"]["containers"]
    for c in mlflow:
        check_image(c["image"], f"Deployment imram-mlflow/{c['name']}")


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_gpus_on_workers_only_and_trial_drivers_on_the_head(which):
    spec = dict(cluster_specs())[which]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert start_resources(head["rayStartParams"]).get(DRIVER_RESOURCE, 0) > 0
    for c in head["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c["resources"].get(part, {}), "the head asks Kubernetes for a GPU"
    assert head["template"]["spec"]["nodeSelector"].get("eks.amazonaws.com/capacityType") == "ON_DEMAND"
    assert len(spec["workerGroupSpecs"]) >= 2
    for g in spec["workerGroupSpecs"]:
        assert DRIVER_RESOURCE not in start_resources(g["rayStartParams"]) and "num-gpus" not in g["rayStartParams"]
        (c,) = g["template"]["spec"]["containers"]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert isinstance(gpus, int) and gpus > 0, f"worker group {g['groupName']} asks for no GPUs"
        assert c["resources"]["requests"].get("nvidia.com/gpu") == gpus  # extended resources: requests == limits
        assert g["maxReplicas"] > g["minReplicas"] >= 0
        assert g["template"]["spec"]["nodeSelector"].get("eks.amazonaws.com/capacityType") == "SPOT"
        env = {e["name"] for e in c["env"]}
        assert {"NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= env
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"


def test_runtime_env_pins_and_version():
    with open(KUBERAY / "runtime_env.yaml") as f:
        env = yaml.safe_load(f)
    assert yaml.safe_load(one("RayJob")["spec"]["runtimeEnvYAML"]) == env, "rayjob.yaml and runtime_env.yaml differ"
    reqs = [normalized(r) for r in env["pip"]["packages"]]
    assert set(reqs) == pinned_deps() and len(reqs) == len(pinned_deps()), (
        f"runtime_env.yaml pins differ from pyproject.toml: {sorted(set(reqs) ^ pinned_deps())}")
    version = pyproject()["version"]
    assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(f"/imram-dist-{version}.zip"), (
        f"working_dir {env['working_dir']} is not the release zip of imram-dist {version}")
    from ray._private.runtime_env.validation import parse_and_validate_pip

    assert parse_and_validate_pip(env["pip"])["packages"]  # Ray's own parser accepts it


def test_entrypoint_runs_the_search_with_gpus_and_the_tracking_server():
    entry = one("RayJob")["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "imram_dist.tune"]
    assert entry[entry.index("--gpus-per-worker") + 1] == "1"
    svc = one("Service", "imram-mlflow")
    port = svc["spec"]["ports"][0]["port"]
    assert entry[entry.index("--tracking-uri") + 1] == f"http://{svc['metadata']['name']}:{port}"
    assert any(w.startswith("run.storage=s3://") for w in entry) and any(w.startswith("data.root=s3://") for w in entry)
    from imram_dist.config import flat_keys

    keys = flat_keys()
    for w in entry:
        if "=" in w and not w.startswith("-"):
            assert w.split("=", 1)[0] in keys, f"entrypoint override {w} names no config key"


def test_s3_through_irsa_and_no_keys():
    sa = one("ServiceAccount", "imram-dist")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    templates = [g["template"] for _, spec in cluster_specs()
                 for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    templates.append(one("Deployment", "imram-mlflow")["spec"]["template"])
    for t in templates:
        assert t["spec"]["serviceAccountName"] == "imram-dist"
        for c in t["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}, names
    for path in KUBERAY.glob("*.yaml"):
        assert credential_hits(path.read_text()) == [], path


def test_nothing_is_exposed_outside_the_cluster():
    for d in docs():
        assert d["kind"] != "Ingress"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP"
    for _, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert not head.get("enableIngress") and head.get("serviceType", "ClusterIP") == "ClusterIP"
    policy = one("NetworkPolicy", "imram-mlflow")["spec"]
    mlflow = one("Deployment", "imram-mlflow")
    assert policy["podSelector"]["matchLabels"].items() <= mlflow["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/node-type": "head"}}}]


def test_mlflow_server_pins_and_store():
    mlflow = one("Deployment", "imram-mlflow")["spec"]
    assert mlflow["replicas"] == 1 and mlflow["strategy"]["type"] == "Recreate"  # one sqlite writer
    (c,) = mlflow["template"]["spec"]["containers"]
    script = " ".join(c["args"])
    reqs = {normalized(r) for r in pip_requirements(script)}
    assert reqs and reqs <= pinned_deps(), f"the MLflow server's pins differ from pyproject.toml: {reqs - pinned_deps()}"
    assert "sqlite:////mlflow/" in script and "--workers 1" in script
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in c["env"]
    (vol,) = mlflow["template"]["spec"]["volumes"]
    assert vol["persistentVolumeClaim"]["claimName"] == one("PersistentVolumeClaim", "imram-mlflow")["metadata"]["name"]
