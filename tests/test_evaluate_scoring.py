"""Blocked and distributed scoring: every layout gives the single-process matrix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from imram_dist.config import EvalConfig, ModelConfig
from imram_dist.evaluate import (
    EvalError,
    encode_captions,
    encode_images,
    evaluate_split,
    image_rows,
    retrieval_metrics,
    score_matrix,
)


def _imram():
    try:
        from imram_dist.model import IMRAM
    except ImportError:
        from imram_dist.model.imram import IMRAM
    return IMRAM


@dataclasses.dataclass
class Split:
    regions: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    caption_to_image: np.ndarray
    image_ids: list
    captions: list


def make_split(n: int = 12, per: int = 5, R: int = 6, D: int = 16, V: int = 30, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    m = n * per
    lengths = rng.integers(3, 9, size=m)
    tokens = np.zeros((m, int(lengths.max()) + 2), dtype=np.int64)  # extra padding columns on purpose
    for j, L in enumerate(lengths):
        tokens[j, :L] = np.r_[1, rng.integers(4, V, size=L - 2), 2]
    return Split(rng.normal(size=(n, R, D)).astype(np.float32), tokens, lengths.astype(np.int64),
                 np.arange(m) // per, [f"img{i}" for i in range(n)], [f"caption {j}" for j in range(m)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(image_dim=16, embed_size=32, word_dim=12, vocab_size=30, steps=3, lambda_softmax=9.0)
    return _imram()(cfg).eval()


def direct_scores(model, split: Split) -> np.ndarray:
    with torch.no_grad():
        return model.similarity(model.encode_images(torch.from_numpy(split.regions)),
                                model.encode_captions(torch.from_numpy(split.tokens), torch.from_numpy(split.lengths)),
                                torch.from_numpy(split.lengths)).numpy()


def test_image_rows_cover_blocks_once():
    for n, w, b in ((10, 3, 2), (7, 4, 4), (128, 2, 128), (5, 1, 3)):
        rows = [image_rows(n, r, w, b) for r in range(w)]
        assert rows[0][0] == 0 and rows[-1][1] == n
        assert all(rows[i][1] == rows[i + 1][0] for i in range(w - 1))
        assert all(r0 % b == 0 for r0, r1 in rows if r1 > r0)


def test_blocked_scoring_equals_one_shot(model):
    split = make_split()
    full = direct_scores(model, split)
    img = encode_images(model, split.regions, batch=5)
    caps = encode_captions(model, split.tokens, split.lengths, block=7)
    out, rows = score_matrix(model, img, caps, block_images=5, block_captions=7)
    assert rows == (0, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, full, atol=1e-5, rtol=0)
    # Ranks sliced by hand reassemble the same matrix.
    parts = [score_matrix(model, img, caps, rank=r, world_size=3, block_images=4, block_captions=7)
             for r in range(3)]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), full, atol=1e-5, rtol=0)
    # A tensor of caption embeddings with lengths works too.
    cap_t = model.encode_captions(torch.from_numpy(split.tokens), torch.from_numpy(split.lengths)).detach()
    out2, _ = score_matrix(model, img, cap_t, split.lengths, block_images=5, block_captions=7)
    np.testing.assert_allclose(out2, full, atol=1e-5, rtol=0)


def test_bf16_precision_scores_close_to_fp32(model):
    """eval.precision=bf16: the same encoders, embeddings scored in bf16 (fp32 scores out), close to
    the fp32 matrix (tests/test_model_precision.py bounds the error against the oracle; here only the
    wiring is checked: bf16 really ran, and the numbers are near); an unknown precision is refused."""
    split = make_split()
    cfg = EvalConfig(block_images=5, block_captions=7, image_batch=4)
    fp32 = evaluate_split(model, split, "auto", 1, cfg, keep_sims=True)
    bf16 = evaluate_split(model, split, "auto", 1, dataclasses.replace(cfg, precision="bf16"), keep_sims=True)
    diff = np.abs(np.asarray(bf16.sims) - np.asarray(fp32.sims))
    assert bf16.sims.dtype == np.float32 and 0 < diff.max() < 0.1 and diff.mean() < 0.01
    img = encode_images(model, split.regions, batch=4)
    caps = encode_captions(model, split.tokens, split.lengths, block=7)
    out, _ = score_matrix(model, img, caps, block_images=5, block_captions=7, precision="bf16")
    np.testing.assert_allclose(out, bf16.sims, atol=1e-6, rtol=0)
    with pytest.raises(EvalError, match="eval.precision: expected one of"):
        evaluate_split(model, split, "auto", 1, dataclasses.replace(cfg, precision="fp16"))


def test_two_workers_equal_one(model, tmp_path):
    """Distributed scoring over 2 gloo processes equals single-process scoring."""
    split = make_split(n=14)
    cfg = EvalConfig(block_images=4, block_captions=15, image_batch=3)
    one = evaluate_split(model, split, "auto", 1, cfg, keep_sims=True)
    two = evaluate_split(model, split, "auto", 2, cfg, keep_sims=True)
    np.testing.assert_allclose(two.sims, one.sims, atol=1e-6, rtol=0)
    assert two.metrics == one.metrics and two.workers == 2
    np.testing.assert_allclose(one.sims, direct_scores(model, split), atol=1e-5, rtol=0)
    assert one.metrics == retrieval_metrics(one.sims, split.caption_to_image)
    # On disk: a memmap at the requested path, the same numbers.
    path = tmp_path / "sims.npy"
    disk = evaluate_split(model, split, "f30k", 2, dataclasses.replace(cfg, memmap_mb=0), sims_path=path)
    np.testing.assert_allclose(np.load(path), one.sims, atol=1e-6, rtol=0)
    assert disk.metrics == one.metrics and disk.notes


def test_coco1k_folds_score_only_diagonal_blocks(model):
    split = make_split(n=15)
    cfg = EvalConfig(fold_images=3, block_images=2, block_captions=8)
    res = evaluate_split(model, split, "coco1k", 1, cfg, keep_sims=True)
    assert res.sims.shape == (5, 3, 15) and len(res.folds) == 5
    full = direct_scores(model, split)
    for f in range(5):
        np.testing.assert_allclose(res.sims[f], full[3 * f:3 * f + 3, 15 * f:15 * f + 15], atol=1e-5, rtol=0)
    for k in ("i2t_r1", "t2i_r5", "i2t_meanr"):
        assert res.metrics[k] == pytest.approx(np.mean([fm[k] for fm in res.folds]))


def test_bad_inputs(model):
    split = make_split(n=4)
    bad = dataclasses.replace(split, tokens=split.tokens[:-1], lengths=split.lengths[:-1],
                              caption_to_image=split.caption_to_image[:-1])
    with pytest.raises(EvalError, match="5 captions per image"):
        evaluate_split(model, bad, "f30k")
    wide = dataclasses.replace(split, regions=np.zeros((4, 6, 20), np.float32))
    with pytest.raises(EvalError, match="16-dim region features"):
        evaluate_split(model, wide, "auto")
    with pytest.raises(EvalError, match="workers"):
        evaluate_split(model, split, "auto", 0)


def test_distributed_evaluate_restores_training_mode(model):
    from imram_dist.evaluate import distributed_evaluate

    split = make_split(n=6, per=1)
    model.train()
    try:
        res = distributed_evaluate(model, split, "1to1", EvalConfig(block_images=4, block_captions=4))
        assert model.training and res.protocol == "1to1" and res.sims is None
        assert set(res.metrics) >= {"rsum", "i2t_r1", "t2i_meanr"}
    finally:
        model.eval()


def test_temporary_memmap_is_used_and_removed(model, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    split = make_split(n=6)
    cfg = EvalConfig(memmap_mb=0, block_images=3, block_captions=10)
    mem = evaluate_split(model, split, "auto", 1, EvalConfig(block_images=3, block_captions=10))
    kept = evaluate_split(model, split, "auto", 1, cfg, keep_sims=True)
    assert isinstance(kept.sims, np.memmap) and kept.metrics == mem.metrics
    assert len(list(tmp_path.glob("imram_sims_*.npy"))) == 1
    name = kept.sims.filename
    del kept
    Path(name).unlink()
    for workers in (1, 2):
        res = evaluate_split(model, split, "auto", workers, cfg)
        assert res.sims is None and res.metrics == mem.metrics
        assert not list(tmp_path.glob("imram_sims_*.npy"))
