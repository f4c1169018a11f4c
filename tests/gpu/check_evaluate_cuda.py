"""Evaluation on CUDA: the blocked scorer and the local multi-process evaluator (each worker on
its own GPU, rows gathered over gloo) give the CPU's scores and metrics.

Not collected by the CPU suite (no test_ prefix). On a GPU machine:
    python -m pytest tests/gpu/check_evaluate_cuda.py -q
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imram_dist.config import EvalConfig, ModelConfig
from imram_dist.evaluate import evaluate_split
from imram_dist.evaluate.scoring import eval_device
from imram_dist.model import IMRAM


def _model_and_split():
    torch.manual_seed(0)
    model = IMRAM(ModelConfig(image_dim=12, embed_size=16, word_dim=8, vocab_size=30, steps=3)).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (35,), generator=g)
    # a split is anything with regions, tokens, lengths (and caption_to_image): what load_eval_split returns
    split = SimpleNamespace(regions=torch.randn(7, 5, 12, generator=g), tokens=torch.randint(0, 30, (35, 8), generator=g),
                       lengths=lengths, caption_to_image=torch.arange(35) // 5)
    return model, split


CFG = EvalConfig(block_images=3, block_captions=11, image_batch=4)


def test_cuda_evaluation_matches_cpu():
    assert eval_device("auto").type == "cuda"
    model, split = _model_and_split()
    on_cpu = evaluate_split(model, split, "f30k", 1, CFG, keep_sims=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact fp32 (cuDNN's GRU too)
    try:
        on_gpu = evaluate_split(model.cuda(), split, "f30k", 1, CFG, keep_sims=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    np.testing.assert_allclose(np.asarray(on_gpu.sims), np.asarray(on_cpu.sims), rtol=0, atol=1e-5)
    assert on_gpu.metrics == pytest.approx(on_cpu.metrics)
    assert next(model.parameters()).is_cuda  # the caller's model stays where it was put


def test_two_cuda_workers_equal_one():
    """Spawned workers start with torch's default settings, so both sides run with them here."""
    model, split = _model_and_split()
    one = evaluate_split(model.cuda(), split, "f30k", 1, CFG, keep_sims=True)
    two = evaluate_split(model, split, "f30k", 2, CFG, keep_sims=True)
    assert two.workers == 2
    np.testing.assert_allclose(np.asarray(two.sims), np.asarray(one.sims), rtol=0, atol=1e-5)
    assert two.metrics == pytest.approx(one.metrics)
