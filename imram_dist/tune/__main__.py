"""python -m imram_dist.tune [--config PRESET] [--space FILE_OR_NAME] [--trials N] ... [key=value ...]"""

from __future__ import annotations

import sys

from imram_dist.config import ConfigError, parse_cli, preset_path

DESCRIPTION = ("Search IMRAM hyper-parameters with Ray Tune: each trial is a Ray Train + DeepSpeed run, ASHA "
               "stops the laggards, MLflow tracks every trial, and the best model is evaluated on the test "
               "split and registered (the champion alias moves only to a better model). Runs on a local Ray "
               "or the cluster in RAY_ADDRESS / cluster.address.")
SHORTHANDS = {
    "--space": "tune.space",
    "--trials": "tune.trials",
    "--scheduler": "tune.scheduler",
    "--search": "tune.search",
    "--max-concurrent": "tune.max_concurrent",
    "--name": "tune.name",
    "--resume": "tune.resume",
    "--workers-per-trial": "cluster.num_workers",
    "--gpus-per-worker": "cluster.gpus_per_worker",
    "--tracking-uri": "tracking.uri",
    "--experiment": "tracking.experiment",
}


def default_preset() -> str:
    """The search preset (a corpus hard enough to tell configs apart) when it ships, else default."""
    try:
        preset_path("search")
        return "search"
    except ConfigError:
        return "default"


def gpu_flag(argv: list[str]) -> list[str]:
    """--gpus-per-worker N also says whether to train on GPUs: N > 0 adds cluster.use_gpu=true,
    N = 0 means CPU workers (cluster.use_gpu=false)."""
    out: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--gpus-per-worker" and args:
            value = args.pop(0)
        elif arg.startswith("--gpus-per-worker="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
            continue
        try:
            gpus = float(value)
        except ValueError:
            gpus = None  # parse_cli names the key and the bad value
        if gpus == 0:
            out.append("cluster.use_gpu=false")
        else:
            out += [f"cluster.gpus_per_worker={value}"] + (["cluster.use_gpu=true"] if gpus else [])
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_cli(gpu_flag(args), "imram_dist.tune", DESCRIPTION, SHORTHANDS, default_preset())
        from imram_dist.tune.search import search

        outcome = search(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if outcome.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
