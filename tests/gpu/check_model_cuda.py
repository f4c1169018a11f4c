"""The same model code on CUDA (fp32 / fp16 / bf16).

Not collected by the CPU suite (the file name has no test_ prefix, so nothing is skipped
there); on a GPU machine run `python -m pytest tests/gpu/check_model_cuda.py` (tests/gpu/run_device.sh
runs it with the other GPU check and benchmarks/bench_model_gpu.py, which has the paper-size timings)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import imram_oracle as oracle  # noqa: E402
from test_model_precision import SPACING, batch, exact_scores, fused_matches_eager_and_oracle_fp64, make, max_err  # noqa: E402

from imram_dist.config import ModelConfig  # noqa: E402
from imram_dist.model import IMRAM, hinge_loss  # noqa: E402


def _small(mode="full", kern="auto", **kw):
    torch.manual_seed(0)
    return IMRAM(ModelConfig(image_dim=10, embed_size=8, word_dim=6, vocab_size=20, mode=mode, steps=3,
                             lambda_softmax=5.0, **kw), kernels=kern)


def _batch(device):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, 5, 10, generator=g).to(device), torch.randint(0, 20, (4, 7), generator=g).to(device),
            torch.tensor([7, 2, 4, 1]))


@pytest.mark.parametrize("kern", ["eager", "fused"])
@pytest.mark.parametrize("mode", ["full", "text", "image"])
def test_cuda_fp32_matches_oracle_and_cpu(mode, kern):
    cpu = _small(mode)
    gpu = _small(mode, kern).cuda()
    regions, tokens, lengths = _batch("cpu")
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's GRU defaults to TF32; compare exact fp32 here
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = oracle.forward(cpu, regions, tokens, lengths)
        out = gpu(regions.cuda(), tokens.cuda(), lengths)  # lengths may stay on the CPU
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_runs_and_trains(dtype):
    model = _small(score_memory_mb=1e-5).cuda()
    regions, tokens, lengths = _batch("cuda")
    with torch.no_grad():
        ref = model(regions, tokens, lengths)
    with torch.autocast("cuda", dtype=dtype):
        img, cap = model.encode_images(regions), model.encode_captions(tokens, lengths)
    s = model.similarity(img.to(dtype), cap.to(dtype), lengths.cuda())
    assert s.dtype == torch.float32 and torch.isfinite(s).all()  # scores are summed in fp32
    torch.testing.assert_close(s.float(), ref, rtol=0, atol=0.1)
    loss = hinge_loss(s[:, :3], 0.2, True)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cuda_fused_kernels_match_eager_and_oracle_fp64_with_gradients():
    """inductor's Triton kernels (the fused update on CUDA), as the CPU suite checks its C++ ones."""
    fused_matches_eager_and_oracle_fp64("cuda")


@pytest.mark.parametrize("kern", ["eager", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_scores_are_as_good_as_rounding_allows(dtype, kern):
    """Half-precision embeddings on CUDA, eager and Triton-fused, against the fp64 oracle within
    3x what rounding the inputs to the dtype costs the exact scores (the CPU suite's yardstick)."""
    model = make(kern=kern)
    regions, tokens, lengths = batch()
    with torch.no_grad():
        img, cap = model.encode_images(regions), model.encode_captions(tokens, lengths)
        exact = exact_scores(model, img, cap, lengths)
        yardstick = max_err(exact_scores(model, img, cap, lengths, dtype), exact)
        s = model.cuda().similarity(img.to(dtype).cuda(), cap.to(dtype).cuda(), lengths)
    assert s.dtype == torch.float32
    assert max_err(s.cpu(), exact) <= 3 * yardstick + 2 * SPACING[dtype]
