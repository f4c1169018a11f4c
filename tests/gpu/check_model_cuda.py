"""The same model code on CUDA (fp32 / fp16 / bf16).

Not collected by the CPU suite (the file name has no test_ prefix, so nothing is skipped
there); on a GPU machine run `python -m pytest tests/gpu/check_model_cuda.py` or run it as
a script for the paper-size timings."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import imram_oracle as oracle  # noqa: E402

from imram_dist.config import ModelConfig  # noqa: E402
from imram_dist.model import IMRAM, hinge_loss  # noqa: E402


def _small(mode="full", **kw):
    torch.manual_seed(0)
    return IMRAM(ModelConfig(image_dim=10, embed_size=8, word_dim=6, vocab_size=20, mode=mode, steps=3,
                             lambda_softmax=5.0, **kw))


def _batch(device):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, 5, 10, generator=g).to(device), torch.randint(0, 20, (4, 7), generator=g).to(device),
            torch.tensor([7, 2, 4, 1]))


@pytest.mark.parametrize("mode", ["full", "text", "image"])
def test_cuda_fp32_matches_oracle_and_cpu(mode):
    cpu = _small(mode)
    gpu = _small(mode).cuda()
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


def paper_size_speed():
    torch.manual_seed(0)
    for mode in ("text", "image", "full"):
        for dtype in (torch.float32, torch.bfloat16):
            model = IMRAM(ModelConfig(vocab_size=1000, mode=mode, score_memory_mb=4096)).cuda().eval()
            img = torch.nn.functional.normalize(torch.randn(128, 36, 1024, device="cuda"), dim=-1).to(dtype)
            lengths = torch.randint(8, 17, (640,))
            cap = torch.nn.functional.normalize(torch.randn(640, 16, 1024, device="cuda"), dim=-1).to(dtype)
            with torch.no_grad():
                model.similarity(img, cap, lengths)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(3):
                    model.similarity(img, cap, lengths)
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / 3
            print(f"{mode:5s} {str(dtype):15s} {128 * 640 / dt:10.0f} pairs/s", flush=True)
    model = IMRAM(ModelConfig(vocab_size=1000, mode="full")).cuda()
    regions = torch.randn(128, 36, 2048, device="cuda")
    lengths = torch.randint(8, 17, (128,))
    tokens = torch.randint(4, 1000, (128, 16), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    hinge_loss(model(regions, tokens, lengths), 0.2, True).backward()
    torch.cuda.synchronize()
    print(f"train step batch 128 full fp32: {time.perf_counter() - t:.2f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    for mode in ("full", "text", "image"):
        test_cuda_fp32_matches_oracle_and_cpu(mode)
    print("fp32 vs oracle: ok", flush=True)
    for dt in (torch.float16, torch.bfloat16):
        test_cuda_half_precision_runs_and_trains(dt)
    print("fp16/bf16: ok", flush=True)
    paper_size_speed()
