"""python -m imram_dist.train [--config FILE|PRESET] [key=value ...]"""

from __future__ import annotations

import sys

from imram_dist.config import ConfigError, parse_cli

DESCRIPTION = ("Train IMRAM with Ray Train + DeepSpeed. Rerunning with the same run.name and "
               "run.storage resumes from the latest checkpoint. Prints per-epoch dev R@K and the path "
               "of the exported inference checkpoint.")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv, "imram_dist.train", DESCRIPTION)
        from imram_dist.train.driver import train

        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
