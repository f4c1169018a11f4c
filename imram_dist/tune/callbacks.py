"""Tune callbacks of a search, run in the search's driver process: console progress and MLflow
tracking. All MLflow writes of the search come from here (one process: no sqlite write races),
through the buffered RunWriter, so a tracking-server outage delays them and loses nothing.

MLflow layout: one parent run per search (params: the space, scheduler, searcher, trial count;
tag imram.search_path), one child run per trial (tag mlflow.parentRunId; params: the trial's full
resolved config flattened to dotted keys; metrics per epoch at step=epoch; tags imram.status =
finished | stopped | failed, imram.stopped_at_epoch, imram.error; artifacts config.yaml,
curves.png and the pyfunc model "model")."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import yaml
from ray.tune import Callback

from imram_dist.config import Config, from_dict, to_dict
from imram_dist.tracking.runs import EPOCH_METRICS, flat_config
from imram_dist.tracking.writer import RunRef, RunWriter
from imram_dist.train.recipe import format_duration
from imram_dist.tune.space import SearchSpace, trial_config

TRIAL_TAG = "imram.trial_id"
SEARCH_TAG = "imram.search_path"
FLUSH_WAIT_END_S = 300.0


def export_trial(cfg: Config, trials_storage: str, trial_id: str, params: dict[str, Any] | None = None,
                 vocab: Any = None) -> str:
    """The trial's best checkpoint (dev rsum) as one inference file; returns its local path.
    Reuses an earlier export (a trial's checkpoints do not change once it has ended)."""
    from ray.train import Checkpoint

    from imram_dist.data import read_manifest, resolve_root
    from imram_dist.train.checkpoints import scan_checkpoints
    from imram_dist.train.driver import export_inference
    from imram_dist.train.plan import resolve_storage
    from imram_dist.tune.search import trial_run_name

    name = trial_run_name(trial_id)
    storage = resolve_storage(trials_storage)
    local = (os.path.abspath(os.path.join("exports", name, "model_best.pt")) if storage.is_s3
             else os.path.join(storage.run_path(name), "model_best.pt"))
    if os.path.exists(local):
        return local
    found = scan_checkpoints(storage, name)
    if not found:
        raise RuntimeError(f"trial {trial_id} left no complete checkpoint in {storage.uri}/{name}")
    best = max(found, key=lambda c: (c["rsum"], -c["epochs_done"]))
    tcfg = trial_config(to_dict(cfg), params or {}) if params is not None else from_dict(to_dict(cfg))
    tcfg.run.name, tcfg.run.storage = name, trials_storage
    if vocab is None:
        vocab = read_manifest(resolve_root(tcfg.data)).load_vocab()
    _, local = export_inference(tcfg, Checkpoint(best["path"], filesystem=storage.filesystem()), vocab)
    return local


def trial_history(trials_storage: str, trial_id: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of a trial from its newest complete checkpoint (resumes included)."""
    from imram_dist.train.checkpoints import scan_checkpoints
    from imram_dist.train.plan import resolve_storage
    from imram_dist.tune.search import trial_run_name

    found = scan_checkpoints(resolve_storage(trials_storage), trial_run_name(trial_id))
    return list(found[-1]["state"].get("history", [])) if found else []


class ProgressPrinter(Callback):
    """One line per finished epoch of any trial, with a running count of the search."""

    def __init__(self, cfg: Config, space: SearchSpace, log: Callable[[str], None] = print):
        self.epochs, self.metric, self.log = cfg.train.epochs, cfg.tune.metric, log
        self.total, self.started = cfg.tune.trials, time.monotonic()
        self.best: tuple[float, str] = (-math.inf, "")
        self.stopped: set[str] = set()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.metric not in result:
            return
        if result[self.metric] > self.best[0]:
            self.best = (float(result[self.metric]), trial.trial_id)
        self.log(f"[tune] trial {trial.trial_id} epoch {int(result.get('epoch', 0))}/{self.epochs} "
                 f"{self.metric} {result[self.metric]:.1f} loss {result.get('loss', float('nan')):.4f} | "
                 f"{self.counts(trials)} | best {self.best[0]:.1f} ({self.best[1]})")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0))
        if epochs < self.epochs:
            self.stopped.add(trial.trial_id)
            self.log(f"[tune] trial {trial.trial_id} stopped by the scheduler after epoch {epochs} | "
                     f"{self.counts(trials)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"[tune] trial {trial.trial_id} failed: {error_text(trial)} | {self.counts(trials)}")

    def counts(self, trials: list) -> str:
        done = sum(t.status == "TERMINATED" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        ended = done + failed
        elapsed = time.monotonic() - self.started
        # at the pace so far (early stops make it pessimistic late in a search, optimistic early)
        pace = (f", about {format_duration(elapsed / ended * (self.total - ended))} left"
                if 0 < ended < self.total else "")
        return (f"{done} done ({len(self.stopped)} stopped early), {running} running, {failed} failed, "
                f"{max(self.total - ended - running, 0)} pending | {format_duration(elapsed)} elapsed{pace}")


def error_text(trial: Any) -> str:
    """The last line of the trial's error (its exception), for a tag and the console."""
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.exists(path):
            with open(path) as f:
                lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
            if lines:
                return lines[-1][:500]
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "unknown error")[:500]


class SearchTracker(Callback):
    """MLflow parent run of the search and child runs of its trials (see the module docstring)."""

    def __init__(self, uri: str, experiment_id: str, cfg: Config, space: SearchSpace, base: dict[str, Any],
                 trials_storage: str, regions: int, feature_dim: int, log: Callable[[str], None] = print):
        self.uri, self.experiment_id, self.cfg, self.space, self.base = uri, experiment_id, cfg, space, base
        self.trials_storage, self.regions, self.feature_dim, self.log = trials_storage, regions, feature_dim, log
        self.writer = RunWriter(uri, log)
        self.parent: RunRef | None = None
        self.children: dict[str, RunRef] = {}
        self.params: dict[str, dict[str, Any]] = {}
        self.model_uris: dict[str, str] = {}
        self.vocab: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; a resumed search builds fresh ones.
        return {"uri": self.uri, "experiment_id": self.experiment_id}

    # -- the parent run ------------------------------------------------------------------

    def open_parent(self, run_id: str | None, search_uri: str) -> str:
        identity = {SEARCH_TAG: search_uri}
        self.parent = self.writer.run(self.experiment_id, self.cfg.tune.name, identity,
                                      tags={"imram.kind": "search", "mlflow.note.content": _search_note(self.cfg)})
        if run_id:
            self.parent.run_id, self.parent.attached = run_id, True
        t = self.cfg.tune
        self.writer.params(self.parent, {
            "tune.space": self.space.source, "tune.trials": t.trials, "tune.scheduler": t.scheduler,
            "tune.search": t.search, "tune.metric": t.metric, "tune.grace_epochs": t.grace_epochs,
            "tune.reduction_factor": t.reduction_factor, "tune.seed": t.seed,
            "searched": ",".join(self.space.searched_keys), "train.epochs": self.cfg.train.epochs,
            "data.root": self.cfg.data.root or "synthetic"})
        self.writer.text(self.parent, self.space.to_yaml(), "search_space.yaml")
        self.writer.text(self.parent, yaml.safe_dump(self.base, sort_keys=False), "base_config.yaml")
        if not self.writer.flush(wait_s=30.0) or self.parent.run_id is None:
            from imram_dist.tracking import TrackingError

            raise TrackingError(f"tracking.uri={self.uri}: could not create the search's parent run")
        return self.parent.run_id

    # -- trials ------------------------------------------------------------------------------

    def _child(self, trial: Any) -> RunRef:
        tid = trial.trial_id
        if tid not in self.children:
            assert self.parent is not None
            self.children[tid] = self.writer.run(
                self.experiment_id, f"trial-{tid}", {TRIAL_TAG: tid, "imram.search_run": str(self.parent.run_id)},
                tags={"imram.kind": "trial", "imram.status": "running", "imram.searched": ",".join(self.space.searched_keys)},
                parent=self.parent)
        return self.children[tid]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ref = self._child(trial)
        params = dict(trial.config)
        self.params[trial.trial_id] = params
        cfg = trial_config(self.base, params)
        from imram_dist.tune.search import trial_run_name

        cfg.run.name, cfg.run.storage = trial_run_name(trial.trial_id), self.trials_storage
        self.writer.params(ref, flat_config(cfg))
        self.writer.text(ref, yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
        self.writer.flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result:
            return
        ref = self._child(trial)
        self.writer.metrics(ref, {k: result[k] for k in EPOCH_METRICS if k in result}, step=int(result["epoch"]))
        self.writer.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ref = self._child(trial)
        epochs = int((trial.last_result or {}).get("epoch", 0))
        if epochs < self.cfg.train.epochs:
            self.writer.tags(ref, {"imram.status": "stopped", "imram.stopped_at_epoch": epochs})
        else:
            self.writer.tags(ref, {"imram.status": "finished"})
        try:
            self._artifacts(trial, ref)
        except Exception as e:  # a trial without a usable checkpoint still gets its status
            self.log(f"[tracking] trial {trial.trial_id}: no model logged ({e})")
            self.writer.tags(ref, {"imram.artifact_error": str(e)[:500]})
        self.writer.end(ref, "FINISHED")
        self.writer.flush()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ref = self._child(trial)
        self.writer.tags(ref, {"imram.status": "failed", "imram.error": error_text(trial)})
        self.writer.end(ref, "FAILED")
        self.writer.flush()

    def _artifacts(self, trial: Any, ref: RunRef) -> None:
        from imram_dist.tracking.plots import curves_png

        # The checkpoint's record fills any epoch MLflow missed (already logged: skipped), up to the
        # epoch Tune saw last: a trial that ASHA stops may have checkpointed one more epoch before its
        # actor was gone, and the run should say what the scheduler decided on.
        seen = int((trial.last_result or {}).get("epoch", 0))
        history = [e for e in trial_history(self.trials_storage, trial.trial_id) if int(e["epoch"]) <= seen]
        for epoch in history:
            self.writer.metrics(ref, {k: epoch[k] for k in EPOCH_METRICS if k in epoch}, step=int(epoch["epoch"]))
        if history:
            self.writer.image(ref, curves_png(history, f"trial {trial.trial_id}"), "curves.png")
        if not self.cfg.tracking.log_model:
            return
        if self.vocab is None:
            from imram_dist.data import read_manifest, resolve_root

            self.vocab = read_manifest(resolve_root(from_dict(self.base).data)).load_vocab()
        local = export_trial(from_dict(self.base), self.trials_storage, trial.trial_id,
                             self.params.get(trial.trial_id, dict(trial.config)), self.vocab)
        self._log_model(trial.trial_id, ref, local)

    def _log_model(self, trial_id: str, ref: RunRef, local: str) -> None:
        from imram_dist.tracking.pyfunc import log_model

        def send(r: RunRef | None) -> None:
            assert r is not None and r.run_id
            uri = log_model(r.run_id, local, self.regions, self.feature_dim)
            self.model_uris[trial_id] = uri
            self.writer.client.set_tag(r.run_id, "imram.model_uri", uri)

        self.writer.call(ref, "log model", send)

    # -- the end of the search -------------------------------------------------------------------

    def _model_uri(self, trial_id: str, local: str) -> str:
        if trial_id in self.model_uris:
            return self.model_uris[trial_id]
        runs = self.writer.client.search_runs([self.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'",
                                              max_results=1)
        uri = runs[0].data.tags.get("imram.model_uri") if runs else None
        if uri:
            return uri
        ref = self.children.get(trial_id) or self.writer.run(
            self.experiment_id, f"trial-{trial_id}", {TRIAL_TAG: trial_id}, parent=self.parent)
        self._log_model(trial_id, ref, local)
        self.writer.flush(wait_s=FLUSH_WAIT_END_S)
        return self.model_uris[trial_id]

    def register_best(self, trial_id: str, test: dict[str, float], protocol: str, dataset: str, local: str) -> Any:
        from imram_dist.tracking.registry import register_and_promote

        assert self.parent is not None
        if not self.writer.flush(wait_s=FLUSH_WAIT_END_S):
            self.log(f"[tracking] {self.uri} still does not answer: the best model is not registered")
            return None
        child = self.children.get(trial_id) or self.writer.run(
            self.experiment_id, f"trial-{trial_id}", {TRIAL_TAG: trial_id}, parent=self.parent)
        test_metrics = {f"test_{k}": v for k, v in test.items()}
        self.writer.metrics(child, test_metrics, step=0)
        self.writer.tags(child, {"imram.best": "true"})
        self.writer.metrics(self.parent, {f"best_{k}": v for k, v in test_metrics.items()}, step=0)
        self.writer.tags(self.parent, {"imram.best_trial": trial_id, "imram.best_run_id": str(child.run_id)})
        self.writer.flush(wait_s=FLUSH_WAIT_END_S)
        if not self.cfg.tracking.log_model:
            return None
        tags = {"dataset": dataset, "protocol": protocol, "test_rsum": f"{test['rsum']:.4f}",
                "search_run_id": self.parent.run_id, "trial_id": trial_id, "search": self.cfg.tune.name}
        return register_and_promote(self.writer.client, self.cfg.tracking.registered_model,
                                    self._model_uri(trial_id, local), str(child.run_id), tags,
                                    self.cfg.tracking.champion_alias)

    def close(self, outcome: Any) -> None:
        assert self.parent is not None
        rows = outcome.rows
        summary = {"trials": len(rows), "trials_finished": sum(r.status == "finished" for r in rows),
                   "trials_stopped": sum(r.status.startswith("stopped") for r in rows),
                   "trials_failed": sum(r.status == "failed" for r in rows)}
        if outcome.best is not None:
            summary["best_dev_rsum"] = outcome.best.best_rsum
        self.writer.metrics(self.parent, summary, step=0)
        if outcome.decision is not None:
            d = outcome.decision
            self.writer.tags(self.parent, {"imram.registered": f"{d.name} v{d.version}",
                                           "imram.champion_decision": d.reason})
        self.writer.end(self.parent, "FINISHED")
        if not self.writer.flush(wait_s=FLUSH_WAIT_END_S):
            self.log(f"[tracking] {self.uri} did not answer for {FLUSH_WAIT_END_S:.0f}s: "
                     f"{self.writer.pending} write(s) not sent")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.flush(wait_s=FLUSH_WAIT_END_S)


def _search_note(cfg: Config) -> str:
    return (f"Ray Tune search `{cfg.tune.name}`: {cfg.tune.trials} trials, {cfg.tune.scheduler} scheduler, "
            f"{cfg.tune.search} search over `{cfg.tune.space}`; child runs are its trials (compare them in the "
            f"Chart view; params are the resolved config, metrics per epoch).")
