"""Pure planning helpers for a training run: the DeepSpeed config generated from our typed
config, the learning-rate schedule, batch arithmetic, fail-fast checks against the cluster,
and storage (local path or s3://) resolution. No Ray worker or DeepSpeed engine needed here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imram_dist.config import Config, ConfigError, TrainConfig

if TYPE_CHECKING:
    import torch


def lr_at_epoch(train: TrainConfig, epoch: int) -> float:
    """Step decay of the authors' recipe: lr0 * 0.1 ** (epoch // lr_update) (epoch is 0-based)."""
    return train.lr * (0.1 ** (epoch // train.lr_update))


def micro_batch(cfg: Config, world_size: int) -> int:
    """Pairs per worker per micro step: global batch / (world * grad_accum); must divide exactly."""
    denom = world_size * cfg.train.grad_accum
    if cfg.data.batch_size % denom:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by cluster.num_workers x "
            f"train.grad_accum = {world_size} x {cfg.train.grad_accum} = {denom}")
    mb = cfg.data.batch_size // denom
    if mb < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} leaves no pairs per worker")
    return mb


def deepspeed_config(cfg: Config, world_size: int, use_gpu: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (client optimizer: torch.optim.Adam, so no
    "optimizer"/"scheduler" sections; the LR is set per epoch by the training loop)."""
    use_gpu = cfg.cluster.use_gpu if use_gpu is None else use_gpu
    t = cfg.train
    check_precision(t.precision, use_gpu)
    mb = micro_batch(cfg, world_size)
    ds: dict[str, Any] = {
        "train_batch_size": mb * world_size * t.grad_accum,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # torch.optim.Adam is a client optimizer DeepSpeed has not "tested" with ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


def check_precision(precision: str, use_gpu: bool) -> None:
    if precision == "fp16" and not use_gpu:
        raise ConfigError("train.precision=fp16 needs GPUs (cluster.use_gpu=true): DeepSpeed's CPU "
                          "accelerator has no fp16 training; use fp32 or bf16 on CPU")


def precision_warnings(cfg: Config, device: torch.device) -> list[str]:
    """What a worker on ``device`` says before training when the run's bf16 would be emulated there."""
    from imram_dist.model.kernels import slow_bf16_note

    return [f"{key}=bf16: {note}" for key, precision in (("train.precision", cfg.train.precision),
                                                        ("eval.precision", cfg.eval.precision))
            if precision == "bf16" and (note := slow_bf16_note(device))]


def check_static(cfg: Config) -> None:
    """Checks across keys that need neither data nor a cluster (the single-key value checks are
    config.validate's, run whenever a config is built); raise ConfigError naming the keys."""
    check_precision(cfg.train.precision, cfg.cluster.use_gpu)
    micro_batch(cfg, cfg.cluster.num_workers)


def check_resources(cfg: Config, resources: dict[str, float]) -> None:
    """More workers than the cluster can ever place -> ConfigError (before any worker starts)."""
    c = cfg.cluster
    cpus = float(resources.get("CPU", 0))
    need_cpu = c.num_workers * c.cpus_per_worker
    if need_cpu > cpus:
        raise ConfigError(
            f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker} needs "
            f"{need_cpu} CPUs but the Ray cluster has {cpus:g}")
    if c.use_gpu:
        gpus = float(resources.get("GPU", 0))
        if c.num_workers > gpus:
            raise ConfigError(f"cluster.num_workers={c.num_workers} with cluster.use_gpu=true needs "
                              f"{c.num_workers} GPUs but the Ray cluster has {gpus:g}")


def check_data(cfg: Config, feature_dim: int, root: str) -> None:
    if cfg.model.image_dim != feature_dim:
        raise ConfigError(
            f"model.image_dim={cfg.model.image_dim} does not match the dataset's feature width "
            f"{feature_dim} (manifest of {root}); set model.image_dim={feature_dim}")


# ---------------------------------------------------------------------------------------
# Storage


@dataclass
class Storage:
    """Where a run lives: ``uri`` as given, ``path`` for pyarrow (no scheme for s3), ``fs``."""

    uri: str
    path: str
    is_s3: bool

    def filesystem(self):
        return storage_filesystem(self.uri)

    def run_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"


def resolve_storage(uri: str) -> Storage:
    if uri.startswith("s3://"):
        return Storage(uri=uri, path=uri[len("s3://"):].rstrip("/"), is_s3=True)
    path = os.path.abspath(os.path.expanduser(uri))
    return Storage(uri=path, path=path, is_s3=False)


def storage_filesystem(uri: str):
    """pyarrow filesystem for the storage. S3 honours the endpoint rule of the data layer
    (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL: non-AWS S3 such as moto) and takes NO credentials:
    this object is pickled into Ray Train's run state and shipped to every worker, so each process
    resolves credentials itself, from its own environment or the instance profile / service account
    (AWS's default chain), and no secret ever travels inside a Ray object."""
    import pyarrow.fs as pafs

    from imram_dist.data.io import s3_endpoint_url

    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem()
    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint_url()
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    kwargs["region"] = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


# Not secrets: where S3 is and the extension cache. Credentials never travel with a run (see
# storage_filesystem): workers take them from their own environment or their instance's role.
ENV_FORWARD = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "TORCH_EXTENSIONS_DIR")


def forwarded_env() -> dict[str, str]:
    """Driver environment the workers need that they may lack (S3 endpoint and region, extension cache)."""
    return {k: os.environ[k] for k in ENV_FORWARD if k in os.environ}
