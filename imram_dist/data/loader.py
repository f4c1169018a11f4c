"""Loaders used by training and evaluation, as webdataset pipelines: TrainPairs (sharded,
shuffled (image, caption) pairs, equal batch counts on every rank) and load_eval_split
(everything once, in order). Our own stages fill what webdataset lacks: verified, validating
shard reading (shards.shard_samples), splitting with fewer shards than consumers, batches of
distinct images, the equal batch count."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds

from .io import DataError
from .shards import BadSampleReport, Manifest, Sample, ShardInfo, read_manifest, shard_samples
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

    def to(self, device, non_blocking: bool = False) -> Batch:
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
# Pipeline stages of our own, where webdataset has no equivalent (see TrainPairs.pipeline)


def split_shards(items: list[dict], n: int, i: int) -> list[dict]:
    """Part i of n of a list of shard descriptions: every n-th shard, as webdataset's
    split_by_node/split_by_worker take them, when there are at least n; otherwise every shard,
    keeping only every n-th sample of each ("mod"/"rem"), so that no consumer is left without
    data (webdataset's splitters would hand it nothing) and nothing is read twice per pass."""
    if n == 1:
        return list(items)
    if len(items) >= n:
        return list(items[i::n])
    return [dict(d, mod=d.get("mod", 1) * n, rem=d.get("rem", 0) + d.get("mod", 1) * i) for d in items]


def split_by_rank(src: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Node splitter for an explicit rank: webdataset's split_by_node reads RANK/WORLD_SIZE from
    the environment (or torch.distributed), while TrainPairs is told its rank."""
    yield from split_shards(list(src), world_size, rank)


def split_by_worker(src: Iterable[dict]) -> Iterator[dict]:
    """Worker splitter; the worker comes from webdataset's pytorch_worker_info."""
    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    yield from split_shards(list(src), num_workers, worker)


def describe(d: dict, by_url: dict[str, ShardInfo]) -> dict:
    """{"url"} -> {"url", "shard": its ShardInfo} (what shard_samples checks it against)."""
    return dict(d, shard=by_url[d["url"]])


def caption_pairs(sample: Sample, vocab: Vocabulary) -> list[tuple]:
    """One image -> one (regions, token ids, image_id, key) pair per caption."""
    return [(sample.regions, vocab.encode(c), sample.image_id, sample.key) for c in sample.captions]


def mix_seed(*parts) -> int:
    """A 64-bit seed from several values (wds.detshuffle adds its pass counter to it)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


class PassShuffle(wds.PipelineStage):
    """webdataset's shuffle buffer with an rng seeded by (seed, epoch, pass, rank, worker):
    reproducible, different on each pass of the endless pipeline and in each consumer."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int):
        self.bufsize = max(1, bufsize)
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.passes = 0

    def run(self, src):
        worker = wds.utils.pytorch_worker_info()[2]
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.passes}/{self.rank}/{worker}")
        self.passes += 1
        return wds.shuffle(bufsize=self.bufsize, initial=self.bufsize, rng=rng)(src)


class DistinctBatches(wds.PipelineStage):
    """Batching: full batches of ``batch_size`` pairs in which no image occurs twice (its other
    captions would be false negatives in the in-batch hinge loss). webdataset's batched cannot
    refuse a sample, so this replaces it: a pair that would collide is held back and goes first
    into the next batch; the last incomplete batch of a pass is dropped. Bad-sample messages
    met since the previous batch ride along in ``Batch.skipped`` (an empty Batch carries those
    of the end of a pass). A pass that yields no batch at all is a DataError (the pipeline
    repeats endlessly, so it would otherwise spin)."""

    def __init__(self, batch_size: int, report: BadSampleReport, rank: int, split: str):
        self.batch_size, self.report, self.rank, self.split = batch_size, report, rank, split
        self.reported = 0

    def _news(self) -> list[str]:
        news = self.report.messages[self.reported:]
        self.reported = len(self.report.messages)
        return news

    def run(self, src):
        B = self.batch_size
        held: deque = deque()
        batch: list = []
        seen: set = set()
        produced = 0
        for p in src:
            if p[3] in seen:
                held.append(p)
                continue
            batch.append(p)
            seen.add(p[3])
            while len(batch) == B:
                out = collate(batch)
                out.skipped = self._news()
                produced += 1
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
        news = self._news()
        if news:
            yield Batch(torch.zeros(0), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                        [], [], news)
        if produced == 0:
            _, _, worker, workers = wds.utils.pytorch_worker_info()
            where = f" (loader worker {worker} of {workers})" if workers > 1 else ""
            raise DataError(f"rank {self.rank}{where}: split {self.split!r} produced no batch of {B} distinct "
                            f"images in a whole pass ({self.report.count} bad samples skipped)")


class TrainPairs:
    """Shuffled (image, caption) training pairs for one rank: a webdataset pipeline
    (``pipeline()``), read in-process or through ``wds.WebLoader`` workers.

    - Shards are shuffled per epoch and pass (seed, epoch, pass; ``set_epoch``) identically on all
      ranks, then split across ranks (shard i -> rank i % world_size) and across DataLoader
      workers; with fewer shards than consumers, every consumer reads all shards and keeps every
      n-th sample. Each shard is verified (sha256) before any of its samples is used.
    - Each image expands into one pair per caption; pairs pass a shuffle buffer
      (``shuffle_buffer`` pairs) and are batched so that no image appears twice in a batch
      (its other captions would be false negatives).
    - ``num_batches = total_pairs // (world_size * batch_size)`` from the manifest, the same on
      every rank; every rank yields exactly that many full batches: the pipeline repeats
      endlessly (a consumer that runs out wraps around: another pass over its shards,
      reshuffled, so a few pairs may repeat within an epoch on that rank) and the epoch stops
      after num_batches (a rank with more pairs drops the extra).
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

    def pipeline(self, epoch: int | None = None) -> wds.DataPipeline:
        """This rank's endless stream of batches for an epoch, chained as open_clip chains its
        training data: shard list, shard shuffle, node and worker splitters, tar reading,
        sample shuffle, batching."""
        epoch = self.epoch if epoch is None else int(epoch)
        shards = self.split_info.shards
        by_url = {self.manifest.shard_url(sh): sh if self.verify_checksums else dataclasses.replace(sh, sha256="")
                  for sh in shards}
        report = BadSampleReport()  # one per consumer: DistinctBatches forwards its messages
        n = len(shards)
        return wds.DataPipeline(
            wds.SimpleShardList(list(by_url)),  # manifest order
            # the same permutation on every rank; detshuffle adds its pass counter to the seed
            wds.detshuffle(bufsize=n, initial=n, seed=mix_seed(self.seed, epoch), epoch=-1),
            functools.partial(split_by_rank, rank=self.rank, world_size=self.world_size),
            split_by_worker,
            wds.map(functools.partial(describe, by_url=by_url)),
            functools.partial(shard_samples, regions=self.manifest.regions, feature_dim=self.manifest.feature_dim,
                              skip_bad=self.skip_bad, report=report),
            wds.map(functools.partial(caption_pairs, vocab=self.vocab)),
            wds.filters.unlisted(),
            PassShuffle(self.shuffle_buffer, self.seed, epoch, self.rank),
            DistinctBatches(self.batch_size, report, self.rank, self.split),
        ).repeat()

    def __iter__(self) -> Iterator[Batch]:
        source = self.pipeline()
        if self.loader_workers > 0:
            source = wds.WebLoader(source, batch_size=None, num_workers=self.loader_workers,
                                   persistent_workers=False, prefetch_factor=2)
        it = iter(source)
        produced = 0
        try:
            for b in it:
                if b.skipped:
                    self.report.extend(b.skipped)
                if len(b) == 0:
                    continue
                produced += 1
                yield b
                if produced >= self.num_batches:
                    return
        finally:
            close = getattr(it, "close", None)
            if close:
                close()  # stops DataLoader workers of an endless pipeline
        raise DataError(f"rank {self.rank}: split {self.split!r} ran out after {produced} of {self.num_batches} "
                        f"batches ({self.report.count} bad samples skipped)")

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
    by_url = {manifest.shard_url(sh): sh for sh in info.shards}
    samples: Iterable[Sample] = wds.DataPipeline(
        wds.SimpleShardList(list(by_url)),  # manifest order, no split: every process reads all
        wds.map(functools.partial(describe, by_url=by_url)),
        functools.partial(shard_samples, regions=manifest.regions, feature_dim=manifest.feature_dim,
                          skip_bad=skip_bad, report=report),
    ) if by_url else []
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, total=info.images, desc=f"load {split}", unit="img")
    for s in samples:
        n = len(ids)
        if n >= info.images:  # the shards hold more than the manifest says: never overrun
            raise DataError(f"split {split}: shard {s.shard} key {s.key}: more images than the "
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

