"""Where runs are tracked: connect to an MLflow store (an sqlite file or an ``mlflow server``),
fail fast and clearly when it cannot be reached, and create the experiment once, before any
trial runs (concurrent trials racing to create a fresh sqlite database crash in a migration)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from imram_dist.config import ConfigError

# MLflow retries an unreachable server for minutes by default; our own writer buffers and
# retries instead (tracking/writer.py), so each request may fail fast.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
            # no artifact progress bars between our progress lines (a model is a few small files)
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class TrackingError(ConfigError):
    """The tracking store cannot be used; the message names the URI."""


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///relative`` or ``sqlite:////absolute`` URI."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser()


def resolve_uri(uri: str) -> str:
    """An sqlite URI with an absolute path (trial processes run in other folders)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{db.resolve()}"
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of an sqlite store live beside the database (mlartifacts/); a server decides its own."""
    db = sqlite_path(uri)
    return str(db.resolve().parent / "mlartifacts") if db is not None else None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """TrackingError within about timeout_s when the store does not answer."""
    if is_http(uri):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"tracking.uri={uri}: /health answered HTTP {r.status}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"tracking.uri={uri}: the MLflow server does not answer ({reason}). Start one with "
                f"`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`, "
                f"or use the default sqlite store (tracking.uri=sqlite:///mlflow.db)") from None
    elif sqlite_path(uri) is not None:
        db = sqlite_path(uri)
        assert db is not None
        try:
            db.resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking.uri={uri}: cannot create the folder of {db}: {e}") from None
    elif uri.startswith(("file:", "/", "./")) or "://" not in uri:
        raise TrackingError(f"tracking.uri={uri}: MLflow 3 refuses plain file stores; use "
                            "sqlite:///mlflow.db or http://host:port of an mlflow server")


def connect(uri: str, experiment: str) -> tuple[str, str]:
    """Point MLflow at the store, check it, create the experiment if needed.
    Returns (absolute tracking URI, experiment id)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)
    uri = resolve_uri(uri)
    check_reachable(uri)
    # mlflow.pyfunc.log_model goes through the process-wide URIs; the registry is the tracking
    # store's own (a stray MLFLOW_REGISTRY_URI from the shell must not send models elsewhere)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, artifact_location=_artifact_location(uri, experiment))
        else:
            exp_id = exp.experiment_id
    except Exception as e:  # mlflow raises several types; say what failed and where
        raise TrackingError(f"tracking.uri={uri}: cannot open experiment {experiment!r}: {e}") from None
    return uri, exp_id


def _artifact_location(uri: str, experiment: str) -> str | None:
    root = artifact_root(uri)
    return None if root is None else str(Path(root) / experiment)


def ui_command(uri: str, port: int = 5000) -> str:
    """The command that shows this store in the MLflow UI, bound to 127.0.0.1 only."""
    if is_http(uri):
        return f"open {uri} (an mlflow server; reach a remote one through an SSH tunnel: ssh -L 5000:127.0.0.1:5000 HOST)"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}"
