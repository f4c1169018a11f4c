"""Global-batch negatives: 2 ranks x 8 pairs give the same loss and gradients as 1 rank x 16
(torch.multiprocessing + gloo, no Ray/DeepSpeed, a few seconds)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from imram_dist.train.dist import PairLoss, gather_with_grad, sharded_pair_loss


def ref_directional(scores, positives, margin, max_violation, query_dim):
    if query_dim == 1:
        scores = scores.t()
    q = torch.arange(scores.shape[0])
    pos = scores[q, positives][:, None]
    cost = (margin + scores - pos).clamp(min=0)
    cost = cost.masked_fill(torch.zeros_like(cost, dtype=torch.bool).index_put_((q, positives), torch.tensor(True)), 0)
    return cost.max(1)[0].sum() if max_violation else cost.sum()


class ToyModel(nn.Module):
    """encode/similarity with the IMRAM API shapes and padding-invariant captions."""

    def __init__(self, dim=6, vocab=20, d=5):
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(dim, d)
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def encode_images(self, regions):
        return self.img(regions)

    def encode_captions(self, tokens, lengths):
        return self.emb(tokens)

    def similarity(self, img, cap, lengths):
        mask = (torch.arange(cap.shape[1])[None, :] < lengths[:, None]).to(cap.dtype)
        c = (cap * mask[..., None]).sum(1) / lengths[:, None].to(cap.dtype)
        i = self.mix(img.mean(1))
        return torch.tanh(i) @ torch.tanh(c).t()


def make_batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, 4, 6, generator=g)
    lengths = torch.randint(3, 9, (n,), generator=g)
    tokens = torch.randint(4, 20, (n, 8), generator=g)
    tokens[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return regions, tokens, lengths


def make_model(kind):
    if kind == "toy":
        return ToyModel(), ref_directional, 6
    from imram_dist.config import ModelConfig
    from imram_dist.model import IMRAM, directional_hinge_loss

    torch.manual_seed(0)
    cfg = ModelConfig(image_dim=6, embed_size=8, word_dim=5, vocab_size=20, steps=2)
    return IMRAM(cfg), directional_hinge_loss, 6


def single(kind):
    model, loss_fn, _ = make_model(kind)
    regions, tokens, lengths = make_batch()
    loss = sharded_pair_loss(model, regions, tokens, lengths, 0.2, True, loss_fn)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, world, init_file, kind, out_dir, uneven):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, loss_fn, _ = make_model(kind)
    regions, tokens, lengths = make_batch()
    cut = [0, 5, 16] if uneven else [0, 8, 16]
    sl = slice(cut[rank], cut[rank + 1])
    r, t, n = regions[sl], tokens[sl], lengths[sl]
    t = t[:, : int(n.max())]  # ranks see different padded lengths
    wrapped = PairLoss(model, 0.2, True, grad_scale=world, loss_fn=loss_fn)
    scaled = wrapped(r, t, n)
    scaled.backward()
    # What DeepSpeed / DDP do: average gradients over ranks.
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    loss = scaled.detach() / world
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss.item(), "grads": {k: p.grad for k, p in model.named_parameters()}},
                   os.path.join(out_dir, "out.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind,uneven", [("toy", False), ("toy", True), ("imram", False)])
def test_two_ranks_equal_one_rank(kind, uneven):
    ref_loss, ref_grads = single(kind)
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, os.path.join(d, "init"), kind, d, uneven), nprocs=2,
                           start_method="spawn", join=True)
        out = torch.load(os.path.join(d, "out.pt"))
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for k, g in ref_grads.items():
        torch.testing.assert_close(out["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_gather_single_process_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    y, sizes = gather_with_grad(x)
    assert y is x and sizes == [3]
