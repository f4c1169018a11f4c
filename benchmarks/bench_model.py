"""IMRAM scoring benchmark at paper sizes (d=1024, R=36, D=2048, ~12-token captions, K=3).

Prints a table: per mode (text / image / full), pairs/s of the fast all-pairs scoring vs a
per-caption loop written like the authors' code (loop over captions, expand the caption against all
images, MDU after every step including the last), measured in the same run; achieved GFLOP/s of the
fast path (FLOPs counted analytically) as a fraction of dense matmul GFLOP/s measured in the same
run; and the peak RSS of one training step (forward + hinge loss + backward) at batch 32 and 128,
each in a fresh subprocess.

    python benchmarks/bench_model.py            # a few minutes
    python benchmarks/bench_model.py --quick    # about a minute
    python benchmarks/bench_model.py --compile  # also time the torch.compile'd scoring core

Not a test: it asserts only that the loop and the fast path agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from imram_dist.config import ModelConfig  # noqa: E402
from imram_dist.model import IMRAM, hinge_loss  # noqa: E402

R, D_IMG, D, K, VOCAB = 36, 2048, 1024, 3, 10000


def paper_config(mode: str, **kw) -> ModelConfig:
    return ModelConfig(image_dim=D_IMG, embed_size=D, word_dim=300, vocab_size=VOCAB, mode=mode, steps=K,
                       lambda_softmax=9.0, **kw)


def embeddings(n_img: int, n_cap: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, R, D, generator=g), dim=-1)
    lengths = torch.randint(8, 17, (n_cap,), generator=g)  # mean 12 tokens
    cap = F.normalize(torch.randn(n_cap, int(lengths.max()), D, generator=g), dim=-1)
    return img, cap, lengths


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------ the authors' structure

def _l2norm(x, dim, eps=1e-8):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _func_attention(query, context, smooth):
    attn = torch.bmm(context, query.transpose(1, 2))  # (B, sourceL, queryL)
    attn = _l2norm(F.leaky_relu(attn, 0.1), 2)
    b, s, q = attn.shape
    attn = F.softmax(attn.transpose(1, 2).contiguous().view(b * q, s) * smooth, dim=1).view(b, q, s)
    return torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous()).transpose(1, 2)


def _cos(x1, x2, dim=2, eps=1e-8):
    return (x1 * x2).sum(dim) / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=eps)


def _gated(model, query, attended, direction):
    cat = torch.cat([query, attended], 2)
    lin, gate = getattr(model, f"linear_{direction}"), getattr(model, f"gate_{direction}")
    g = torch.sigmoid(gate(cat))
    return query * g + torch.tanh(lin(cat)) * (1 - g)


def loop_scores(model: IMRAM, images: torch.Tensor, captions: torch.Tensor, lengths) -> torch.Tensor:
    """Per-caption loop mirroring the authors' xattn_score_{Text,Image}_IMRAM."""
    cfg = model.config
    n_image = images.shape[0]
    cols = []
    for i in range(captions.shape[0]):
        n_word = int(lengths[i])
        cap_i_expand = captions[i, :n_word].unsqueeze(0).repeat(n_image, 1, 1)
        total = images.new_zeros(n_image)
        for direction, query0, context in (("t2i", cap_i_expand, images), ("i2t", images, cap_i_expand)):
            if (direction == "t2i" and cfg.mode == "image") or (direction == "i2t" and cfg.mode == "text"):
                continue
            query = query0
            for _ in range(cfg.steps):
                attn_feat = _func_attention(query, context, cfg.lambda_softmax)
                total = total + _cos(query0, attn_feat).mean(1)
                query = _gated(model, query, attn_feat, direction)  # also after the last step
                if cfg.renorm_query:
                    query = _l2norm(query, -1)
        cols.append(total)
    return torch.stack(cols, 1)


# ------------------------------------------------------------------ FLOP count of the fast path

def fast_flops(mode: str, n_img: int, lengths: torch.Tensor, L_pad: int) -> float:
    """Multiply-adds x 2 of every matmul the fast path runs (elementwise work not counted)."""
    M = len(lengths)
    T = int(lengths.sum())  # real words over all captions
    pairs_words = n_img * T  # sum over pairs of caption length
    total = 0.0
    if mode in ("full", "text"):  # query = words (packed, no padding), context = regions
        total += 2 * n_img * R * T * D  # first-step raw attention (one matmul)
        total += (K - 1) * 2 * pairs_words * R * D  # later-step attention X C^T
        total += K * 2 * pairs_words * R * R  # |c|^2 through the region Gram
        total += (K - 1) * 2 * pairs_words * R * 2 * D  # weights @ (C W_c^T)
        total += max(K - 2, 0) * 2 * pairs_words * D * 2 * D  # per-pair W_x x_k
        total += 2 * n_img * R * D * 2 * D + 2 * T * D * 2 * D + 2 * n_img * R * R * D  # per image/caption
    if mode in ("full", "image"):  # query = regions, context = words (padded to L_pad)
        pairs_rows = n_img * M * R
        total += 2 * pairs_rows * L_pad * D  # first-step raw attention
        total += (K - 1) * 2 * pairs_rows * L_pad * D
        total += K * 2 * pairs_rows * L_pad * L_pad
        total += (K - 1) * 2 * pairs_rows * L_pad * 2 * D
        total += max(K - 2, 0) * 2 * pairs_rows * D * 2 * D
        total += 2 * n_img * R * D * 2 * D + 2 * M * L_pad * D * 2 * D + 2 * M * L_pad * L_pad * D
    return total


def matmul_gflops(reps: int) -> float:
    a, b = torch.randn(4608, D), torch.randn(D, 2 * D)
    return 2 * 4608 * D * 2 * D / best_time(lambda: a @ b, reps) / 1e9


# ------------------------------------------------------------------ training-step memory

def train_step_child(batch: int, mode: str, budget: float) -> None:
    torch.manual_seed(0)
    model = IMRAM(paper_config(mode, score_memory_mb=budget))
    regions = torch.randn(batch, R, D_IMG)
    lengths = torch.randint(8, 17, (batch,))
    tokens = torch.randint(4, VOCAB, (batch, int(lengths.max())))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    loss = hinge_loss(model(regions, tokens, lengths), 0.2, True)
    loss.backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_gib": peak / 2**20, "before_gib": rss0 / 2**20, "step_s": dt}))


def train_step(batch: int, mode: str, budget: float) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_train-step", str(batch), mode,
                          str(budget)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller blocks, fewer repetitions")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd scoring core")
    ap.add_argument("--modes", default="text,image,full")
    ap.add_argument("--_train-step", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._train_step:
        b, mode, budget = args._train_step
        train_step_child(int(b), mode, float(budget))
        return
    torch.set_grad_enabled(False)
    n_img, n_cap, n_loop_cap, reps = (16, 32, 8, 3) if args.quick else (32, 64, 16, 5)
    img, cap, lengths = embeddings(n_img, n_cap)
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={D} R={R} K={K}, "
          f"{n_img} images x {n_cap} captions (mean length {lengths.float().mean():.1f}); "
          f"loop baseline on {n_img} x {n_loop_cap}; load average at start {load0[0]:.1f}")
    a_mm, b_mm = torch.randn(4608, D), torch.randn(D, 2 * D)
    mm_flops = 2 * 4608 * D * 2 * D
    rows = []
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        model = IMRAM(paper_config(mode)).eval()
        fns = {"fast": lambda: model.similarity(img, cap, lengths),
               "loop": lambda: loop_scores(model, img, cap[:n_loop_cap], lengths[:n_loop_cap]),
               "mm": lambda: a_mm @ b_mm}
        row = dict(mode=mode)
        if args.compile:
            cmodel = IMRAM(replace(paper_config(mode), compile_scoring=True)).eval()
            cmodel.load_state_dict(model.state_dict())
            t0 = time.perf_counter()
            cmodel.similarity(img, cap, lengths)
            row["compile_s"] = time.perf_counter() - t0
            fns["compiled"] = lambda: cmodel.similarity(img, cap, lengths)
        for f in fns.values():  # warm-up
            f()
        # interleaved rounds (fast, loop, matmul[, compiled] each round), medians: the machine is shared
        ts = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in ts.items()}
        err = (loop_scores(model, img, cap[:n_loop_cap], lengths[:n_loop_cap])
               - model.similarity(img, cap[:n_loop_cap], lengths[:n_loop_cap])).abs().max().item()
        assert err < 1e-3, f"{mode}: loop and fast path disagree by {err}"
        fl = fast_flops(mode, n_img, lengths, cap.shape[1])
        row.update(fast_ms_pair=med["fast"] / (n_img * n_cap) * 1e3,
                   loop_ms_pair=med["loop"] / (n_img * n_loop_cap) * 1e3,
                   gflops=fl / med["fast"] / 1e9, mm_gflops=mm_flops / med["mm"] / 1e9, max_err=err)
        if args.compile:
            row["compiled_ms_pair"] = med["compiled"] / (n_img * n_cap) * 1e3
            row["compiled_gflops"] = fl / med["compiled"] / 1e9
        rows.append(row)
    load1 = os.getloadavg()
    print(f"\nmedians of {reps} interleaved rounds; dense fp32 matmul [4608 x {D}] @ [{D} x {2 * D}] timed in "
          f"the same rounds; load average at end {load1[0]:.1f} (1 min), {load1[1]:.1f} (5 min)\n")
    head = ("| mode | fast ms/pair | loop ms/pair | speed-up vs loop | fast GFLOP/s | matmul GFLOP/s | "
            "% of matmul |")
    if args.compile:
        head += " compiled ms/pair | compiled % of matmul | compile s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['mode']} | {r['fast_ms_pair']:.3f} | {r['loop_ms_pair']:.3f} | "
                f"{r['loop_ms_pair'] / r['fast_ms_pair']:.1f}x | {r['gflops']:.1f} | {r['mm_gflops']:.1f} | "
                f"{100 * r['gflops'] / r['mm_gflops']:.0f}% |")
        if args.compile:
            line += (f" {r['compiled_ms_pair']:.3f} | {100 * r['compiled_gflops'] / r['mm_gflops']:.0f}% | "
                     f"{r['compile_s']:.0f} |")
        print(line)
    diffs = ", ".join(f"{r['mode']} {r['max_err']:.1e}" for r in rows)
    print(f"\n(loop vs fast max |diff| per mode: {diffs})")
    print("\nOne training step (forward + hinge loss + backward), full IMRAM, fresh process each, "
          "score_memory_mb=1024:")
    print("| batch | peak RSS GiB | step s | load average |")
    print("|---|---|---|---|")
    for b in ((32,) if args.quick else (32, 128)):
        r = train_step(b, "full", 1024.0)
        print(f"| {b} | {r['peak_gib']:.2f} | {r['step_s']:.1f} | {os.getloadavg()[0]:.1f} |")
    if args.quick:
        print("(batch 128 skipped with --quick)")


if __name__ == "__main__":
    main()
