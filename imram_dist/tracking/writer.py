"""Every MLflow write of a search or a training run goes through one RunWriter.

Writes are queued and sent in order. When the store does not answer (a tracking server that
restarts, an sqlite file locked by another writer) the queue is kept and sent again at the
next flush, so an outage delays what MLflow shows but loses nothing. A run is named by the tags
that identify it (``imram.trial_id``, ...): it is looked up before it is created, so a resumed
search attaches to its runs instead of making new ones, and a metric point (key, step) already
in the store is never sent twice.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imram_dist.tracking.store import check_reachable, is_http

# log_batch takes at most 1000 metrics, 100 params and 100 tags per call.
PARAMS_PER_CALL = 100
PARAM_VALUE_MAX = 6000


@dataclass
class RunRef:
    """A run, created or found when the writer first reaches the store."""

    experiment_id: str
    name: str
    identity: dict[str, str]
    """Tags that identify the run; found by these before it is created."""
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    attached: bool = False
    """True when the run existed before this process found it (a resumed search)."""
    logged_steps: dict[str, set[int]] = field(default_factory=dict)


class RunWriter:
    """Buffered, in-order, idempotent MLflow writes (see the module docstring)."""

    def __init__(self, uri: str, log: Callable[[str], None] | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # the registry lives in the tracking store: a stray MLFLOW_REGISTRY_URI must not redirect it
        self.client = MlflowClient(uri, registry_uri=uri)
        self._ops: deque[tuple[RunRef | None, str, Callable[[RunRef | None], None]]] = deque()
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._down_since: float | None = None
        self.failed_ops: list[str] = []
        """Writes the store refused for good (not an outage): described, then dropped."""

    # -- queueing ------------------------------------------------------------------------

    def run(self, experiment_id: str, name: str, identity: dict[str, str],
            tags: dict[str, str] | None = None, parent: RunRef | None = None) -> RunRef:
        ref = RunRef(experiment_id, name, dict(identity), dict(tags or {}))

        def resolve(_: RunRef | None) -> None:
            if ref.run_id is not None:
                return
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in ref.identity.items())
            found = self.client.search_runs([ref.experiment_id], filter_string=query, max_results=1)
            if found:
                ref.run_id, ref.attached = found[0].info.run_id, True
                if found[0].info.status != "RUNNING":
                    self.client.update_run(ref.run_id, status="RUNNING")
                return
            all_tags = {**ref.identity, **ref.tags}
            if parent is not None:
                all_tags["mlflow.parentRunId"] = str(parent.run_id)
            ref.run_id = self.client.create_run(ref.experiment_id, run_name=ref.name, tags=all_tags).info.run_id

        self._ops.append((parent, f"create run {name}", resolve))
        return ref

    def params(self, ref: RunRef, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_text(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_CALL):
            chunk = items[i:i + PARAMS_PER_CALL]
            self._queue(ref, "params", lambda r, c=chunk: self._log_params(r, c))

    def _log_params(self, ref: RunRef, chunk: list[Any]) -> None:
        if ref.attached:  # params of a resumed run are already there (and cannot change)
            existing = self.client.get_run(ref.run_id).data.params
            chunk = [p for p in chunk if p.key not in existing]
        if chunk:
            self.client.log_batch(ref.run_id, params=chunk)

    def metrics(self, ref: RunRef, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        self._queue(ref, f"metrics step {step}", lambda r: self._log_metrics(r, values, step))

    def _log_metrics(self, ref: RunRef, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        fresh = []
        for key, value in values.items():
            if key not in ref.logged_steps:
                ref.logged_steps[key] = ({int(m.step) for m in self.client.get_metric_history(ref.run_id, key)}
                                         if ref.attached else set())
            if step not in ref.logged_steps[key]:
                fresh.append(Metric(key, value, int(time.time() * 1000), step))
        if fresh:
            self.client.log_batch(ref.run_id, metrics=fresh)
        for m in fresh:
            ref.logged_steps[m.key].add(step)

    def tags(self, ref: RunRef, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._queue(ref, "tags", lambda r: self.client.log_batch(r.run_id, tags=items))

    def text(self, ref: RunRef, text: str, artifact_file: str) -> None:
        self._queue(ref, f"artifact {artifact_file}", lambda r: self.client.log_text(r.run_id, text, artifact_file))

    def artifact(self, ref: RunRef, local_path: str, artifact_path: str | None = None) -> None:
        self._queue(ref, f"artifact {os.path.basename(local_path)}",
                    lambda r: self.client.log_artifact(r.run_id, local_path, artifact_path))

    def image(self, ref: RunRef, png: bytes, artifact_file: str) -> None:
        def send(r: RunRef) -> None:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, os.path.basename(artifact_file))
                with open(path, "wb") as f:
                    f.write(png)
                self.client.log_artifact(r.run_id, path, os.path.dirname(artifact_file) or None)

        self._queue(ref, f"artifact {artifact_file}", send)

    def call(self, ref: RunRef | None, what: str, fn: Callable[[RunRef | None], None]) -> None:
        """Any other write (a logged model, a registry update), in order with the rest."""
        self._queue(ref, what, fn)

    def end(self, ref: RunRef, status: str = "FINISHED") -> None:
        self._queue(ref, f"end run ({status})", lambda r: self.client.set_terminated(r.run_id, status))

    def _queue(self, ref: RunRef | None, what: str, fn: Callable[[Any], None]) -> None:
        self._ops.append((ref, what, fn))

    # -- sending ---------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._ops)

    def flush(self, wait_s: float = 0.0) -> bool:
        """Send what is queued, in order. On an outage keep the rest and return False; with
        wait_s > 0 keep retrying (every few seconds) for that long first."""
        deadline = time.monotonic() + wait_s
        while True:
            if self._send_all():
                if self._down_since is not None:
                    self._log(f"[tracking] {self.uri} answers again after "
                              f"{time.monotonic() - self._down_since:.0f}s; buffered writes sent")
                    self._down_since = None
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(3.0, max(0.0, deadline - time.monotonic())))

    def _send_all(self) -> bool:
        while self._ops:
            ref, what, fn = self._ops[0]
            try:
                fn(ref)
            except Exception as e:  # MLflow raises many types; tell an outage from a refusal
                if self._is_outage(e):
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        self._log(f"[tracking] {self.uri} does not answer ({_short(e)}); "
                                  f"buffering {len(self._ops)} write(s) and retrying")
                    return False
                self.failed_ops.append(f"{what}: {_short(e)}")
                self._log(f"[tracking] MLflow refused {what}: {_short(e)} (dropped)")
            self._ops.popleft()
        return True

    def _is_outage(self, error: Exception) -> bool:
        text = str(error)
        if "database is locked" in text:
            return True
        if is_http(self.uri):
            try:
                check_reachable(self.uri, timeout_s=3.0)
            except Exception:
                return True
            # Reachable now: a request that failed on the connection is still worth a retry.
            return any(s in text for s in ("Connection", "connection", "Max retries", "timed out", "503", "502"))
        return False


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _param_text(v: Any) -> str:
    text = str(v)
    return text if len(text) <= PARAM_VALUE_MAX else text[:PARAM_VALUE_MAX - 3] + "..."


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 300 else text[:297] + "..."
