"""convert-precomp: the public SCAN/IMRAM "precomp" folder -> imram-dist shards."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from .io import DataError, atomic_write_bytes, sha256_file
from .shards import Manifest, ShardInfo, ShardWriter, SplitInfo, write_manifest
from .tokenize import Vocabulary, build_vocab

log = logging.getLogger("imram_dist.data")

PRECOMP_SPLITS = ("train", "dev", "test", "testall")
STATE_DIR = ".convert-state"


def find_precomp_splits(src: str) -> dict[str, dict[str, str]]:
    """split -> {"caps": path, "feats": path, "ids": path|None} for the splits present."""
    found = {}
    for split in PRECOMP_SPLITS:
        caps = os.path.join(src, f"{split}_caps.txt")
        feats = [os.path.join(src, f"{split}_{n}.npy") for n in ("ims", "feat")]
        feats = [f for f in feats if os.path.exists(f)]
        if not os.path.exists(caps):
            if feats:
                log.warning("%s: features without %s_caps.txt; split skipped", feats[0], split)
            continue
        if not feats:
            raise DataError(f"{caps}: no features next to it ({split}_ims.npy or {split}_feat.npy)")
        ids = os.path.join(src, f"{split}_ids.txt")
        found[split] = {"caps": caps, "feats": feats[0], "ids": ids if os.path.exists(ids) else None}
    if not found:
        raise DataError(f"{src}: no precomp split found (expected e.g. train_caps.txt + train_ims.npy)")
    return found


def read_captions(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def captions_per_image(n_images: int, n_caps: int, caps_path: str, feats_path: str) -> int:
    if n_caps == 5 * n_images:
        return 5
    if n_caps == n_images:
        return 1
    raise DataError(f"{caps_path}: {n_caps} captions do not fit the {n_images} images of {feats_path} "
                    f"(expected {5 * n_images} for 5 per image, or {n_images} for 1:1)")


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def convert_precomp(src: str, out: str, samples_per_shard: int = 1000, dtype: str = "float16",
                    vocab: str | None = None, vocab_threshold: int = 4, progress: bool = True) -> Manifest:
    """Convert SRC (precomp layout) into OUT. Rerunning after an interruption skips the shards
    that are already complete (checksum matches the recorded one); manifest.json comes last."""
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    splits = find_precomp_splits(src)
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)

    # Load and check everything before writing anything.
    loaded = {}
    R = D = None
    for split, files in splits.items():
        feats = np.load(files["feats"], mmap_mode="r")
        if feats.ndim != 3:
            raise DataError(f"{files['feats']}: expected N x R x D features, got shape {feats.shape}")
        if R is None:
            R, D = int(feats.shape[1]), int(feats.shape[2])
        elif (feats.shape[1], feats.shape[2]) != (R, D):
            raise DataError(f"{files['feats']}: regions x width {feats.shape[1:]} differ from "
                            f"{(R, D)} of the other splits")
        caps = read_captions(files["caps"])
        cpi = captions_per_image(len(feats), len(caps), files["caps"], files["feats"])
        for i, c in enumerate(caps):
            if not c:
                raise DataError(f"{files['caps']}: line {i + 1} is an empty caption")
        ids = None
        if files["ids"]:
            raw_ids = read_captions(files["ids"])
            if len(raw_ids) == len(feats):
                ids = raw_ids
            elif len(raw_ids) == len(caps) and cpi == 5:
                ids = raw_ids[::5]
            else:
                log.warning("%s: %d ids fit neither images nor captions; using row numbers",
                            files["ids"], len(raw_ids))
        loaded[split] = (feats, caps, cpi, ids)

    if vocab:
        voc = Vocabulary.load(vocab)
        vocab_src = os.path.abspath(vocab)
    else:
        texts = [c for s in ("train", "dev") if s in loaded for c in loaded[s][1]]
        if not texts:
            raise DataError(f"{src}: no train/dev captions to build a vocabulary from; pass --vocab")
        voc = build_vocab(texts, vocab_threshold)
        vocab_src = f"built from train+dev captions, count >= {vocab_threshold}"
    vocab_bytes = voc.dumps()
    atomic_write_bytes(os.path.join(out, "vocab.json"), vocab_bytes)

    split_infos = {}
    for split, (feats, caps, cpi, ids) in loaded.items():
        n = len(feats)
        n_shards = (n + samples_per_shard - 1) // samples_per_shard
        shards = []
        bar = tqdm(total=n, desc=f"convert {split}", unit="img", disable=not progress)
        src_fp = [os.path.abspath(splits[split]["feats"]), os.path.getsize(splits[split]["feats"]),
                  os.path.getmtime(splits[split]["feats"]), os.path.getsize(splits[split]["caps"]),
                  os.path.getmtime(splits[split]["caps"])]
        for si in range(n_shards):
            lo, hi = si * samples_per_shard, min(n, (si + 1) * samples_per_shard)
            name = f"{split}-{si:05d}.tar"
            path = os.path.join(out, name)
            state_path = os.path.join(out, STATE_DIR, name + ".json")
            fp = _fingerprint(src_fp, lo, hi, dtype, cpi, ids is not None, 1)
            if os.path.exists(path) and os.path.exists(state_path):
                with open(state_path) as f:
                    st = json.load(f)
                if st.get("fingerprint") == fp and sha256_file(path) == st["sha256"]:
                    shards.append(ShardInfo(name, hi - lo, st["captions"], st["sha256"], st["bytes"]))
                    bar.update(hi - lo)
                    continue
            w = ShardWriter(path, dtype)
            try:
                for i in range(lo, hi):
                    img_caps = caps[i * cpi:(i + 1) * cpi]
                    w.write(f"{split}-{i:07d}", np.asarray(feats[i]), img_caps,
                            ids[i] if ids is not None else f"{split}/{i}")
                    bar.update(1)
            except BaseException:
                w.abort()
                raise
            sha, size = w.close()
            atomic_write_bytes(state_path, json.dumps({"fingerprint": fp, "sha256": sha, "bytes": size,
                                                       "captions": w.captions}).encode())
            shards.append(ShardInfo(name, hi - lo, w.captions, sha, size))
        bar.close()
        split_infos[split] = SplitInfo(split, n, len(caps), cpi, shards)

    manifest = Manifest(
        root=out, regions=R, feature_dim=D, dtype=dtype, vocab="vocab.json", splits=split_infos,
        vocab_sha256=hashlib.sha256(vocab_bytes).hexdigest(),
        provenance={"tool": "python -m imram_dist.data convert-precomp", "source": os.path.abspath(src),
                    "files": {s: {"captions": os.path.basename(f["caps"]), "features": os.path.basename(f["feats"]),
                                  "ids": os.path.basename(f["ids"]) if f["ids"] else None}
                              for s, f in splits.items()},
                    "vocabulary": vocab_src, "samples_per_shard": samples_per_shard},
    )
    write_manifest(out, manifest)
    return manifest
