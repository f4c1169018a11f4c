"""inspect (statistics + full validation) and upload (boto3 multipart, verified)."""

from __future__ import annotations

import base64
import hashlib
import logging
import os

import numpy as np

from .io import DataError, is_s3, join, s3_client, sha256_file, split_s3
from .shards import MANIFEST, BadSampleReport, check_vocab_bytes, iter_shard, read_manifest
from .tokenize import tokenize

log = logging.getLogger("imram_dist.data")


def inspect_dataset(root: str, progress: bool = True) -> dict:
    """Counts, shapes, dtypes, caption-length stats and a full validation pass; every bad
    sample or shard is listed in result["errors"]."""
    from tqdm import tqdm

    m = read_manifest(root)
    out = {"root": root, "regions": m.regions, "feature_dim": m.feature_dim, "dtype": m.dtype,
           "vocab": m.vocab, "splits": {}, "errors": []}
    try:
        vocab = m.load_vocab()
        out["vocab_size"] = len(vocab)
    except Exception as e:
        out["errors"].append(f"vocabulary {m.vocab_url}: {e}")
        vocab = None
    for name, info in m.splits.items():
        report = BadSampleReport(limit=10 ** 9)
        lens, images, captions, dtypes, unk, total_tok = [], 0, 0, set(), 0, 0
        fmin, fmax = np.inf, -np.inf
        for sh in tqdm(info.shards, desc=f"inspect {name}", unit="shard", disable=not progress):
            for s in iter_shard(m.shard_url(sh), name=sh.name, expect=sh, regions=m.regions,
                                feature_dim=m.feature_dim, skip_bad=True, report=report):
                images += 1
                captions += len(s.captions)
                dtypes.add(str(s.regions.dtype))
                fmin, fmax = min(fmin, float(s.regions.min())), max(fmax, float(s.regions.max()))
                for c in s.captions:
                    toks = tokenize(c)
                    lens.append(len(toks))
                    if vocab is not None:
                        total_tok += len(toks)
                        unk += sum(t not in vocab for t in toks)
        lens_a = np.array(lens or [0])
        if images != info.images:
            report.add(f"split {name}: {images} valid images read, the manifest says {info.images}")
        out["splits"][name] = {
            "images": images, "captions": captions, "manifest_images": info.images,
            "manifest_captions": info.captions, "shards": len(info.shards),
            "captions_per_image": info.captions_per_image, "stored_dtypes": sorted(dtypes),
            "feature_range": [fmin, fmax] if images else None,
            "caption_words": {"min": int(lens_a.min()), "mean": round(float(lens_a.mean()), 2),
                              "p95": int(np.percentile(lens_a, 95)), "max": int(lens_a.max())},
            "unknown_word_rate": round(unk / total_tok, 4) if total_tok else None,
            "bad": report.count,
        }
        out["errors"].extend(report.messages)
    return out


def _local_files(root: str) -> list[str]:
    m = read_manifest(root)
    files = [m.vocab] + [sh.name for s in m.splits.values() for sh in s.shards]
    for f in files:
        if not os.path.exists(os.path.join(root, f)):
            raise DataError(f"{os.path.join(root, f)}: listed in the manifest but absent")
    return files


def _digests(path: str, part_size: int | None) -> tuple[str, str]:
    """One pass over a file -> (sha256 hex, the ChecksumSHA256 S3 stores for it when uploaded in
    parts of part_size, or whole when part_size is None). A multipart object's checksum is
    S3's composite: the SHA-256 of the parts' SHA-256 digests (S3 appends "-<parts>")."""
    whole = hashlib.sha256()
    parts: list[bytes] = []
    with open(path, "rb") as f:
        while True:
            part = hashlib.sha256()
            left = part_size or (1 << 62)
            n = 0
            while left:
                b = f.read(min(left, 1 << 22))
                if not b:
                    break
                whole.update(b)
                part.update(b)
                left -= len(b)
                n += len(b)
            if n:
                parts.append(part.digest())
            if n == 0 or part_size is None or left:
                break
    s3 = whole.digest() if part_size is None else hashlib.sha256(b"".join(parts)).digest()
    return whole.hexdigest(), base64.b64encode(s3).decode()


def _verify_stored(client, bucket: str, key: str, name: str, local_sha: str, local_checksum: str) -> str:
    """Check the stored object against the local file without downloading it: S3 verified
    every part's SHA-256 on arrival (ChecksumAlgorithm="SHA256") and returns the object's
    checksum; a store that returns none (some S3-compatible servers) is read back and hashed.
    Returns how it was verified."""
    head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    stored = head.get("ChecksumSHA256")
    if stored:
        if stored.split("-")[0] != local_checksum:  # "-" is not in the base64 alphabet
            raise DataError(f"upload of {name} to s3://{bucket}/{key}: the store's ChecksumSHA256 {stored} "
                            f"differs from the local file's {local_checksum}")
        return "s3-checksum"
    h = hashlib.sha256()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in iter(lambda: body.read(1 << 22), b""):
        h.update(chunk)
    if h.hexdigest() != local_sha:
        raise DataError(f"upload of {name} to s3://{bucket}/{key}: sha256 of the stored object "
                        f"{h.hexdigest()[:16]}... differs from the local {local_sha[:16]}...")
    return "read-back"


def upload_dataset(root: str, dest: str, progress: bool = True, chunk_mb: int = 16,
                   max_concurrency: int = 8) -> dict:
    """Upload ROOT (a local dataset folder) to s3://bucket/prefix: vocab.json checked against
    the manifest's vocab_sha256 first (refused when it differs or is not recorded), then
    vocabulary and shards (multipart, each checked against its manifest sha256 before it goes,
    the sha256 stored as object metadata, S3 checksums SHA-256 verified by the store), then
    manifest.json last, so readers never see a manifest with missing shards."""
    from boto3.s3.transfer import TransferConfig
    from s3transfer.utils import ChunksizeAdjuster
    from tqdm import tqdm

    if not is_s3(dest):
        raise ValueError(f"destination must be s3://bucket/prefix, got {dest!r}")
    m = read_manifest(root)
    files = _local_files(root) + [MANIFEST]
    # Every file but the manifest has an expected sha256 in the manifest; check each before it goes.
    manifest_path = os.path.join(root, MANIFEST)
    vocab_path = os.path.join(root, m.vocab)
    if not m.vocab_sha256:
        raise DataError(f"{manifest_path}: field vocab_sha256 is missing or empty; expected the sha256 of "
                        f"{vocab_path} ({sha256_file(vocab_path)}); not uploading")
    with open(vocab_path, "rb") as f:
        check_vocab_bytes(f.read(), m)  # names vocab.json, the field and the expected value
    expected = {sh.name: sh.sha256 for s in m.splits.values() for sh in s.shards}
    expected[m.vocab] = m.vocab_sha256
    client = s3_client()
    chunk = chunk_mb << 20
    tc = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=max_concurrency)
    total = sum(os.path.getsize(os.path.join(root, f)) for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not progress)
    verified: dict[str, int] = {}
    for name in files:
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        # the part size s3transfer will use (it enlarges parts past 10,000 of them)
        part = ChunksizeAdjuster().adjust_chunksize(chunk, size) if size >= chunk else None
        local_sha, local_checksum = _digests(path, part)
        if name in expected and local_sha != expected[name]:
            raise DataError(f"shard {name}: local file does not match its manifest sha256; not uploading")
        bucket, key = split_s3(join(dest, name))
        client.upload_file(path, bucket, key, Config=tc, Callback=bar.update,
                           ExtraArgs={"Metadata": {"sha256": local_sha}, "ChecksumAlgorithm": "SHA256"})
        how = _verify_stored(client, bucket, key, name, local_sha, local_checksum)
        verified[how] = verified.get(how, 0) + 1
    bar.close()
    return {"dest": dest, "files": len(files), "bytes": total, "verified": verified}
