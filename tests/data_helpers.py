"""Helpers shared by the data tests (no tests here)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from imram_dist.config import SynthConfig


def tiny_synth_cfg(**kw) -> SynthConfig:
    base = dict(train_images=70, dev_images=12, test_images=10, regions=8, feature_dim=16, seed=3,
                samples_per_shard=9)
    base.update(kw)
    return SynthConfig(**base)


def make_precomp(folder, *, n_train=8, n_dev=4, n_test=3, R=4, D=8, seed=0):
    """train: 5 captions/image, train_ims.npy; dev: 5/image, dev_feat.npy; test: 1:1, test_ims.npy."""
    rng = np.random.default_rng(seed)
    words = ["dog", "cat", "runs", "on", "grass", "a", "red", "ball", "the", "sits"]
    out = {}
    os.makedirs(folder, exist_ok=True)
    for split, n, cpi, fname in (("train", n_train, 5, "ims"), ("dev", n_dev, 5, "feat"),
                                 ("test", n_test, 1, "ims")):
        feats = rng.standard_normal((n, R, D)).astype(np.float32)
        caps = [" ".join(rng.choice(words, rng.integers(2, 7))) + ("." if i % 3 == 0 else "")
                for i in range(n * cpi)]
        if split == "train":
            caps[0] = "A Zebra's unique caption, isn't it?"
        np.save(os.path.join(folder, f"{split}_{fname}.npy"), feats)
        with open(os.path.join(folder, f"{split}_caps.txt"), "w") as f:
            f.write("\n".join(caps) + "\n")
        out[split] = (feats, caps, cpi)
    return out


def asdict(cfg):
    return dataclasses.asdict(cfg)
