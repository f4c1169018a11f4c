"""The fast, factorised, chunked IMRAM scoring against the literal per-pair oracle (imram_oracle.py)."""

from __future__ import annotations

import imram_oracle as oracle
import pytest
import torch

from imram_dist.config import ModelConfig
from imram_dist.model import IMRAM, hinge_loss

D_IMG, D, WORD, VOCAB = 10, 8, 6, 23


def make(mode="full", steps=3, renorm=False, seed=0, **kw) -> IMRAM:
    torch.manual_seed(seed)
    cfg = ModelConfig(image_dim=D_IMG, embed_size=D, word_dim=WORD, vocab_size=VOCAB, mode=mode,
                      steps=steps, lambda_softmax=5.0, renorm_query=renorm, **kw)
    return IMRAM(cfg)


def batch(N=3, M=4, R=5, L=7, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(N, R, D_IMG, generator=g, dtype=dtype)
    lengths = torch.tensor([L, 2, 4, 1, 5, 3, 6][:M])
    tokens = torch.randint(0, VOCAB, (M, L), generator=g)
    return regions, tokens, lengths


@pytest.mark.parametrize("mode", ["text", "image", "full"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("renorm", [False, True])
def test_scores_match_oracle_fp32(mode, steps, renorm):
    model = make(mode, steps, renorm)
    regions, tokens, lengths = batch()
    with torch.no_grad():
        fast = model(regions, tokens, lengths)
        ref = oracle.forward(model, regions, tokens, lengths)
    assert fast.shape == (3, 4) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    # the same numbers with autograd on (the training path)
    torch.testing.assert_close(model(regions, tokens, lengths).detach(), fast, rtol=0, atol=1e-6)


def test_similarity_matches_oracle_on_encoded_inputs():
    model = make("full", 3)
    regions, tokens, lengths = batch(N=4, M=5)
    with torch.no_grad():
        img, cap = model.encode_images(regions), model.encode_captions(tokens, lengths)
        torch.testing.assert_close(model.similarity(img, cap, lengths),
                                   oracle.similarity(model, img, cap, lengths), rtol=0, atol=1e-5)


def _grads(model, loss):
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # the other direction's MDU is unused
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("mode,steps,renorm,max_violation", [
    ("full", 3, False, True), ("full", 2, True, False), ("text", 3, False, False), ("image", 3, True, True),
])
def test_gradients_match_oracle_fp64(mode, steps, renorm, max_violation):
    model = make(mode, steps, renorm).double()
    regions, tokens, lengths = batch(N=4, M=4, dtype=torch.float64)
    fast = _grads(model, hinge_loss(model(regions, tokens, lengths), 0.2, max_violation))
    ref = _grads(model, oracle.hinge_loss(oracle.forward(model, regions, tokens, lengths), 0.2, max_violation))
    for (name, _), a, b in zip(model.named_parameters(), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def _count_blocks(model):
    calls = []
    inner = model._block

    def counting(*args, **kw):
        calls.append(args[0].shape[0] * args[5].shape[0])
        return inner(*args, **kw)

    model._block = counting
    return calls


@pytest.mark.parametrize("budget_mb", [1e-6, 0.004])
def test_chunked_path_matches_oracle_with_and_without_grad(budget_mb):
    model = make("full", 3, score_memory_mb=budget_mb).double()
    calls = _count_blocks(model)
    regions, tokens, lengths = batch(N=4, M=4, dtype=torch.float64)
    with torch.no_grad():
        fast = model(regions, tokens, lengths)
    n_eval = len(calls)
    assert n_eval > 1, "the budget was meant to force several chunks"
    ref = oracle.forward(model, regions, tokens, lengths)
    torch.testing.assert_close(fast, ref.detach(), rtol=0, atol=1e-10)
    calls.clear()
    scores = model(regions, tokens, lengths)
    torch.testing.assert_close(scores.detach(), ref.detach(), rtol=0, atol=1e-10)
    loss = hinge_loss(scores, 0.2, True)
    g_fast = _grads(model, loss)
    assert len(calls) == 2 * n_eval  # forward, then each chunk recomputed in backward (checkpointing)
    g_ref = _grads(model, oracle.hinge_loss(ref, 0.2, True))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_chunked_fp32_equals_single_chunk():
    big = make("full", 3)
    small = make("full", 3, score_memory_mb=0.002)
    regions, tokens, lengths = batch(N=5, M=6)
    with torch.no_grad():
        torch.testing.assert_close(small(regions, tokens, lengths), big(regions, tokens, lengths),
                                   rtol=0, atol=1e-5)
