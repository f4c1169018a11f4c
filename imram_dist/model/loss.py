"""Hinge triplet losses (VSE++): hardest in-batch negative or the sum of all violations."""

from __future__ import annotations

import torch


def _as_loss_dtype(scores: torch.Tensor) -> torch.Tensor:
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def directional_hinge_loss(scores: torch.Tensor, positives: torch.Tensor, margin: float = 0.2,
                           max_violation: bool = True, query_dim: int = 0) -> torch.Tensor:
    """Hinge loss of one retrieval direction, summed over the queries.

    query_dim=0: row q is a query whose positive is column positives[q] (scores [Q, C]);
    query_dim=1: column q is a query whose positive is row positives[q] (scores [C, Q]).
    Every other entry of the query's row/column is a negative; max_violation keeps the hardest one
    per query, otherwise all violations are summed. Half precision is computed in fp32."""
    if scores.dim() != 2:
        raise ValueError(f"scores: expected a 2-D matrix, got shape {tuple(scores.shape)}")
    if query_dim not in (0, 1):
        raise ValueError(f"query_dim: expected 0 (rows are queries) or 1 (columns are queries), got {query_dim!r}")
    s = _as_loss_dtype(scores)
    if query_dim == 1:
        s = s.t()
    Q, C = s.shape
    positives = torch.as_tensor(positives, device=s.device).long().reshape(-1)
    if positives.shape[0] != Q:
        raise ValueError(f"positives: expected one index per query ({Q}), got {positives.shape[0]}")
    if Q and (int(positives.min()) < 0 or int(positives.max()) >= C):
        raise ValueError(f"positives: expected indices in [0, {C}), got range "
                         f"[{int(positives.min())}, {int(positives.max())}]")
    pos = s.gather(1, positives.unsqueeze(1))  # [Q, 1]
    cost = (margin + s - pos).clamp(min=0)
    is_pos = torch.zeros_like(cost, dtype=torch.bool).scatter_(1, positives.unsqueeze(1), True)
    cost = cost.masked_fill(is_pos, 0)
    if max_violation:
        return cost.max(1)[0].sum() if C else cost.sum()
    return cost.sum()


def hinge_loss(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True) -> torch.Tensor:
    """The authors' ContrastiveLoss on a square [B, B] matrix with positives on the diagonal:
    image queries (rows) plus caption queries (columns), summed over the batch."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square [B, B] matrix (positives on the diagonal), "
                         f"got shape {tuple(scores.shape)}")
    idx = torch.arange(scores.shape[0], device=scores.device)
    return (directional_hinge_loss(scores, idx, margin, max_violation, query_dim=0)
            + directional_hinge_loss(scores, idx, margin, max_violation, query_dim=1))
