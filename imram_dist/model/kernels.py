"""The kernels of the scoring core: the memory update (eager reference, fused version) and the
backend of the per-pair projection matmul (torch's, or oneDNN's for CPU fp32; see below).

Only one elementwise step of IMRAM touches per-pair tensors of width d (everything else in a
block is attention-sized, R x L per pair, ~50x smaller): the memory update
  x_new = g * q + (1 - g) * tanh(o),  [g_pre ; o_pre] = a (+ b),  g = sigmoid(g_pre)
where a is a matmul output of width 2d and b is a second addend (the per-row bias-carrying
projection, or a second matmul output) or None. In eager PyTorch that is four passes over
memory (add, sigmoid, tanh, lerp; tanh is slow in bf16 on CPU); the fused kernel (a custom
autograd Function whose forward and backward are ``torch.compile``d pointwise functions:
inductor makes one C++/OpenMP loop of each on CPU, one Triton kernel on GPU) reads a, b and q
once and writes x_new once, computing in fp32 registers for half precision; under autograd it
also writes the pre-activation (what the backward needs: sigmoid and tanh are recomputed there
rather than stored) and its backward is one pass as well.

``select(name, device, dtype, width, matmul)`` picks the implementations; ``"auto"`` uses the
fused kernel where it was measured faster (benchmarks/bench_model.py prints both) and the backend
is usable, the eager reference elsewhere, and oneDNN for the fp32 projection where MKL is slow. The
eager update with torch's matmul is the reference the tests check the others against.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from imram_dist.machine import cpu_info, describe_cpu

CHOICES = ("auto", "eager", "fused")


def gate_eager(a: torch.Tensor, q: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: lerp(tanh(o), q, sigmoid(g)) with [g ; o] = a + b along the last dim."""
    d = q.shape[-1]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, q, b)):
        pre = a if b is None else a + b
        return torch.lerp(torch.tanh(pre[..., d:]), q, torch.sigmoid(pre[..., :d]))
    # no autograd: in-place passes inside a (a fresh temporary owned by the caller), no new
    # allocation; the result is a strided view on a's second half
    pre = a if b is None else a.add_(b)
    g = pre[..., :d].sigmoid_()
    return pre[..., d:].tanh_().lerp_(q, g)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision compute, the compute dtype itself otherwise (fp32, fp64)."""
    return torch.promote_types(dtype, torch.float32)


# The fused kernels evaluate sigmoid and tanh through exp, as
#   x_new = g q + (1 - g) tanh(o) = q + (tanh(o) - q) / (1 + exp(g_pre)),  tanh(o) = 2 / (1 + exp(-2 o_pre)) - 1,
# two exps and two divisions per element instead of a polynomial tanh and sigmoid (~2.5x faster on
# AVX-512 here). Each exp is used once: inductor stores an exp used twice in a buffer of its own
# (a CPU heuristic for "heavy" ops), and where q and the addend broadcast (the first step) it could
# not fuse those buffers back into the loop: three loops and two fp32 buffers. Measured on
# [64, 1152, 2048] bf16 on the AMD EPYC: the broadcast call 35.0 ms against 56.4 with the earlier
# (q (1 + B) + A (1 - B)) / ((1 + A)(1 + B)) form, the full one 35.0 against 33.9; same errors against
# fp64. The arguments are clamped (|g_pre| <= 30, |o_pre| <= 15) so that nothing overflows in fp32;
# that changes sigmoid/tanh by less than 1e-12, far below fp32 rounding.
G_CLAMP, O_CLAMP = 30.0, 15.0


def _update(g_pre: torch.Tensor, o_pre: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    tanh_o = 2 / (1 + torch.exp(-2 * o_pre.clamp(-O_CLAMP, O_CLAMP))) - 1
    return q + (tanh_o - q) / (1 + torch.exp(g_pre.clamp(-G_CLAMP, G_CLAMP)))


def _halves(a: torch.Tensor, b: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of the pre-activation a + b, in the accumulation dtype."""
    acc = accumulation_dtype(a.dtype)
    return a[..., :d].to(acc) + b[..., :d].to(acc), a[..., d:].to(acc) + b[..., d:].to(acc)


def _gate_fwd(a: torch.Tensor, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    g_pre, o_pre = _halves(a, b, q.shape[-1])
    return _update(g_pre, o_pre, q.to(g_pre.dtype)).to(a.dtype)


def _gate_fwd_save(a: torch.Tensor, q: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the saved pre-activation is written half by half from the same loop that computes the update
    # (a [.., 2d]-wide `a + b` made inductor add a second loop that read a and b again: 20.5 against
    # 27.8 ms in bf16, 31.7 against 39.3 ms in fp32 on a [32, 1152, 2048] block, same bits)
    g_pre, o_pre = _halves(a, b, q.shape[-1])
    out = _update(g_pre, o_pre, q.to(g_pre.dtype)).to(a.dtype)
    return out, torch.cat([g_pre.to(a.dtype), o_pre.to(a.dtype)], -1)


def _gate_bwd(pre: torch.Tensor, q: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(x_new)/d(pre) and d(x_new)/d(q) times grad, from the saved pre-activation (recomputes
    sigmoid and tanh instead of storing them): g = 1/(1+A), tanh(o) = 2r - 1 with r = 1/(1+B),
    g' = g (1 - g), tanh' = 4 r (1 - r)."""
    d = q.shape[-1]
    acc = accumulation_dtype(pre.dtype)
    p = pre.to(acc)
    gr = grad.to(acc)
    g = 1 / (1 + torch.exp(-p[..., :d].clamp(-G_CLAMP, G_CLAMP)))
    r = 1 / (1 + torch.exp(-2 * p[..., d:].clamp(-O_CLAMP, O_CLAMP)))
    o = 2 * r - 1
    d_g = gr * (q.to(acc) - o) * g * (1 - g)
    d_o = gr * (1 - g) * 4 * r * (1 - r)
    # round each half before the concatenation: inductor then writes both straight into the
    # half-precision output (a cat of fp32 halves made it write a full fp32 copy and convert it)
    return torch.cat([d_g.to(pre.dtype), d_o.to(pre.dtype)], -1), (gr * g).to(q.dtype)


# Dynamic row counts: every block size (and a new batch size) reuses the same kernels. What makes a
# new graph is the dtype, a broadcast (size-1) leading dimension and the width, so the recompile
# limit is raised for these functions (8 by default is shared per function).
# The width is static and the kernels choose their thread count at run time, because inductor's CPU
# code generation reads the sizes of the call that compiles a graph (its "hints") even for dynamic
# dims: it halves the bf16 vector width (16 lanes instead of 32) when the innermost hint is below 32,
# and leaves out the OpenMP parallel loop when the whole hint is small. Its on-disk graph cache
# (/tmp/torchinductor_*) then serves that kernel to every later process whose graph matches up to
# the dynamic sizes. On the AMD EPYC (family 26) of docs/model.md, a gate compiled by a process that
# ran it at d=16 (as the tests do) took 255 ms at [32, 2304] rows x d=1,024 in bf16 in the next
# process, against 46 ms when compiled at that width. With a static width each width compiles its
# own graph; dynamic threads give every kernel a parallel loop whatever the hint.
_RECOMPILE_LIMIT = 64
INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True}


def static_width(t: torch.Tensor) -> torch.Tensor:
    """Mark t's last dim static for torch.compile (see above); returns t."""
    torch._dynamo.mark_static(t, t.dim() - 1)
    return t


@functools.cache
def _compiled(name: str) -> Callable:
    fn = {"fwd": _gate_fwd, "fwd_save": _gate_fwd_save, "bwd": _gate_bwd}[name]
    return torch.compile(fn, dynamic=True, options=INDUCTOR_OPTIONS)


def _call(name: str, *args: torch.Tensor):
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        return _compiled(name)(*(static_width(t) for t in args))


class _FusedGate(torch.autograd.Function):
    """The memory update with a one-pass compiled forward and a one-pass compiled backward; saves
    only the pre-activation (2d per row, in the compute dtype) and q."""

    @staticmethod
    def forward(ctx, a, q, b):  # type: ignore[override]
        out, pre = _call("fwd_save", a, q, b)
        ctx.save_for_backward(pre, q)
        ctx.shapes = (a.shape, b.shape)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, q = ctx.saved_tensors
        a_shape, b_shape = ctx.shapes
        q_shape = q.shape
        grad = grad.contiguous()
        if q_shape != grad.shape:
            # q broadcasts (size-1 leading dim: the first step). Given such a q, inductor splits the
            # backward into two loops with two fp32 buffers between them; a contiguous copy keeps it
            # one loop (same bits). [32, 1152, 1024] bf16 on the AMX Xeon of the README's run: 40 ms
            # with the copy against 63 without, fp32 48 against 60.
            q = q.expand(grad.shape).contiguous()
        d_pre, d_q = _call("bwd", pre, q, grad)
        d_a = d_pre.sum_to_size(a_shape) if ctx.needs_input_grad[0] else None
        d_b = d_pre.sum_to_size(b_shape) if ctx.needs_input_grad[2] else None
        d_q = d_q.sum_to_size(q_shape) if ctx.needs_input_grad[1] else None
        return d_a, d_q, d_b


def gate_fused(a: torch.Tensor, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same update as gate_eager (b required), one compiled pass each way."""
    if torch.is_grad_enabled() and (a.requires_grad or q.requires_grad or b.requires_grad):
        return _FusedGate.apply(a, q, b)
    return _call("fwd", a, q, b)


# ------------------------------------------------------------------ the per-pair projection
# The one matmul paid per pair, x @ W_x^T ([pairs x query rows, d] @ [d, 2d]), is ~90% of the FLOPs of
# fp32 scoring. torch runs fp32 matmuls on x86 through MKL, whose sgemm takes its AVX2 code on CPUs
# that are not Intel's: on the AMD EPYC (AVX-512) of the run in docs/model.md, "CPU figures", this matmul at
# [25,000 x 1,024] @ [1,024 x 2,048] ran at ~190 GFLOP/s through MKL and ~360 GFLOP/s through oneDNN
# (the library torch already uses for bf16). oneDNN's fp32 result is IEEE fp32 (no reduced-precision
# accumulation); it differs from MKL's only in summation order (~1e-6 relative).


# On CPU the projections run ROW_CHUNK rows at a time, each piece written into one output. oneDNN
# (torch's bf16 matmul, and fp32 with fp32_matmul=onednn) slows down for some row counts: on the AMD
# EPYC of that run, [M x 1,024] @ [1,024 x 2,048] in bf16 ran at 460-500 GFLOP/s for
# M = 25,184 (32 x 787: the text-direction rows of the scoring benchmark) and M = 28,117 (31 x 907),
# and at ~850 for M = 25,000 or 24,576; in fp32 through oneDNN 300 against 450. Of 40 random row
# counts between 20,000 and 30,000, 12 lost more than 25% (the 8 of them factored each had a prime
# factor above 500). 4,096-row pieces ran at ~850 (bf16) for every M tried, and within 2% of the
# unchunked matmul where that was fast (fp32 through oneDNN, whose pieces are copied in: 2-4%).
# Each output row is the same dot products either way; a piece may get another kernel than the
# whole, with another summation order (the scoring benchmark's scores came out bit-identical).
# GPUs run one matmul, through plain autograd.
ROW_CHUNK = 4096


def _mm_torch(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(x, w_t, out=out)
    else:
        torch.addmm(bias, x, w_t, out=out)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.t() (+ bias) as one oneDNN call (CPU fp32, no autograd, no row chunks)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _mm_onednn(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    out.copy_(onednn_linear(x, w_t.t(), bias))  # the op has no out= form


_MM = {"torch": _mm_torch, "onednn": _mm_onednn}


def _whole(backend: str, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w_t (+ bias) as one call of backend's matmul."""
    if backend == "onednn":
        return onednn_linear(x, w_t.t(), bias)
    return x @ w_t if bias is None else torch.addmm(bias, x, w_t)


def _by_rows(backend: str, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w_t (+ bias) in backend's matmul (CPU), ROW_CHUNK rows at a time (see above)."""
    if x.shape[0] <= ROW_CHUNK:
        return _whole(backend, x, w_t, bias)
    out = x.new_empty(x.shape[0], w_t.shape[1])
    for i in range(0, x.shape[0], ROW_CHUNK):
        _MM[backend](x[i:i + ROW_CHUNK], w_t, bias, out[i:i + ROW_CHUNK])
    return out


@functools.cache
def half_weight_grad_in_pieces() -> bool:
    """Whether the half-precision weight gradient runs in row pieces (_weight_grad): on CPUs with
    AMX (the amx_bf16 flag of /proc/cpuinfo), where oneDNN repacks a transposed input slowly.
    Elsewhere one matmul was the faster."""
    return "amx_bf16" in cpu_info("flags").split()


def _weight_grad(backend: str, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad^T @ x (CPU), computed as its transpose x^T @ grad: both backends copy or repack a
    transposed input, and x^T is half the size of grad^T. In half precision on AMX CPUs, ROW_CHUNK
    rows at a time, each piece of x^T copied to a contiguous matrix while it is in cache, the
    pieces' (half-precision) products summed in fp32. Measured on the AMX Xeon of the README's run,
    for [36,864 x 2,048]^T @ [36,864 x 1,024] (the image direction's projection at batch 32), in one
    bf16 run: 125 ms in pieces, 166 as one x^T @ grad, 176 as grad^T @ x, 152 in pieces transposed
    by an inductor kernel (which alone copied a piece in 0.8 ms against torch's 3.2); in one fp32
    run: 377 ms as one x^T @ grad, 420 in pieces, 426 as grad^T @ x. On the Zen 4 EPYC of
    docs/model.md (AVX512-BF16, no AMX), bf16, medians of 7: one x^T @ grad 382 ms, in pieces 429
    (at 25,184 rows 261 against 289), and one matmul rounds its result to bf16 once instead of once
    per piece (max error against fp64 1.9e-3 against 3.2e-3 of the largest entry)."""
    if backend == "onednn":
        return onednn_linear(x.t(), grad.t()).t()
    if x.dtype not in (torch.bfloat16, torch.float16) or x.shape[0] <= ROW_CHUNK \
            or not half_weight_grad_in_pieces():
        return (x.t() @ grad).t()
    acc = torch.zeros(x.shape[1], grad.shape[1], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], ROW_CHUNK):
        acc += x[i:i + ROW_CHUNK].t().contiguous() @ grad[i:i + ROW_CHUNK]
    return acc.t().to(x.dtype)


class _Linear(torch.autograd.Function):
    """x @ weight.t() + bias (weight: [out, in]) with the forward and the input gradient in row chunks,
    all three matmuls in one backend. The weight gradient's reduction runs over the rows, which
    showed no slow row counts; it is one matmul, except in half precision on AMX (see _weight_grad)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.backend = backend
        return _by_rows(backend, x, weight.t(), bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        d_x = _by_rows(ctx.backend, grad, weight) if ctx.needs_input_grad[0] else None  # grad @ weight
        d_w = None
        if ctx.needs_input_grad[1]:
            d_w = _weight_grad(ctx.backend, x, grad)
        d_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return d_x, d_w, d_b, None


def _linear(backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.device.type != "cpu":
        return _whole("torch", x, weight.t(), bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Linear.apply(x, weight, bias, backend)
    return _by_rows(backend, x, weight.t(), bias)


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.t() (+ bias) through torch's matmul (the reference), differentiable, in row chunks
    on CPU; x is 2-D."""
    return _linear("torch", x, weight, bias)


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.t() (+ bias) in oneDNN (CPU fp32), in row chunks, differentiable; x is 2-D."""
    return _linear("onednn", x, weight, bias)


MATMUL_CHOICES = ("auto", "torch", "onednn")


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's fp32 linear and it agrees with torch's matmul."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.randn(5, 8, dtype=torch.float32), torch.randn(3, 8, dtype=torch.float32)
        return bool(torch.allclose(onednn_linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError):  # op missing or not built for this CPU
        return False


@functools.cache
def cpu_vendor() -> str:
    """The x86 vendor string of this CPU ("GenuineIntel", "AuthenticAMD", ...), "" if unknown."""
    return cpu_info("vendor_id")


@functools.cache
def cpu_bf16_matmul_native() -> bool:
    """Whether torch runs bf16 matmuls on this CPU through oneDNN (x86 with AVX512 or AMX/AVX512-BF16,
    ARM with bf16): torch's own test, True when it cannot say. Without it torch falls back to
    reference loops: on an AVX2-only AMD EPYC (x86 family 25 model 1) a 4608x1024 @ 1024x2048 bf16
    matmul ran at 0.4 GFLOP/s against 129 in fp32 (docs/model.md, "bf16 on CPUs without it")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def slow_bf16_note(device: torch.device) -> str | None:
    """What to tell someone who asked for bf16 on this device, if torch can only emulate it here."""
    if device.type != "cpu" or cpu_bf16_matmul_native():
        return None
    return (f"this CPU has no bf16 matmul in torch ({describe_cpu()}), so torch computes bf16 matmuls in "
            "reference loops, tens to hundreds of times slower than fp32: use fp32 on this machine")


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether this CPU reports AVX-512 (the avx512f flag of /proc/cpuinfo)."""
    return "avx512f" in cpu_info("flags").split()


def matmul_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The backend "auto" picks for the per-pair projection: oneDNN for CPU fp32 on x86 CPUs with
    AVX-512 that are not Intel's (MKL's sgemm runs its AVX2 code there, oneDNN its AVX-512 code),
    torch's matmul everywhere else: on Intel CPUs, on AVX2-only CPUs (where both run AVX2 code and
    MKL was the faster, docs/model.md), for bf16/fp16 on CPU (already oneDNN inside torch), for fp64
    (no oneDNN path) and on GPUs."""
    if device.type == "cpu" and dtype == torch.float32 and cpu_vendor() not in ("", "GenuineIntel") \
            and cpu_has_avx512() and onednn_available():
        return "onednn"
    return "torch"


@dataclass(frozen=True)
class Kernels:
    """The kernels of the scoring core: the memory update and the per-pair projection."""

    name: str
    gate: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor] = linear_torch


EAGER = Kernels("eager", gate_eager)
FUSED = Kernels("fused", gate_fused)
EAGER_ONEDNN = Kernels("eager+onednn", gate_eager, linear_onednn)
FUSED_ONEDNN = Kernels("fused+onednn", gate_fused, linear_onednn)


def fused_available(device: torch.device) -> bool:
    """Whether torch.compile's inductor backend can build kernels for this device here."""
    if device.type == "cpu":
        return shutil.which("g++") is not None or shutil.which("c++") is not None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


# CPU fp32 uses the fused kernels from this embedding width up: at paper sizes (d=1024,
# benchmarks/bench_model.py) training steps were 6-23% faster in every run, and scoring was a wash
# (from 4% slower to 11% faster over five runs), so one rule for both; at small widths the passes are
# cheap next to the compile each process pays (~12 s with a warm inductor cache, ~45 s cold).
FUSED_FP32_MIN_WIDTH = 512


def auto_choice(device: torch.device, dtype: torch.dtype, width: int = 0) -> str:
    """The implementation that was measured faster for this device, compute dtype and embedding
    width: CPU fp32/fp64 below FUSED_FP32_MIN_WIDTH eager (the compile would dominate), fused from
    there; CPU bf16/fp16 and CUDA fused (the elementwise passes dominate). Fused only where the
    backend can build kernels."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float64) and width < FUSED_FP32_MIN_WIDTH:
        return "eager"
    return "fused" if fused_available(device) else "eager"


def select(name: str, device: torch.device, dtype: torch.dtype, width: int = 0,
           matmul: str = "torch") -> Kernels:
    """Kernels by name: the memory update "eager", "fused", or "auto" (auto_choice), and the
    per-pair projection's backend matmul "torch", "onednn" or "auto" (matmul_choice; "onednn" only
    applies to CPU fp32, other devices and dtypes keep torch's)."""
    if name not in CHOICES:
        raise ValueError(f"kernels: expected one of {list(CHOICES)}, got {name!r}")
    if matmul not in MATMUL_CHOICES:
        raise ValueError(f"fp32_matmul: expected one of {list(MATMUL_CHOICES)}, got {matmul!r}")
    if name == "auto":
        name = auto_choice(device, dtype, width)
    if matmul == "auto":
        matmul = matmul_choice(device, dtype)
    onednn = matmul == "onednn" and device.type == "cpu" and dtype == torch.float32
    if onednn and not onednn_available():
        raise RuntimeError("fp32_matmul=onednn: this torch build has no usable oneDNN fp32 linear "
                           "(torch.ops.mkldnn._linear_pointwise); use fp32_matmul=auto or torch")
    if name == "fused":
        return FUSED_ONEDNN if onednn else FUSED
    return EAGER_ONEDNN if onednn else EAGER
