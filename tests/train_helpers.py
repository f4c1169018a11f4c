"""Tiny configs shared by the training tests (not a test module)."""

from __future__ import annotations

from imram_dist.config import Config, load_config

# Small enough for 2 CPU cores: 160 train images (800 pairs, 50 steps/epoch at batch 16),
# a 1-step Full-IMRAM with d=32; chance dev rsum on 50 images / 250 captions is about 62.
TINY = {
    "data.synth.train_images": 160, "data.synth.dev_images": 50, "data.synth.test_images": 10,
    "model.embed_size": 32, "model.word_dim": 32, "model.steps": 1,
    "data.batch_size": 16, "data.shuffle_buffer": 200,
    "train.lr": 5e-3, "train.lr_update": 4, "train.epochs": 4, "train.log_every": 25,
    "cluster.num_workers": 2, "run.keep_checkpoints": 2,
}
CHANCE_RSUM = 62.0
LEARNED_RSUM = 90.0  # floor after 3-4 short epochs (measured 105-160; chance ~62), see docs/training.md


def tiny_overrides(cache_dir: str, storage: str, name: str, **extra) -> dict:
    ov = dict(TINY)
    ov.update({"data.cache_dir": str(cache_dir), "run.storage": str(storage), "run.name": name})
    ov.update(extra)
    return ov


def tiny_config(cache_dir: str, storage: str, name: str, **extra) -> Config:
    return load_config("default", tiny_overrides(cache_dir, storage, name, **extra))


def as_cli(overrides: dict) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]
