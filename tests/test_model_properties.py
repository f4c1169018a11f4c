"""Padding invariance, permutation equivariance, determinism, dtypes, losses."""

from __future__ import annotations

import imram_oracle as oracle
import pytest
import torch

from imram_dist.config import ModelConfig
from imram_dist.model import IMRAM, directional_hinge_loss, hinge_loss

D_IMG, D, WORD, VOCAB = 12, 16, 8, 30


def make(mode="full", seed=0, **kw) -> IMRAM:
    torch.manual_seed(seed)
    return IMRAM(ModelConfig(image_dim=D_IMG, embed_size=D, word_dim=WORD, vocab_size=VOCAB, mode=mode,
                             steps=3, lambda_softmax=9.0, **kw))


def batch(N=4, M=6, R=6, L=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(N, R, D_IMG, generator=g)
    lengths = torch.tensor([9, 3, 1, 2, 7, 5][:M])
    tokens = torch.randint(0, VOCAB, (M, L), generator=g)
    return regions, tokens, lengths


@pytest.mark.parametrize("mode", ["full", "text", "image"])
def test_padding_never_changes_a_score(mode):
    model = make(mode)
    regions, tokens, lengths = batch()
    M, L = tokens.shape
    with torch.no_grad():
        base = model(regions, tokens, lengths)
        # wider padding holding garbage ids (out of vocabulary, negative) beyond each length
        wide = torch.randint(-1000, 1000, (M, L + 5))
        for j, n in enumerate(lengths.tolist()):
            wide[j, :n] = tokens[j, :n]
        torch.testing.assert_close(model(regions, wide, lengths), base, rtol=0, atol=1e-6)
        # garbage (even NaN/Inf) in padded embedding slots, and extra pad columns
        img, cap = model.encode_images(regions), model.encode_captions(tokens, lengths)
        junk = torch.randn(M, L + 3, D) * 100
        junk[:, -1] = float("nan")
        junk[:, -2] = float("inf")
        for j, n in enumerate(lengths.tolist()):
            junk[j, :n] = cap[j, :n]
        torch.testing.assert_close(model.similarity(img, junk, lengths), base, rtol=0, atol=1e-6)
    # and no gradient leaks into padded slots
    cap = cap.clone().requires_grad_(True)
    model.similarity(img, cap, lengths).sum().backward()
    for j, n in enumerate(lengths.tolist()):
        assert torch.all(cap.grad[j, n:] == 0)
    assert torch.isfinite(cap.grad).all()


def test_a_caption_scores_the_same_alone_or_in_a_batch():
    model = make()
    regions, tokens, lengths = batch()
    with torch.no_grad():
        full = model(regions, tokens, lengths)
        for j in range(tokens.shape[0]):
            n = int(lengths[j])
            alone = model(regions, tokens[j:j + 1, :n], lengths[j:j + 1])
            torch.testing.assert_close(alone[:, 0], full[:, j], rtol=0, atol=1e-6)


def test_permuting_inputs_permutes_the_matrix():
    model = make()
    regions, tokens, lengths = batch()
    pi, pc = torch.randperm(4), torch.randperm(6)
    with torch.no_grad():
        base = model(regions, tokens, lengths)
        perm = model(regions[pi], tokens[pc], lengths[pc])
    torch.testing.assert_close(perm, base[pi][:, pc], rtol=0, atol=1e-6)


def test_deterministic_under_a_seed():
    a, b = make(seed=7), make(seed=7)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert not torch.equal(make(seed=8).gate_t2i.weight, a.gate_t2i.weight)
    regions, tokens, lengths = batch()
    with torch.no_grad():
        assert torch.equal(a(regions, tokens, lengths), b(regions, tokens, lengths))
        assert torch.equal(a(regions, tokens, lengths), a(regions, tokens, lengths))


def test_parameter_names_follow_the_authors():
    names = {n.rsplit(".", 1)[0] for n, _ in make().named_parameters()}
    assert names == {"img_enc.fc_local", "txt_enc.embed", "txt_enc.rnn", "linear_t2i", "gate_t2i",
                     "linear_i2t", "gate_i2t"}
    m = make()
    bound = (6 / (D_IMG + D)) ** 0.5
    assert m.img_enc.fc_local.weight.abs().max() <= bound and torch.all(m.img_enc.fc_local.bias == 0)
    assert m.txt_enc.embed.weight.abs().max() <= 0.1


def test_bf16_on_cpu_computes_in_bf16_and_scores_in_fp32():
    """bf16 embeddings (or a bf16 model) run the matmuls in bf16; the scores come out in fp32
    (tests/test_model_precision.py checks the values against the oracle)."""
    model = make()
    regions, tokens, lengths = batch()
    with torch.no_grad():
        ref = model(regions, tokens, lengths)
        img, cap = model.encode_images(regions), model.encode_captions(tokens, lengths)
        low = model.similarity(img.bfloat16(), cap.bfloat16(), lengths)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        torch.testing.assert_close(low, ref, rtol=0, atol=0.1)
        m16 = make().to(torch.bfloat16)
        out = m16(regions, tokens, lengths)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert model.similarity(img.double(), cap.double(), lengths).dtype == torch.float64
    loss = hinge_loss(model(regions[:4], tokens[:4], lengths[:4]).bfloat16(), 0.2, True)
    assert loss.dtype == torch.float32


def test_empty_inputs_give_an_empty_matrix():
    model = make()
    regions, tokens, lengths = batch()
    with torch.no_grad():
        assert model(regions[:0], tokens, lengths).shape == (0, 6)
        assert model(regions, tokens[:0], lengths[:0]).shape == (4, 0)


# ----------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("max_violation", [True, False])
def test_hinge_loss_matches_the_elementwise_definition(max_violation):
    s = torch.randn(6, 6, dtype=torch.float64)
    torch.testing.assert_close(hinge_loss(s, 0.2, max_violation), oracle.hinge_loss(s, 0.2, max_violation))
    # the authors' training code scores captions x images; the loss does not care
    torch.testing.assert_close(hinge_loss(s.t(), 0.2, max_violation), hinge_loss(s, 0.2, max_violation))


@pytest.mark.parametrize("max_violation", [True, False])
def test_directional_losses_split_the_symmetric_one(max_violation):
    s = torch.randn(8, 8, dtype=torch.float64)
    idx = torch.arange(8)
    rows = directional_hinge_loss(s, idx, 0.2, max_violation, query_dim=0)
    cols = directional_hinge_loss(s, idx, 0.2, max_violation, query_dim=1)
    torch.testing.assert_close(rows + cols, hinge_loss(s, 0.2, max_violation))
    # distributed layout: rank r holds images/captions [4r, 4r+4); rows = local images x all captions,
    # cols = all images x local captions; summing over ranks gives the global loss
    total = sum(directional_hinge_loss(s[4 * r:4 * r + 4], idx[4 * r:4 * r + 4], 0.2, max_violation, 0)
                + directional_hinge_loss(s[:, 4 * r:4 * r + 4], idx[4 * r:4 * r + 4], 0.2, max_violation, 1)
                for r in range(2))
    torch.testing.assert_close(total, hinge_loss(s, 0.2, max_violation))


def test_loss_bad_inputs_say_what_was_expected():
    with pytest.raises(ValueError, match="square"):
        hinge_loss(torch.zeros(2, 3), 0.2, True)
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        directional_hinge_loss(torch.zeros(2, 3), torch.tensor([0, 3]), 0.2, True, 0)
    with pytest.raises(ValueError, match="one index per query"):
        directional_hinge_loss(torch.zeros(2, 3), torch.tensor([0]), 0.2, True, 0)
    with pytest.raises(ValueError, match="query_dim"):
        directional_hinge_loss(torch.zeros(2, 2), torch.tensor([0, 1]), 0.2, True, 2)


# ------------------------------------------------------------------------- compiled scoring

def test_compiled_scoring_matches_eager_and_oracle():
    """config.compile_scoring: the no-grad path runs the torch.compile'd core (dynamic shapes), the
    grad path stays eager; ragged chunks (several block shapes, a new batch size) reuse the graph."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    eager = make("full", score_memory_mb=0.02)
    comp = make("full", score_memory_mb=0.02, compile_scoring=True)
    regions, tokens, lengths = batch()
    with torch.no_grad():
        ref = oracle.forward(eager, regions, tokens, lengths)
        for n, m in ((4, 6), (3, 5), (4, 6)):
            a = comp(regions[:n], tokens[:m], lengths[:m])
            torch.testing.assert_close(a, eager(regions[:n], tokens[:m], lengths[:m]), rtol=0, atol=1e-6)
            torch.testing.assert_close(a, ref[:n, :m], rtol=0, atol=1e-5)
    assert comp._compiled_block is not None
    # bounded: one dynamic-shape graph plus size-1 specialisations, never more than dynamo's limit
    assert counters["stats"]["unique_graphs"] <= torch._dynamo.config.recompile_limit, dict(counters["stats"])
    # with autograd the eager core runs (the compiled one is never traced with grad)
    s = comp(regions, tokens[:4], lengths[:4])
    torch.testing.assert_close(s.detach(), ref[:, :4], rtol=0, atol=1e-5)
    hinge_loss(s, 0.2, True).backward()
    assert all(torch.isfinite(p.grad).all() for p in comp.parameters() if p.grad is not None)


def test_default_budget_trains_a_batch_of_32_at_paper_sizes_in_one_chunk():
    """model.score_memory_mb's default holds the 1,024 pairs of a batch of 32 (d=1024, R=36, ~12-word
    captions padded to 16, K=3) in one chunk, so backward recomputes nothing (docs/model.md)."""
    from imram_dist.model.scoring import bytes_per_pair

    per_pair = bytes_per_pair(36, 12.3, 16, 1024, 3, True, True, 4, grad=True)
    assert 1.5e6 <= per_pair <= 1.9e6  # the measured peak: 1.5 (fused) - 1.7 (eager) MB per pair
    assert ModelConfig().score_memory_mb * 2**20 // per_pair >= 32 * 32


# ------------------------------------------------------------------------- short softmax rows

@pytest.mark.parametrize("row", [1, 9, 15, 16, 36])
def test_softmax_last_matches_torch_softmax_with_gradients(row):
    """scoring.softmax_last (its own passes below SHORT_SOFTMAX_ROW, torch's softmax from there):
    values and gradients equal torch.softmax's in fp64, masked (-inf) entries give 0 and get no
    gradient, and a large shift (scores near lambda) neither overflows nor changes a weight."""
    from imram_dist.model.scoring import softmax_last

    g = torch.Generator().manual_seed(row)
    x = (torch.randn(3, 5, row, generator=g, dtype=torch.float64) * 9).requires_grad_()
    mask = torch.rand(3, 5, row, generator=g) < 0.3
    mask[..., 0] = False  # every row keeps an entry, as every caption keeps a word
    w = torch.randn(3, 5, row, generator=g, dtype=torch.float64)
    for shift in (0.0, 80.0):
        ours = softmax_last((x + shift).masked_fill(mask, float("-inf")))
        ref = torch.softmax((x + shift).masked_fill(mask, float("-inf")), dim=-1)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
        assert bool((ours[mask] == 0).all())
        (d_ours,) = torch.autograd.grad((ours * w).sum(), x)
        (d_ref,) = torch.autograd.grad((ref * w).sum(), x)
        torch.testing.assert_close(d_ours, d_ref, rtol=1e-10, atol=1e-12)
        assert bool((d_ours[mask] == 0).all())
    with torch.no_grad():  # fp32 with a shift that would overflow exp() without the row max
        big = torch.softmax(x.detach().float() + 100.0, dim=-1)
        torch.testing.assert_close(softmax_last(x.detach().float() + 100.0), big, rtol=1e-6, atol=1e-7)


def test_segment_sum_is_the_per_caption_sum():
    """scoring.segment_sum: the packed words' sums per caption, for [n, T, R] and [n, T] inputs,
    exact in fp64 against a loop over the captions' word ranges."""
    from imram_dist.model.scoring import segment_sum

    lengths = [3, 1, 4, 2, 6]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    g = torch.Generator().manual_seed(0)
    for shape in ((3, len(seg), 7), (3, len(seg))):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        out = segment_sum(x, seg, len(lengths))
        start = 0
        for j, n_words in enumerate(lengths):
            torch.testing.assert_close(out[:, j], x[:, start:start + n_words].sum(1), rtol=0, atol=1e-14)
            start += n_words
        assert out.shape == (3, len(lengths), *shape[2:])
