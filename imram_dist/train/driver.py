"""The driver side of a training run: fail-fast checks, data preparation, Ray Train
TorchTrainer with DeepSpeed workers, and the final consolidated inference checkpoint."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imram_dist import HUGE_PAGES_ENV, KEEP_FREED_MEMORY_ENV
from imram_dist.config import Config, ConfigError, to_dict
from imram_dist.train.checkpoints import WEIGHTS_FILE, prune_checkpoints, scan_checkpoints
from imram_dist.train.plan import (
    check_data,
    check_resources,
    check_static,
    forwarded_env,
    resolve_storage,
)
from imram_dist.train.recipe import WorkerArgs, train_loop


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    export_path: str
    """The consolidated fp32 inference checkpoint (local path, or s3:// URI when uploaded)."""
    best_metrics: dict[str, Any]
    """Dev metrics of the exported (best-rsum) epoch."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Per-epoch metrics (loss, lr, pairs/s, dev R@K) of the whole run, resumes included."""
    checkpoint_path: str = ""
    """The Ray checkpoint the export came from."""
    storage_path: str = ""
    """The run's folder in storage."""
    result: Any = None
    """The ray.train.Result."""
    local_export_path: str = ""
    resumed_at: list[int] = field(default_factory=list)
    """Epochs already done each time the workers (re)started from a checkpoint (restarts after
    a failure and reruns of the same run), up to the latest checkpoint."""


def prepare_data(cfg: Config) -> tuple[str, Any, Any]:
    """Resolve data.root (generating the synthetic corpus once, here on the driver), check the
    model against the manifest, and fill model.vocab_size. Returns (root, manifest, vocab)."""
    from imram_dist.data import ensure_synthetic, read_manifest

    root = cfg.data.root
    if not root:
        root = str(ensure_synthetic(os.path.expanduser(cfg.data.cache_dir), cfg.data.synth))
    manifest = read_manifest(root)
    for key, split in (("data.train_split", cfg.data.train_split), ("data.dev_split", cfg.data.dev_split)):
        if split not in manifest.splits:
            raise ConfigError(f"{key}={split!r}: the dataset at {root} has splits {sorted(manifest.splits)}")
    check_data(cfg, manifest.feature_dim, root)
    vocab = manifest.load_vocab()
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = len(vocab)
    elif cfg.model.vocab_size < len(vocab):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset vocabulary "
                          f"({len(vocab)} words in {manifest.vocab_url}); use 0 to take it from the data")
    return root, manifest, vocab


def job_env(cfg: Config) -> dict[str, str]:
    """Environment variables every Ray worker of the job gets (its runtime_env): workers on other
    nodes do not inherit this process's environment. DeepSpeed's CPU accelerator without GPUs, and
    the memory settings as this process has them (see imram_dist/__init__.py)."""
    env = {"DS_ACCELERATOR": "cpu"} if not cfg.cluster.use_gpu else {}
    for name in (HUGE_PAGES_ENV, KEEP_FREED_MEMORY_ENV):
        env[name] = os.environ.get(name, "1")
    return env


def ensure_ray(cfg: Config, local_resources: dict[str, float] | None = None, dashboard: bool = False,
               log_to_driver: bool = True) -> None:
    """Join cluster.address (or RAY_ADDRESS; "auto" joins a `ray start` cluster on this machine),
    or start a new local Ray (see start_local_ray)."""
    import ray

    if ray.is_initialized():
        return
    env = job_env(cfg)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=log_to_driver)
    else:
        start_local_ray(resources=local_resources, dashboard=dashboard, env=env, log_to_driver=log_to_driver)


def start_local_ray(num_cpus: int | None = None, resources: dict[str, float] | None = None,
                    dashboard: bool = False, env: dict[str, str] | None = None, log_to_driver: bool = True) -> str:
    """A new single-node Ray on 127.0.0.1 (never an unrelated cluster already running here), offering
    ``resources`` (custom resources, e.g. the search's trial-driver slots). Returns its address.

    Its GCS port is chosen first and exported as RAY_ADDRESS before the start, so that every Ray
    process of this cluster inherits it: Ray's state API (used by Train's placement-group cleaner
    when Tune stops a trial) otherwise guesses among all clusters on the machine and fails when
    there are several. dashboard=True starts the dashboard (on 127.0.0.1) that serves that API."""
    import ray
    from torch.distributed.elastic.utils.distributed import get_free_port

    port = get_free_port()
    address = f"127.0.0.1:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = address
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, resources=resources or None,
                 include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                 runtime_env={"env_vars": env} if env else None)
    except Exception:
        os.environ.pop("RAY_ADDRESS", None)
        raise
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    return address


def build_trainer(cfg: Config, root: str, callbacks: list[Any] | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = resolve_storage(cfg.run.storage)
    env = forwarded_env()
    if not cfg.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    args = WorkerArgs(config=to_dict(cfg), root=root, storage=storage.uri, use_gpu=cfg.cluster.use_gpu,
                      threads=cfg.cluster.torch_threads or cfg.cluster.cpus_per_worker, env=env)
    resources: dict[str, float] = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                      resources_per_worker=resources)
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage.path,
        storage_filesystem=storage.filesystem() if storage.is_s3 else None,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute="rsum",
            checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        callbacks=callbacks,
        # worker-group start-up, process groups, "Reporting training result" dicts per rank: to the
        # session's log files, not the console, which shows our progress lines and real warnings
        logging_config=ray.train.LoggingConfig(log_level=cfg.run.ray_log_level),
    )
    return TorchTrainer(train_loop, train_loop_config={"args": args}, scaling_config=scaling,
                        run_config=run_config)


def export_inference(cfg: Config, checkpoint, vocab, log: Callable[[str], None] = print) -> tuple[str, str]:
    """best checkpoint -> one fp32 file (weights, resolved config, vocabulary), written to a
    temporary name then renamed. Returns (path or s3 URI, local path)."""
    import torch

    from imram_dist.model import IMRAM, save_inference_checkpoint

    storage = resolve_storage(cfg.run.storage)
    if cfg.run.export_path:
        local = os.path.abspath(os.path.expanduser(cfg.run.export_path))
    elif storage.is_s3:
        local = os.path.abspath(os.path.join("exports", cfg.run.name, "model_best.pt"))
    else:
        local = os.path.join(storage.run_path(cfg.run.name), "model_best.pt")
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    with checkpoint.as_directory() as d:
        weights = torch.load(os.path.join(d, WEIGHTS_FILE), map_location="cpu", weights_only=True)
    model = IMRAM(cfg.model)
    model.load_state_dict(weights)
    model.eval()
    # save_inference_checkpoint writes a temporary file and renames it (atomic).
    save_inference_checkpoint(local, model, to_dict(cfg), vocab.to_json())
    where = local
    if storage.is_s3 and not cfg.run.export_path:
        import pyarrow.fs as pafs

        dest = f"{storage.run_path(cfg.run.name)}/model_best.pt"
        pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=storage.filesystem())
        where = f"s3://{dest}"
    return where, local


def train(cfg: Config, log: Callable[[str], None] = print) -> TrainOutcome:
    """Run (or resume) a whole training run and export the best epoch. ConfigError, raised
    before any worker starts, for a config this data/cluster cannot run."""
    check_static(cfg)
    root, manifest, vocab = prepare_data(cfg)
    # the dashboard serves the state API that Train's placement-group cleaner polls: without it
    # the console gets "Failed to query Ray Train Controller actor state" twice a second
    ensure_ray(cfg, dashboard=True)
    import ray

    check_resources(cfg, ray.cluster_resources())
    storage = resolve_storage(cfg.run.storage)
    log(f"[train] run {cfg.run.name!r} in {storage.uri}; data {root} ({manifest.split(cfg.data.train_split).captions} "
        f"train pairs, vocab {len(vocab)}); {cfg.cluster.num_workers} worker(s), "
        f"{'GPU/nccl' if cfg.cluster.use_gpu else 'CPU/gloo'}")
    t0 = time.perf_counter()
    found = scan_checkpoints(storage, cfg.run.name)
    if found:  # the workers pick it up (newest complete checkpoint in storage)
        last = found[-1]
        log(f"[train] resuming run {cfg.run.name!r}: latest checkpoint {last['name']} "
            f"({last['epochs_done']}/{cfg.train.epochs} epochs done)")
    result = build_trainer(cfg, root).fit()
    if result.error is not None:  # pragma: no cover - fit() raises in 2.60; kept for safety
        raise result.error
    found = scan_checkpoints(storage, cfg.run.name)
    if not found:
        raise RuntimeError(f"run {cfg.run.name!r} finished without a complete checkpoint in {storage.uri}")
    best_c = max(found, key=lambda c: (c["rsum"], -c["epochs_done"]))
    state = found[-1]["state"]
    history = state.get("history", [])
    best_metrics = dict(best_c["metrics"])
    from ray.train import Checkpoint

    ckpt = Checkpoint(best_c["path"], filesystem=storage.filesystem())
    where, local = export_inference(cfg, ckpt, vocab, log)
    prune_checkpoints(storage, cfg.run.name, cfg.run.keep_checkpoints, found)
    m = best_metrics
    log(f"[train] finished in {time.perf_counter() - t0:.1f}s; best dev epoch {m.get('epoch')}: "
        f"i2t R@1/5/10 {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} "
        f"t2i R@1/5/10 {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} rsum {m['rsum']:.1f}")
    log(f"[train] exported inference checkpoint: {where}")
    return TrainOutcome(export_path=where, best_metrics=dict(best_metrics), history=history,
                        resumed_at=list(state.get("resumed_at", [])),
                        checkpoint_path=best_c["path"], storage_path=f"{storage.run_path(cfg.run.name)}",
                        result=result, local_export_path=local)
