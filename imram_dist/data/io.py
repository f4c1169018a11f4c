"""Where bytes come from: local paths and s3:// URLs (boto3, streamed), plus atomic writes.

Importing this module registers an ``s3`` handler in WebDataset's gopen scheme table, so
``webdataset.gopen.gopen("s3://bucket/key")`` (and every WebDataset pipeline) streams objects
with boto3. The endpoint and credentials come from boto3's usual sources (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ~/.aws, instance roles); none are in code or logs.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import secrets
import tempfile
import threading
from urllib.parse import urlparse

import braceexpand

# `webdataset.gopen` is the function; the module has to be imported by its full name.
wds_gopen = importlib.import_module("webdataset.gopen")


class DataError(RuntimeError):
    """Malformed or missing data; the message names the shard (and key when there is one)."""

    def __init__(self, message: str, shard: str = "", key: str = ""):
        super().__init__(message)
        self.shard = shard
        self.key = key


_clients: dict[int, object] = {}
_lock = threading.Lock()


def s3_endpoint_url() -> str | None:
    """The S3 endpoint by boto3's own precedence: AWS_ENDPOINT_URL_S3 (service-specific), then
    AWS_ENDPOINT_URL (global), else None (AWS). Every S3 user in the project should take it here."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client():
    """One boto3 S3 client per process (clients must not cross a fork)."""
    pid = os.getpid()
    with _lock:
        client = _clients.get(pid)
        if client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            client = boto3.session.Session().client(
                "s3", endpoint_url=s3_endpoint_url(),
                config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32))
            _clients[pid] = client
    return client


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    pr = urlparse(url)
    if pr.scheme != "s3" or not pr.netloc:
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return pr.netloc, pr.path.lstrip("/")


def join(root: str, name: str) -> str:
    root = str(root)
    if is_s3(root):
        return root.rstrip("/") + "/" + name
    return os.path.join(os.path.expanduser(root), name)


def _s3_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset gopen handler: a streaming boto3 body for s3://bucket/key."""
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported by the s3 gopen handler")
    bucket, key = split_s3(url)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as e:  # botocore ClientError
        if _s3_missing(e):
            raise FileNotFoundError(f"{url}: no such object") from None
        raise


wds_gopen.gopen_schemes["s3"] = gopen_s3


def open_stream(url: str):
    """A readable binary stream for a local path, file:// or s3:// URL (WebDataset gopen)."""
    url = str(url)
    if not is_s3(url) and "://" not in url:
        url = os.path.expanduser(url)
    return wds_gopen.gopen(url, "rb")


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        return f.read()


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Brace patterns (``shards/train-{00000..00009}.tar``) or lists -> list of URLs."""
    if isinstance(pattern, (list, tuple)):
        return [u for p in pattern for u in expand_urls(p)]
    return list(braceexpand.braceexpand(str(pattern)))


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open_stream(path) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def unique_tmp_path(path: str | os.PathLike) -> str:
    """A temporary name beside path, unique per call (pid + random token), so that writers
    in other processes or threads never share one; ends in ``.tmp``."""
    return f"{os.fspath(path)}.{os.getpid()}-{secrets.token_hex(6)}.tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a unique temporary name beside path, fsync, then os.replace: readers see the
    old file or the whole new one; a failed write leaves no temporary file."""
    path = os.path.expanduser(os.fspath(path))
    tmp = unique_tmp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# A fetched shard stays in memory up to this size, beyond it in an anonymous temporary file.
SPOOL_MAX_BYTES = 512 << 20


def fetch_hashed(stream, chunk: int = 1 << 22) -> tuple[tempfile.SpooledTemporaryFile, str, int]:
    """Read a whole stream into a private copy (memory, or an unlinked temporary file when it
    is large) while hashing it -> (copy rewound to 0, sha256 hex, bytes). The bytes a caller
    parses from the copy are exactly the bytes that were hashed: nothing can change them
    between the checksum and their use (unlike hashing a file, then reading it again)."""
    copy = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_BYTES)
    h = hashlib.sha256()
    n = 0
    try:
        while True:
            b = stream.read(chunk)
            if not b:
                break
            h.update(b)
            copy.write(b)
            n += len(b)
    except BaseException:
        copy.close()
        raise
    copy.seek(0)
    return copy, h.hexdigest(), n
