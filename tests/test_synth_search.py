"""The search corpus knobs of the synthetic generator (SynthConfig.binding) and configs/search.yaml:
default-off is byte-identical to the corpus generated before the knob existed, the keyed corpus
is deterministic, and it has the structure docs/synthetic.md claims."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from data_helpers import tiny_synth_cfg

from imram_dist.config import SynthConfig, load_config
from imram_dist.data import ensure_synthetic, generate_synthetic, iter_shard, read_manifest, tokenize
from imram_dist.data.synth import ATTRIBUTES, World, config_hash, generate_split

# sha256 of every file of generate_synthetic(tiny_synth_cfg()) made by the generator before
# SynthConfig.binding existed (commit a221a22): the default must keep producing these bytes.
BEFORE_KNOBS = {
    "dev-00000.tar": "518e81fcee2535f29f90d560c9d4b51a5a19c8827e0d8aa09e69c6e16c1b7eb1",
    "dev-00001.tar": "becb93a4d6df134a24f95a4582c65b347a60e91ba940766fa0473d884c8cb38b",
    "manifest.json": "5474623a1e0e5a30708bebc40509b7ceac7f172d7dd8a77b5bafee23758129c1",
    "test-00000.tar": "82dab35c4caafe35096068d5ab7600b05f22c2074fc4f2de9bda8182478a895e",
    "test-00001.tar": "e358199b9e4d36771720843db67b3334e5e56230fa6a57a797167782e8cd525a",
    "train-00000.tar": "2572233be0af1891a2c3c9d7362be2c7004fcd95d0457662f047abaa78f0e435",
    "train-00001.tar": "09bd07489a6295b51e9d2055c231734cf7b1d910ccca4a55ec446ae1f9ec79f5",
    "train-00002.tar": "04433e5f8c27617af57d8f23ba54879a20889c2f5699e2e3b3595462c5ddd1c4",
    "train-00003.tar": "9cf6bd46c3f49248ae1f0b57112628d4e3dd7e9e65c2eccc564b529514018bd7",
    "train-00004.tar": "272ba5779e18d270e853bcb1b1010301581a41cb1c80bbdb6c0291af3611c91e",
    "train-00005.tar": "5a392af85bf5e70dcf871d9411b837aeaf6d4d3a6d9e3c41b3c20df288c4e70a",
    "train-00006.tar": "622c82da3a2b5bf8c7d6eac381e3428fd1ba458b7b7951e8c1b4e697f6e361ec",
    "train-00007.tar": "2c923127c73c21fec16c135497e31b011625996f4e3c2f7a0d6a2296a4f1c523",
    "vocab.json": "3a093fdd14e81872fe37bf1448ee9c95bc9ebb3ebc941b4349bac26ea45153a6",
}
DEFAULT_HASH_BEFORE = "1dfc65392799a62b"  # config_hash(SynthConfig()) before the knob: the cache name


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def keyed_cfg(**kw) -> SynthConfig:
    base = dict(binding="key", regions=12, max_objects=4)
    base.update(kw)
    return tiny_synth_cfg(**base)


def _samples(root, split="train"):
    m = read_manifest(str(root))
    return [s for sh in m.splits[split].shards
            for s in iter_shard(m.shard_url(sh), regions=m.regions, feature_dim=m.feature_dim)]


def test_default_is_byte_identical_to_before_the_knob(tmp_path):
    generate_synthetic(str(tmp_path / "d"), tiny_synth_cfg())
    generate_synthetic(str(tmp_path / "j"), tiny_synth_cfg(binding="joint"))  # explicit default
    assert sorted(os.listdir(tmp_path / "d")) == sorted(BEFORE_KNOBS)
    for name, sha in BEFORE_KNOBS.items():
        assert _sha(tmp_path / "d" / name) == sha, name
        assert _sha(tmp_path / "j" / name) == sha, name
    assert config_hash(SynthConfig()) == DEFAULT_HASH_BEFORE
    prov = json.loads((tmp_path / "d" / "manifest.json").read_text())["provenance"]["synth_config"]
    assert "binding" not in prov and prov["regions"] == 8
    assert all("attribute_regions" not in s.meta for s in _samples(tmp_path / "d"))


def test_keyed_corpus_deterministic_and_recorded(tmp_path):
    generate_synthetic(str(tmp_path / "a"), keyed_cfg())
    generate_synthetic(str(tmp_path / "b"), keyed_cfg())
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b"))
    for f in files:
        assert _sha(tmp_path / "a" / f) == _sha(tmp_path / "b" / f), f
    generate_synthetic(str(tmp_path / "c"), keyed_cfg(seed=4))
    assert _sha(tmp_path / "a" / "train-00000.tar") != _sha(tmp_path / "c" / "train-00000.tar")
    assert read_manifest(str(tmp_path / "a")).provenance["synth_config"]["binding"] == "key"
    assert config_hash(keyed_cfg()) != config_hash(keyed_cfg(binding="joint"))
    root = ensure_synthetic(str(tmp_path / "cache"), keyed_cfg())
    assert root.endswith(config_hash(keyed_cfg())) and ensure_synthetic(str(tmp_path / "cache"), keyed_cfg()) == root


def test_keyed_twins_differ_only_in_attribute_regions(tmp_path):
    """A keyed twin keeps every object region and distractor bit for bit; only the attribute
    regions change, and they hold the same attributes as the partner's, bound to other objects.
    (In the joint corpus the object regions themselves change: tested in test_data_format.py.)"""
    generate_synthetic(str(tmp_path / "k"), keyed_cfg())
    samples = _samples(tmp_path / "k")
    by_key = {s.key: s for s in samples}
    twins = [(s, by_key[s.meta["twin"]]) for s in samples if "twin" in s.meta and s.key < s.meta["twin"]]
    assert len(twins) >= 10
    attr_words = {w for syn in ATTRIBUTES for w in syn}
    for a, b in twins:
        assert a.meta["objects"] == b.meta["objects"] and a.meta["regions"] == b.meta["regions"]
        assert a.meta["attribute_regions"] == b.meta["attribute_regions"]
        assert sorted(a.meta["attributes"]) == sorted(b.meta["attributes"])
        assert all(x != y for x, y in zip(a.meta["attributes"], b.meta["attributes"]))
        att_regions = set(a.meta["attribute_regions"])
        obj_regions = {r for rs in a.meta["regions"] for r in rs}
        assert len(att_regions) == len(a.meta["objects"]) and not att_regions & obj_regions
        for r in range(a.regions.shape[0]):
            same = np.array_equal(a.regions[r], b.regions[r])
            assert same == (r not in att_regions), (a.key, r)
        for ca, cb in zip(a.captions, b.captions):  # captions: the same, attribute words swapped
            diff = [(x, y) for x, y in zip(tokenize(ca), tokenize(cb)) if x != y]
            assert diff and all(x in attr_words and y in attr_words for x, y in diff)


def test_attribute_is_bound_only_through_the_key():
    """Rendered features: an object's regions do not depend on its attribute at all; its
    attribute region carries the object's key (closer to its own object's regions than to the
    other objects' regions of the same image), and the same attribute in another binding (another
    key) is a different feature, so no region by itself says which object is, e.g., red."""
    cfg = SynthConfig(binding="key", noise=0.0, train_images=400)
    world = World(cfg)
    own, other = [], []
    for _, feats, _, _, meta in generate_split(world, "train", cfg.train_images, 0):
        f = feats - feats.mean(0, keepdims=True)  # remove what every region of the image shares
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        for j, ar in enumerate(meta["attribute_regions"]):
            for k, regs in enumerate(meta["regions"]):
                c = float(np.mean([f[ar] @ f[r] for r in regs]))
                (own if k == j else other).append(c)
    gap = np.mean(own) - np.mean(other)
    assert gap > 0.15, (np.mean(own), np.mean(other))
    # twins: same attribute content, other key -> attribute region changes; object regions do not
    pairs = list(generate_split(world, "dev", 60, 1))
    by_key = {p[0]: p for p in pairs}
    checked = 0
    for key, feats, _, _, meta in pairs:
        t = meta.get("twin")
        if t is None or key > t:
            continue
        tf, tm = by_key[t][1], by_key[t][4]
        for j, ar in enumerate(meta["attribute_regions"]):
            # the twin's region with this attribute sits at another object's attribute slot
            k = tm["attributes"].index(meta["attributes"][j])
            assert k != j and not np.allclose(feats[ar], tf[tm["attribute_regions"][k]], atol=1e-3)
            checked += 1
        for regs in meta["regions"]:
            assert np.array_equal(feats[regs], tf[regs])
    assert checked >= 20


def test_keyed_corpus_needs_room_for_attribute_regions():
    with pytest.raises(ValueError, match=r"data.synth.regions: expected at least 3 x max_objects = 12 with "
                                         r"binding='key', got 8"):
        World(tiny_synth_cfg(binding="key"))  # tiny: 8 regions, up to 4 objects
    with pytest.raises(ValueError, match=r"data.synth.binding: expected one of .*'joint'.*got 'loose'"):
        World(dataclasses.replace(tiny_synth_cfg(), binding="loose"))


def test_search_preset_uses_the_keyed_corpus():
    cfg = load_config("search")
    assert cfg.data.synth.binding == "key"
    assert cfg.model.image_dim == cfg.data.synth.feature_dim
    assert 3 * cfg.data.synth.max_objects <= cfg.data.synth.regions
    assert (cfg.cluster.num_workers, cfg.cluster.cpus_per_worker) == (1, 1)
    default = load_config("default")
    assert default.data.synth.binding == "joint" and config_hash(default.data.synth) == DEFAULT_HASH_BEFORE
