"""Distributed IMRAM training: Ray Train (TorchTrainer, Train V2) launches DeepSpeed workers.

``train(cfg)`` runs (or resumes) a run and exports the best epoch; ``python -m
imram_dist.train`` is the CLI. See docs/training.md."""

from __future__ import annotations

from imram_dist.train.plan import (
    check_resources,
    check_static,
    deepspeed_config,
    lr_at_epoch,
    micro_batch,
    resolve_storage,
)

__all__ = ["train", "TrainOutcome", "check_resources", "check_static", "deepspeed_config",
           "lr_at_epoch", "micro_batch", "resolve_storage"]


def __getattr__(name: str):
    if name in ("train", "TrainOutcome"):
        from imram_dist.train import driver

        return getattr(driver, name)
    raise AttributeError(name)
