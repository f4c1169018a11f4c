"""Converter, synthetic corpus, tokeniser, vocabulary, CLI."""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import make_precomp, tiny_synth_cfg

from imram_dist.data import (
    DataError,
    Vocabulary,
    ensure_synthetic,
    generate_synthetic,
    iter_shard,
    load_eval_split,
    read_manifest,
    tokenize,
)
from imram_dist.data.__main__ import main as cli
from imram_dist.data.convert import convert_precomp
from imram_dist.data.shards import ShardWriter

# --- tokeniser and vocabulary -----------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("A man riding a horse.", ["a", "man", "riding", "a", "horse", "."]),
    ("The dog's ball isn't red!", ["the", "dog", "'s", "ball", "is", "n't", "red", "!"]),
    ("They can't, won't; we'll see...", ["they", "ca", "n't", ",", "wo", "n't", ";", "we", "'ll", "see", "..."]),
    ('He said "hi" (twice)', ["he", "said", "``", "hi", "''", "(", "twice", ")"]),
    ("I cannot go, gonna stay", ["i", "can", "not", "go", ",", "gon", "na", "stay"]),
    ("1,000 people at 5:30 in a t-shirt", ["1,000", "people", "at", "5:30", "in", "a", "t-shirt"]),
    ("A dog. A cat on the U.S. flag.", ["a", "dog", ".", "a", "cat", "on", "the", "u.s.", "flag", "."]),
    ("you're I'm they've she'd", ["you", "'re", "i", "'m", "they", "'ve", "she", "'d"]),
    ("  lots   of\tspace  ", ["lots", "of", "space"]),
])
def test_tokenize(text, expected):
    assert tokenize(text) == expected


def test_vocabulary_encode_and_roundtrip(tmp_path):
    v = Vocabulary(["a", "dog", "runs"])
    assert [v.word2idx[w] for w in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]
    assert v.encode("A dog flies.") == [1, 4, 5, 3, 3, 2]
    p = tmp_path / "vocab.json"
    v.save(str(p))
    d = json.loads(p.read_text())
    assert set(d) == {"word2idx", "idx2word", "idx"} and d["idx"] == 7 and d["idx2word"]["4"] == "a"
    assert Vocabulary.load(str(p)) == v and len(Vocabulary.load(str(p))) == 7
    with pytest.raises(ValueError, match="word2idx"):
        Vocabulary.from_json({"idx2word": {}, "idx": 0})


# --- convert-precomp --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_convert_reads_back_exactly(tmp_path, dtype):
    src = make_precomp(tmp_path / "pre")
    out = tmp_path / "out"
    m = convert_precomp(str(tmp_path / "pre"), str(out), samples_per_shard=3, dtype=dtype, progress=False)
    assert set(m.splits) == {"train", "dev", "test"}
    assert (m.regions, m.feature_dim, m.dtype) == (4, 8, dtype)
    assert m.provenance["files"]["dev"]["features"] == "dev_feat.npy"
    m2 = read_manifest(str(out))
    for split, (feats, caps, cpi) in src.items():
        info = m2.splits[split]
        assert (info.images, info.captions, info.captions_per_image) == (len(feats), len(caps), cpi)
        assert [s.images for s in info.shards] == [min(3, len(feats) - i) for i in range(0, len(feats), 3)]
        ev = load_eval_split(str(out), split)
        assert ev.regions.dtype == getattr(torch, dtype)
        np.testing.assert_array_equal(ev.regions.numpy(), feats.astype(dtype))
        assert ev.captions == caps
        assert ev.caption_to_image.tolist() == [i // cpi for i in range(len(caps))]
        assert ev.image_ids == [f"{split}/{i}" for i in range(len(feats))]
        vocab = m2.load_vocab()
        for j, c in enumerate(caps):
            ids = vocab.encode(c)
            assert ev.tokens[j, : ev.lengths[j]].tolist() == ids and ev.tokens[j, ev.lengths[j]:].eq(0).all()
    # vocabulary: words with count >= 4 in train + dev captions, nothing else
    counts = Counter(t for s in ("train", "dev") for c in src[s][1] for t in tokenize(c))
    vocab = m2.load_vocab()
    assert set(vocab.word2idx) - {"<pad>", "<start>", "<end>", "<unk>"} == {w for w, n in counts.items() if n >= 4}
    assert "zebra" not in vocab
    ev32 = load_eval_split(str(out), "test", dtype="float32")
    assert ev32.regions.dtype == torch.float32


def test_convert_deterministic_existing_vocab_and_count_error(tmp_path):
    make_precomp(tmp_path / "pre")
    convert_precomp(str(tmp_path / "pre"), str(tmp_path / "a"), samples_per_shard=3, progress=False)
    convert_precomp(str(tmp_path / "pre"), str(tmp_path / "b"), samples_per_shard=3, progress=False)
    for name in os.listdir(tmp_path / "a"):
        if name.endswith(".tar"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    v = Vocabulary(["dog", "zebra"])
    v.save(str(tmp_path / "v.json"))
    m = convert_precomp(str(tmp_path / "pre"), str(tmp_path / "c"), vocab=str(tmp_path / "v.json"), progress=False)
    assert m.load_vocab() == v
    # 7 captions for 2 images
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "test_ims.npy", np.zeros((2, 4, 8), np.float32))
    (bad / "test_caps.txt").write_text("\n".join(["x"] * 7) + "\n")
    with pytest.raises(DataError, match=r"test_caps.txt: 7 captions do not fit the 2 images"):
        convert_precomp(str(bad), str(tmp_path / "d"), vocab=str(tmp_path / "v.json"), progress=False)


def test_convert_interrupted_then_resumed(tmp_path, monkeypatch):
    make_precomp(tmp_path / "pre", n_train=10)
    ref = tmp_path / "ref"
    convert_precomp(str(tmp_path / "pre"), str(ref), samples_per_shard=2, progress=False)
    out = tmp_path / "out"
    real_write = ShardWriter.write
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_write(self, *a, **k)

    monkeypatch.setattr(ShardWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_precomp(str(tmp_path / "pre"), str(out), samples_per_shard=2, progress=False)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    names = sorted(os.listdir(out))
    assert "manifest.json" not in names and not any(n.endswith(".tmp") for n in names)
    assert names.count("train-00003.tar") == 0 and "train-00002.tar" in names  # no partial shard
    before = os.stat(out / "train-00000.tar").st_mtime_ns
    convert_precomp(str(tmp_path / "pre"), str(out), samples_per_shard=2, progress=False)
    assert os.stat(out / "train-00000.tar").st_mtime_ns == before  # skipped: checksum matched
    for name in os.listdir(ref):
        if name.endswith(".tar") or name == "vocab.json":
            assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert read_manifest(str(out)).splits == read_manifest(str(ref)).splits


def test_cli_convert_inspect(tmp_path, capsys):
    make_precomp(tmp_path / "pre")
    assert cli(["convert-precomp", str(tmp_path / "pre"), str(tmp_path / "out"), "--samples-per-shard", "4"]) == 0
    assert cli(["inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "train: 8/8 images, 40/40 captions, 2 shards" in text and "0 problems" in text
    os.remove(tmp_path / "out" / "dev-00000.tar")
    assert cli(["inspect", str(tmp_path / "out")]) == 1
    assert "shard dev-00000.tar: listed in the manifest but absent" in capsys.readouterr().out


# --- shard bytes --------------------------------------------------------------------------

def test_shard_bytes_are_pinned_and_plain_webdataset_reads_them(tmp_path):
    import webdataset as wds

    path = tmp_path / "train-00000.tar"
    w = ShardWriter(str(path), "float16")
    for i in range(3):
        w.write(f"train-{i:07d}", np.arange(24, dtype=np.float32).reshape(4, 6) / (i + 1),
                [f"a dog number {i}", "a cat \u00e9t\u00e9"], f"img/{i}", {"twin": "x"} if i == 1 else None)
    # the bytes the format has had since its first writer (tarfile by hand), now webdataset's TarWriter
    assert w.close() == ("fdc785ac866a96ef7b94bef5fbe45523a54a6d91b4e9b293096e24e463e36e30", 10240)
    with tarfile.open(path) as t:
        members = t.getmembers()
    assert [m.name for m in members] == [f"train-{i:07d}.{e}" for i in range(3) for e in ("json", "npy")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    assert path.read_bytes()[257:265] == b"ustar\x0000"  # POSIX ustar magic and version (not GNU)
    got = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [f"train-{i:07d}" for i in range(3)]
    np.testing.assert_array_equal(got[2]["npy"], (np.arange(24, dtype=np.float32).reshape(4, 6) / 3).astype(np.float16))
    assert got[1]["json"] == {"image_id": "img/1", "captions": ["a dog number 1", "a cat \u00e9t\u00e9"],
                              "meta": {"twin": "x"}}


# --- synthetic corpus -------------------------------------------------------------------

def test_synth_deterministic_and_planted_structure(tmp_path):
    cfg = tiny_synth_cfg()
    generate_synthetic(str(tmp_path / "a"), cfg)
    generate_synthetic(str(tmp_path / "b"), cfg)
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b"))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    generate_synthetic(str(tmp_path / "c"), tiny_synth_cfg(seed=4))
    assert (tmp_path / "a" / "train-00000.tar").read_bytes() != (tmp_path / "c" / "train-00000.tar").read_bytes()

    m = read_manifest(str(tmp_path / "a"))
    assert (m.regions, m.feature_dim) == (8, 16) and m.splits["train"].images == 70
    samples = [s for sh in m.splits["train"].shards for s in iter_shard(m.shard_url(sh), regions=8, feature_dim=16)]
    by_key = {s.key: s for s in samples}
    twins = [(s, by_key[s.meta["twin"]]) for s in samples if "twin" in s.meta and s.key < s.meta["twin"]]
    assert len(twins) >= 10
    vocab = m.load_vocab()
    from imram_dist.data.synth import ATTRIBUTES
    attr_words = {w for syn in ATTRIBUTES for w in syn}
    for a, b in twins:
        assert a.meta["objects"] == b.meta["objects"] and a.meta["regions"] == b.meta["regions"]
        assert sorted(a.meta["attributes"]) == sorted(b.meta["attributes"])
        assert all(x != y for x, y in zip(a.meta["attributes"], b.meta["attributes"]))  # every attribute moved
        obj_regions = {r for rs in a.meta["regions"] for r in rs}
        for r in range(8):
            same = np.array_equal(a.regions[r], b.regions[r])
            assert same == (r not in obj_regions), (a.key, r)
        for ca, cb in zip(a.captions, b.captions):
            ta, tb = tokenize(ca), tokenize(cb)
            assert len(ta) == len(tb)
            diff = [(x, y) for x, y in zip(ta, tb) if x != y]
            assert all(x in attr_words and y in attr_words for x, y in diff)
    # several objects, 5 varied captions, synonyms, sometimes an object left out
    assert all(len(s.captions) == 5 and 2 <= len(s.meta["objects"]) <= 4 for s in samples)
    assert len({c.split(" ")[0] for s in samples for c in s.captions}) >= 4
    assert "puppy" in vocab and "dog" in vocab and "crimson" in vocab


def test_ensure_synthetic_generates_once(tmp_path):
    cfg = tiny_synth_cfg(train_images=20, dev_images=5, test_images=5)
    root = ensure_synthetic(str(tmp_path), cfg)
    t0 = os.stat(os.path.join(root, "manifest.json")).st_mtime_ns
    time.sleep(0.01)
    assert ensure_synthetic(str(tmp_path), cfg) == root
    assert os.stat(os.path.join(root, "manifest.json")).st_mtime_ns == t0
    other = ensure_synthetic(str(tmp_path), tiny_synth_cfg(train_images=20, dev_images=5, test_images=5, seed=9))
    assert other != root
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synth-tmp")]
    assert read_manifest(root).provenance["synth_config"]["train_images"] == 20


def test_cli_synth_takes_config_keys(tmp_path, capsys):
    """synth follows the one CLI convention: --config, shorthand flags for data.synth keys, key=value."""
    from imram_dist.config import load_config

    out = tmp_path / "syn"
    assert cli(["synth", str(out), "--train-images", "12", "--seed", "3", "data.synth.dev_images=5",
                "data.synth.test_images=4", "data.synth.regions=10"]) == 0
    m = read_manifest(str(out))
    assert {k: v.images for k, v in m.splits.items()} == {"train": 12, "dev": 5, "test": 4}
    assert m.regions == 10
    # without --config the default preset's corpus: what `python -m imram_dist.train` trains on
    assert load_config("default").data.synth.feature_dim == m.feature_dim
    capsys.readouterr()
    assert cli(["synth", str(tmp_path / "bad"), "train.lr=3"]) == 2
    assert "synth takes data.synth.* keys only, got ['train.lr=3']" in capsys.readouterr().err
    assert cli(["synth", str(tmp_path / "bad"), "data.synth.regions=many"]) == 2
    assert "data.synth.regions" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli(["synth", "--help"]) == 0
    assert "[--train-images TRAIN_IMAGES] [--seed SEED]" in capsys.readouterr().out
