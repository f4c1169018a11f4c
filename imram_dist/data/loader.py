"""Loaders used by training and evaluation: TrainPairs (sharded, shuffled (image, caption)
pairs, equal batch counts on every rank) and load_eval_split (everything once, in order)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .io import DataError
from .shards import BadSampleReport, Manifest, ShardInfo, iter_shard, read_manifest
from .tokenize import Vocabulary


@dataclass
class Batch:
    regions: torch.Tensor  # [B, R, D] float32
    tokens: torch.Tensor  # [B, L] long, padded with 0
    lengths: torch.Tensor  # [B] long
    image_ids: list[str]
    keys: list[str]
    skipped: list[str] = field(default_factory=list)  # bad-sample messages met since the last batch

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.regions.to(device, non_blocking=non_blocking),
                     self.tokens.to(device, non_blocking=non_blocking),
                     self.lengths.to(device, non_blocking=non_blocking),
                     self.image_ids, self.keys, self.skipped)


def pad_tokens(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists with 0 -> (tokens [B, L] long, lengths [B] long)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.zeros(len(seqs), int(lengths.max()) if len(seqs) else 0, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


def collate(pairs: list[tuple]) -> Batch:
    """pairs of (regions [R,D] array, token ids, image_id, key) -> Batch (regions float32)."""
    regions = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32, copy=False))
    tokens, lengths = pad_tokens([p[1] for p in pairs])
    return Batch(regions, tokens, lengths, [p[2] for p in pairs], [p[3] for p in pairs])


# ---------------------------------------------------------------------------------------
# Work assignment: shards to consumers (ranks, then DataLoader workers)


@dataclass(frozen=True)
class Assignment:
    """Shards to read, and of each shard only the samples with index % mod == rem."""

    shards: tuple[ShardInfo, ...]
    mod: int = 1
    rem: int = 0

    def split(self, n: int, i: int) -> "Assignment":
        """Part i of n: whole shards when there are enough, otherwise every n-th sample."""
        if n == 1:
            return self
        if len(self.shards) >= n:
            return Assignment(self.shards[i::n], self.mod, self.rem)
        return Assignment(self.shards, self.mod * n, self.rem + self.mod * i)


class _PairStream(IterableDataset):
    """One rank's pass over its shards -> batches (runs in DataLoader workers)."""

    def __init__(self, owner: "TrainPairs"):
        super().__init__()
        self.o = owner

    def __iter__(self) -> Iterator[Batch]:
        o = self.o
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        work = o.assignment(o.epoch, o._pass).split(nw, wid)
        rng = random.Random(f"{o.seed}/{o.epoch}/{o._pass}/{o.rank}/{wid}")
        report = BadSampleReport()
        reported = 0

        def pairs():
            shards = list(work.shards)
            for sh in shards:
                keep = None if work.mod == 1 else (lambda i, m=work.mod, r=work.rem: i % m == r)
                for s in iter_shard(o.manifest.shard_url(sh), name=sh.name,
                                    expect=sh if o.verify_checksums else
                                    ShardInfo(sh.name, sh.images, sh.captions, "", sh.bytes),
                                    regions=o.manifest.regions, feature_dim=o.manifest.feature_dim,
                                    skip_bad=o.skip_bad, report=report, keep=keep):
                    for c in s.captions:
                        yield (s.regions, o.vocab.encode(c), s.image_id, s.key)

        def shuffled():
            buf: list = []
            size = max(1, o.shuffle_buffer)
            for p in pairs():
                if len(buf) < size:
                    buf.append(p)
                    continue
                j = rng.randrange(size)
                buf[j], p = p, buf[j]
                yield p
            rng.shuffle(buf)
            yield from buf

        held: deque = deque()
        batch: list = []
        seen: set = set()
        B = o.batch_size
        for p in shuffled():
            if p[3] in seen:
                held.append(p)
                continue
            batch.append(p)
            seen.add(p[3])
            if len(batch) == B:
                out = collate(batch)
                out.skipped = report.messages[reported:]
                reported = len(report.messages)
                yield out
                batch, seen = [], set()
                # pairs held back (same image as one already in the batch) go first next time
                for _ in range(len(held)):
                    q = held.popleft()
                    if q[3] in seen or len(batch) == B:
                        held.append(q)
                    else:
                        batch.append(q)
                        seen.add(q[3])
                if len(batch) == B:  # only possible when B is tiny
                    out = collate(batch)
                    yield out
                    batch, seen = [], set()
        # A last incomplete batch (and held pairs) is dropped; the rank wraps around anyway.
        if report.messages[reported:]:
            # deliver the remaining reports with an empty batch marker
            yield Batch(torch.zeros(0), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                        [], [], report.messages[reported:])


class TrainPairs:
    """Shuffled (image, caption) training pairs for one rank.

    - Shards are shuffled per epoch (seed, epoch; ``set_epoch``) identically on all ranks, then
      split across ranks (shard i -> rank i % world_size) and across DataLoader workers; with
      fewer shards than consumers, every consumer reads all shards and keeps every n-th sample.
    - Each image expands into one pair per caption; pairs pass a shuffle buffer
      (``shuffle_buffer`` pairs) and are batched so that no image appears twice in a batch
      (its other captions would be false negatives).
    - ``num_batches = total_pairs // (world_size * batch_size)`` from the manifest, the same on
      every rank; every rank yields exactly that many full batches: a rank with more pairs stops
      early (drops the extra), a rank that runs out wraps around (starts another pass over its
      shards, reshuffled), so a few pairs may repeat within an epoch on that rank.
    """

    def __init__(self, root: str, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, loader_workers: int = 0, shuffle_buffer: int = 1000,
                 skip_bad: bool = False, verify_checksums: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.manifest: Manifest = read_manifest(root) if not isinstance(root, Manifest) else root
        self.split_info = self.manifest.split(split)
        self.vocab: Vocabulary = self.manifest.load_vocab()
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.loader_workers = loader_workers
        self.shuffle_buffer = shuffle_buffer
        self.skip_bad = skip_bad
        self.verify_checksums = verify_checksums
        self.epoch = 0
        self._pass = 0
        self.report = BadSampleReport()
        if batch_size > self.split_info.images:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.split_info.images} images of split "
                             f"{split!r}: a batch cannot hold distinct images")
        if self.num_batches < 1:
            raise ValueError(f"split {split!r} has {self.split_info.captions} pairs, fewer than one batch of "
                             f"{batch_size} per rank on {world_size} ranks")

    @property
    def num_batches(self) -> int:
        return self.split_info.captions // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def regions(self) -> int:
        return self.manifest.regions

    @property
    def feature_dim(self) -> int:
        return self.manifest.feature_dim

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def assignment(self, epoch: int, pass_: int = 0) -> Assignment:
        shards = list(self.split_info.shards)
        rng = np.random.default_rng([self.seed, epoch, pass_])
        order = rng.permutation(len(shards))
        return Assignment(tuple(shards[i] for i in order)).split(self.world_size, self.rank)

    def _one_pass(self) -> Iterator[Batch]:
        ds = _PairStream(self)
        if self.loader_workers > 0:
            loader = DataLoader(ds, batch_size=None, num_workers=self.loader_workers,
                                persistent_workers=False, prefetch_factor=2)
            yield from loader
        else:
            yield from ds

    def __iter__(self) -> Iterator[Batch]:
        produced = 0
        self._pass = 0
        while produced < self.num_batches:
            got = 0
            it = self._one_pass()
            try:
                for b in it:
                    if b.skipped:
                        self.report.extend(b.skipped)
                    if len(b) == 0:
                        continue
                    got += 1
                    produced += 1
                    yield b
                    if produced >= self.num_batches:
                        break
            finally:
                close = getattr(it, "close", None)
                if close:
                    close()
            if got == 0 and produced < self.num_batches:
                raise DataError(f"rank {self.rank}: split {self.split!r} produced no batch of {self.batch_size} "
                                f"distinct images in a whole pass ({self.report.count} bad samples skipped)")
            self._pass += 1

    @property
    def bad_samples(self) -> int:
        return self.report.count


# ---------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalSplit:
    regions: torch.Tensor  # [N, R, D] float16 or float32
    tokens: torch.Tensor  # [M, L] long padded with 0
    lengths: torch.Tensor  # [M] long
    caption_to_image: torch.Tensor  # [M] long
    image_ids: list[str]
    captions: list[str]
    keys: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return self.regions.shape[0]

    @property
    def num_captions(self) -> int:
        return self.tokens.shape[0]


def load_eval_split(root: str, split: str, dtype: str | torch.dtype | None = None,
                    skip_bad: bool = False, vocab: Vocabulary | None = None,
                    progress: bool = False) -> EvalSplit:
    """Every image and every caption of a split exactly once, in manifest order.

    regions keep the stored dtype (float16 by default) unless ``dtype`` is given
    ("float32"/torch.float32). ``caption_to_image[j]`` is the image row of caption j.
    """
    manifest = read_manifest(root) if not isinstance(root, Manifest) else root
    info = manifest.split(split)
    vocab = vocab or manifest.load_vocab()
    tdtype = {"float16": torch.float16, "float32": torch.float32}.get(dtype, dtype) if dtype else \
        {"float16": torch.float16, "float32": torch.float32}[manifest.dtype]
    regions = torch.empty(info.images, manifest.regions, manifest.feature_dim, dtype=tdtype)
    report = BadSampleReport()
    caps: list[str] = []
    seqs: list[list[int]] = []
    c2i: list[int] = []
    ids: list[str] = []
    keys: list[str] = []
    shards = info.shards
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc=f"load {split}", unit="shard")
    for sh in shards:
        for s in iter_shard(manifest.shard_url(sh), name=sh.name, expect=sh, regions=manifest.regions,
                            feature_dim=manifest.feature_dim, skip_bad=skip_bad, report=report):
            n = len(ids)
            if n >= info.images:  # the shards hold more than the manifest says: never overrun
                raise DataError(f"split {split}: shard {sh.name} key {s.key}: more images than the "
                                f"manifest's {info.images}")
            regions[n] = torch.from_numpy(s.regions.astype(np.float32 if tdtype == torch.float32 else
                                                           s.regions.dtype, copy=False)).to(tdtype)
            ids.append(s.image_id)
            keys.append(s.key)
            for c in s.captions:
                caps.append(c)
                seqs.append(vocab.encode(c))
                c2i.append(n)
    if len(ids) != info.images and not skip_bad:
        raise DataError(f"split {split}: read {len(ids)} images, the manifest says {info.images}")
    regions = regions[: len(ids)]
    tokens, lengths = pad_tokens(seqs)
    return EvalSplit(regions, tokens, lengths, torch.tensor(c2i, dtype=torch.long), ids, caps, keys,
                     report.messages)

