"""Recall metrics and protocols on small hand-built matrices with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imram_dist.evaluate import EvalError, average_folds, plan_protocol, retrieval_metrics, retrieval_ranks
from imram_dist.evaluate.metrics import METRIC_KEYS, RECALL_KEYS


def reference_ranks(sims: np.ndarray, c2i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct, slow pessimistic ranks: 1 + number of wrong items scoring >= the best right one."""
    n, m = sims.shape
    i2t = np.array([1 + sum(sims[i, j] >= sims[i, c2i == i].max() for j in range(m) if c2i[j] != i)
                    for i in range(n)])
    t2i = np.array([1 + sum(sims[i, j] >= sims[c2i[j], j] for i in range(n) if i != c2i[j]) for j in range(m)])
    return i2t, t2i


def test_one_to_one_known_answer():
    # image 0: its caption (0) is best -> rank 1; image 1: caption 1 is 3rd; image 2: 2nd.
    sims = np.array([[0.9, 0.1, 0.2],
                     [0.5, 0.1, 0.3],
                     [0.8, 0.4, 0.7]], dtype=np.float32)
    i2t, t2i = retrieval_ranks(sims, np.arange(3))
    assert i2t.tolist() == [1, 3, 2]
    # caption 0: column [0.9, 0.5, 0.8] -> image 0 first; caption 1: [0.1, 0.1, 0.4] -> image 1 ties
    # image 0 (pessimistic) and is behind image 2 -> rank 3; caption 2: [0.2, 0.3, 0.7] -> 1.
    assert t2i.tolist() == [1, 3, 1]
    m = retrieval_metrics(sims, np.arange(3))
    assert list(m) == list(METRIC_KEYS)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == 100.0 and m["t2i_r10"] == 100.0
    assert m["i2t_medr"] == 2.0 and m["i2t_meanr"] == pytest.approx(2.0)
    assert m["t2i_r1"] == pytest.approx(200 / 3) and m["t2i_medr"] == 1.0
    assert m["t2i_meanr"] == pytest.approx(5 / 3)
    assert m["rsum"] == pytest.approx(sum(m[k] for k in RECALL_KEYS))


def test_five_captions_per_image_known_answer():
    n, m = 3, 15
    c2i = np.arange(m) // 5
    sims = np.zeros((n, m), dtype=np.float32)
    # image 0: own captions 0..4 all score 0.5; a wrong caption (7) scores 0.9 -> best own rank 2.
    sims[0, 0:5] = 0.5
    sims[0, 7] = 0.9
    # image 1: one own caption (9) is the top -> rank 1, even though the others rank low.
    sims[1, 9] = 1.0
    sims[1, 0:5] = 0.2
    # image 2: own captions at -1, every other caption at 0 -> 10 wrong ones above: rank 11.
    sims[2, 10:15] = -1.0
    i2t, t2i = retrieval_ranks(sims, c2i)
    assert i2t.tolist() == [2, 1, 11]
    exp_i2t, exp_t2i = reference_ranks(sims, c2i)
    assert i2t.tolist() == exp_i2t.tolist() and t2i.tolist() == exp_t2i.tolist()
    met = retrieval_metrics(sims, c2i)
    assert met["i2t_r1"] == pytest.approx(100 / 3)
    assert met["i2t_r5"] == pytest.approx(200 / 3)
    assert met["i2t_r10"] == pytest.approx(200 / 3)
    assert met["i2t_medr"] == 2.0 and met["i2t_meanr"] == pytest.approx(14 / 3)


def test_ties_are_pessimistic_and_order_free():
    # A constant matrix: every query gets the worst rank.
    n = 12
    sims = np.ones((n, 5 * n), dtype=np.float32)
    i2t, t2i = retrieval_ranks(sims, np.arange(5 * n) // 5)
    assert (i2t == 1 + 5 * n - 5).all()
    assert (t2i == n).all()
    met = retrieval_metrics(sims, np.arange(5 * n) // 5)
    assert met["rsum"] == 0.0
    # A tie between a right and a wrong item ranks the right one second, whichever comes first.
    s = np.array([[0.7, 0.7], [0.1, 0.9]], dtype=np.float32)
    i2t, t2i = retrieval_ranks(s, np.arange(2))
    assert i2t.tolist() == [2, 1]
    s_swapped = s[::-1, ::-1].copy()  # same matrix with items in the opposite order
    i2t_b, t2i_b = retrieval_ranks(s_swapped, np.arange(2))
    assert i2t_b[::-1].tolist() == i2t.tolist() and t2i_b[::-1].tolist() == t2i.tolist()
    # Ties among an image's own captions do not hurt it.
    s = np.array([[0.5, 0.5, 0.1, 0.1], [0.0, 0.0, 0.3, 0.3]], dtype=np.float32)
    i2t, _ = retrieval_ranks(s, np.array([0, 0, 1, 1]))
    assert i2t.tolist() == [1, 1]


def test_random_matrices_match_direct_computation_and_input_types(tmp_path):
    rng = np.random.default_rng(0)
    for n, per in ((7, 5), (9, 1)):
        sims = rng.integers(0, 4, size=(n, n * per)).astype(np.float32)  # many ties
        c2i = np.arange(n * per) // per
        exp = reference_ranks(sims, c2i)
        for variant in (sims, torch.from_numpy(sims)):
            got = retrieval_ranks(variant, torch.from_numpy(c2i) if per == 1 else c2i)
            assert got[0].tolist() == exp[0].tolist() and got[1].tolist() == exp[1].tolist()
        mm = np.lib.format.open_memmap(str(tmp_path / f"s{n}.npy"), mode="w+", dtype=np.float32, shape=sims.shape)
        mm[:] = sims
        got = retrieval_ranks(mm, c2i, chunk_rows=2)
        assert got[0].tolist() == exp[0].tolist() and got[1].tolist() == exp[1].tolist()


def test_coco1k_fold_average_matches_direct_computation():
    rng = np.random.default_rng(1)
    fold, folds = 4, 5
    n = fold * folds
    sims = rng.normal(size=(n, 5 * n)).astype(np.float32)
    # Make fold 2 perfect so that the folds differ a lot.
    for i in range(2 * fold, 3 * fold):
        sims[i, 5 * i:5 * i + 5] += 10
    plan = plan_protocol("coco1k", n, 5 * n, np.arange(5 * n) // 5, fold_images=fold)
    assert plan.protocol == "coco1k" and len(plan.groups) == folds
    per = [retrieval_metrics(sims[g.i0:g.i1, g.c0:g.c1], g.caption_to_image) for g in plan.groups]
    mean = average_folds(per)
    # Direct: ranks of each fold computed by hand, then recall per fold, then mean.
    for key in ("i2t_r1", "i2t_r5", "t2i_r10", "i2t_meanr", "t2i_medr"):
        direct = []
        for f in range(folds):
            blk = sims[f * fold:(f + 1) * fold, 5 * f * fold:5 * (f + 1) * fold]
            i2t, t2i = reference_ranks(blk, np.arange(5 * fold) // 5)
            r = i2t if key.startswith("i2t") else t2i
            stat = key.split("_")[1]
            direct.append({"r1": 100 * np.mean(r <= 1), "r5": 100 * np.mean(r <= 5), "r10": 100 * np.mean(r <= 10),
                           "meanr": r.mean(), "medr": np.floor(np.median(r))}[stat])
        assert mean[key] == pytest.approx(np.mean(direct))
    assert mean["rsum"] == pytest.approx(sum(mean[k] for k in RECALL_KEYS))
    assert per[2]["i2t_r1"] == 100.0 and per[2]["t2i_r1"] == 100.0


def test_protocol_errors_and_auto():
    with pytest.raises(EvalError, match="5 captions per image"):
        plan_protocol("f30k", 10, 49)
    with pytest.raises(EvalError, match="5 captions per image"):
        plan_protocol("coco5k", 10, 10)
    with pytest.raises(EvalError, match="multiple of 1000"):
        plan_protocol("coco1k", 1500, 7500)
    with pytest.raises(EvalError, match="as many captions as images"):
        plan_protocol("1to1", 10, 50)
    with pytest.raises(EvalError, match="unknown protocol"):
        plan_protocol("flickr", 10, 50)
    with pytest.raises(EvalError, match="consecutive"):
        plan_protocol("f30k", 2, 10, np.array([0, 1] * 5))
    assert plan_protocol("auto", 10, 50).protocol == "5x"
    assert plan_protocol("auto", 10, 10).protocol == "1to1"
    assert plan_protocol("auto", 3, 4, np.array([0, 1, 2, 2])).protocol == "custom"
    with pytest.raises(EvalError, match="cannot infer"):
        plan_protocol("auto", 3, 4)
    assert plan_protocol("f30k", 10, 50).notes  # nominal size differs: noted, not refused
    with pytest.raises(EvalError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.arange(2))
    with pytest.raises(EvalError, match="no caption"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))
