"""Global-batch negatives across ranks: gather embeddings with gradients, score this rank's
share of the global similarity matrix, and compute the hinge loss so that the SUM of the
per-rank losses equals the single-device loss on the global batch.

Rank r holds images I_r and captions C_r (pair i of the global batch is image i, caption i).
It scores I_r x C_all (rows: its images are queries over every caption) and I_all x C_r
(columns: its captions are queries over every image); the I_r x C_r block is shared, so the
rank pays |I_r| x N + (N - |I_r|) x |C_r| pair scores instead of N x N.

Gradients: `gather_with_grad` is torch.distributed.nn's all_gather, whose backward sums over
ranks the gradient of each rank's slice of the gathered tensor, so each rank's encoder receives d(sum of all ranks'
losses)/d(its embeddings). Each rank's parameter gradient is then its share of the gradient
of the global loss, and the sum over ranks is the full gradient. DeepSpeed (like DDP)
AVERAGES gradients over ranks, so the loss handed to backward is multiplied by the world size
(`grad_scale`): the averaged gradient then equals the 1-worker gradient on the global batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``x`` along dim 0 with gradients flowing back to each rank.

    Ranks may differ in every dimension: all dims are zero-padded to the maximum over ranks,
    dim 0 is then cut back to each rank's own size (other dims stay padded, e.g. caption
    length, which the model masks with the lengths). Returns (gathered, sizes per rank)."""
    rank, world = _world()
    if world == 1:
        return x, [x.shape[0]]
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_l = [[int(v) for v in s.tolist()] for s in shapes]
    maxs = [max(s[d] for s in shapes_l) for d in range(x.dim())]
    pad: list[int] = []
    for d in reversed(range(x.dim())):
        pad += [0, maxs[d] - x.shape[d]]
    xp = F.pad(x, pad) if any(pad) else x
    # torch's differentiable all_gather: backward sums each rank's slice of the gradient over ranks.
    # torch 2.13 marks it deprecated in favour of the private _functional_collectives; it is still
    # the supported autograd-aware gather, so the warning (once per rank per run) is filtered.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        g = dist_nn.all_gather(xp.contiguous())
    sizes = [s[0] for s in shapes_l]
    return torch.cat([g[r][: sizes[r]] for r in range(world)], dim=0), sizes


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (ranks may differ in dim 0 only)."""
    with torch.no_grad():
        out, _ = gather_with_grad(x.detach())
    return out


def all_reduce_sum(value: float | torch.Tensor, device: torch.device | str = "cpu") -> float:
    rank, world = _world()
    t = torch.as_tensor(value, dtype=torch.float64, device=device).detach().clone().reshape(1)
    if world > 1:
        dist.all_reduce(t)
    return float(t.item())


def all_reduce_min(value: int, device: torch.device | str = "cpu") -> int:
    rank, world = _world()
    t = torch.tensor([value], dtype=torch.long, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _default_loss() -> Callable:
    from imram_dist.model import directional_hinge_loss

    return directional_hinge_loss


def sharded_pair_loss(model: nn.Module, regions: torch.Tensor, tokens: torch.Tensor,
                      lengths: torch.Tensor, margin: float, max_violation: bool,
                      loss_fn: Callable | None = None) -> torch.Tensor:
    """This rank's share of the global-batch hinge loss (sum over ranks = single-device loss).

    ``model`` provides encode_images / encode_captions / similarity (imram_dist.model.IMRAM)."""
    loss_fn = loss_fn or _default_loss()
    img = model.encode_images(regions)
    cap = model.encode_captions(tokens, lengths)
    rank, world = _world()
    b = img.shape[0]
    if world == 1:
        scores = model.similarity(img, cap, lengths).float()
        pos = torch.arange(b, device=scores.device)
        return (loss_fn(scores, pos, margin, max_violation, 0)
                + loss_fn(scores, pos, margin, max_violation, 1))
    all_img, sizes = gather_with_grad(img)
    all_cap, _ = gather_with_grad(cap)
    all_len = gather_nograd(lengths)
    off = sum(sizes[:rank])
    n = all_img.shape[0]
    rows = model.similarity(img, all_cap, all_len).float()  # [b, N]: my images vs all captions
    others = torch.cat([all_img[:off], all_img[off + b:]], dim=0)
    if others.shape[0]:
        oth = model.similarity(others, cap, lengths).float()  # [N-b, b]
        cols = torch.cat([oth[:off], rows[:, off:off + b], oth[off:]], dim=0)  # [N, b]
    else:
        cols = rows[:, off:off + b]
    assert cols.shape == (n, b)
    pos = torch.arange(off, off + b, device=rows.device)
    return (loss_fn(rows, pos, margin, max_violation, 0)
            + loss_fn(cols, pos, margin, max_violation, 1))


class PairLoss(nn.Module):
    """The module DeepSpeed wraps: forward(regions, tokens, lengths) -> the loss to backprop,
    i.e. this rank's loss x ``grad_scale`` (the world size; see the module docstring).
    ``self.model`` is the IMRAM model itself (checkpoints and evaluation use it)."""

    def __init__(self, model: nn.Module, margin: float, max_violation: bool, grad_scale: float = 1.0,
                 loss_fn: Callable | None = None):
        super().__init__()
        self.model = model
        self.margin = margin
        self.max_violation = max_violation
        self.grad_scale = grad_scale
        self.loss_fn = loss_fn

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        loss = sharded_pair_loss(self.model, regions, tokens, lengths, self.margin, self.max_violation,
                                 self.loss_fn)
        return loss * self.grad_scale
