"""Recall metrics and evaluation protocols (pure numpy; no model, no torch.distributed).

Tie rule (pessimistic): a query's rank is 1 + the number of *wrong* items whose score is
greater than **or equal to** the best correct item's score. A correct item never beats
itself and never counts against another correct item of the same query, and the rank does
not depend on the order of items. A degenerate model that gives every pair the same score
therefore gets the worst possible ranks, not the best. (The authors' code breaks ties by
the order numpy's argsort happens to return, which is neither documented nor stable.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RECALL_KS = (1, 5, 10)
METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum",
)
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
PROTOCOLS = ("f30k", "coco5k", "coco1k", "1to1", "auto")
NOMINAL_IMAGES = {"f30k": 1000, "coco5k": 5000}


class EvalError(ValueError):
    """Input that cannot be evaluated (wrong shapes, missing split, bad checkpoint); the
    message says what is wrong."""


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def retrieval_ranks(sims: Any, caption_to_image: Any, chunk_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks for every image query (i2t) and every caption query (t2i).

    ``sims`` is [N images, M captions] (numpy array, np.memmap or torch tensor); it is read in
    row chunks of ``chunk_rows`` and never copied whole. ``caption_to_image[j]`` is the image
    of caption j. Image->text rank: the rank of the image's best-ranked caption among all M
    captions. Text->image rank: the rank of the caption's image among all N images. Ties are
    pessimistic (see the module docstring).
    """
    sims = _to_numpy(sims) if not isinstance(sims, np.ndarray) else sims
    c2i = _to_numpy(caption_to_image).astype(np.int64).reshape(-1)
    if sims.ndim != 2:
        raise EvalError(f"similarity matrix must be 2-D [images, captions], got shape {sims.shape}")
    n, m = sims.shape
    if c2i.shape[0] != m:
        raise EvalError(f"caption_to_image has {c2i.shape[0]} entries but the matrix has {m} captions")
    if m and (c2i.min() < 0 or c2i.max() >= n):
        raise EvalError(f"caption_to_image refers to images outside 0..{n - 1}")
    per_image = np.bincount(c2i, minlength=n)
    if n and per_image.min() == 0:
        missing = np.flatnonzero(per_image == 0)
        raise EvalError(f"{missing.size} image(s) have no caption (first: {missing[0]}); "
                        "every image needs at least one caption")
    # Score of each caption with its own image, and each image's best own-caption score.
    pos = np.asarray(sims[c2i, np.arange(m)], dtype=np.float64)
    if not np.all(np.isfinite(pos)):
        raise EvalError("similarity matrix contains NaN or inf")
    best = np.full(n, -np.inf)
    np.maximum.at(best, c2i, pos)
    # Own captions scoring >= the best own score (i.e. tied with it) do not count against it.
    own_at_best = np.bincount(c2i, weights=(pos >= best[c2i]).astype(np.float64), minlength=n)

    i2t_ge = np.zeros(n, dtype=np.int64)
    t2i_ge = np.zeros(m, dtype=np.int64)
    for r0 in range(0, n, chunk_rows):
        block = np.asarray(sims[r0:r0 + chunk_rows], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise EvalError("similarity matrix contains NaN or inf")
        i2t_ge[r0:r0 + block.shape[0]] = (block >= best[r0:r0 + block.shape[0], None]).sum(axis=1)
        t2i_ge += (block >= pos[None, :]).sum(axis=0)
    i2t_rank = 1 + i2t_ge - own_at_best.astype(np.int64)
    t2i_rank = t2i_ge  # the caption's own image is counted once by >=, so this is 1 + wrong ones
    return i2t_rank, t2i_rank


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def retrieval_metrics(sims: Any, caption_to_image: Any, return_ranks: bool = False) -> dict[str, Any]:
    """Image->text and text->image R@1/5/10 (percent), median and mean rank (1-based) and rsum.

    ``sims``: [N, M] scores (numpy, np.memmap or torch), higher = more similar.
    ``caption_to_image``: [M] image index of each caption (``arange(5N) // 5`` for 5 captions
    per image, ``arange(N)`` for 1:1). i2t rank = rank of the image's best-ranked caption;
    t2i rank = rank of the caption's image. R@K = % of queries with rank <= K; medr =
    floor(median rank); rsum = sum of the six recalls. Ties are pessimistic: wrong items
    with a score equal to the correct item's rank ahead of it.
    With ``return_ranks`` the dict also holds ``i2t_ranks`` / ``t2i_ranks`` arrays.
    """
    i2t, t2i = retrieval_ranks(sims, caption_to_image)
    out: dict[str, Any] = {**_summary(i2t, "i2t"), **_summary(t2i, "t2i")}
    out["rsum"] = float(sum(out[k] for k in RECALL_KEYS))
    out = {k: out[k] for k in METRIC_KEYS}
    if return_ranks:
        out["i2t_ranks"], out["t2i_ranks"] = i2t, t2i
    return out


def average_folds(fold_metrics: list[dict[str, Any]]) -> dict[str, float]:
    """COCO 1K: the mean of each metric over folds; rsum = sum of the mean recalls
    (not the mean of per-fold rsums, although the two are equal)."""
    if not fold_metrics:
        raise EvalError("no folds to average")
    out = {k: float(np.mean([f[k] for f in fold_metrics])) for k in METRIC_KEYS if k != "rsum"}
    out["rsum"] = float(sum(out[k] for k in RECALL_KEYS))
    return {k: out[k] for k in METRIC_KEYS}


# ---------------------------------------------------------------------------------------
# Protocols


@dataclass
class Group:
    """One similarity matrix to score: images [i0, i1) against captions [c0, c1)."""

    i0: int
    i1: int
    c0: int
    c1: int
    caption_to_image: np.ndarray  # local image index of each caption in the group

    @property
    def shape(self) -> tuple[int, int]:
        return self.i1 - self.i0, self.c1 - self.c0


@dataclass
class ProtocolPlan:
    protocol: str  # the resolved protocol (never "auto")
    groups: list[Group]
    notes: list[str]


def _five_caption_check(n: int, m: int, c2i: np.ndarray | None, what: str) -> np.ndarray:
    if m != 5 * n:
        raise EvalError(f"protocol {what} needs 5 captions per image: {n} images need {5 * n} "
                        f"captions, the split has {m}")
    expected = np.arange(m) // 5
    if c2i is not None and not np.array_equal(c2i, expected):
        raise EvalError(f"protocol {what}: captions must be stored as 5 consecutive captions per "
                        "image (caption i belongs to image i // 5); this split's caption_to_image differs")
    return expected


def plan_protocol(protocol: str, n_images: int, n_captions: int,
                  caption_to_image: Any = None, fold_images: int = 1000) -> ProtocolPlan:
    """Which matrices a protocol scores, after checking that the split fits it.

    f30k / coco5k: the whole split, 5 consecutive captions per image (nominally 1,000 x 5,000
    and 5,000 x 25,000; other sizes are evaluated the same way and noted). coco1k: folds of
    ``fold_images`` images and their 5x captions, in order. 1to1: caption i <-> image i.
    auto: 5 per image if the counts are exactly 5:1, 1to1 if 1:1, else the split's own
    caption_to_image.
    """
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    n, m = int(n_images), int(n_captions)
    if n == 0 or m == 0:
        raise EvalError(f"empty split: {n} images, {m} captions")
    c2i = None if caption_to_image is None else _to_numpy(caption_to_image).astype(np.int64).reshape(-1)
    if c2i is not None and c2i.shape[0] != m:
        raise EvalError(f"caption_to_image has {c2i.shape[0]} entries for {m} captions")
    notes: list[str] = []
    if protocol == "auto":
        if m == 5 * n and (c2i is None or np.array_equal(c2i, np.arange(m) // 5)):
            protocol = "5x"
        elif m == n and (c2i is None or np.array_equal(c2i, np.arange(m))):
            protocol = "1to1"
        elif c2i is not None:
            return ProtocolPlan("custom", [Group(0, n, 0, m, c2i)], ["caption_to_image taken from the split"])
        else:
            raise EvalError(f"cannot infer a protocol for {n} images and {m} captions "
                            "(neither 5 per image nor 1:1) without caption_to_image")
    if protocol in ("f30k", "coco5k", "5x"):
        local = _five_caption_check(n, m, c2i, protocol)
        nominal = NOMINAL_IMAGES.get(protocol)
        if nominal and n != nominal:
            notes.append(f"{protocol} nominally has {nominal} images; this split has {n}")
        return ProtocolPlan(protocol, [Group(0, n, 0, m, local)], notes)
    if protocol == "1to1":
        if m != n:
            raise EvalError(f"protocol 1to1 needs as many captions as images: {n} images, {m} captions")
        if c2i is not None and not np.array_equal(c2i, np.arange(m)):
            raise EvalError("protocol 1to1: caption i must belong to image i")
        return ProtocolPlan("1to1", [Group(0, n, 0, m, np.arange(m))], notes)
    # coco1k
    _five_caption_check(n, m, c2i, "coco1k")
    if fold_images < 1 or n % fold_images:
        raise EvalError(f"protocol coco1k needs a multiple of {fold_images} images "
                        f"(eval.fold_images); the split has {n}")
    folds = n // fold_images
    if folds != 5:
        notes.append(f"coco1k nominally has 5 folds; this split gives {folds}")
    local = np.arange(5 * fold_images) // 5
    groups = [Group(f * fold_images, (f + 1) * fold_images, 5 * f * fold_images, 5 * (f + 1) * fold_images, local)
              for f in range(folds)]
    return ProtocolPlan("coco1k", groups, notes)


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """A readable table of one result (or of the fold mean), for stdout."""
    lines = [title] if title else []
    lines.append(f"{'direction':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}")
    for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
        lines.append(f"{name:<12}{metrics[d + '_r1']:>8.2f}{metrics[d + '_r5']:>8.2f}"
                     f"{metrics[d + '_r10']:>8.2f}{metrics[d + '_medr']:>8.1f}{metrics[d + '_meanr']:>9.2f}")
    lines.append(f"rsum {metrics['rsum']:.2f}")
    return "\n".join(lines)
