"""The search: Ray Tune samples configurations from a space; each trial is a function trainable
that builds and fits the ordinary training run (imram_dist.train's TorchTrainer with DeepSpeed
workers, Train V2), reporting each epoch's dev R@K to Tune through TuneReportCallback. ASHA stops
trials that lag; MLflow gets one parent run per search and one child run per trial
(imram_dist/tune/callbacks.py); the best trial is evaluated on the test split and registered.

Order of work in ``search(cfg)``: every check that can fail (space, sampled configs, tracking
store, data, cluster) runs before the first trial starts.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imram_dist.config import Config, ConfigError, from_dict, to_dict
from imram_dist.tune.space import SearchSpace, check_samples, load_space, trial_config

SEARCH_STATE = "imram_search.json"
TRIALS_DIR = "trials"
DRIVER_SHARE = 0.01
"""Of tune.driver_resource per trial driver: 100 drivers per unit a node offers."""


def trial_run_name(trial_id: str) -> str:
    """The trial's Ray Train run name: from the Tune trial id alone (stable across restores), so
    a resumed trial finds its own checkpoints again."""
    return f"trial-{trial_id}"


def run_trial(params: dict[str, Any], base: dict[str, Any], root: str, trials_storage: str) -> None:
    """The Tune function trainable: one distributed training run with the sampled params."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from imram_dist.train.driver import build_trainer

    cfg = trial_config(base, params)
    cfg.run.name = trial_run_name(ray.tune.get_context().get_trial_id())
    cfg.run.storage = trials_storage
    build_trainer(cfg, root, callbacks=[TuneReportCallback()]).fit()


@dataclass
class TrialRow:
    """One line of the final table."""

    trial_id: str
    params: dict[str, Any]
    """The trial's sampled (and fixed) values by dotted key."""
    best_rsum: float
    epochs: int
    status: str
    error: str = ""


@dataclass
class SearchOutcome:
    """What a search produced."""

    rows: list[TrialRow]
    best: TrialRow | None
    test_metrics: dict[str, float] = field(default_factory=dict)
    decision: Any = None
    parent_run_id: str = ""
    tracking_uri: str = ""
    search_path: str = ""
    seconds: float = 0.0


def concurrency(cfg: Config, resources: dict[str, float]) -> int:
    """Trials the cluster holds at once: its CPUs (or GPUs) over what one trial's workers take."""
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    c = cfg.cluster
    if c.use_gpu:
        fits = resources.get("GPU", 0.0) / (c.num_workers * c.gpus_per_worker)
    else:
        fits = resources.get("CPU", 0.0) / (c.num_workers * c.cpus_per_worker)
    return max(1, int(fits + 1e-9))


def _scheduler(cfg: Config) -> Any:
    if cfg.tune.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_epochs,
                         reduction_factor=cfg.tune.reduction_factor)


def _searcher(cfg: Config, n_concurrent: int) -> Any:
    if cfg.tune.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=n_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores max_concurrent_trials for a generator instance: it takes its own limit.
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=n_concurrent)


def _read_state(fs: Any, path: str) -> dict[str, Any] | None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _write_state(fs: Any, path: str, state: dict[str, Any]) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(state, indent=1).encode())
    fs.move(tmp, path)


def search(cfg: Config, log: Callable[[str], None] = print) -> SearchOutcome:
    """Run (or, with tune.resume, continue) a search; see the module docstring."""
    import ray
    from ray import tune

    from imram_dist.evaluate.scoring import eval_device
    from imram_dist.train.driver import ensure_ray, prepare_data
    from imram_dist.train.plan import check_resources, check_static, resolve_storage
    from imram_dist.tune.callbacks import ProgressPrinter, SearchTracker

    t0 = time.perf_counter()
    storage = resolve_storage(cfg.run.storage)
    fs = storage.filesystem()
    search_path = storage.run_path(cfg.tune.name)
    state_path = f"{search_path}/{SEARCH_STATE}"
    trials_storage = f"{storage.uri.rstrip('/')}/{cfg.tune.name}/{TRIALS_DIR}"
    state = _read_state(fs, state_path)
    if state is not None and not cfg.tune.resume:
        raise ConfigError(f"tune.name={cfg.tune.name!r}: a search of that name exists in {storage.uri}; pass --resume "
                          f"to continue it, or choose another tune.name")
    if cfg.tune.resume:
        if state is None:
            raise ConfigError(f"--resume: no search named {cfg.tune.name!r} in {storage.uri} to continue")
        # A resumed search goes on with the config it started with (same data, same space),
        # whatever else this command line says.
        cfg = from_dict(state["base"])
        cfg.tune.resume = True

    space = load_space(cfg.tune.space)
    space.apply_fixed(cfg)  # plain values of the space are part of every trial's base config
    check_static(cfg)
    eval_device(cfg.eval.device)  # the final test run scores in this process: fail now, not after the trials
    tracking = None
    if cfg.tracking.enabled:
        from imram_dist.tracking import connect

        tracking = connect(cfg.tracking.uri, cfg.tracking.experiment)  # fails in seconds, naming the URI
    root, manifest, _ = prepare_data(cfg)  # the synthetic corpus is generated here, once
    base = to_dict(cfg)
    check_samples(space, base, seed=cfg.tune.seed)

    local = not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    ensure_ray(cfg, local_resources={cfg.tune.driver_resource: 1.0}, dashboard=True,
               log_to_driver=cfg.tune.verbose > 0)  # our progress lines, not every worker's
    resources = ray.cluster_resources()
    if resources.get(cfg.tune.driver_resource, 0.0) < DRIVER_SHARE:
        raise ConfigError(
            f"tune.driver_resource={cfg.tune.driver_resource!r}: the Ray cluster offers none of this resource, so no "
            f"trial driver could be placed; start the head node with --resources='{{\"{cfg.tune.driver_resource}\": 1}}' "
            f"(the cluster configs in cluster/ do)")
    if local:
        check_resources(cfg, resources)  # a local cluster never grows; an autoscaling one may
    n_concurrent = concurrency(cfg, resources)
    restorable = state is not None and tune.Tuner.can_restore(
        f"s3://{search_path}" if storage.is_s3 else search_path, storage_filesystem=fs if storage.is_s3 else None)

    parent_id = ""
    tracker = None
    if tracking is not None:
        uri, exp_id = tracking
        tracker = SearchTracker(uri, exp_id, cfg, space, base, trials_storage,
                                regions=manifest.regions, feature_dim=manifest.feature_dim, log=log)
        parent_id = tracker.open_parent(state.get("parent_run_id") if state else None, search_uri=
                                        f"s3://{search_path}" if storage.is_s3 else search_path)
    if state is None:
        state = {"name": cfg.tune.name, "parent_run_id": parent_id, "space": space.source,
                 "created": time.time(), "base": base}
        _write_state(fs, state_path, state)

    _keep_credentials_out_of_runtime_envs()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, root=root, trials_storage=trials_storage),
        {cfg.tune.driver_resource: DRIVER_SHARE})
    callbacks = [tracker] if tracker is not None else []
    progress = ProgressPrinter(cfg, space, log)
    callbacks.append(progress)
    if state.get("started") and cfg.tune.resume:
        if not restorable:
            raise ConfigError(f"--resume: {search_path} holds no Tune experiment state to restore")
        log(f"[tune] resuming search {cfg.tune.name!r} from {storage.uri}")
        tuner = tune.Tuner.restore(f"s3://{search_path}" if storage.is_s3 else search_path, trainable,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False,
                                   storage_filesystem=fs if storage.is_s3 else None)
        tuner._local_tuner.get_run_config().callbacks = callbacks  # fresh trackers, not the pickled ones
    else:
        state["started"] = True
        _write_state(fs, state_path, state)
        tuner = tune.Tuner(
            trainable, param_space=space.to_ray(),
            tune_config=tune.TuneConfig(
                num_samples=cfg.tune.trials, metric=cfg.tune.metric, mode="max", scheduler=_scheduler(cfg),
                search_alg=_searcher(cfg, n_concurrent), reuse_actors=False),
            run_config=tune.RunConfig(
                name=cfg.tune.name, storage_path=storage.path, storage_filesystem=fs if storage.is_s3 else None,
                callbacks=callbacks, verbose=cfg.tune.verbose, progress_reporter=None,
                failure_config=tune.FailureConfig(max_failures=0)))
    log(f"[tune] search {cfg.tune.name!r}: {cfg.tune.trials} trials from {space.source} "
        f"({', '.join(space.searched_keys)}), {cfg.tune.scheduler} scheduler, {cfg.tune.search} search, "
        f"{n_concurrent} at a time, {cfg.cluster.num_workers} worker(s) per trial; data {root}")
    results = tuner.fit()
    rows = table_rows(results, space, cfg)
    outcome = SearchOutcome(rows=rows, best=next((r for r in rows if r.status != "failed"), None),
                            parent_run_id=parent_id, tracking_uri=tracking[0] if tracking else "",
                            search_path=search_path)
    if outcome.best is not None and cfg.tune.evaluate_best:
        outcome.test_metrics, outcome.decision = finish_best(cfg, outcome.best, root, manifest, trials_storage,
                                                             tracker, log)
    if tracker is not None:
        tracker.close(outcome)
    outcome.seconds = time.perf_counter() - t0
    log(format_table(outcome, space, cfg))
    return outcome


SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def _keep_credentials_out_of_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS credential variables into every trainable's runtime_env
    (ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE), which Ray keeps in its state and writes
    to runtime_env_agent.log. Trial drivers do not need them: on a local Ray they inherit the
    environment Ray was started with, on a cluster they use the node's role. Stop that copy."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(SECRET_ENV)


def table_rows(results: Any, space: SearchSpace, cfg: Config) -> list[TrialRow]:
    rows = []
    for r in results:
        df = r.metrics_dataframe
        best = float(df[cfg.tune.metric].max()) if df is not None and cfg.tune.metric in df else -math.inf
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(str(r.path)).split("_")[-1]
        if r.error is not None:
            status = "failed"
        elif epochs < cfg.train.epochs:
            status = f"stopped@{epochs}"
        else:
            status = "finished"
        params = dict(r.config or {})
        rows.append(TrialRow(str(trial_id), params, best, epochs, status, "" if r.error is None else str(r.error)))
    rows.sort(key=lambda row: (row.status == "failed", -row.best_rsum))
    return rows


def finish_best(cfg: Config, best: TrialRow, root: str, manifest: Any, trials_storage: str, tracker: Any,
                log: Callable[[str], None]) -> tuple[dict[str, float], Any]:
    """Evaluate the best trial's exported model on eval.split; log and register it."""
    from imram_dist.data import load_eval_split
    from imram_dist.evaluate import evaluate_split
    from imram_dist.evaluate.scoring import eval_device
    from imram_dist.tune.callbacks import export_trial

    local = export_trial(cfg, trials_storage, best.trial_id, best.params)
    from imram_dist.model import load_inference_checkpoint

    model, _ = load_inference_checkpoint(local)
    model.to(eval_device(cfg.eval.device))
    split = load_eval_split(root, cfg.eval.split)
    result = evaluate_split(model, split, protocol=cfg.eval.protocol, cfg=cfg.eval)
    m = {k: float(v) for k, v in result.metrics.items()}
    log(f"[tune] best trial {best.trial_id} on {cfg.eval.split} ({result.protocol}): i2t R@1/5/10 "
        f"{m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} t2i R@1/5/10 {m['t2i_r1']:.1f}/"
        f"{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} rsum {m['rsum']:.1f}")
    decision = None
    if tracker is not None:
        decision = tracker.register_best(best.trial_id, m, result.protocol, dataset_label(cfg, manifest, root),
                                         local)
        if decision is not None:
            log(f"[tune] registry: {decision.reason}")
    return m, decision


def dataset_label(cfg: Config, manifest: Any, root: str) -> str:
    """Names the evaluation data for the champion rule: the dataset and a digest of the split's shards."""
    import hashlib

    shards = manifest.splits[cfg.eval.split].shards
    digest = hashlib.sha256("".join(s.sha256 for s in shards).encode()).hexdigest()[:12]
    name = cfg.data.root or "synthetic"
    return f"{name}:{cfg.eval.split}@{digest}"


def format_table(outcome: SearchOutcome, space: SearchSpace, cfg: Config) -> str:
    keys = space.searched_keys
    head = ["trial", *keys, f"dev {cfg.tune.metric}", "epochs", "status"]
    body = []
    for r in outcome.rows:
        vals = [_fmt(r.params.get(k)) for k in keys]
        body.append([r.trial_id, *vals, f"{r.best_rsum:.1f}" if r.best_rsum > -math.inf else "-", str(r.epochs),
                     r.status])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["", f"[tune] {len(outcome.rows)} trials, best first:",
             "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    if outcome.decision is not None:
        lines.append(f"[tune] champion: {outcome.decision.reason}")
    if outcome.tracking_uri:
        from imram_dist.tracking import ui_command

        lines.append(f"[tune] compare the trials in the MLflow UI: {ui_command(outcome.tracking_uri)}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
