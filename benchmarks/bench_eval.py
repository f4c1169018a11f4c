"""Evaluation throughput and memory of full IMRAM (K=3) at the paper's sizes.

    python benchmarks/bench_eval.py --quick            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_eval.py --images 64        # steadier numbers

What it measures:
1. pairs/s of imram_dist.evaluate.evaluate_split (encode + blocked scoring; metrics excluded)
   with 1 and 2 local worker processes, on a random split of N images (R=36 regions,
   D=2048) x 5N captions (~12 tokens incl. <start>/<end>), d=1024, vocabulary 8,481;
2. the projected wall time of Flickr30K 1K (5M pairs) and COCO 5K (125M pairs) from those
   rates, next to the per-caption loop structured like the authors' code (bench_model.loop_scores),
   timed in the same run on a few pairs of the same split (scoring only: encoding is well under 1%
   of a pair's cost there);
3. peak memory (max RSS) of a 1,000 x 5,000 run, in a fresh process: the whole split is
   built, every image and caption encoded and the full 1,000 x 5,000 float32 matrix
   allocated, for real; only the scoring is cut short to one block (scoring memory does not
   grow with N or M: the model chunks each block to model.score_memory_mb).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# imram_dist before torch: importing it turns on torch's huge pages (see imram_dist/__init__.py)
import imram_dist  # noqa: E402, F401, I001
import torch  # noqa: E402

from imram_dist.config import EvalConfig, ModelConfig  # noqa: E402

PROTOCOL_PAIRS = {"Flickr30K 1K (1,000 x 5,000)": 5_000_000, "COCO 5K (5,000 x 25,000)": 125_000_000,
                  "COCO 1K (5 folds of 1,000 x 5,000)": 25_000_000}


@dataclasses.dataclass
class Split:
    regions: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    caption_to_image: torch.Tensor


def paper_model(seed: int = 0, device: str = "cpu", dtype: str = "fp32", score_mb: int = 0):
    from imram_dist.model import IMRAM

    torch.manual_seed(seed)
    cfg = ModelConfig(image_dim=2048, embed_size=1024, word_dim=300, vocab_size=8481, mode="full", steps=3,
                      lambda_softmax=9.0)
    if score_mb:
        cfg.score_memory_mb = score_mb
    model = IMRAM(cfg).eval()
    return model.to(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])


def random_split(n: int, per: int = 5, R: int = 36, D: int = 2048, V: int = 8481, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    m = n * per
    lengths = torch.randint(10, 15, (m,), generator=g)  # 8-12 words + <start>/<end>: mean ~12 tokens
    tokens = torch.randint(4, V, (m, int(lengths.max())), generator=g)
    tokens[:, 0] = 1
    for j, L in enumerate(lengths.tolist()):
        tokens[j, L - 1] = 2
        tokens[j, L:] = 0
    regions = torch.relu(torch.randn(n, R, D, generator=g))  # features are post-ReLU, non-negative
    return Split(regions, tokens, lengths, torch.arange(m) // per)


def loop_ms_per_pair(model, n_images: int = 8, n_captions: int = 16, rounds: int = 3) -> float:
    """ms/pair of the authors' per-caption loop on encoded images and captions (at most 5 per image)
    of a random split."""
    from bench_model import loop_scores

    split = random_split(n_images)  # 5 captions per image
    device = model.img_enc.fc_local.weight.device
    with torch.no_grad():
        img = model.encode_images(split.regions[:n_images].to(device))
        lengths = split.lengths[:n_captions]
        cap = model.encode_captions(split.tokens[:n_captions, :int(lengths.max())], lengths)
        loop_scores(model, img, cap, lengths)  # warm-up
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            loop_scores(model, img, cap, lengths)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] / (n_images * n_captions) * 1e3


def throughput(model, n: int, workers: int, cfg: EvalConfig) -> dict:
    from imram_dist.evaluate import evaluate_split

    split = random_split(n)
    res = evaluate_split(model, split, "auto", workers, cfg)
    return {"workers": workers, "images": n, "captions": 5 * n, "pairs": res.pairs,
            "seconds": round(res.seconds, 2), "score_seconds": round(res.score_seconds, 2),
            "pairs_per_s": round(res.pairs / res.score_seconds, 1),
            "pairs_per_s_with_startup": round(res.pairs / res.seconds, 1)}


def full_run(model, n: int, cfg: EvalConfig) -> dict:
    """A real, complete n x 5n evaluation (GPU: the whole Flickr30K-sized matrix)."""
    from imram_dist.evaluate import evaluate_split

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    split = random_split(n)
    res = evaluate_split(model, split, "auto", 1, cfg)
    out = {"images": n, "captions": 5 * n, "pairs": res.pairs, "seconds": round(res.seconds, 2),
           "pairs_per_s": round(res.pairs / res.score_seconds, 1), "rsum": round(res.metrics["rsum"], 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def check_devices(n: int = 6) -> dict:
    """The same weights scored on CPU and on the GPU (fp32): largest absolute difference."""
    from imram_dist.evaluate import evaluate_split

    split = random_split(n)
    cfg = EvalConfig(block_images=4, block_captions=16)
    cpu = evaluate_split(paper_model(), split, "auto", 1, cfg, keep_sims=True)
    gpu = evaluate_split(paper_model(device="cuda"), split, "auto", 1, cfg, keep_sims=True)
    return {"pairs": cpu.pairs, "max_abs_diff": float(np.abs(np.asarray(cpu.sims) - np.asarray(gpu.sims)).max()),
            "same_metrics": cpu.metrics == gpu.metrics}


def memory_run(n: int, block_images: int, block_captions: int) -> dict:
    """In this (fresh) process: encode a full n x 5n split, allocate the matrix, score one block."""
    from imram_dist.evaluate import allocate_scores, encode_captions, encode_images, score_matrix

    t0 = time.perf_counter()
    model = paper_model()
    split = random_split(n)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    img = encode_images(model, split.regions, batch=EvalConfig().image_batch)
    caps = encode_captions(model, split.tokens, split.lengths, block=block_captions)
    sims = allocate_scores((n, 5 * n), memmap_mb=1 << 30)
    sims[:] = 0.0  # touch every page: the matrix is really resident
    t1 = time.perf_counter()
    sub_caps = caps[:1]
    out, _ = score_matrix(model, img[:block_images], sub_caps, block_images=block_images,
                          block_captions=block_captions)
    sims[:out.shape[0], :out.shape[1]] = out
    t2 = time.perf_counter()
    return {
        "images": n, "captions": 5 * n, "scored_block": list(out.shape),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_inputs_mb": round(rss_inputs, 1),
        "image_emb_mb": round(img.numel() * 4 / 2**20, 1),
        "caption_emb_mb": round(sum(e.numel() for _, e, _ in caps) * 4 / 2**20, 1),
        "regions_mb": round(split.regions.numel() * 4 / 2**20, 1),
        "matrix_mb": round(sims.nbytes / 2**20, 1),
        "encode_s": round(t1 - t0, 1), "one_block_s": round(t2 - t1, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (16 images x 80 captions)")
    ap.add_argument("--images", type=int, default=48, help="images of the throughput split (x5 captions)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--block-images", type=int, default=0, help="eval.block_images (0: images / max workers)")
    ap.add_argument("--block-captions", type=int, default=0, help="eval.block_captions (0: the config default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1,000 x 5,000 memory run")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model/scoring dtype")
    ap.add_argument("--score-mb", type=int, default=0, help="model.score_memory_mb (0: the config default)")
    ap.add_argument("--full", type=int, default=0, help="also run a complete N x 5N evaluation (e.g. 1000 on a GPU)")
    ap.add_argument("--max-full-s", type=float, default=240, help="skip --full when projected to take longer")
    ap.add_argument("--check", action="store_true", help="compare CPU and GPU scores (needs cuda)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    defaults = EvalConfig()
    if args.memory_child:
        print(json.dumps(memory_run(1000, 2, defaults.block_captions)))
        return
    n = 16 if args.quick else args.images
    workers = [int(w) for w in args.workers.split(",")]
    cfg = EvalConfig(block_images=args.block_images or max(1, n // max(workers)),
                     block_captions=args.block_captions or defaults.block_captions)
    model = paper_model(device=args.device, dtype=args.dtype, score_mb=args.score_mb)
    from bench_model import machine

    out: dict = {"sizes": "full IMRAM K=3, d=1024, R=36, D=2048, word_dim=300, V=8481, ~12-token captions",
                 "machine": machine(), "load_average_start": os.getloadavg()[0],
                 "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                 "dtype": args.dtype, "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                 "blocks": [cfg.block_images, cfg.block_captions], "runs": []}
    print(f"{out['machine']}\nload average at start: {out['load_average_start']:.1f}")
    print(f"{out['sizes']}; {out['device']} {out['dtype']}; torch {out['torch']}; "
          f"{out['threads']} torch threads, {out['cpus']} CPUs; blocks {out['blocks']}")
    for w in workers:
        r = throughput(model, n, w, cfg)
        out["runs"].append(r)
        print(f"workers={w}: {r['pairs']} pairs, encode+score {r['score_seconds']} s -> {r['pairs_per_s']} pairs/s "
              f"({1000 / r['pairs_per_s']:.3f} ms/pair); {r['seconds']} s with worker start-up and metrics")
    out["loop_ms_per_pair"] = loop_ms = round(loop_ms_per_pair(model), 3)
    print(f"per-caption loop (the authors' structure), same model and run: {loop_ms} ms/pair; ours x1 is "
          f"{loop_ms * out['runs'][0]['pairs_per_s'] / 1000:.1f}x that")
    print("\nprojected wall time (hours)")
    head = f"{'protocol':<38}" + "".join(f"{'ours x' + str(r['workers']):>12}" for r in out["runs"])
    print(head + f"{'loop':>12}")
    out["projection_h"] = {}
    for name, pairs in PROTOCOL_PAIRS.items():
        ours = [pairs / r["pairs_per_s"] / 3600 for r in out["runs"]]
        loop = pairs * loop_ms / 1000 / 3600
        out["projection_h"][name] = {"ours": [round(x, 2) for x in ours], "loop": round(loop, 1)}
        print(f"{name:<38}" + "".join(f"{x:>12.2f}" for x in ours) + f"{loop:>12.1f}")
    if args.check:
        out["cpu_vs_gpu"] = check_devices()
        print(f"\nCPU vs GPU fp32 scores: {out['cpu_vs_gpu']}")
    rate = out["runs"][0]["pairs_per_s"]
    if args.full and 5 * args.full ** 2 / rate > args.max_full_s:
        print(f"\nskipping the complete {args.full} x {5 * args.full} run: ~{5 * args.full ** 2 / rate:.0f} s "
              f"projected > --max-full-s {args.max_full_s}")
    elif args.full:
        out["full"] = full_run(model, args.full, cfg)
        print(f"\ncomplete {args.full} x {5 * args.full} evaluation: {out['full']}")
    if not args.no_memory:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child"],
                              capture_output=True, text=True, check=True)
        mem = json.loads(proc.stdout.strip().splitlines()[-1])
        out["memory_1000x5000"] = mem
        print(f"\npeak memory, 1,000 x 5,000 (1 worker; encode + matrix real, scoring cut to one "
              f"{mem['scored_block'][0]} x {mem['scored_block'][1]} block): max RSS {mem['peak_rss_mb']:.0f} MB "
              f"(inputs alone {mem['rss_after_inputs_mb']:.0f} MB; regions {mem['regions_mb']:.0f}, image emb "
              f"{mem['image_emb_mb']:.0f}, caption emb {mem['caption_emb_mb']:.0f}, matrix {mem['matrix_mb']:.0f} MB; "
              f"encode {mem['encode_s']} s)")
    out["load_average_end"] = os.getloadavg()[0]
    print(f"\nload average at end: {out['load_average_end']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
