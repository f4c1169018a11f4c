"""The shard format: deterministic tar writer (webdataset's TarWriter), manifest, and the
verified, validating shard reader (webdataset's tar expansion and key grouping) that both
loaders' webdataset pipelines use.

One sample per image, WebDataset-style (files grouped by key, the part before the first dot):
  {key}.json  {"image_id": str, "captions": [str, ...]} (+ optional "meta")
  {key}.npy   region features, R x D, float16 (default) or float32
See docs/data.md for the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from .io import DataError, atomic_write_bytes, fetch_hashed, join, open_stream, read_bytes, sha256_file, unique_tmp_path
from .tokenize import Vocabulary

log = logging.getLogger("imram_dist.data")

FORMAT = "imram-dist-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")


# ---------------------------------------------------------------------------------------
# Manifest


@dataclass
class ShardInfo:
    name: str
    images: int
    captions: int
    sha256: str
    bytes: int


@dataclass
class SplitInfo:
    name: str
    images: int
    captions: int
    captions_per_image: int | None  # 5, 1, or None when it varies
    shards: list[ShardInfo]


@dataclass
class Manifest:
    root: str
    regions: int
    feature_dim: int
    dtype: str
    vocab: str
    splits: dict[str, SplitInfo]
    provenance: dict[str, Any] = field(default_factory=dict)
    vocab_sha256: str = ""

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"{join(self.root, MANIFEST)}: no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]

    def shard_url(self, shard: ShardInfo | str) -> str:
        return join(self.root, shard.name if isinstance(shard, ShardInfo) else shard)

    @property
    def vocab_url(self) -> str:
        return join(self.root, self.vocab)

    def load_vocab(self) -> Vocabulary:
        """The vocabulary, checked against vocab_sha256 when the manifest records one (a
        different vocab.json would silently change every token id)."""
        raw = read_bytes(self.vocab_url)
        check_vocab_bytes(raw, self)
        return Vocabulary.loads(raw)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION,
            "regions": self.regions, "feature_dim": self.feature_dim, "dtype": self.dtype,
            "vocab": self.vocab, "vocab_sha256": self.vocab_sha256,
            "splits": {name: {"images": s.images, "captions": s.captions,
                              "captions_per_image": s.captions_per_image,
                              "shards": [vars(sh) for sh in s.shards]}
                       for name, s in self.splits.items()},
            "provenance": self.provenance,
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode() + b"\n"


def check_vocab_bytes(raw: bytes, manifest: Manifest) -> None:
    """DataError naming the file, the field and the expected value when raw (vocab.json) does
    not hash to the manifest's vocab_sha256 (no check when the manifest records none)."""
    if not manifest.vocab_sha256:
        return
    got = hashlib.sha256(raw).hexdigest()
    if got != manifest.vocab_sha256:
        raise DataError(f"{manifest.vocab_url}: sha256 {got} does not match field vocab_sha256 of "
                        f"{join(manifest.root, MANIFEST)} (expected {manifest.vocab_sha256})")


def read_manifest(root: str) -> Manifest:
    """Read ROOT/manifest.json (ROOT: a folder or s3://bucket/prefix)."""
    root = str(root)
    if root.endswith("/" + MANIFEST) or root == MANIFEST:
        root = root[: -len(MANIFEST)].rstrip("/") or "."
    url = join(root, MANIFEST)
    try:
        raw = read_bytes(url)
    except FileNotFoundError:
        raise DataError(f"{url}: no manifest (is {root!r} a converted dataset root?)") from None
    try:
        d = json.loads(raw)
        if d.get("format") != FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
        splits = {
            name: SplitInfo(name, int(s["images"]), int(s["captions"]), s.get("captions_per_image"),
                            [ShardInfo(**sh) for sh in s["shards"]])
            for name, s in d["splits"].items()
        }
        return Manifest(root=root, regions=int(d["regions"]), feature_dim=int(d["feature_dim"]),
                        dtype=d["dtype"], vocab=d["vocab"], splits=splits,
                        provenance=d.get("provenance", {}), vocab_sha256=d.get("vocab_sha256", ""))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{url}: malformed manifest: {e}") from None


def write_manifest(root: str, manifest: Manifest) -> None:
    atomic_write_bytes(os.path.join(root, MANIFEST), manifest.dumps())


# ---------------------------------------------------------------------------------------
# Writing


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


class ShardWriter:
    """Writes one tar shard with deterministic bytes through ``webdataset.TarWriter`` (mtime 0,
    uid/gid 0, empty user/group names, mode 0644, ustar; a sample's files in sorted extension
    order, i.e. json then npy) to a unique temporary name beside NAME (``self.tmp``), so that
    writers into one folder never clash; ``close()`` fsyncs, renames it to NAME and returns
    (sha256, size). A crash never leaves a partial shard under its final name."""

    def __init__(self, path: str, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.path = path
        self.tmp = unique_tmp_path(path)
        self.dtype = np.dtype(dtype)
        self._f = open(self.tmp, "xb")
        # encoder=False: we hand it bytes (our own json/npy encodings, which fix the bytes).
        self._tar = wds.TarWriter(self._f, user="", group="", mode=0o644, mtime=0, encoder=False)
        # webdataset 1.0.2 resolves its `format` argument (ustar by default) but never passes it
        # to tarfile.open, which then writes pax: pin ustar, the format the shards always had
        # (for short ASCII names the two give the same bytes; for others ustar keeps them so).
        self._tar.tarstream.format = tarfile.USTAR_FORMAT
        self.images = 0
        self.captions = 0

    def write_files(self, key: str, files: dict[str, bytes]) -> None:
        """One sample given as raw member bytes by extension ({"json": ..., "npy": ...}); counts
        an image (captions are counted by ``write``)."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        self._tar.write({"__key__": key, **files})
        self.images += 1

    def write(self, key: str, regions: np.ndarray, captions: list[str], image_id: str,
              meta: dict | None = None) -> None:
        doc: dict[str, Any] = {"image_id": str(image_id), "captions": list(captions)}
        if meta:
            doc["meta"] = meta
        self.write_files(key, {"json": encode_json(doc),
                               "npy": encode_npy(np.asarray(regions).astype(self.dtype, copy=False))})
        self.captions += len(captions)

    def close(self) -> tuple[str, int]:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return sha256_file(self.path), os.path.getsize(self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
            self._f.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


# ---------------------------------------------------------------------------------------
# Reading and validation


@dataclass
class Sample:
    key: str
    image_id: str
    captions: list[str]
    regions: np.ndarray  # R x D as stored
    shard: str = ""
    meta: dict | None = None


class BadSampleReport:
    """Bad samples and shards met while reading (with skip_bad); messages name shard and key."""

    def __init__(self, limit: int = 1000):
        self.count = 0
        self.messages: list[str] = []
        self.limit = limit

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.messages) < self.limit:
            self.messages.append(message)
        log.warning("skipped bad data: %s", message)

    def extend(self, messages: list[str]) -> None:
        for m in messages:
            self.count += 1
            if len(self.messages) < self.limit:
                self.messages.append(m)


def decode_sample(key: str, files: dict[str, bytes], shard: str, regions: int | None,
                  feature_dim: int | None, with_regions: bool = True) -> Sample:
    """Parse and validate one sample; DataError naming shard and key on any defect."""
    where = f"shard {shard}, key {key}"
    for ext, what in (("json", "captions/image id (.json)"), ("npy", "region features (.npy)")):
        if ext not in files:
            raise DataError(f"{where}: missing field {what}", shard, key)
    try:
        doc = json.loads(files["json"])
    except ValueError as e:
        raise DataError(f"{where}: unreadable .json: {e}", shard, key) from None
    caps = doc.get("captions") if isinstance(doc, dict) else None
    if not isinstance(caps, list) or not caps:
        raise DataError(f"{where}: no captions", shard, key)
    for i, c in enumerate(caps):
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"{where}: caption #{i} is empty", shard, key)
    if "image_id" not in doc:
        raise DataError(f"{where}: missing field image_id", shard, key)
    arr = None
    if with_regions:
        try:
            arr = np.load(io.BytesIO(files["npy"]), allow_pickle=False)
        except Exception as e:
            raise DataError(f"{where}: unreadable .npy: {e}", shard, key) from None
        if arr.dtype.name not in DTYPES:
            raise DataError(f"{where}: region features have dtype {arr.dtype}, expected one of {DTYPES}",
                            shard, key)
        exp = (regions, feature_dim)
        if arr.ndim != 2 or (regions is not None and arr.shape[0] != regions) or (
                feature_dim is not None and arr.shape[1] != feature_dim):
            raise DataError(f"{where}: region features have shape {tuple(arr.shape)}, expected {exp} (R x D)",
                            shard, key)
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: region features contain NaN or Inf", shard, key)
    return Sample(key=key, image_id=str(doc["image_id"]), captions=caps, regions=arr, shard=shard,
                  meta=doc.get("meta"))


class _Cursor:
    """Where the parse of one shard is: samples seen so far and the last complete key."""

    def __init__(self) -> None:
        self.index = 0
        self.last_key = "(none)"


# webdataset's group_by_keys reports a second file with the same key and extension like this.
_DUPLICATE = re.compile(r"^(\S+): duplicate file name in tar file")


def _tar_samples(stream, url: str, name: str, regions: int | None, feature_dim: int | None,
                 bad: Callable[..., None], keep: Callable[[int], bool] | None, with_regions: bool,
                 cur: _Cursor) -> Iterator[Sample]:
    """Parse one shard's tar stream into validated samples, in order: webdataset's tar expansion
    and key grouping, then our validation; every defect goes to ``bad(message, key)`` (which
    raises, or records and lets the parse go on), naming the shard and the key."""
    groups = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], eof_value=None))
    try:
        for group in groups:
            key = group["__key__"].rpartition("/")[2]
            i = cur.index
            cur.index += 1
            cur.last_key = key
            if keep is not None and not keep(i):
                continue
            files = {ext: data for ext, data in group.items() if not ext.startswith("__")}
            try:
                sample = decode_sample(key, files, name, regions, feature_dim, with_regions)
            except DataError as e:
                bad(str(e), key)
                continue
            yield sample
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # webdataset appends " @ <stream>" to the first argument and the stream and URL as
        # further arguments; the first argument without that is tarfile's own message.
        detail = str(e.args[0]).split(" @ ")[0] if e.args else ""
        dup = _DUPLICATE.match(detail)
        if dup:
            key = dup.group(1).rpartition("/")[2].partition(".")[0]
            bad(f"shard {name}, key {key}: duplicate file {dup.group(1)} (rest of the shard not read)", key)
        else:
            bad(f"shard {name}: corrupt or truncated tar after key {cur.last_key}: {type(e).__name__}: {detail}",
                cur.last_key)


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


def _reject_shard(copy, name: str, digest: str, expect: ShardInfo, regions: int | None,
                  feature_dim: int | None, skip_bad: bool, report: BadSampleReport) -> None:
    """A shard whose sha256 differs from the manifest's: none of its samples is used. Its
    private copy is parsed (nothing yielded) only to say what else is wrong with it."""
    found: list[tuple[str, str]] = []
    cur = _Cursor()
    for _ in _tar_samples(copy, name, name, regions, feature_dim, lambda m, k="": found.append((m, k)), None,
                          True, cur):
        pass
    if cur.index != expect.images:
        found.append((f"shard {name}: holds {cur.index} samples, the manifest says {expect.images} "
                      f"(truncated or replaced shard; last key {cur.last_key})", cur.last_key))
    what = f"checksum mismatch (sha256 {digest[:16]}..., manifest {expect.sha256[:16]}...)"
    if not skip_bad:
        if found:
            msg, key = found[0]
            raise DataError(f"{msg}; and the shard's {what}: none of its samples is used", name, key)
        raise DataError(f"shard {name}: {what}: none of its samples is used", name)
    for msg, _ in found:
        report.add(msg)
    report.add(f"shard {name}: {what}: all its samples skipped")


def iter_shard(url: str, *, name: str | None = None, expect: ShardInfo | None = None,
               regions: int | None = None, feature_dim: int | None = None,
               skip_bad: bool = False, report: BadSampleReport | None = None,
               keep: Callable[[int], bool] | None = None, with_regions: bool = True) -> Iterator[Sample]:
    """Stream the samples of one shard (local path or s3:// URL), validating each.

    With ``expect`` carrying a sha256, the shard is verified before use: it is fetched whole
    into a private copy (memory, or an unlinked temporary file past ``io.SPOOL_MAX_BYTES``)
    while hashed, and parsed from that copy only when the digest matches; a mismatch yields no
    sample at all. With ``expect`` the sample count is checked when the shard ends.
    ``keep(i)`` selects samples by their index in the shard (others are read but not decoded).
    Errors raise DataError naming the shard and key; with ``skip_bad`` they are added to
    ``report`` and the sample (or, for a missing, corrupt or mismatching shard, the rest of the
    shard) is skipped.
    """
    name = name or url.rsplit("/", 1)[-1]
    report = report if report is not None else BadSampleReport()

    def bad(msg: str, key: str = "") -> None:
        if not skip_bad:
            raise DataError(msg, name, key)
        report.add(msg)

    try:
        raw = open_stream(url)
    except FileNotFoundError:
        bad(f"shard {name}: listed in the manifest but absent ({url})")
        return
    except Exception as e:
        bad(f"shard {name}: cannot open {url}: {e}")
        return
    source = raw
    if expect is not None and expect.sha256:
        try:
            source, digest, _ = fetch_hashed(raw)
        except Exception as e:  # OSError, or botocore's errors for an S3 body cut short
            bad(f"shard {name}: cannot read {url}: {type(e).__name__}: {e}")
            return
        finally:
            _close(raw)
        if digest != expect.sha256:
            with source:
                _reject_shard(source, name, digest, expect, regions, feature_dim, skip_bad, report)
            return
    cur = _Cursor()
    try:
        yield from _tar_samples(source, url, name, regions, feature_dim, bad, keep, with_regions, cur)
        if expect is not None and cur.index != expect.images:
            bad(f"shard {name}: holds {cur.index} samples, the manifest says {expect.images} "
                f"(truncated or replaced shard; last key {cur.last_key})", cur.last_key)
    finally:
        _close(source)


def shard_samples(src: Iterable[dict], *, regions: int | None, feature_dim: int | None, skip_bad: bool,
                  report: BadSampleReport, with_regions: bool = True) -> Iterator[Sample]:
    """Pipeline stage (webdataset style: an iterator in, an iterator out): shard descriptions
    ``{"url", "shard": ShardInfo or None, "mod", "rem"}`` -> the validated samples of each shard,
    verified before use when its ShardInfo carries a sha256 (``iter_shard``); of each shard only
    the samples with index % mod == rem (see loader.split_shards)."""
    for d in src:
        mod, rem = d.get("mod", 1), d.get("rem", 0)
        keep = None if mod == 1 else (lambda i, m=mod, r=rem: i % m == r)
        shard = d.get("shard")
        yield from iter_shard(d["url"], name=shard.name if shard else None, expect=shard, regions=regions,
                              feature_dim=feature_dim, skip_bad=skip_bad, report=report, keep=keep,
                              with_regions=with_regions)
