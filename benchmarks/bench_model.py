"""IMRAM scoring and training-step benchmark at paper sizes (d=1024, R=36, D=2048, ~12-token
captions, full IMRAM K=3), fp32 and bf16, eager and fused kernels, against a per-caption loop
written like the authors' code, all measured in the same run.

    python benchmarks/bench_model.py             # scoring + training step, a few minutes
    python benchmarks/bench_model.py --quick     # smaller blocks, fewer rounds
    python benchmarks/bench_model.py --no-train  # scoring only
    python benchmarks/bench_model.py --dtypes fp32  # fp32 paths only

bf16 paths run only where torch has a bf16 matmul on this CPU (kernels.cpu_bf16_matmul_native:
AVX512 or AMX/AVX512-BF16); on an AVX2-only CPU torch emulates it 10-300 times slower than
fp32 and the run prints that it left them out (--dtypes fp32,bf16 runs them anyway).

Prints the CPU model and its bf16 support, the load average, and tables:
- scoring: ms/pair per path, speed-up against the fp32 per-caption loop, achieved GFLOP/s
  (matmul FLOPs of the path, counted analytically) as a share of the same dtype's dense matmul
  rate measured in the same interleaved rounds;
- one training step at batch 32 (encoders, all B x B pairs, hinge loss, backward, gradient
  clipping at 2.0, Adam) per path, against the same step through the per-caption loop, with the
  peak RSS of each path measured in a fresh process.
Every path is timed in interleaved rounds (one call of each per round; a training step right
after an untimed step of the same path) and reported as the median: the machine is shared, so
compare ratios from one run, not times across runs.

Not a test: it only asserts that the paths agree (fp32 exactly, bf16 within rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# imram_dist before torch: importing it turns on torch's huge pages (see imram_dist/__init__.py)
import imram_dist  # noqa: E402, I001
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from imram_dist.config import ModelConfig  # noqa: E402
from imram_dist.machine import describe_cpu  # noqa: E402
from imram_dist.model import IMRAM, hinge_loss, kernels  # noqa: E402

R, D_IMG, D, K, VOCAB = 36, 2048, 1024, 3, 10000
MM = (4608, D, 2 * D)  # the dense matmul whose rate the paths are compared with


def paper_config(mode: str = "full", **kw) -> ModelConfig:
    return ModelConfig(image_dim=D_IMG, embed_size=D, word_dim=300, vocab_size=VOCAB, mode=mode, steps=K,
                       lambda_softmax=9.0, **kw)


def embeddings(n_img: int, n_cap: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, R, D, generator=g), dim=-1)
    lengths = torch.randint(8, 17, (n_cap,), generator=g)  # mean 12 tokens
    cap = F.normalize(torch.randn(n_cap, int(lengths.max()), D, generator=g), dim=-1)
    return img, cap, lengths


def machine() -> str:
    memory = ", ".join(f"{env}={os.environ.get(env, 'unset')}"
                       for env in (imram_dist.HUGE_PAGES_ENV, imram_dist.KEEP_FREED_MEMORY_ENV))
    return f"{describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; memory settings: {memory}"


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
    """Per-caption loop mirroring the authors' xattn_score_{Text,Image}_IMRAM (differentiable:
    their training step backpropagates through exactly this)."""
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


# ------------------------------------------------------------------ FLOP counts

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


def projection_rows(mode: str, n_img: int, lengths: torch.Tensor) -> list[int]:
    """Rows of each per-pair query projection W_x x_k (k = 1 .. K-2) of a block of n_img images x
    len(lengths) captions: the text direction's n_img x (real words), the image direction's
    captions x n_img x R."""
    rows = []
    if mode in ("full", "text"):
        rows.append(n_img * int(lengths.sum()))
    if mode in ("full", "image"):
        rows.append(len(lengths) * n_img * R)
    return rows * max(K - 2, 0)


def projections(dtype: torch.dtype, rows: list[int]):
    """The per-pair projections alone, at the block's shapes, through the backend that
    model.fp32_matmul=auto picks for the dtype on this CPU (kernels.linear_*, row chunks included)."""
    kern = kernels.select("eager", torch.device("cpu"), dtype, D, "auto")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(max(rows), D, generator=g) * D ** -0.5).to(dtype)
    w = (torch.randn(2 * D, D, generator=g) * D ** -0.5).to(dtype)
    return lambda: [kern.linear(x[:r], w) for r in rows]


def mm_flops() -> float:
    return 2.0 * MM[0] * MM[1] * MM[2]


# ------------------------------------------------------------------ timing

def interleaved(fns: dict, rounds: int, untimed: int = 0) -> dict:
    """One timed call of each function per round, after one warm-up call each; median seconds.
    With untimed > 0 each timed call comes right after that many untimed calls of the same function:
    a training step that follows another path's step often finds the allocator's free lists laid out
    for that path and takes fresh memory (page faults, up to ~1 s per step here); a training loop
    runs the same step again and again, so the step after a step is what it sees."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(untimed):
                f()
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def with_kernels(model: IMRAM, name: str, matmul: str) -> IMRAM:
    m = IMRAM(dataclasses.replace(model.config, fp32_matmul=matmul), kernels=name)
    m.load_state_dict(model.state_dict())
    return m.train(model.training)


def auto_mark(dtype: torch.dtype, kern: str, matmul: str, device: torch.device | None = None) -> str:
    """" (auto)" on the path that the defaults (kernels=auto, fp32_matmul=auto) pick on this device
    (the CPU by default)."""
    device = device or torch.device("cpu")
    auto = kernels.select("auto", device, dtype, D, "auto")
    this = kernels.select(kern, device, dtype, D, matmul)
    return " (auto)" if auto is this else ""


# The dense matmul whose rate the paths are compared with, in each backend torch offers on CPU:
# torch's own (MKL for fp32 on x86, oneDNN for bf16) and oneDNN's fp32 linear (what
# fp32_matmul=onednn runs); "% of same-dtype matmul" is against the faster of the fp32 two.
def dense_matmuls(dtypes: list[torch.dtype]) -> dict:
    bf = torch.bfloat16
    a32, w32 = torch.randn(MM[0], MM[1]), torch.randn(MM[2], MM[1])
    a16, w16 = a32.to(bf), w32.to(bf)
    fns = {"mm fp32": lambda: a32 @ w32.t()}
    if bf in dtypes:
        fns["mm bf16"] = lambda: a16 @ w16.t()
    if kernels.onednn_available():
        fns["mm fp32 onednn"] = lambda: kernels.onednn_linear(a32, w32)
    return fns


def matmul_rates(med: dict) -> dict:
    """GFLOP/s per dtype (fp32: the faster backend), plus each backend's under its own key."""
    out = {k: mm_flops() / med[k] / 1e9 for k in med if k.startswith("mm ")}
    out[torch.float32] = max(v for k, v in out.items() if k.startswith("mm fp32"))
    if "mm bf16" in out:
        out[torch.bfloat16] = out["mm bf16"]
    return out


def describe_rates(rate: dict) -> str:
    fp32 = f"fp32 {rate['mm fp32']:.0f} (torch)"
    if "mm fp32 onednn" in rate:
        fp32 += f" / {rate['mm fp32 onednn']:.0f} (oneDNN)"
    bf16 = (f", bf16 {rate['mm bf16']:.0f} GFLOP/s ({rate['mm bf16'] / rate[torch.float32]:.1f}x the faster fp32)"
            if "mm bf16" in rate else "")
    return f"dense matmul {MM[0]}x{MM[1]} @ {MM[1]}x{MM[2]} in the same rounds: {fp32} GFLOP/s{bf16}"


def ceilings(ceiling: dict) -> str:
    return ", ".join(f"{NAMES[dt]} {x:.1f}x" for dt, x in ceiling.items())


NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


SCORE_PATHS = {  # name: (dtype, kernels, fp32 matmul backend)
    "fp32 eager": (torch.float32, "eager", "torch"), "fp32 eager + oneDNN": (torch.float32, "eager", "onednn"),
    "fp32 fused": (torch.float32, "fused", "torch"), "fp32 fused + oneDNN": (torch.float32, "fused", "onednn"),
    "bf16 eager": (torch.bfloat16, "eager", "torch"), "bf16 fused": (torch.bfloat16, "fused", "torch")}


def scoring(args) -> None:
    torch.set_grad_enabled(False)
    n_img, n_cap, n_loop_cap = (16, 32, 8) if args.quick else (32, 64, 16)
    img, cap, lengths = embeddings(n_img, n_cap)
    torch.manual_seed(0)
    model = IMRAM(paper_config(args.mode)).eval()
    bf = torch.bfloat16
    paths = {k: v for k, v in SCORE_PATHS.items()
             if (v[2] == "torch" or kernels.onednn_available()) and v[0] in args.dtypes}
    models = {k: with_kernels(model, kern, mm).eval() for k, (_, kern, mm) in paths.items()}
    inputs = {torch.float32: (img, cap), bf: (img.to(bf), cap.to(bf))}
    t0 = time.perf_counter()
    for k, (dt, _, _) in paths.items():  # compile the fused kernels outside the timed rounds
        models[k].similarity(*inputs[dt], lengths)
    compile_s = time.perf_counter() - t0
    fns = {"loop": lambda: loop_scores(model, img, cap[:n_loop_cap], lengths[:n_loop_cap]),
           **dense_matmuls(args.dtypes)}
    for k, (dt, _, _) in paths.items():
        fns[k] = (lambda m=models[k], i=inputs[dt]: m.similarity(*i, lengths))
    rows = projection_rows(args.mode, n_img, lengths)
    if rows:
        fns.update({f"projections {dt}": projections(dt, rows) for dt in args.dtypes})
    med = interleaved(fns, args.rounds)
    ref = loop_scores(model, img, cap[:n_loop_cap], lengths[:n_loop_cap])
    errs = {}
    for k, (dt, _, _) in paths.items():
        i, c = inputs[dt]
        s = models[k].similarity(i, c[:n_loop_cap], lengths[:n_loop_cap])
        errs[k] = float((s.float() - ref).abs().max())
        assert errs[k] < (1e-3 if dt == torch.float32 else 0.1), f"{k}: disagrees with the loop by {errs[k]}"
    fl = fast_flops(args.mode, n_img, lengths, cap.shape[1])
    rate = matmul_rates(med)
    loop_ms = med["loop"] / (n_img * n_loop_cap) * 1e3
    print(f"\n## Scoring, {args.mode} IMRAM: {n_img} images x {n_cap} captions (mean length "
          f"{lengths.float().mean():.1f}) per call; loop on {n_img} x {n_loop_cap}; medians of {args.rounds} "
          f"interleaved rounds; {describe_rates(rate)}; fused kernels compiled in {compile_s:.0f} s "
          f"(first calls)\n")
    print("| path | ms/pair | vs fp32 loop | GFLOP/s | % of same-dtype matmul | max abs diff vs loop |")
    print("|---|---|---|---|---|---|")
    print(f"| per-caption loop, fp32 | {loop_ms:.3f} | 1.0x | | | |")
    for k, (dt, kern, mm) in paths.items():
        ms = med[k] / (n_img * n_cap) * 1e3
        print(f"| {k}{auto_mark(dt, kern, mm)} | {ms:.3f} | {loop_ms / ms:.1f}x | {fl / med[k] / 1e9:.0f} | "
              f"{100 * fl / med[k] / 1e9 / rate[dt]:.0f}% | {errs[k]:.1e} |")
    ceiling = {dt: loop_ms / (fl / (n_img * n_cap) / (rate[dt] * 1e9) * 1e3) for dt in args.dtypes}
    print(f"\nCeiling of this algebra on this machine (its matmul FLOPs at 100% of the fastest dense matmul "
          f"of the dtype, elementwise work free): {ceilings(ceiling)} the fp32 loop.")
    if rows:  # what any implementation that computes W_x x_k with this matmul can reach
        share = 100 * sum(rows) * 2 * D * 2 * D / fl
        bound = {dt: med[f"projections {dt}"] / (n_img * n_cap) * 1e3 for dt in args.dtypes}
        each = ", ".join(f"{NAMES[dt]} {ms:.3f} ms/pair ({loop_ms / ms:.1f}x the loop)" for dt, ms in bound.items())
        print(f"The per-pair projections alone (W_x x_k for k = 1..K-2 of every pair: {share:.0f}% of these matmul "
              f"FLOPs, the only width-d work per pair that the algebra leaves), at this block's shapes, in the same "
              f"rounds, through the backend auto picks: {each}: the most any path could reach if all the rest of "
              f"scoring were free.")


# ------------------------------------------------------------------ training step

TRAIN_PATHS = {  # name: (autocast dtype or None, kernels, fp32 matmul backend, use the per-caption loop)
    "loop fp32": (None, "eager", "torch", True),
    "fp32 eager": (None, "eager", "torch", False),
    "fp32 fused": (None, "fused", "torch", False),
    "fp32 fused + oneDNN": (None, "fused", "onednn", False),
    "bf16 autocast eager": (torch.bfloat16, "eager", "torch", False),
    "bf16 autocast fused": (torch.bfloat16, "fused", "torch", False),
}


def train_batch(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.relu(torch.randn(batch, R, D_IMG, generator=g))
    lengths = torch.randint(8, 17, (batch,), generator=g)
    tokens = torch.randint(4, VOCAB, (batch, int(lengths.max())), generator=g)
    return regions, tokens, lengths


def make_step(path: str, model: IMRAM, batch):
    """One optimisation step as the training loop runs it: encoders, all pairs, hinge loss,
    backward, global-norm clipping at 2.0, Adam."""
    autocast, kern, matmul, loop = TRAIN_PATHS[path]
    model = with_kernels(model, kern, matmul).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    regions, tokens, lengths = batch

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            if loop:
                img = model.encode_images(regions)
                cap = model.encode_captions(tokens, lengths)
                scores = loop_scores(model, img, cap, lengths)
            else:
                scores = model(regions, tokens, lengths)
            loss = hinge_loss(scores.float(), 0.2, True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        return float(loss.detach())

    return step


def train_memory_child(path: str, batch: int) -> None:
    torch.manual_seed(0)
    model = IMRAM(paper_config())
    step = make_step(path, model, train_batch(batch))
    step()  # first step: compiles the fused kernels, allocates Adam state
    t = time.perf_counter()
    step()
    dt = time.perf_counter() - t
    print(json.dumps({"peak_gib": peak_rss_kib() / 2**20, "step_s": dt}))


def peak_rss_kib() -> int:
    """This process's peak RSS. VmHWM belongs to the address space (reset by exec); ru_maxrss is
    not: a child forked from a large parent starts with the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def train_memory(path: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_train-memory", path, str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def training(args) -> None:
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    model = IMRAM(paper_config())
    batch = train_batch(args.batch)
    paths = [p for p, v in TRAIN_PATHS.items()
             if (v[2] == "torch" or kernels.onednn_available()) and (v[0] or torch.float32) in args.dtypes]
    steps = {p: make_step(p, model, batch) for p in paths}
    losses = {p: s() for p, s in steps.items()}  # from the same weights: the first losses agree
    for p, v in losses.items():
        tol = 1e-3 if TRAIN_PATHS[p][0] is None else 0.05 * abs(losses["loop fp32"]) + 0.1
        assert abs(v - losses["loop fp32"]) <= tol, f"{p}: first-step loss {v} vs loop {losses['loop fp32']}"
    med = interleaved({**steps, **dense_matmuls(args.dtypes)}, args.train_rounds, untimed=1)
    rate = matmul_rates(med)
    rate[None] = rate[torch.float32]
    # useful FLOPs: scoring forward x 3 (backward costs two matmuls per forward matmul); encoders
    # and the recomputation of checkpointed chunks not counted
    regions, tokens, lengths = batch
    fl = 3 * fast_flops("full", args.batch, lengths, int(lengths.max()))
    loop_s = med["loop fp32"]
    print(f"\n## Training step, full IMRAM, batch {args.batch} ({args.batch ** 2} pairs; encoders, hinge loss, "
          f"backward, clip 2.0, Adam); medians of {args.train_rounds} interleaved rounds after a warm-up "
          f"step each, each timed step right after an untimed step of the same path; {describe_rates(rate)}\n")
    print("| path | step s | vs fp32 loop | scoring GFLOP/s (fwd+bwd) | % of same-dtype matmul |")
    print("|---|---|---|---|---|")
    for p in paths:
        ac, kern, matmul, loop = TRAIN_PATHS[p]
        if loop:
            print(f"| per-caption loop, fp32 | {med[p]:.2f} | 1.0x | | |")
            continue
        auto = auto_mark(ac or torch.float32, kern, matmul)
        print(f"| {p}{auto} | {med[p]:.2f} | {loop_s / med[p]:.1f}x | {fl / med[p] / 1e9:.0f} | "
              f"{100 * fl / med[p] / 1e9 / rate[ac]:.0f}% |", flush=True)
    ceiling = {dt: loop_s / (fl / (rate[dt] * 1e9)) for dt in args.dtypes}
    print(f"\nCeiling on this machine (the scoring matmuls, forward and backward, at 100% of the fastest dense "
          f"matmul of the dtype; encoders, elementwise work and the optimizer free): {ceilings(ceiling)} the fp32 "
          f"loop's step.")
    if args.no_memory:
        return
    print("\nPeak RSS of one training step per path (fresh process each, second step):\n")
    print("| path | peak RSS GiB |")
    print("|---|---|")
    for p in paths:
        print(f"| {p} | {train_memory(p, args.batch)['peak_gib']:.2f} |", flush=True)


def bench_dtypes(spec: str) -> list[torch.dtype]:
    """The dtypes of --dtypes; fp32 always (the loop baseline and the ceilings are fp32's)."""
    if spec == "auto":
        if kernels.cpu_bf16_matmul_native():
            return [torch.float32, torch.bfloat16]
        print("bf16 paths left out: torch has no bf16 matmul on this CPU and would emulate it (see "
              "kernels.cpu_bf16_matmul_native); --dtypes fp32,bf16 runs them anyway")
        return [torch.float32]
    by_name = {v: k for k, v in NAMES.items()}
    try:
        chosen = {by_name[name] for name in spec.split(",")}
    except KeyError:
        raise SystemExit(f"--dtypes: expected fp32, bf16 or fp32,bf16, got {spec!r}") from None
    return [dt for dt in NAMES if dt in chosen | {torch.float32}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller scoring blocks, fewer rounds")
    ap.add_argument("--mode", default="full", choices=["full", "text", "image"], help="scoring mode")
    ap.add_argument("--rounds", type=int, default=0, help="scoring rounds (default 5, 3 with --quick)")
    ap.add_argument("--train-rounds", type=int, default=0, help="training rounds (default 3, 2 with --quick)")
    ap.add_argument("--batch", type=int, default=32, help="training batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--no-train", action="store_true", help="scoring only")
    ap.add_argument("--no-score", action="store_true", help="training step only")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-path peak-RSS subprocesses")
    ap.add_argument("--dtypes", default="auto",
                    help="fp32, bf16 or fp32,bf16 (default auto: bf16 only where torch has a bf16 matmul on this CPU)")
    ap.add_argument("--_train-memory", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._train_memory:
        train_memory_child(args._train_memory[0], int(args._train_memory[1]))
        return
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.train_rounds = args.train_rounds or (2 if args.quick else 3)
    load0 = os.getloadavg()
    print(f"{machine()}\nload average at start: {load0[0]:.1f} (1 min), {load0[1]:.1f} (5 min)")
    args.dtypes = bench_dtypes(args.dtypes)
    if not args.no_score:
        scoring(args)
    if not args.no_train:
        training(args)
    load1 = os.getloadavg()
    print(f"\nload average at end: {load1[0]:.1f} (1 min), {load1[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
