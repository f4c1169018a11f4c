"""python -m imram_dist.train [--config FILE|PRESET] [key=value ...]"""

from __future__ import annotations

import sys

from imram_dist.config import ConfigError, parse_cli

DESCRIPTION = ("Train IMRAM with Ray Train + DeepSpeed. Rerunning with the same run.name and "
               "run.storage resumes from the latest checkpoint. Prints per-epoch dev R@K and the path "
               "of the exported inference checkpoint; tracks the run in MLflow (tracking.*) unless "
               "tracking.enabled=false.")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv, "imram_dist.train", DESCRIPTION)
        tracking = None
        if cfg.tracking.enabled:  # fail in seconds, before any worker starts, if the store is down
            from imram_dist.tracking import connect

            tracking = connect(cfg.tracking.uri, cfg.tracking.experiment)
        from imram_dist.train.driver import train

        outcome = train(cfg)
        if tracking is not None:
            from imram_dist.data import read_manifest, resolve_root
            from imram_dist.tracking import ui_command
            from imram_dist.tracking.runs import log_training_run

            manifest = read_manifest(resolve_root(cfg.data))
            run_id = log_training_run(cfg, *tracking, outcome, manifest.regions, manifest.feature_dim)
            print(f"[train] tracked in MLflow run {run_id} ({tracking[0]}); view it with: {ui_command(tracking[0])}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
