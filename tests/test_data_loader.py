"""TrainPairs / load_eval_split: sharding across ranks and workers, batching, S3, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading

import boto3
import numpy as np
import pytest
import torch
from data_helpers import make_precomp, tiny_synth_cfg

from imram_dist.data import DataError, TrainPairs, generate_synthetic, iter_shard, load_eval_split, read_manifest
from imram_dist.data.__main__ import main as cli
from imram_dist.data.convert import convert_precomp
from imram_dist.data.loader import split_shards
from imram_dist.data.shards import Manifest, ShardInfo, ShardWriter, SplitInfo, write_manifest
from imram_dist.data.tokenize import Vocabulary


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(str(root), tiny_synth_cfg())  # 70 train images in shards of 9 (last one 7)
    return str(root)


def epoch_batches(root, split="train", **kw):
    out = {}
    for r in range(kw.get("world_size", 1)):
        tp = TrainPairs(root, split, rank=r, **kw)
        tp.set_epoch(0)
        out[r] = (tp, list(tp))
    return out


def test_batches_equal_counts_distinct_images(synth_root):
    m = read_manifest(synth_root)
    sizes = [s.images for s in m.splits["train"].shards]
    assert len(set(sizes)) > 1  # uneven shards
    for ws in (2, 3):
        runs = epoch_batches(synth_root, batch_size=8, world_size=ws, seed=1, shuffle_buffer=50)
        nb = runs[0][0].num_batches
        assert nb == 350 // (ws * 8)
        for tp, batches in runs.values():
            assert tp.num_batches == nb and len(batches) == nb
            for b in batches:
                assert b.regions.shape == (8, 8, 16) and b.regions.dtype == torch.float32
                assert b.tokens.dtype == torch.long and b.lengths.tolist() == [int((t != 0).sum()) for t in b.tokens]
                assert len(set(b.keys)) == 8  # no image twice in a batch
                assert b.tokens[:, 0].eq(1).all()


def test_shuffle_is_deterministic_and_changes_with_epoch(synth_root):
    def keys(epoch, seed=0):
        tp = TrainPairs(synth_root, "train", batch_size=7, seed=seed, shuffle_buffer=30)
        tp.set_epoch(epoch)
        return [k for b in tp for k in b.keys]

    a = keys(0)
    assert a == keys(0)
    assert a != keys(1) and a != keys(0, seed=5)


def test_workers_split_and_no_duplicates(synth_root):
    # 1 rank, 2 DataLoader workers: each reads its own shards; first pass has no repeated pair.
    tp = TrainPairs(synth_root, "train", batch_size=5, loader_workers=2, shuffle_buffer=20)
    batches = list(tp)
    assert len(batches) == tp.num_batches == 70
    pairs = [(k, tuple(t[:n].tolist())) for b in batches for k, t, n in zip(b.keys, b.tokens, b.lengths)]
    assert all(len(set(b.keys)) == 5 for b in batches)
    assert len({k for k, _ in pairs}) >= 65


def test_fewer_shards_than_ranks_splits_samples(synth_root):
    # dev has one shard of 12 images; 3 ranks each keep every 3rd sample.
    seen = []
    for r in range(3):
        tp = TrainPairs(synth_root, "dev", batch_size=4, rank=r, world_size=3, shuffle_buffer=1)
        assert split_shards([{"url": "dev-00000.tar"}], 3, r) == [{"url": "dev-00000.tar", "mod": 3, "rem": r}]
        # ... and then over 2 loader workers of that rank: every 6th sample
        assert split_shards(split_shards([{"url": "u"}], 3, r), 2, 1) == [{"url": "u", "mod": 6, "rem": r + 3}]
        seen.append({k for b in tp for k in b.keys})
    assert all(seen) and not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_eval_split_synth(synth_root):
    ev = load_eval_split(synth_root, "test")
    assert ev.regions.shape == (10, 8, 16) and ev.regions.dtype == torch.float16
    assert ev.tokens.shape[0] == 50 and ev.caption_to_image.tolist() == [i // 5 for i in range(50)]
    assert ev.image_ids == [f"synth-test-{i}" for i in range(10)]


def test_s3_upload_read_two_ranks(tmp_path, s3_bucket):
    make_precomp(tmp_path / "pre", n_train=8, n_dev=4, n_test=40)  # test split is 1:1 -> 40 pairs
    out = tmp_path / "out"
    convert_precomp(str(tmp_path / "pre"), str(out), samples_per_shard=10, progress=False)
    dest = f"s3://{s3_bucket}/datasets/tiny"
    assert cli(["upload", str(out), dest, "--chunk-mb", "5"]) == 0
    s3 = boto3.client("s3")
    head = s3.head_object(Bucket=s3_bucket, Key="datasets/tiny/test-00000.tar")
    m = read_manifest(dest)
    assert head["Metadata"]["sha256"] == m.splits["test"].shards[0].sha256
    local = load_eval_split(str(out), "train")
    remote = load_eval_split(dest, "train")
    assert torch.equal(local.regions, remote.regions) and local.captions == remote.captions
    # two ranks over 4 shards of 10 one-caption images: no overlap, no loss
    got = []
    for r in range(2):
        tp = TrainPairs(dest, "test", batch_size=4, rank=r, world_size=2, seed=0, shuffle_buffer=7)
        assert tp.num_batches == 5
        keys = [k for b in tp for k in b.keys]
        assert len(keys) == 20 and len(set(keys)) == 20
        got.append(set(keys))
    assert not (got[0] & got[1]) and got[0] | got[1] == {f"test-{i:07d}" for i in range(40)}
    # a missing object is reported by name
    s3.delete_object(Bucket=s3_bucket, Key="datasets/tiny/dev-00000.tar")
    with pytest.raises(DataError, match="dev-00000.tar: listed in the manifest but absent"):
        load_eval_split(dest, "dev")


# --- bad input --------------------------------------------------------------------------

R, D = 4, 6


def good(i):
    return dict(key=f"s-{i:03d}", regions=np.full((R, D), i, np.float32), captions=[f"a dog number {i}", "a cat"],
                image_id=str(i))


def build(root, samples_per_shard: list[list[dict]], raw: dict | None = None):
    """Write shards (ShardWriter, or raw tar members for missing-field cases) and a manifest."""
    os.makedirs(root, exist_ok=True)
    Vocabulary(["a", "dog", "cat"]).save(os.path.join(root, "vocab.json"))
    shards = []
    for si, samples in enumerate(samples_per_shard):
        name = f"train-{si:05d}.tar"
        w = ShardWriter(os.path.join(root, name), "float16")
        ncap = 0
        for s in samples:
            if "files" in s:  # raw members
                w.write_files(s["key"], s["files"])
                ncap += 2
            else:
                w.write(**s)
                ncap += len(s["captions"])
        sha, size = w.close()
        shards.append(ShardInfo(name, len(samples), ncap, sha, size))
    split = SplitInfo("train", sum(s.images for s in shards), sum(s.captions for s in shards), None, shards)
    vocab_sha = hashlib.sha256(open(os.path.join(root, "vocab.json"), "rb").read()).hexdigest()
    write_manifest(root, Manifest(str(root), R, D, "float16", "vocab.json", {"train": split},
                                  vocab_sha256=vocab_sha))
    return str(root)


def npy(a):
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def corrupt_but_parseable(path):
    """Change bytes in the middle of a shard so that it still parses (a caption's text)."""
    data = open(path, "rb").read()
    i = data.index(b"a dog number 1")
    open(path, "wb").write(data[:i] + b"a cat number 1" + data[i + 14:])


BAD_SAMPLES = {
    "missing field": ({"key": "s-001", "files": {"json": json.dumps({"image_id": "1", "captions": ["a", "b"]}).encode()}},
                      "s-001: missing field region features"),
    "wrong R": (dict(good(1), regions=np.zeros((R + 1, D))), r"s-001: region features have shape \(5, 6\)"),
    "wrong D": (dict(good(1), regions=np.zeros((R, D - 1))), r"s-001: region features have shape \(4, 5\)"),
    "non-finite": (dict(good(1), regions=np.full((R, D), np.nan)), "s-001: region features contain NaN"),
    "empty caption": (dict(good(1), captions=["a dog", "  "]), "s-001: caption #1 is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample(tmp_path, case):
    bad, msg = BAD_SAMPLES[case]
    root = build(tmp_path / "ds", [[good(0), bad, good(2)], [good(3), good(4), good(5)]])
    with pytest.raises(DataError, match=f"shard train-00000.tar, key {msg}"):
        load_eval_split(root, "train")
    ev = load_eval_split(root, "train", skip_bad=True)
    assert ev.image_ids == ["0", "2", "3", "4", "5"] and len(ev.skipped) == 1 and "s-001" in ev.skipped[0]
    with pytest.raises(DataError, match="train-00000.tar"):
        list(TrainPairs(root, "train", batch_size=2, shuffle_buffer=1))
    tp = TrainPairs(root, "train", batch_size=2, shuffle_buffer=1, skip_bad=True)
    keys = {k for b in tp for k in b.keys}
    assert tp.bad_samples >= 1 and "s-001" not in keys


@pytest.mark.parametrize("case", ["truncated", "corrupt", "absent", "checksum"])
def test_bad_shard(tmp_path, case):
    root = build(tmp_path / "ds", [[good(0), good(1), good(2)], [good(3), good(4), good(5)]])
    path = os.path.join(root, "train-00000.tar")
    data = open(path, "rb").read()
    if case == "truncated":
        open(path, "wb").write(data[: len(data) // 2 + 100])
        msg = "train-00000.tar"
    elif case == "corrupt":
        open(path, "wb").write(data[:1024] + b"\xff" * 600 + data[1624:])
        msg = "train-00000.tar"
    elif case == "absent":
        os.remove(path)
        msg = "train-00000.tar: listed in the manifest but absent"
    else:
        corrupt_but_parseable(path)
        msg = "train-00000.tar: checksum mismatch"
    with pytest.raises(DataError, match=msg):
        load_eval_split(root, "train")
    ev = load_eval_split(root, "train", skip_bad=True)
    assert ev.image_ids[-3:] == ["3", "4", "5"] and ev.skipped and all("train-00000.tar" in s for s in ev.skipped)
    assert cli(["inspect", root]) == 1


def test_eval_split_with_more_images_than_the_manifest_is_a_clear_error(synth_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    real = manifest["splits"]["dev"]["images"]
    manifest["splits"]["dev"]["images"] = real - 1  # the shards now hold one image too many
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"split dev: shard dev-\d+\.tar key .*more images than the manifest's {real - 1}"):
        load_eval_split(str(root), "dev")


# --- verified before use ------------------------------------------------------------------

SHARD0_KEYS = {"s-000", "s-001", "s-002"}


def test_checksum_mismatch_yields_no_sample_of_the_shard(tmp_path):
    root = build(tmp_path / "ds", [[good(0), good(1), good(2)], [good(3), good(4), good(5)]])
    corrupt_but_parseable(os.path.join(root, "train-00000.tar"))
    # the damage is invisible to parsing: unverified, every pair of the shard comes through
    loose = TrainPairs(root, "train", batch_size=1, shuffle_buffer=1, verify_checksums=False)
    assert {k for b in loose for k in b.keys} >= SHARD0_KEYS
    # verified: a DataError naming the shard before any of its samples is yielded (batches of
    # one pair, shuffle buffer 1: a streaming check would have let several through)
    for seed in range(4):  # some seeds read shard 1 first, some shard 0
        seen: list[str] = []
        with pytest.raises(DataError, match=r"shard train-00000.tar: checksum mismatch \(sha256 [0-9a-f]{16}\.\.\., "
                                            r"manifest [0-9a-f]{16}\.\.\.\): none of its samples is used") as ei:
            for b in TrainPairs(root, "train", batch_size=1, shuffle_buffer=1, seed=seed):
                seen.extend(b.keys)
        assert ei.value.shard == "train-00000.tar"
        assert not SHARD0_KEYS & set(seen), seen
    m = read_manifest(root)
    with pytest.raises(DataError, match="checksum mismatch"):
        next(iter_shard(m.shard_url(m.splits["train"].shards[0]), expect=m.splits["train"].shards[0]))
    # skip_bad: the whole shard is left out and reported; the other shard trains
    tp = TrainPairs(root, "train", batch_size=1, shuffle_buffer=1, skip_bad=True)
    keys = {k for b in tp for k in b.keys}
    assert keys == {"s-003", "s-004", "s-005"} and tp.bad_samples >= 1  # once per pass over the shards
    assert all("train-00000.tar: checksum mismatch" in msg for msg in tp.report.messages)
    ev = load_eval_split(root, "train", skip_bad=True)
    assert ev.image_ids == ["3", "4", "5"]


def test_checksum_mismatch_on_s3_yields_no_sample(tmp_path, s3_bucket):
    root = build(tmp_path / "ds", [[good(0), good(1), good(2)], [good(3), good(4), good(5)]])
    dest = f"s3://{s3_bucket}/datasets/corrupt"
    assert cli(["upload", root, dest]) == 0
    corrupt_but_parseable(os.path.join(root, "train-00000.tar"))
    boto3.client("s3").upload_file(os.path.join(root, "train-00000.tar"), s3_bucket,
                                   "datasets/corrupt/train-00000.tar")
    seen: list[str] = []
    with pytest.raises(DataError, match="shard train-00000.tar: checksum mismatch"):
        for b in TrainPairs(dest, "train", batch_size=1, shuffle_buffer=1):
            seen.extend(b.keys)
    assert not SHARD0_KEYS & set(seen)


def test_a_large_shard_is_verified_through_a_temporary_file(tmp_path, monkeypatch):
    import imram_dist.data.io as dio

    root = build(tmp_path / "ds", [[good(0), good(1), good(2)], [good(3), good(4), good(5)]])
    monkeypatch.setattr(dio, "SPOOL_MAX_BYTES", 1024)  # every shard spills to disk
    assert load_eval_split(root, "train").image_ids == ["0", "1", "2", "3", "4", "5"]
    corrupt_but_parseable(os.path.join(root, "train-00000.tar"))
    with pytest.raises(DataError, match="train-00000.tar: checksum mismatch"):
        load_eval_split(root, "train")


# --- unique temporary names ---------------------------------------------------------------

def test_shard_writers_into_one_name_do_not_clash(tmp_path):
    path = str(tmp_path / "train-00000.tar")
    w1, w2 = ShardWriter(path), ShardWriter(path)
    assert w1.tmp != w2.tmp and all(os.path.dirname(w.tmp) == str(tmp_path) for w in (w1, w2))
    w1.write(**good(1))
    w2.write(**good(2))
    w1.close()
    sha2, size2 = w2.close()
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha2 and os.path.getsize(path) == size2
    w3 = ShardWriter(path)
    w3.write(**good(3))
    w3.abort()
    assert os.listdir(tmp_path) == ["train-00000.tar"]
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha2


def test_atomic_writes_from_threads_do_not_clash(tmp_path):
    from imram_dist.data.io import atomic_write_bytes

    path = tmp_path / "f.json"
    errors: list[BaseException] = []

    def write(i):
        try:
            for _ in range(40):
                atomic_write_bytes(path, bytes([65 + i]) * 20000)
        except BaseException as e:  # noqa: BLE001 (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = path.read_bytes()
    assert len(data) == 20000 and len(set(data)) == 1
    assert os.listdir(tmp_path) == ["f.json"]


# --- vocabulary checked against the manifest ---------------------------------------------

def test_upload_refuses_a_vocabulary_that_does_not_match_the_manifest(tmp_path, s3_bucket, capsys):
    make_precomp(tmp_path / "pre", n_train=4, n_dev=2, n_test=2)
    out = tmp_path / "out"
    m = convert_precomp(str(tmp_path / "pre"), str(out), samples_per_shard=10, progress=False)
    Vocabulary(["a", "dog", "zebra"]).save(str(out / "vocab.json"))
    dest = f"s3://{s3_bucket}/datasets/badvocab"
    assert cli(["upload", str(out), dest]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'vocab.json'}: sha256 " in err and "field vocab_sha256" in err
    assert f"(expected {m.vocab_sha256})" in err
    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="datasets/badvocab").get("KeyCount") == 0
    # the loaders refuse it too (a different vocabulary would change every token id)
    with pytest.raises(DataError, match=rf"vocab.json: sha256 [0-9a-f]{{64}} does not match field vocab_sha256 .*"
                                        rf"\(expected {m.vocab_sha256}\)"):
        TrainPairs(str(out), "train", batch_size=2)
    # a manifest without the field cannot be checked: refused, naming the field
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["vocab_sha256"] = ""
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli(["upload", str(out), dest]) == 2
    assert "manifest.json: field vocab_sha256 is missing or empty" in capsys.readouterr().err
    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="datasets/badvocab").get("KeyCount") == 0


def test_upload_is_verified_by_s3_checksums_without_reading_back(tmp_path, s3_bucket, monkeypatch, capsys):
    import base64

    import imram_dist.data.tools as tools
    from imram_dist.data.io import s3_client

    make_precomp(tmp_path / "pre", n_train=20, n_dev=2, n_test=2, R=36, D=2048)
    out = tmp_path / "out"
    m = convert_precomp(str(tmp_path / "pre"), str(out), samples_per_shard=20, dtype="float32", progress=False)
    big = out / "train-00000.tar"
    assert big.stat().st_size > 5 << 20  # two parts of 5 MiB
    gets: list[str] = []
    client = s3_client()

    def on_get(**kw):
        gets.append(kw["params"]["url_path"])

    client.meta.events.register("before-call.s3.GetObject", on_get)
    try:
        dest = f"s3://{s3_bucket}/datasets/checksums"
        assert cli(["upload", str(out), dest, "--chunk-mb", "5"]) == 0
        assert "by the store's SHA-256 checksum" in capsys.readouterr().out
        assert gets == []  # nothing was downloaded to verify it
        # the store's checksum of the two-part object is S3's composite of the parts' SHA-256
        data = big.read_bytes()
        parts = [hashlib.sha256(data[i:i + (5 << 20)]).digest() for i in (0, 5 << 20)]
        head = client.head_object(Bucket=s3_bucket, Key="datasets/checksums/train-00000.tar", ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
        assert head["Metadata"]["sha256"] == m.splits["train"].shards[0].sha256
        assert torch.equal(load_eval_split(dest, "train").regions, load_eval_split(str(out), "train").regions)
        # a store holding other bytes than the local file is an error naming the file
        real = tools._digests
        monkeypatch.setattr(tools, "_digests", lambda path, part: (real(path, part)[0], "AAAA" + real(path, part)[1][4:]))
        with pytest.raises(DataError, match=r"upload of vocab.json to s3://.*ChecksumSHA256 .* differs from the local"):
            tools.upload_dataset(str(out), dest, progress=False, chunk_mb=5)
    finally:
        client.meta.events.unregister("before-call.s3.GetObject", on_get)
