"""Mixed precision (autocast, bf16 models, bf16 embeddings) and the fused kernels, against the
literal oracle (imram_oracle.py) evaluated in float64.

Tolerances. A half-precision run cannot be closer to the exact scores than the rounding of its
inputs allows, so each low-precision result is compared with that yardstick: the exact (fp64)
oracle run on the same embeddings and weights rounded to the low dtype. The mixed path (matmuls
in bf16/fp16, attention, norms, cosines and sums in fp32) may add rounding of its own inside
the matmul outputs and the memory update, but it must stay within 3x the yardstick (plus two
units of the dtype's spacing, so that a lucky near-zero yardstick does not make the test
flaky). Scores of a few captions in these tiny models are ill-conditioned (a gradient can move
by tens of percent when the inputs are rounded), which is why the bound is relative to that
yardstick and not a fixed number.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import imram_oracle as oracle
import pytest
import torch

from imram_dist.config import ModelConfig
from imram_dist.model import IMRAM, hinge_loss, kernels, l2norm

D_IMG, D, WORD, VOCAB = 24, 32, 16, 30
SPACING = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}  # distance from 1 to the next value


def make(mode="full", seed=0, kern="eager", **kw) -> IMRAM:
    torch.manual_seed(seed)
    return IMRAM(ModelConfig(image_dim=D_IMG, embed_size=D, word_dim=WORD, vocab_size=VOCAB, mode=mode,
                             steps=3, lambda_softmax=9.0, **kw), kernels=kern)


def batch(N=4, M=5, R=6, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(N, R, D_IMG, generator=g)
    lengths = torch.tensor([9, 3, 1, 7, 5][:M])
    tokens = torch.randint(0, VOCAB, (M, L), generator=g)
    return regions, tokens, lengths


def rounded(model: IMRAM, dtype: torch.dtype) -> IMRAM:
    """An fp64 copy whose weights went through dtype (what a half-precision run sees)."""
    return copy.deepcopy(model).to(dtype).double()


def exact_scores(model, img, cap, lengths, dtype=None):
    """The oracle in fp64 on the embeddings (and weights) rounded to dtype first, if given."""
    m = rounded(model, dtype) if dtype else copy.deepcopy(model).double()
    i, c = (img.to(dtype), cap.to(dtype)) if dtype else (img, cap)
    with torch.no_grad():
        return oracle.similarity(m, i.double(), c.double(), lengths)


def max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def encoded():
    model = make()
    regions, tokens, lengths = batch()
    with torch.no_grad():
        return model, model.encode_images(regions), model.encode_captions(tokens, lengths), lengths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scoring_under_cpu_autocast_is_as_good_as_rounding_allows(encoded, dtype):
    """CPU autocast (bf16, and fp16 standing in for CUDA's fp16) changes the compute dtype of
    scoring; the scores come out fp32, within 3x the input-rounding error of the exact ones."""
    model, img, cap, lengths = encoded
    exact = exact_scores(model, img, cap, lengths)
    yardstick = max_err(exact_scores(model, img, cap, lengths, dtype), exact)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        s = model.similarity(img, cap, lengths)
    assert s.dtype == torch.float32
    assert max_err(s, exact) <= 3 * yardstick + 2 * SPACING[dtype], (max_err(s, exact), yardstick)


def test_bf16_embeddings_on_an_fp32_model(encoded):
    """eval.precision=bf16: fp32 encoders, bf16 embeddings into scoring (MDU weights cast to bf16)."""
    model, img, cap, lengths = encoded
    exact = exact_scores(model, img, cap, lengths)
    yardstick = max_err(exact_scores(model, img, cap, lengths, torch.bfloat16), exact)
    with torch.no_grad():
        s = model.similarity(img.bfloat16(), cap.bfloat16(), lengths)
    assert s.dtype == torch.float32
    assert max_err(s, exact) <= 3 * yardstick + 2 * SPACING[torch.bfloat16]


def _smooth_grads(model, img, cap, lengths, weight, autocast=None):
    """Gradients of a smooth function of the scores (the hinge loss's kinks would make rounding
    flip which terms count) w.r.t. the embeddings and the MDU weights."""
    img = img.detach().clone().requires_grad_(True)
    cap = cap.detach().clone().requires_grad_(True)
    mdus = [model.gate_t2i.weight, model.linear_t2i.weight, model.gate_i2t.weight, model.linear_i2t.weight]
    if autocast is None:
        s = model.similarity(img, cap, lengths)
    else:
        with torch.autocast("cpu", dtype=autocast):
            s = model.similarity(img, cap, lengths)
    return [g.double() for g in torch.autograd.grad((s * weight.to(s.dtype)).sum(), [img, cap] + mdus)]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_autocast_gradients_are_as_good_as_rounding_allows(encoded):
    model, img, cap, lengths = encoded
    weight = torch.randn(img.shape[0], cap.shape[0], generator=torch.Generator().manual_seed(5))
    m64 = copy.deepcopy(model).double()
    exact = _smooth_grads(m64, img.double(), cap.double(), lengths, weight.double())
    r64 = rounded(model, torch.bfloat16)
    yard = _smooth_grads(r64, img.bfloat16().double(), cap.bfloat16().double(), lengths, weight.double())
    low = _smooth_grads(model, img, cap, lengths, weight, autocast=torch.bfloat16)
    for name, a, y, e in zip(["image_emb", "caption_emb", "gate_t2i", "linear_t2i", "gate_i2t", "linear_i2t"],
                             low, yard, exact):
        assert _rel(a, e) <= 3 * _rel(y, e) + 2 * SPACING[torch.bfloat16], (name, _rel(a, e), _rel(y, e))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_training_step_runs_under_cpu_autocast(dtype):
    """The whole step (encoders, scoring, hinge loss, backward) under autocast: fp32 scores and
    loss, finite fp32 gradients for every parameter, a loss close to the fp32 one."""
    model = make()
    regions, tokens, lengths = batch(N=5, M=5)
    ref = hinge_loss(model(regions, tokens, lengths), 0.2, True)
    with torch.autocast("cpu", dtype=dtype):
        s = model(regions, tokens, lengths)
        loss = hinge_loss(s, 0.2, True)
    assert s.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    # 10 hinge terms of scores that each moved by a few units of the dtype's spacing
    assert abs(float(loss.detach()) - float(ref.detach())) <= 10 * 2 * 4 * SPACING[dtype]


def test_a_bf16_model_trains_and_scores_close_to_its_exact_scores():
    """DeepSpeed's bf16: the whole model in bf16 (encoders included: the GRU recurrence and the
    norms round at every step, so the bound is wider: 8 units of bf16 spacing)."""
    model = make().to(torch.bfloat16)
    regions, tokens, lengths = batch()
    with torch.no_grad():
        s = model(regions, tokens, lengths)
        exact = oracle.forward(copy.deepcopy(model).double(), regions.bfloat16().double(), tokens, lengths)
    assert s.dtype == torch.float32
    assert max_err(s, exact) <= 8 * SPACING[torch.bfloat16], max_err(s, exact)
    hinge_loss(model(regions[:4], tokens[:4], lengths[:4]), 0.2, True).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------- fused kernels

def test_fp16_encoders_give_zeros_not_nan_at_padded_positions():
    """In fp16 the spec's eps (1e-8) rounds to 0: an all-zero vector, which every padded word
    position of the caption encoder is, normalised to 0/0. It must stay zero, and a non-zero
    vector must normalise as in fp32 up to fp16 rounding."""
    model = make().half()
    regions, tokens, lengths = batch()
    cap = model.encode_captions(tokens, lengths)
    pad = torch.arange(cap.shape[1]) >= lengths.unsqueeze(1)
    assert pad.any() and torch.isfinite(cap).all() and (cap[pad] == 0).all()
    assert torch.isfinite(model.encode_images(torch.zeros_like(regions).half())).all()  # zero fc output at init
    x = torch.randn(6, D)
    assert max_err(l2norm(x.half()), l2norm(x)) <= SPACING[torch.float16]
    assert l2norm(x).dtype == torch.float32 and torch.equal(l2norm(x), x / (x.norm(dim=-1, keepdim=True) + 1e-8))


def test_kernel_choice():
    cpu = torch.device("cpu")
    assert kernels.select("auto", cpu, torch.float32) is kernels.EAGER
    assert kernels.select("eager", cpu, torch.bfloat16) is kernels.EAGER
    assert kernels.select("fused", cpu, torch.float32) is kernels.FUSED
    assert kernels.select("fused", cpu, torch.float32, matmul="onednn") is kernels.FUSED_ONEDNN
    assert kernels.select("eager", cpu, torch.float32, matmul="onednn") is kernels.EAGER_ONEDNN
    # oneDNN only replaces torch's fp32 CPU matmul: bf16 (oneDNN inside torch already) and fp64 keep it
    assert kernels.select("eager", cpu, torch.bfloat16, matmul="onednn") is kernels.EAGER
    assert kernels.select("eager", cpu, torch.float64, matmul="onednn") is kernels.EAGER
    with pytest.raises(ValueError, match="fp32_matmul: expected one of"):
        kernels.select("eager", cpu, torch.float32, matmul="mkl")
    fused = kernels.FUSED if kernels.fused_available(cpu) else kernels.EAGER
    assert kernels.select("auto", cpu, torch.bfloat16) is fused
    # CPU fp32: fused at paper widths, eager for small models (the compile would dominate)
    wide = kernels.FUSED_FP32_MIN_WIDTH
    assert kernels.select("auto", cpu, torch.float32, width=wide) is fused
    assert kernels.select("auto", cpu, torch.float32, width=wide - 1) is kernels.EAGER
    assert IMRAM(ModelConfig(vocab_size=10, embed_size=wide, image_dim=8, word_dim=4)).kernels_for(
        cpu, torch.float32).gate is fused.gate  # (the fp32 matmul backend depends on the CPU: vendor, AVX-512)
    assert IMRAM(ModelConfig(vocab_size=10, embed_size=wide - 1, image_dim=8, word_dim=4)).kernels_for(
        cpu, torch.float32, grad=True).gate is kernels.gate_eager
    compiled = IMRAM(ModelConfig(vocab_size=10, embed_size=wide, image_dim=8, word_dim=4, compile_scoring=True))
    assert compiled.kernels_for(cpu, torch.float32, grad=False) is kernels.EAGER  # the compiled core traces eager
    with pytest.raises(ValueError, match="kernels: expected one of"):
        make(kern="triton")


def fused_matches_eager_and_oracle_fp64(device: str) -> None:
    """The fused (compiled) update against the eager reference on `device`, in fp64 (so any
    difference is a bug, not rounding), scores and every parameter's gradient, through the
    chunked/checkpointed path as well. tests/gpu/check_model_cuda.py runs it on CUDA."""
    eager = make("full", score_memory_mb=0.02).double().to(device)
    fused = make("full", score_memory_mb=0.02, kern="fused").double().to(device)
    regions, tokens, lengths = batch(N=4, M=4)
    regions, tokens = regions.double().to(device), tokens.to(device)
    s_e, s_f = eager(regions, tokens, lengths), fused(regions, tokens, lengths)
    torch.testing.assert_close(s_f, s_e, rtol=0, atol=1e-12)
    with torch.no_grad():
        ref = oracle.forward(copy.deepcopy(eager).cpu(), regions.cpu(), tokens.cpu(), lengths)
        torch.testing.assert_close(s_f.detach().cpu(), ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(fused(regions, tokens, lengths), s_e.detach(), rtol=0, atol=1e-12)
    hinge_loss(s_e, 0.2, False).backward()
    hinge_loss(s_f, 0.2, False).backward()
    for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        ge = torch.zeros_like(pe) if pe.grad is None else pe.grad
        gf = torch.zeros_like(pf) if pf.grad is None else pf.grad
        torch.testing.assert_close(gf, ge, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_kernels_match_eager_and_oracle_fp64_with_gradients():
    fused_matches_eager_and_oracle_fp64("cpu")


@pytest.mark.parametrize("q_rows", [1, 3], ids=["broadcast", "full"])
def test_fused_gate_backward_returns_gradients_of_its_inputs_shapes(q_rows):
    """The fused update's own backward (before autograd's checks, which would silently sum a
    gradient of the wrong shape) returns gradients shaped like a, q and b, with eager's values, for
    the first step's broadcast query and addend as well as for full ones."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(q_rows, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(q_rows, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((kernels.gate_eager(a, q, b) * up).sum(), (a, q, b))
    got = kernels._FusedGate.apply(a, q, b).grad_fn.apply(up)
    assert [tuple(t.shape) for t in got] == [tuple(a.shape), tuple(q.shape), tuple(b.shape)]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


COMPILE_AT_WIDTH = """
import json, re, sys
import torch
from torch._inductor.utils import run_and_get_code
from imram_dist.model import kernels
d = int(sys.argv[1])
bf = torch.bfloat16
a, q, b = torch.randn(1, 1, 2 * d, dtype=bf), torch.randn(1, 1, d, dtype=bf), torch.randn(1, 1, 2 * d, dtype=bf)
report = {}
with torch.no_grad():
    for name, args in (("fwd", (a, q, b)), ("fwd_save", (a, q, b)), ("bwd", (a, q, q.clone()))):
        source = "\\n".join(run_and_get_code(lambda: kernels._call(name, *args))[1])
        lanes = re.findall(r"Vectorized<at::BFloat16>::loadu\\([^;]*static_cast<int64_t>\\((\\d+)\\)\\);", source)
        report[name] = {"parallel": "#pragma omp parallel" in source, "lanes": sorted({int(n) for n in lanes})}
print(json.dumps(report))
"""


def test_fused_kernels_compiled_in_another_process_at_another_width_are_not_reused(tmp_path):
    """Inductor's CPU code depends on the sizes of the call that compiles a graph, also for
    dynamic dims, and its on-disk cache hands that code to later processes (kernels.py, "The width
    is static"). A process that compiled the kernels for one row half a vector wide must not hand
    them to a process at a wider width (in bf16 they would run half-width vectors, and without a
    parallel loop);
    and every kernel has an OpenMP parallel loop however few rows compiled it.
    run_and_get_code also returns code that the on-disk cache served."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def run(d: int) -> dict:
        out = subprocess.run([sys.executable, "-c", COMPILE_AT_WIDTH, str(d)], env=env, check=True,
                             capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # The widths follow this CPU's vector length: 16 and 48 with AVX512's 32 bf16 lanes, 8 and 24
    # with AVX2's 16. Half a vector wide, the kernels run half-width vectors; the wide process must
    # get full ones. Without a vector ISA both run scalar code, and only the parallel loop is checked.
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    lanes = isa.nelements(torch.bfloat16) if isa else 32
    want_narrow, want_wide = ([lanes // 2], [lanes]) if isa else ([], [])
    narrow = run(lanes // 2)
    assert all(r["parallel"] and r["lanes"] == want_narrow for r in narrow.values()), (str(isa), narrow)
    wide = run(3 * lanes // 2)
    assert all(r["parallel"] and r["lanes"] == want_wide for r in wide.values()), (str(isa), wide)


def test_fused_bf16_is_at_least_as_accurate_as_eager_bf16(encoded):
    """In bf16 the fused update computes in fp32 registers and rounds once; eager rounds after
    every pass. Both must meet the rounding yardstick."""
    model, img, cap, lengths = encoded
    fused = copy.deepcopy(model)
    fused.kernels = "fused"
    exact = exact_scores(model, img, cap, lengths)
    yardstick = max_err(exact_scores(model, img, cap, lengths, torch.bfloat16), exact)
    with torch.no_grad():
        e = model.similarity(img.bfloat16(), cap.bfloat16(), lengths)
        f = fused.similarity(img.bfloat16(), cap.bfloat16(), lengths)
    assert max_err(f, exact) <= 3 * yardstick + 2 * SPACING[torch.bfloat16]
    assert max_err(f, e) <= 2 * (yardstick + SPACING[torch.bfloat16])


# ----------------------------------------------------------------------------- oneDNN fp32 matmul

def test_auto_matmul_takes_onednn_for_fp32_on_avx512_x86_cpus_not_made_by_intel(monkeypatch):
    cpu = torch.device("cpu")
    assert kernels.onednn_available()  # the CPU build of torch the project installs has it
    for vendor, avx512, want in (("AuthenticAMD", True, "onednn"), ("HygonGenuine", True, "onednn"),
                                 ("AuthenticAMD", False, "torch"), ("GenuineIntel", True, "torch"),
                                 ("GenuineIntel", False, "torch"), ("", True, "torch")):
        monkeypatch.setattr(kernels, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(kernels, "cpu_has_avx512", lambda a=avx512: a)
        assert kernels.matmul_choice(cpu, torch.float32) == want, (vendor, avx512)
        assert kernels.matmul_choice(cpu, torch.bfloat16) == "torch"
        assert kernels.matmul_choice(cpu, torch.float64) == "torch"
        assert kernels.matmul_choice(torch.device("cuda"), torch.float32) == "torch"
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(kernels, "cpu_has_avx512", lambda: True)
    model = make(fp32_matmul="auto")
    assert model.kernels_for(cpu, torch.float32).linear is kernels.linear_onednn
    assert model.kernels_for(cpu, torch.bfloat16).linear is kernels.linear_torch
    monkeypatch.setattr(kernels, "cpu_has_avx512", lambda: False)
    assert model.kernels_for(cpu, torch.float32).linear is kernels.linear_torch


def test_avx512_comes_from_the_cpu_flags(monkeypatch):
    kernels.cpu_has_avx512.cache_clear()
    try:
        monkeypatch.setattr(kernels, "cpu_info", lambda field: "fpu avx2 avx512f avx512bw" if field == "flags" else "")
        assert kernels.cpu_has_avx512()
        kernels.cpu_has_avx512.cache_clear()
        monkeypatch.setattr(kernels, "cpu_info", lambda field: "fpu avx2 avx512_bf16x" if field == "flags" else "")
        assert not kernels.cpu_has_avx512()
    finally:
        kernels.cpu_has_avx512.cache_clear()


@pytest.mark.parametrize("kern", ["eager", "fused"])
def test_onednn_projection_scores_and_gradients_match_torch_matmul_and_the_oracle(kern):
    """The model with fp32_matmul=onednn against fp32_matmul=torch (same weights): scores and every
    parameter's gradient, through the chunked/checkpointed path, and the scores against the fp64
    oracle."""
    ref = make("full", score_memory_mb=0.02, fp32_matmul="torch")
    one = make("full", score_memory_mb=0.02, fp32_matmul="onednn", kern=kern)
    regions, tokens, lengths = batch(N=5, M=5)
    assert one.kernels_for(torch.device("cpu"), torch.float32, grad=True).linear is kernels.linear_onednn
    s_ref, s_one = ref(regions, tokens, lengths), one(regions, tokens, lengths)
    torch.testing.assert_close(s_one, s_ref, rtol=0, atol=2e-6)
    with torch.no_grad():
        exact = oracle.forward(copy.deepcopy(ref).double(), regions.double(), tokens, lengths)
    # as close to the exact scores as torch's fp32 matmul is, up to a few fp32 ulps (scores ~1)
    assert max_err(s_one, exact) <= 2 * max_err(s_ref, exact) + 1e-6, (max_err(s_one, exact), max_err(s_ref, exact))
    hinge_loss(s_ref, 0.2, False).backward()
    hinge_loss(s_one, 0.2, False).backward()
    for (name, pr), po in zip(ref.named_parameters(), one.parameters()):
        gr = torch.zeros_like(pr) if pr.grad is None else pr.grad
        go = torch.zeros_like(po) if po.grad is None else po.grad
        # relative to the gradient's scale: a few entries are ill-conditioned (see the module docstring)
        err, scale = float((go - gr).abs().max()), float(gr.abs().max())
        assert err <= 1e-4 * scale + 1e-9, (name, err, scale)


@pytest.mark.parametrize("rows", [8, 10**9], ids=["chunked", "whole"])
@pytest.mark.parametrize("linear", [kernels.linear_torch, kernels.linear_onednn], ids=["torch", "onednn"])
def test_projection_matches_one_torch_matmul_with_gradients(linear, rows, monkeypatch):
    """Both backends, in 8-row pieces (37 rows: four whole pieces and a tail of 5) and whole, against
    one torch matmul: the output and the input, weight and bias gradients, with and without bias. oneDNN
    differs from MKL only in summation order, and a piece may get another kernel than the whole, so
    the bound is a few fp32 ulps of the output scale. The strided input is what the eager update
    hands over: a view on the second half of its buffer."""
    monkeypatch.setattr(kernels, "ROW_CHUNK", rows)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for x in (torch.randn(37, 64, generator=g)[:, 32:], torch.randn(37, 32, generator=g), torch.randn(8, 32, generator=g)):
        for b in (None, bias):
            xa, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
            xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
            ba = bb = None
            if b is not None:
                ba, bb = b.clone().requires_grad_(), b.clone().requires_grad_()
            out = linear(xa, wa, ba)
            want = xb @ wb.t() if bb is None else xb @ wb.t() + bb
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-5)
            up = torch.randn(want.shape, generator=g)
            (out * up).sum().backward()
            (want * up).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-6, atol=1e-4)
            if b is not None:
                torch.testing.assert_close(ba.grad, bb.grad, rtol=1e-6, atol=1e-5)
            with torch.no_grad():
                torch.testing.assert_close(linear(x, weight, b), want.detach(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pieces", [True, False], ids=["pieces", "one-matmul"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_gradient_in_pieces_is_as_accurate_as_one_matmul(dtype, pieces, monkeypatch):
    """In half precision on AMX CPUs the projection's weight gradient is summed over 8-row pieces (37
    rows: four whole pieces and a tail of 5) in fp32, each piece's x^T copied contiguous; elsewhere it
    is one matmul. Against the fp64 product either must be as close as one half-precision matmul of
    the whole, i.e. within a few roundings of the result."""
    monkeypatch.setattr(kernels, "ROW_CHUNK", 8)
    monkeypatch.setattr(kernels, "half_weight_grad_in_pieces", lambda: pieces)
    calls = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(a.shape) or real_mm(a, b))
    g = torch.Generator().manual_seed(5)
    x64, up64 = torch.randn(37, 32, generator=g, dtype=torch.float64), torch.randn(37, 48, generator=g, dtype=torch.float64)
    x, up = x64.to(dtype), up64.to(dtype)
    weight = torch.randn(48, 32, generator=g).to(dtype).requires_grad_()
    kernels.linear_torch(x, weight).backward(up)
    exact = up.double().t() @ x.double()  # grad^T @ x of the rounded inputs
    whole = (up.t() @ x).double()
    scale = float(exact.abs().max())
    err, err_whole = float((weight.grad.double() - exact).abs().max()), float((whole - exact).abs().max())
    assert weight.grad.dtype == dtype and weight.grad.shape == (48, 32)
    assert err <= max(2 * err_whole, SPACING[dtype] * scale), (err, err_whole, scale)
    # the weight gradient's matmuls (the input gradient runs through torch.mm): five pieces or one
    wgrad = [c for c in calls if c[0] == 32]
    assert wgrad == ([(32, 8)] * 4 + [(32, 5)] if pieces else [(32, 37)]), calls


def test_half_weight_gradient_pieces_only_on_amx_cpus(monkeypatch):
    """The rule behind half_weight_grad_in_pieces: the amx_bf16 flag, not AVX512-BF16."""
    try:
        for flags, want in (("fpu avx512f avx512_bf16 amx_bf16 amx_tile", True),
                            ("fpu avx512f avx512_bf16", False), ("fpu avx2", False)):
            kernels.half_weight_grad_in_pieces.cache_clear()
            monkeypatch.setattr(kernels, "cpu_info", lambda field, f=flags: f if field == "flags" else "")
            assert kernels.half_weight_grad_in_pieces() is want, flags
    finally:
        kernels.half_weight_grad_in_pieces.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunked_projections_leave_scores_and_gradients_unchanged(dtype, monkeypatch):
    """The whole model with 4-row projection pieces (every projection of this batch is chunked, with a
    ragged tail) against one matmul per projection: the same scores and parameter gradients, fp32 and
    bf16, through the chunked/checkpointed path."""
    regions, tokens, lengths = batch(N=5, M=5)
    runs = []
    for rows in (10**9, 4):
        monkeypatch.setattr(kernels, "ROW_CHUNK", rows)
        model = make("full", score_memory_mb=0.02, kern="fused").to(dtype)
        scores = model(regions.to(dtype), tokens, lengths)
        hinge_loss(scores, 0.2, False).backward()
        runs.append((scores, [p.grad for p in model.parameters()]))
    (s_one, g_one), (s_rows, g_rows) = runs
    torch.testing.assert_close(s_rows, s_one, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-3)
    for a, b in zip(g_rows, g_one):
        if b is not None:  # relative to the gradient's scale, as in the oneDNN test above: a few entries
            # are ill-conditioned, and a matmul of other rows may sum in another order
            err, scale = float((a.float() - b.float()).abs().max()), float(b.float().abs().max())
            assert err <= (1e-4 if dtype == torch.float32 else 2e-2) * scale + 1e-9, (err, scale)
