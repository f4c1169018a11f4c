"""Recall and speed of eval.precision=bf16 against fp32 on a trained model, in one run.

    python -m imram_dist.train run.storage=/tmp/perf_runs          # the trained default model
    python benchmarks/bench_precision.py --checkpoint /tmp/perf_runs/imram-synth/model_best.pt

The split (default: eval.split of the checkpoint's own config, on its dataset: the built-in
synthetic corpus for the default preset) is evaluated with imram_dist.evaluate.evaluate_split in
fp32 and in bf16 (same encoders, embeddings scored in bf16), in interleaved rounds; prints R@1/5/10
of both directions, rsum, the change bf16 - fp32 in points, how many scores moved and by how much,
and the scoring time of each (median over rounds). The CPU model and its bf16 support are printed
with it, since bf16 speed depends on AMX/AVX512-BF16.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import machine  # noqa: E402

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def main() -> None:
    from imram_dist.config import from_dict, load_config
    from imram_dist.data import resolve_root
    from imram_dist.evaluate import evaluate_split
    from imram_dist.evaluate.cli import checkpoint_vocab, load_split
    from imram_dist.evaluate.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/perf_runs/imram-synth/model_best.pt")
    ap.add_argument("--data", help="dataset root (default: the checkpoint config's data.root / synthetic corpus)")
    ap.add_argument("--split", help="default: the checkpoint config's eval.split")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    model, info = load_model(args.checkpoint)
    cfg = from_dict(info["config"]) if isinstance(info.get("config"), dict) else load_config("default", [])
    root = args.data or str(resolve_root(cfg.data))
    split = args.split or cfg.eval.split
    data, _ = load_split(root, split, checkpoint_vocab(info))
    mc = model.config
    print(f"{machine()}\nload average at start: {os.getloadavg()[0]:.1f}")
    print(f"model {args.checkpoint}: d={mc.embed_size}, image_dim={mc.image_dim}, {mc.mode} K={mc.steps}; "
          f"split {root}:{split}")
    base = dataclasses.replace(cfg.eval, memmap_mb=1 << 20)
    runs: dict[str, list] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for p in runs:
            runs[p].append(evaluate_split(model, data, "auto", 1, dataclasses.replace(base, precision=p),
                                          keep_sims=True))
    res = {p: r[-1] for p, r in runs.items()}
    secs = {p: statistics.median(x.score_seconds for x in r) for p, r in runs.items()}
    for p, r in runs.items():  # every round gave the same numbers (scoring is deterministic)
        assert all(np.array_equal(np.asarray(x.sims), np.asarray(r[0].sims)) for x in r), p
    diff = np.abs(np.asarray(res["bf16"].sims) - np.asarray(res["fp32"].sims))
    a = res["fp32"]
    print(f"\n{a.n_images} images x {a.n_captions} captions ({a.protocol}), {a.pairs:,} pairs; medians of "
          f"{args.rounds} interleaved rounds; load average at end {os.getloadavg()[0]:.1f}\n")
    print("| precision | " + " | ".join(KEYS) + " | scoring s (encode + score) |")
    print("|---" * (len(KEYS) + 2) + "|")
    for p in runs:
        m = res[p].metrics
        print(f"| {p} | " + " | ".join(f"{m[k]:.2f}" for k in KEYS) + f" | {secs[p]:.2f} |")
    d = {k: res["bf16"].metrics[k] - a.metrics[k] for k in KEYS}
    print("| bf16 - fp32 (points) | " + " | ".join(f"{d[k]:+.2f}" for k in KEYS)
          + f" | {secs['fp32'] / secs['bf16']:.2f}x faster |")
    print(f"\nscores: max |bf16 - fp32| {diff.max():.2e}, mean {diff.mean():.2e} "
          f"(score range {np.asarray(a.sims).min():.2f} .. {np.asarray(a.sims).max():.2f})")


if __name__ == "__main__":
    main()
