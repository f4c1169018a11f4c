"""One MLflow run for one `python -m imram_dist.train` run, laid out like a search's trial runs:
the resolved config as dotted params, per-epoch metrics at step=epoch, config.yaml, curves.png
and the pyfunc model. Rerunning (resuming) the same run name and storage attaches to the same
MLflow run and adds only the epochs it does not have yet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from imram_dist.config import Config, flat_keys, to_dict

EPOCH_METRICS = ("loss", "lr", "pairs_per_s", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                 "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "rsum", "train_seconds", "eval_seconds")
FLUSH_WAIT_S = 300.0


def flat_config(cfg: Config) -> dict[str, Any]:
    """Every leaf of the config under its dotted key (the MLflow params of a run)."""
    return {key: value for key, (value, _, _) in flat_keys(cfg).items()}


def log_training_run(cfg: Config, uri: str, experiment_id: str, outcome: Any, regions: int, feature_dim: int,
                     log: Callable[[str], None] = print) -> str:
    """Track a finished (or resumed) training run; returns the MLflow run id."""
    from imram_dist.tracking.plots import curves_png
    from imram_dist.tracking.pyfunc import log_model
    from imram_dist.tracking.writer import RunWriter

    writer = RunWriter(uri, log)
    ref = writer.run(experiment_id, cfg.run.name, {"imram.train_run": outcome.storage_path},
                     tags={"imram.kind": "train", "imram.status": "finished"})
    writer.params(ref, flat_config(cfg))
    for epoch in outcome.history:
        writer.metrics(ref, {k: epoch[k] for k in EPOCH_METRICS if k in epoch}, step=int(epoch["epoch"]))
    best = outcome.best_metrics
    writer.metrics(ref, {f"best_{k}": best[k] for k in EPOCH_METRICS if k in best}, step=int(best.get("epoch", 0)))
    writer.text(ref, yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    if outcome.history:
        writer.image(ref, curves_png(outcome.history, f"run {cfg.run.name}"), "curves.png")
    if cfg.tracking.log_model:
        def send(r: Any) -> None:
            uri_ = log_model(r.run_id, outcome.local_export_path, regions, feature_dim)
            writer.client.set_tag(r.run_id, "imram.model_uri", uri_)

        writer.call(ref, "log model", send)
    writer.tags(ref, {"imram.export_path": outcome.export_path, "imram.best_epoch": best.get("epoch", "")})
    writer.end(ref, "FINISHED")
    if not writer.flush(wait_s=FLUSH_WAIT_S):
        log(f"[tracking] {uri} did not answer for {FLUSH_WAIT_S:.0f}s: {writer.pending} write(s) not sent")
    return str(ref.run_id)
