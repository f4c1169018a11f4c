"""IMRAM scoring and training step on one CUDA GPU at paper sizes (d=1024, R=36, D=2048, ~12-token
captions, full IMRAM K=3): fp32 (TF32 off), bf16 and fp16, eager and fused (inductor's Triton
kernels), against the per-caption loop written like the authors' code, on the same GPU, in the same
run. The GPU counterpart of bench_model.py, whose loop, FLOP count and timing it imports.

    python benchmarks/bench_model_gpu.py                        # on a GPU machine, ~3-4 min
    python benchmarks/bench_model_gpu.py --device cpu --quick   # the same code on tiny blocks (a dry run)

Prints the GPU (name, memory, compute capability), torch and Triton versions, and tables:
- scoring: ms/pair and pairs/s per path, speed-up against the fp32 per-caption loop, achieved
  GFLOP/s (the path's matmul FLOPs, counted analytically) as a share of the same dtype's dense
  matmul rate measured in the same interleaved rounds, and the ceiling of the algebra;
- one training step (encoders, all B x B pairs, hinge loss, backward, clip 2.0, Adam; fp16 with a
  gradient scaler) per path against the same step through the per-caption loop, with each path's
  peak GPU memory during a step.
Every call is followed by a device synchronize, so a time is the GPU's work, not the launch.

Not a test: it only asserts that the paths agree with the loop (fp32 within 1e-3, half within 0.1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402  (imports imram_dist before torch, as bench_model.py needs)
import torch  # noqa: E402

from imram_dist.model import IMRAM, hinge_loss  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16"}


def dtypes(device: torch.device) -> list[torch.dtype]:
    # fp16 is a GPU dtype here: CPU fp16 matmuls have no fast kernels, and the model is not
    # benchmarked (or tuned) for them
    return [F32, BF16, F16] if device.type == "cuda" else [F32, BF16]


def synced(fn, device: torch.device):
    """fn followed by a synchronize, so that timing it times the GPU's work."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def machine(device: torch.device) -> str:
    tf32 = (f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cuDNN {torch.backends.cudnn.allow_tf32}")
    if device.type != "cuda":
        return f"{bm.machine()}; dry run on CPU ({tf32})"
    p = torch.cuda.get_device_properties(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (fused = eager)"
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
            f"{p.multi_processor_count} SMs; torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"Triton {triton_version}; {tf32}")


# The dense matmul whose rate each path is compared with: the per-pair projection's shape,
# [rows x d] @ [d x 2d], repeated so that one timed call is long next to a launch.
def dense_matmuls(device: torch.device, rows: int, repeat: int) -> tuple[dict, float]:
    fns = {}
    for dt in dtypes(device):
        a = torch.randn(rows, bm.D, device=device).to(dt)
        w = torch.randn(2 * bm.D, bm.D, device=device).to(dt)
        fns[f"mm {NAMES[dt]}"] = (lambda a=a, w=w: [a @ w.t() for _ in range(repeat)][-1])
    return fns, 2.0 * rows * bm.D * 2 * bm.D * repeat


def rates(med: dict, flops: float, device: torch.device) -> dict:
    return {dt: flops / med[f"mm {NAMES[dt]}"] / 1e9 for dt in dtypes(device)}


def describe(rate: dict) -> str:
    return ", ".join(f"{NAMES[dt]} {r:,.0f}" for dt, r in rate.items()) + " GFLOP/s"


def scoring(args, device: torch.device) -> None:
    torch.set_grad_enabled(False)
    n_img, n_cap, n_loop_cap = args.images, args.captions, args.loop_captions
    img, cap, lengths = bm.embeddings(n_img, n_cap)
    img, cap = img.to(device), cap.to(device)
    torch.manual_seed(0)
    model = IMRAM(bm.paper_config(args.mode, score_memory_mb=args.score_memory_mb)).to(device).eval()
    paths = {f"{NAMES[dt]} {kern}": (dt, kern) for dt in dtypes(device) for kern in ("eager", "fused")}
    models = {k: bm.with_kernels(model, kern, "torch").to(device).eval() for k, (_, kern) in paths.items()}
    inputs = {dt: (img.to(dt), cap.to(dt)) for dt in dtypes(device)}
    t0 = time.perf_counter()
    for k, (dt, _) in paths.items():  # compile the fused kernels outside the timed rounds
        synced(lambda k=k, dt=dt: models[k].similarity(*inputs[dt], lengths), device)()
    compile_s = time.perf_counter() - t0
    mm, mm_fl = dense_matmuls(device, args.mm_rows, args.mm_repeat)
    fns = {"loop": lambda: bm.loop_scores(model, img, cap[:n_loop_cap], lengths[:n_loop_cap]), **mm}
    for k, (dt, _) in paths.items():
        fns[k] = (lambda m=models[k], i=inputs[dt]: m.similarity(*i, lengths))
    med = bm.interleaved({k: synced(f, device) for k, f in fns.items()}, args.rounds)
    ref = bm.loop_scores(model, img, cap[:n_loop_cap], lengths[:n_loop_cap])
    errs = {}
    for k, (dt, _) in paths.items():
        i, c = inputs[dt]
        s = models[k].similarity(i, c[:n_loop_cap], lengths[:n_loop_cap])
        errs[k] = float((s.float() - ref).abs().max())
        assert errs[k] < (1e-3 if dt == F32 else 0.1), f"{k}: disagrees with the loop by {errs[k]}"
    fl = bm.fast_flops(args.mode, n_img, lengths, cap.shape[1])
    rate = rates(med, mm_fl, device)
    loop_ms = med["loop"] / (n_img * n_loop_cap) * 1e3
    print(f"\n## Scoring, {args.mode} IMRAM, d={bm.D}: {n_img} images x {n_cap} captions (mean length "
          f"{lengths.float().mean():.1f}) per call; loop on {n_img} x {n_loop_cap}; medians of {args.rounds} "
          f"interleaved rounds; dense matmul [{args.mm_rows} x {bm.D}] @ [{bm.D} x {2 * bm.D}] in the same "
          f"rounds: {describe(rate)}; first calls (fused: compile) {compile_s:.0f} s\n")
    print("| path | ms/pair | pairs/s | vs fp32 loop | GFLOP/s | % of same-dtype matmul | max abs diff vs loop |")
    print("|---|---|---|---|---|---|---|")
    print(f"| per-caption loop, fp32 | {loop_ms:.4f} | {1e3 / loop_ms:,.0f} | 1.0x | | | |")
    for k, (dt, kern) in paths.items():
        ms = med[k] / (n_img * n_cap) * 1e3
        mark = bm.auto_mark(dt, kern, "torch", device)
        print(f"| {k}{mark} | {ms:.4f} | {1e3 / ms:,.0f} | {loop_ms / ms:.1f}x | "
              f"{fl / med[k] / 1e9:,.0f} | {100 * fl / med[k] / 1e9 / rate[dt]:.0f}% | {errs[k]:.1e} |")
    ceiling = ", ".join(f"{NAMES[dt]} {loop_ms / (fl / (n_img * n_cap) / (r * 1e9) * 1e3):.0f}x"
                        for dt, r in rate.items())
    print(f"\nCeiling of this algebra here (its matmul FLOPs at the dense rate of the dtype, elementwise "
          f"work free): {ceiling} the fp32 loop.", flush=True)


TRAIN_KERNELS = ("eager", "fused")


def train_paths(device: torch.device) -> dict:
    """name: (autocast dtype or None, kernels, through the per-caption loop)"""
    paths = {"loop fp32": (None, "eager", True)}
    for dt in dtypes(device):
        for kern in TRAIN_KERNELS:
            paths[f"{NAMES[dt]}{'' if dt == F32 else ' autocast'} {kern}"] = (None if dt == F32 else dt, kern, False)
    return paths


def make_step(spec: tuple, model: IMRAM, batch, device: torch.device):
    """One optimisation step as training runs it: encoders, all pairs, hinge loss, backward,
    clipping at 2.0, Adam; fp16 through a gradient scaler (DeepSpeed's fp16 scales the loss too)."""
    autocast, kern, loop = spec
    model = bm.with_kernels(model, kern, "torch").to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == F16)
    regions, tokens, lengths = batch

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast or F32, enabled=autocast is not None):
            if loop:
                img, cap = model.encode_images(regions), model.encode_captions(tokens, lengths)
                scores = bm.loop_scores(model, img, cap, lengths)
            else:
                scores = model(regions, tokens, lengths)
            loss = hinge_loss(scores.float(), 0.2, True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    return step


def peak_step_gib(step, device: torch.device) -> float:
    """GPU memory a step takes above what was allocated before it (its activations, gradients
    and temporaries; the weights and Adam state are already there)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def training(args, device: torch.device) -> None:
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    model = IMRAM(bm.paper_config(score_memory_mb=args.score_memory_mb)).to(device)
    regions, tokens, lengths = bm.train_batch(args.batch)
    batch = regions.to(device), tokens.to(device), lengths
    specs = train_paths(device)
    steps = {p: make_step(s, model, batch, device) for p, s in specs.items()}
    t0 = time.perf_counter()
    losses = {p: s() for p, s in steps.items()}  # from the same weights: the first losses agree
    first_s = time.perf_counter() - t0
    for p, v in losses.items():
        tol = 1e-3 if specs[p][0] is None else 0.05 * abs(losses["loop fp32"]) + 0.1
        assert abs(v - losses["loop fp32"]) <= tol, f"{p}: first-step loss {v} vs loop {losses['loop fp32']}"
    mm, mm_fl = dense_matmuls(device, args.mm_rows, args.mm_repeat)
    med = bm.interleaved({k: synced(f, device) for k, f in {**steps, **mm}.items()}, args.train_rounds,
                         untimed=1)
    rate = rates(med, mm_fl, device)
    fl = 3 * bm.fast_flops("full", args.batch, lengths, int(lengths.max()))  # forward + 2x backward
    loop_s = med["loop fp32"]
    print(f"\n## Training step, full IMRAM, d={bm.D}, batch {args.batch} ({args.batch ** 2} pairs; encoders, hinge loss, "
          f"backward, clip 2.0, Adam); medians of {args.train_rounds} interleaved rounds, each timed step "
          f"right after an untimed step of the same path; dense matmul in the same rounds: {describe(rate)}; "
          f"first steps (fused: compile) {first_s:.0f} s\n")
    print("| path | step ms | vs fp32 loop | scoring GFLOP/s (fwd+bwd) | % of same-dtype matmul | step GPU memory GiB |")
    print("|---|---|---|---|---|---|")
    for p, (ac, kern, loop) in specs.items():
        gib = f"{peak_step_gib(steps[p], device):.2f}" if device.type == "cuda" else "n/a (CPU)"
        if loop:
            print(f"| per-caption loop, fp32 | {med[p] * 1e3:.1f} | 1.0x | | | {gib} |")
            continue
        mark = bm.auto_mark(ac or F32, kern, "torch", device)
        print(f"| {p}{mark} | {med[p] * 1e3:.1f} | {loop_s / med[p]:.1f}x | "
              f"{fl / med[p] / 1e9:,.0f} | {100 * fl / med[p] / 1e9 / rate[ac or F32]:.0f}% | {gib} |", flush=True)
    ceiling = ", ".join(f"{NAMES[dt]} {loop_s / (fl / (r * 1e9)):.0f}x" for dt, r in rate.items())
    print(f"\nCeiling here (the scoring matmuls, forward and backward, at the dense rate of the dtype; "
          f"encoders, elementwise work and the optimizer free): {ceiling} the fp32 loop's step.", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the same code")
    ap.add_argument("--quick", action="store_true", help="tiny blocks and batch, one round (a dry run)")
    ap.add_argument("--mode", default="full", choices=["full", "text", "image"], help="scoring mode")
    ap.add_argument("--rounds", type=int, default=5, help="scoring rounds")
    ap.add_argument("--train-rounds", type=int, default=3, help="training rounds")
    ap.add_argument("--batch", type=int, default=128, help="training batch")
    ap.add_argument("--images", type=int, default=128, help="images per scoring call")
    ap.add_argument("--captions", type=int, default=640, help="captions per scoring call")
    ap.add_argument("--loop-captions", type=int, default=32, help="captions the loop scores per call")
    ap.add_argument("--score-memory-mb", type=float, default=8192.0, help="model.score_memory_mb")
    ap.add_argument("--mm-rows", type=int, default=32768, help="rows of the dense reference matmul")
    ap.add_argument("--mm-repeat", type=int, default=10, help="reference matmuls per timed call")
    ap.add_argument("--width", type=int, default=bm.D, help=f"embedding width d (default the paper's {bm.D}; "
                    "256 with --quick)")
    ap.add_argument("--no-train", action="store_true", help="scoring only")
    ap.add_argument("--no-score", action="store_true", help="training step only")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model_gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
                 "use --device cpu --quick for a dry run, or benchmarks/bench_model.py for CPU figures")
    if args.quick:
        args.rounds, args.train_rounds, args.batch = 1, 1, 8
        args.images, args.captions, args.loop_captions, args.mm_rows, args.mm_repeat = 8, 16, 4, 2048, 1
        # a narrow model keeps the dry run short on CPUs where torch emulates bf16 matmuls (AVX2 only:
        # 10-300 times slower than fp32); every path and kernel still runs
        args.width = 256 if args.width == bm.D else args.width
    # bench_model's helpers (model config, embeddings, FLOP counts, auto marks) read its module's D
    bm.D = args.width
    # fp32 means IEEE fp32 here: TF32 matmuls (and cuDNN's TF32 GRU) would make it another precision
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(machine(device), flush=True)
    for name, run, skip in (("scoring", scoring, args.no_score), ("training", training, args.no_train)):
        if not skip:
            t = time.perf_counter()
            run(args, device)
            # device time is scarce: the next run's plan needs what each part took
            print(f"\n({name}: {time.perf_counter() - t:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
