"""Blocked and distributed scoring of every (image, caption) pair.

Images and captions are encoded once (``model.encode_images`` / ``model.encode_captions``),
then ``model.similarity`` scores image-block x caption-block pairs. The block grid is fixed
by the config alone (``eval.block_images`` x ``eval.block_captions``, starting at the first
image/caption of the matrix) and never by the number of workers, so every block, and every
score, is computed exactly as in one process. With ``world_size`` W, rank r scores a
contiguous run of image blocks against all captions; the rows are then sent to rank 0 over
torch.distributed (gloo or nccl), straight into the one images x captions matrix.

The same functions serve training's dev evaluation inside Ray Train workers
(:func:`distributed_evaluate` with an initialised process group) and the CLI
(:func:`evaluate_split` with ``workers`` local processes).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.elastic.utils.distributed import get_free_port

from imram_dist.config import ConfigError, EvalConfig
from imram_dist.evaluate.metrics import (
    EvalError,
    Group,
    ProtocolPlan,
    average_folds,
    plan_protocol,
    retrieval_metrics,
)
from imram_dist.model import unwrap
from imram_dist.model.kernels import slow_bf16_note

CaptionBlocks = list  # list of (c0, emb [b, Lb, d], lengths [b]) in caption order


# ---------------------------------------------------------------------------------------
# Helpers


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _dtype(model: Any) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def scoring_dtype(precision: str) -> torch.dtype:
    """The dtype embeddings are scored in for ``eval.precision`` (the encoders always run in the
    model's own dtype; bf16 scoring keeps attention, norms, cosines and scores in fp32)."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise EvalError(f"eval.precision: expected one of {sorted(PRECISIONS)}, got {precision!r}") from None


def eval_device(name: str) -> torch.device:
    """The device ``eval.device`` (auto, cpu or cuda: the config checks the choice) names: "auto"
    is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device=cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False: a "
                          f"CPU build of torch {torch.__version__}, or no driver); use eval.device=cpu or auto")
    return torch.device(name)


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t if dtype is None else t.to(dtype)


def image_rows(n_images: int, rank: int, world_size: int, block_images: int) -> tuple[int, int]:
    """The contiguous image rows [r0, r1) that ``rank`` scores: whole blocks of the fixed
    block grid, split as evenly as possible over ranks (a rank may get none)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    n_blocks = -(-n_images // block_images)
    b0, b1 = rank * n_blocks // world_size, (rank + 1) * n_blocks // world_size
    return min(b0 * block_images, n_images), min(b1 * block_images, n_images)


def allocate_scores(shape: tuple[int, ...], memmap_mb: int = 1024, path: str | os.PathLike | None = None) -> np.ndarray:
    """The one float32 score matrix: an .npy memmap at ``path`` (when given, or a temporary
    ``imram_sims_*.npy`` file when larger than ``memmap_mb``; the evaluate functions delete
    that file unless the matrix is returned), else an array in memory."""
    nbytes = int(np.prod(shape)) * 4
    if path is None and nbytes <= memmap_mb * 2**20:
        return np.zeros(shape, dtype=np.float32)
    if path is None:
        fd, path = tempfile.mkstemp(suffix=".npy", prefix="imram_sims_")
        os.close(fd)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=tuple(shape))


# ---------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_images(model: Any, regions: Any, i0: int = 0, i1: int | None = None, batch: int = 128) -> torch.Tensor:
    """``model.encode_images`` over images [i0, i1) in batches of ``batch`` (grid from i0)."""
    model = unwrap(model)
    regions = _as_tensor(regions)
    i1 = regions.shape[0] if i1 is None else i1
    dev = _device(model)
    dtype = _dtype(model)
    parts = [model.encode_images(regions[a:min(a + batch, i1)].to(dev, dtype)).float().cpu()
             for a in range(i0, i1, batch)]
    return torch.cat(parts) if parts else torch.empty(0)


@torch.no_grad()
def encode_captions(model: Any, tokens: Any, lengths: Any, c0: int = 0, c1: int | None = None,
                    block: int = 640) -> CaptionBlocks:
    """``model.encode_captions`` over captions [c0, c1) in blocks of ``block`` (grid from c0),
    each block trimmed to its longest caption. Returns [(start, emb [b, Lb, d], lengths [b])]
    with start relative to c0."""
    model = unwrap(model)
    tokens, lengths = _as_tensor(tokens, torch.long), _as_tensor(lengths, torch.long)
    c1 = tokens.shape[0] if c1 is None else c1
    dev = _device(model)
    out: CaptionBlocks = []
    for a in range(c0, c1, block):
        b = min(a + block, c1)
        lens = lengths[a:b]
        longest = int(lens.max())
        emb = model.encode_captions(tokens[a:b, :longest].to(dev), lens.to(dev)).float().cpu()
        out.append((a - c0, emb, lens))
    return out


def _caption_blocks(caption_emb: Any, lengths: Any, block: int) -> CaptionBlocks:
    if isinstance(caption_emb, list):
        return caption_emb
    lengths = _as_tensor(lengths, torch.long)
    out = []
    for a in range(0, caption_emb.shape[0], block):
        lens = lengths[a:a + block]
        out.append((a, caption_emb[a:a + block, :int(lens.max())], lens))
    return out


# ---------------------------------------------------------------------------------------
# Scoring


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit="pair", unit_scale=True, desc=desc, smoothing=0.1,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} pairs [{elapsed}<{remaining}, {rate_fmt}]")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def score_matrix(model: Any, image_emb: torch.Tensor, caption_emb: torch.Tensor | CaptionBlocks, lengths: Any = None,
                 rank: int = 0, world_size: int = 1, out: Any = None, *, block_images: int | None = None,
                 block_captions: int | None = None, progress: bool = False,
                 precision: str | None = None) -> tuple[Any, tuple[int, int]]:
    """Score this rank's image rows against all captions, block by block.

    ``image_emb``: [N, R, d] embeddings of all N images of the matrix; ``caption_emb``:
    [M, L, d] with ``lengths`` [M], or the blocks returned by :func:`encode_captions`.
    Rank ``rank`` of ``world_size`` scores rows [r0, r1) (:func:`image_rows`) into ``out``
    ([r1 - r0, M], float32; allocated when None; numpy, np.memmap or torch). Returns
    ``(out, (r0, r1))``. Block sizes and ``precision`` ("fp32" or "bf16": the dtype the
    embeddings are scored in) default to :class:`EvalConfig`'s.
    """
    defaults = EvalConfig()
    block_images = block_images or defaults.block_images
    block_captions = block_captions or defaults.block_captions
    dtype = scoring_dtype(precision or defaults.precision)
    model = unwrap(model)
    blocks = _caption_blocks(caption_emb, lengths, block_captions)
    n = image_emb.shape[0]
    m = sum(int(e.shape[0]) for _, e, _ in blocks)
    r0, r1 = image_rows(n, rank, world_size, block_images)
    if out is None:
        out = np.zeros((r1 - r0, m), dtype=np.float32)
    if tuple(out.shape) != (r1 - r0, m):
        raise ValueError(f"out has shape {tuple(out.shape)}; rank {rank} needs {(r1 - r0, m)}")
    dev = _device(model)
    bar = _Progress((r1 - r0) * m, progress and rank == 0,
                    "scoring" if world_size == 1 else f"scoring (rank 0 of {world_size})")
    torch_out = isinstance(out, torch.Tensor)
    try:
        for a in range(r0, r1, block_images):
            b = min(a + block_images, r1)
            imgs = image_emb[a:b].to(dev, dtype)
            for c0, emb, lens in blocks:
                s = model.similarity(imgs, emb.to(dev, dtype), lens.to(dev)).float().cpu()
                c1 = c0 + emb.shape[0]
                if torch_out:
                    out[a - r0:b - r0, c0:c1] = s
                else:
                    out[a - r0:b - r0, c0:c1] = s.numpy()
                bar.update((b - a) * (c1 - c0))
    finally:
        bar.close()
    return out, (r0, r1)


def gather_rows(local: Any, n_images: int, block_images: int, out: Any = None, dst: int = 0,
                chunk_mb: int = 64) -> Any:
    """Send every rank's rows (from :func:`score_matrix`) to rank ``dst``, into ``out``
    ([N, M]: numpy, np.memmap or torch), in chunks of about ``chunk_mb``. Needs an
    initialised torch.distributed process group; returns ``out`` on dst, None elsewhere.
    On dst, ``local=None`` means its own rows are already in place in ``out``."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    m = (out if rank == dst and out is not None else local).shape[-1]
    rows_per_chunk = max(1, (chunk_mb * 2**20) // max(1, 4 * m))
    backend = dist.get_backend()
    comm_dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if rank == dst:
        if out is None:
            out = np.zeros((n_images, m), dtype=np.float32)
        r0, r1 = image_rows(n_images, rank, world, block_images)
        if r1 > r0 and local is not None:
            out[r0:r1] = local[:] if not isinstance(out, torch.Tensor) else _as_tensor(np.asarray(local))
        for src in range(world):
            if src == dst:
                continue
            s0, s1 = image_rows(n_images, src, world, block_images)
            for a in range(s0, s1, rows_per_chunk):
                b = min(a + rows_per_chunk, s1)
                buf = torch.empty((b - a, m), dtype=torch.float32, device=comm_dev)
                dist.recv(buf, src=src)
                buf = buf.cpu()
                if isinstance(out, torch.Tensor):
                    out[a:b] = buf
                else:
                    out[a:b] = buf.numpy()
        return out
    r0, r1 = image_rows(n_images, rank, world, block_images)
    for a in range(r0, r1, rows_per_chunk):
        b = min(a + rows_per_chunk, r1)
        chunk = _as_tensor(np.ascontiguousarray(local[a - r0:b - r0]) if not isinstance(local, torch.Tensor)
                           else local[a - r0:b - r0].contiguous()).to(comm_dev)
        dist.send(chunk, dst=dst)
    return None


# ---------------------------------------------------------------------------------------
# Whole evaluations


@dataclass
class EvalResult:
    """The outcome of one evaluation."""

    protocol: str
    metrics: dict[str, float]
    """The reported numbers (for coco1k: the mean over folds)."""
    folds: list[dict[str, float]] = field(default_factory=list)
    """Per-fold metrics (coco1k only)."""
    n_images: int = 0
    n_captions: int = 0
    pairs: int = 0
    seconds: float = 0.0
    """Wall time of the whole evaluation (worker start-up, encoding, scoring, metrics)."""
    score_seconds: float = 0.0
    """Wall time of encoding + scoring alone (rank 0), without process start-up and metrics."""
    workers: int = 1
    notes: list[str] = field(default_factory=list)
    sims: Any = None
    """The score matrix ([N, M], or [folds, n, m] for coco1k) where it was kept; None otherwise."""

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol, "metrics": self.metrics, "folds": self.folds,
            "images": self.n_images, "captions": self.n_captions, "pairs": self.pairs,
            "seconds": round(self.seconds, 3), "score_seconds": round(self.score_seconds, 3),
            "pairs_per_s": round(self.pairs / self.score_seconds, 1) if self.score_seconds > 0 else None,
            "workers": self.workers, "notes": self.notes,
        }


def _split_arrays(eval_split: Any) -> tuple[Any, Any, Any, Any]:
    try:
        return eval_split.regions, eval_split.tokens, eval_split.lengths, getattr(eval_split, "caption_to_image", None)
    except AttributeError as e:
        raise EvalError(f"not an EvalSplit (needs regions, tokens, lengths): {e}") from None


def check_compatible(model: Any, eval_split: Any) -> None:
    """Clear errors for a model that cannot score this data (feature width, vocabulary)."""
    model = unwrap(model)
    regions, tokens, lengths, _ = _split_arrays(eval_split)
    if len(regions.shape) != 3:
        raise EvalError(f"regions must be [images, regions, features], got shape {tuple(regions.shape)}")
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    width = getattr(cfg, "image_dim", None)
    if width is not None and int(regions.shape[-1]) != int(width):
        raise EvalError(f"the model expects {width}-dim region features (model.image_dim) but the data "
                        f"has {regions.shape[-1]}-dim features: wrong checkpoint for this dataset?")
    vocab = getattr(cfg, "vocab_size", 0) or 0
    if vocab and len(tokens) and int(_as_tensor(tokens).max()) >= vocab:
        raise EvalError(f"caption token ids go up to {int(_as_tensor(tokens).max())} but the model's "
                        f"vocabulary has {vocab} words: the data was tokenised with another vocabulary")
    if len(lengths) == 0:
        raise EvalError("the split has no captions")
    if int(_as_tensor(lengths).min()) < 1:
        raise EvalError("every caption needs at least one token")


def _plan(eval_split: Any, protocol: str, cfg: EvalConfig, model: Any) -> ProtocolPlan:
    regions, tokens, _, c2i = _split_arrays(eval_split)
    plan = plan_protocol(protocol, regions.shape[0], tokens.shape[0], c2i, cfg.fold_images)
    if scoring_dtype(cfg.precision) == torch.bfloat16 and (note := slow_bf16_note(_device(unwrap(model)))):
        plan.notes.append(f"eval.precision=bf16: {note}")
    return plan


def _storage_shape(plan: ProtocolPlan) -> tuple[int, ...]:
    if len(plan.groups) == 1:
        return plan.groups[0].shape
    return (len(plan.groups), *plan.groups[0].shape)


def _group_view(sims: Any, plan: ProtocolPlan, g: int) -> Any:
    return sims if len(plan.groups) == 1 else sims[g]


def _release(sims: Any, keep: bool, own_path: str | os.PathLike | None) -> Any:
    """Flush a memmap; delete a temporary one (not the caller's --save-sims file) unless kept."""
    if isinstance(sims, np.memmap):
        sims.flush()
        if not keep and own_path is None:
            name = sims.filename
            del sims
            try:
                os.unlink(name)
            except OSError:
                pass
            return None
    return sims if keep else None


def _metrics_from(sims: Any, plan: ProtocolPlan) -> tuple[dict[str, float], list[dict[str, float]]]:
    per = [retrieval_metrics(_group_view(sims, plan, g), grp.caption_to_image) for g, grp in enumerate(plan.groups)]
    if len(per) == 1:
        return per[0], []
    return average_folds(per), per


def _score_groups(model: Any, eval_split: Any, plan: ProtocolPlan, cfg: EvalConfig, rank: int, world: int,
                  sims: Any, progress: bool) -> None:
    """Encode and score every group of the plan; rows go to rank 0's ``sims`` (if distributed)."""
    import torch.distributed as dist

    regions, tokens, lengths, _ = _split_arrays(eval_split)
    distributed = world > 1
    for g, grp in enumerate(plan.groups):
        n, m = grp.shape
        r0, r1 = image_rows(n, rank, world, cfg.block_images)
        # Encode all of the group's images on the same global batch grid as one process would
        # (only the batches that overlap this rank's rows), and all of its captions.
        first = (r0 // cfg.image_batch) * cfg.image_batch
        last = min(-(-r1 // cfg.image_batch) * cfg.image_batch, n)
        img = encode_images(unwrap(model), regions, grp.i0 + first, grp.i0 + last, cfg.image_batch) \
            if r1 > r0 else torch.empty(0)
        caps = encode_captions(model, tokens, lengths, grp.c0, grp.c1, cfg.block_captions)
        # score_matrix indexes image_emb by group row; give it a view starting at row `first`.
        padded = _RowOffset(img, first, n)
        target = _group_view(sims, plan, g) if (sims is not None and rank == 0) else None
        if distributed:
            # Rank 0 scores straight into its rows of the matrix; the others send theirs.
            local, _ = score_matrix(model, padded, caps, rank=rank, world_size=world,
                                    out=target[r0:r1] if rank == 0 else None,
                                    block_images=cfg.block_images, block_captions=cfg.block_captions,
                                    progress=progress, precision=cfg.precision)
            gather_rows(None if rank == 0 else local, n, cfg.block_images, out=target, dst=0)
        else:
            score_matrix(model, padded, caps, out=target, block_images=cfg.block_images,
                         block_captions=cfg.block_captions, progress=progress, precision=cfg.precision)
        if distributed:
            dist.barrier()


class _RowOffset:
    """A [n, R, d] stand-in that holds only rows [first, first + len(t)) of the image
    embeddings; indexing outside them is a bug (score_matrix only touches its own rows)."""

    def __init__(self, t: torch.Tensor, first: int, n: int):
        self.t, self.first, self.shape = t, first, (n, *t.shape[1:])

    def __getitem__(self, s: slice) -> torch.Tensor:
        a, b = s.start - self.first, s.stop - self.first
        if a < 0 or b > self.t.shape[0]:
            raise IndexError(f"rows {s.start}:{s.stop} were not encoded on this rank")
        return self.t[a:b]


def distributed_evaluate(model: Any, eval_split: Any, protocol: str = "auto", cfg: EvalConfig | None = None, *,
                         sims: Any = None, keep_sims: bool = False, compute_metrics: bool = True,
                         progress: bool = False) -> EvalResult:
    """Evaluate ``eval_split`` with every rank of the current torch.distributed process group
    scoring a slice of the images (or alone when no group is initialised).

    Call it on every rank with the same model weights and split (e.g. inside a Ray Train
    worker for dev R@K). Rank 0 gathers the matrix (into ``sims`` when given, else an array or
    a temporary memmap per ``cfg.memmap_mb``) and computes the metrics, which are then
    broadcast: every rank returns the same :class:`EvalResult` (``sims`` set on rank 0 only,
    and only with ``keep_sims``). The model is put in eval mode and restored afterwards.
    """
    import torch.distributed as dist

    cfg = cfg or EvalConfig()
    scoring_dtype(cfg.precision)  # a bad value fails before any encoding
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    check_compatible(model, eval_split)
    plan = _plan(eval_split, protocol, cfg, model)
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    t0 = time.perf_counter()
    sims_given = "caller" if sims is not None else None
    try:
        if rank == 0 and sims is None:
            sims = allocate_scores(_storage_shape(plan), cfg.memmap_mb)
        _score_groups(model, eval_split, plan, cfg, rank, world, sims if rank == 0 else None, progress)
    finally:
        inner.train(was_training)
    seconds = time.perf_counter() - t0
    n = sum(g.shape[0] for g in plan.groups)
    m = sum(g.shape[1] for g in plan.groups)
    pairs = sum(g.shape[0] * g.shape[1] for g in plan.groups)
    payload: list[Any] = [None]
    if rank == 0:
        metrics, folds = _metrics_from(sims, plan) if compute_metrics else ({}, [])
        payload = [EvalResult(plan.protocol, metrics, folds, n, m, pairs, seconds, seconds, world, plan.notes)]
    if distributed:
        dist.broadcast_object_list(payload, src=0)
    result: EvalResult = payload[0]
    if rank == 0:
        result.sims = _release(sims, keep_sims, sims_given)
    return result


def _spawn_worker(rank: int, world: int, port: int, model: Any, split: dict, protocol: str, cfg: EvalConfig,
                  sims: Any, sims_path: str | None, threads: int, progress: bool, timing: torch.Tensor,
                  device_type: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if device_type == "cuda":  # one GPU per worker where there are enough; rows still travel over gloo
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        model = model.to(device)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if rank == 0 and sims is None and sims_path is not None:
            sims = np.load(sims_path, mmap_mode="r+")
        res = distributed_evaluate(model, _SplitView(**split), protocol, cfg, sims=sims if rank == 0 else None,
                                   compute_metrics=False, progress=progress)
        if rank == 0:
            timing[0] = res.score_seconds
        if rank == 0 and isinstance(sims, np.memmap):
            sims.flush()
    finally:
        dist.destroy_process_group()


@dataclass
class _SplitView:
    regions: Any
    tokens: Any
    lengths: Any
    caption_to_image: Any = None


def evaluate_split(model: Any, eval_split: Any, protocol: str = "auto", workers: int = 1,
                   cfg: EvalConfig | None = None, *, sims_path: str | os.PathLike | None = None,
                   keep_sims: bool = False, progress: bool = False) -> EvalResult:
    """Evaluate a split in this process (``workers=1``) or with ``workers`` local processes
    (torch.multiprocessing spawn + gloo, the same code path as :func:`distributed_evaluate`),
    on the model's device: with a model on CUDA, worker i scores on GPU i modulo the GPU count.

    The score matrix is written to ``sims_path`` (.npy) when given, else kept in memory or in
    a temporary memmap (``cfg.memmap_mb``); with ``keep_sims`` it is returned in ``result.sims``.
    Metrics are computed here, from the one matrix.
    """
    cfg = cfg or EvalConfig()
    scoring_dtype(cfg.precision)
    if workers < 1:
        raise EvalError(f"--workers must be at least 1, got {workers}")
    check_compatible(model, eval_split)
    plan = _plan(eval_split, protocol, cfg, model)
    shape = _storage_shape(plan)
    t0 = time.perf_counter()
    if workers == 1:
        sims = allocate_scores(shape, cfg.memmap_mb, sims_path)
        result = distributed_evaluate(model, eval_split, protocol, cfg, sims=sims, keep_sims=True,
                                      compute_metrics=False, progress=progress)
    else:
        import torch.multiprocessing as mp

        sims = allocate_scores(shape, cfg.memmap_mb, sims_path)
        on_disk = isinstance(sims, np.memmap)
        shared = None if on_disk else torch.zeros(shape, dtype=torch.float32).share_memory_()
        if on_disk:
            sims.flush()
        regions, tokens, lengths, c2i = _split_arrays(eval_split)
        split = dict(regions=_as_tensor(regions), tokens=_as_tensor(tokens, torch.long),
                     lengths=_as_tensor(lengths, torch.long),
                     caption_to_image=None if c2i is None else _as_tensor(np.asarray(c2i), torch.long))
        threads = max(1, torch.get_num_threads() // workers)
        inner = unwrap(model)
        device_type = _device(inner).type
        if device_type == "cuda":  # the workers get a CPU copy and move it to their own GPU
            inner = copy.deepcopy(inner).cpu()
        timing = torch.zeros(1, dtype=torch.float64).share_memory_()
        mp.spawn(_spawn_worker, nprocs=workers, join=True,
                 args=(workers, get_free_port(), inner, split, protocol, cfg, shared,
                       sims.filename if on_disk else None, threads, progress, timing, device_type))
        if on_disk:
            sims = np.load(sims.filename, mmap_mode="r+")
        else:
            sims = shared.numpy()
        result = EvalResult(plan.protocol, {}, [], sum(g.shape[0] for g in plan.groups),
                            sum(g.shape[1] for g in plan.groups),
                            sum(g.shape[0] * g.shape[1] for g in plan.groups), 0.0, float(timing[0]), workers,
                            plan.notes)
    result.seconds = time.perf_counter() - t0
    result.metrics, result.folds = _metrics_from(sims, plan)
    result.sims = _release(sims, keep_sims or sims_path is not None, sims_path)
    return result


__all__: Sequence[str] = (
    "EvalResult", "allocate_scores", "distributed_evaluate", "encode_captions", "encode_images",
    "eval_device", "evaluate_split", "gather_rows", "image_rows", "score_matrix", "scoring_dtype", "check_compatible", "Group",
)
