"""The default search as a new user runs it, measured: `python -m imram_dist.tune --trials N`
(defaults: the search preset, tune/default.yaml, ASHA, local Ray, sqlite MLflow) in a fresh
folder, then a 3-seed search of the preset's own config for the seed-to-seed spread, both in
this run on this machine. Prints wall time, per-trial start-up overhead, best / median / seed
spread of dev rsum, rsum by K and by margin, and where ASHA stopped trials; writes a PNG.

    python benchmarks/bench_tune.py                # 50 trials (about 30 minutes on 2 cores)
    python benchmarks/bench_tune.py --trials 6     # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from imram_dist.machine import describe_cpu  # noqa: E402 (torch-free)


def run(args: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imram_dist.tune", *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"search failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return wall, proc.stdout


def trials_of(client, search: str) -> list:
    parent = next(r for e in client.search_experiments() for r in client.search_runs(
        [e.experiment_id], filter_string=f"tags.`imram.kind` = 'search' and attributes.run_name = '{search}'"))
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def best_rsum(client, run) -> float:
    return max(m.value for m in client.get_metric_history(run.info.run_id, "rsum"))


def overhead_s(client, run) -> float:
    """Trial wall time (MLflow start to end) minus the time its workers trained and evaluated."""
    busy = sum(m.value for key in ("train_seconds", "eval_seconds")
               for m in client.get_metric_history(run.info.run_id, key))
    return (run.info.end_time - run.info.start_time) / 1000.0 - busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="docs/img/tune_rsum_by_k_margin.png")
    args = p.parse_args()
    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    print(f"CPU: {describe_cpu()}; load average before: "
          f"{os.getloadavg()[0]:.1f}; working folder {work}")
    common = [f"run.storage={work}/runs", f"tracking.uri=sqlite:///{work}/mlflow.db", f"data.cache_dir={work}/cache"]
    wall, out = run(["--trials", str(args.trials), "--name", "bench", *common], work)
    seed_space = work / "seeds.yaml"
    seed_space.write_text("train.seed: {randint: [0, 100000]}\n")
    seed_wall, _ = run(["--trials", str(args.seeds), "--space", str(seed_space), "--scheduler", "fifo",
                        "--name", "bench-seeds", "tracking.registered_model=imram-bench-seeds", *common], work)

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    trials = trials_of(client, "bench")
    rows = [{"steps": int(t.data.params["model.steps"]), "margin": float(t.data.params["model.margin"]),
             "mode": t.data.params["model.mode"], "rsum": best_rsum(client, t), "status": t.data.tags["imram.status"],
             "epochs": len(client.get_metric_history(t.info.run_id, "rsum")), "overhead": overhead_s(client, t)}
            for t in trials]
    seeds = [best_rsum(client, t) for t in trials_of(client, "bench-seeds")]
    rsums = sorted(r["rsum"] for r in rows)
    best, median = rsums[-1], statistics.median(rsums)
    spread = statistics.pstdev(seeds) if len(seeds) > 1 else float("nan")
    print(f"\nsearch of {len(rows)} trials: wall {wall / 60:.1f} min ({wall / len(rows):.1f} s per trial); "
          f"3-seed search {seed_wall / 60:.1f} min")
    print(f"per-trial start-up overhead (wall minus train+eval): median {statistics.median(r['overhead'] for r in rows):.1f} s")
    print(f"dev rsum: best {best:.1f}, median {median:.1f}, worst {rsums[0]:.1f}; "
          f"seed spread of the preset config: {', '.join(f'{s:.1f}' for s in seeds)} (std {spread:.1f}); "
          f"best - median = {best - median:.1f} = {(best - median) / spread:.1f}x the seed std")
    print("\nrsum by K (best dev rsum of each trial):")
    print("| K | trials | mean | max |\n|---|---|---|---|")
    by_k = defaultdict(list)
    for r in rows:
        by_k[r["steps"]].append(r["rsum"])
    for k in sorted(by_k):
        print(f"| {k} | {len(by_k[k])} | {statistics.mean(by_k[k]):.1f} | {max(by_k[k]):.1f} |")
    print("\nrsum by margin:")
    print("| margin | trials | mean | max |\n|---|---|---|---|")
    for lo in (0.05, 0.2, 0.35):
        sel = [r["rsum"] for r in rows if lo <= r["margin"] < lo + 0.15]
        if sel:
            print(f"| {lo:.2f}-{lo + 0.15:.2f} | {len(sel)} | {statistics.mean(sel):.1f} | {max(sel):.1f} |")
    stops = Counter(r["epochs"] for r in rows if r["status"] == "stopped")
    print(f"\nASHA stopped {sum(stops.values())} of {len(rows)} trials: "
          + ", ".join(f"{n} after epoch {e}" for e, n in sorted(stops.items())))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_m) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for k in sorted(by_k):
        ax_k.scatter([k] * len(by_k[k]), by_k[k], alpha=0.6)
    ax_k.set(xlabel="K (model.steps)", ylabel="best dev rsum", title="rsum by K", xticks=sorted(by_k))
    colours = {1: "tab:blue", 2: "tab:orange", 3: "tab:green"}
    for r in rows:
        ax_m.scatter(r["margin"], r["rsum"], color=colours.get(r["steps"], "grey"), alpha=0.6)
    ax_m.set(xlabel="model.margin", ylabel="best dev rsum", title="rsum by margin (colour: K)")
    fig.suptitle(f"{len(rows)} trials, {describe_cpu()}", fontsize=7)
    fig.tight_layout()
    out = repo / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
