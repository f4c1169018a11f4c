"""The built-in synthetic corpus: fine-grained matching matters (see docs/data.md).

World (fixed by the seed): every object type o and attribute a has a random latent vector;
a fixed random 2-layer tanh network maps [latent(o); latent(a); view] to a D-dim region
feature, so a region encodes its object and attribute jointly (not as a sum). An image holds
2-4 objects with distinct attributes; each object fills 1-2 regions (different random views),
the other regions are distractors (random latents of unnamed things); Gaussian noise on all.
Captions (5 per image) come from varied templates with synonyms, random object order,
attribute before or after the noun, sometimes one object omitted. Half the images (by
default) come as attribute-swapped twins: same objects, same regions, same views, same noise,
same distractors, same caption templates, but the attributes cyclically permuted among the
objects, so a twin differs from its partner only in its object regions and attribute words.

With binding="key" (off by default; see docs/synthetic.md) an object's regions render
(object, key) and one more region renders (attribute, key), the key being a random per-image tag
that no caption names: the attribute is bound to its object only through the image's context.
A twin then keeps every object region and only re-binds the attribute regions to other keys, so
telling it apart takes two hops: a word finds its object's region, then the attribute region
that shares that region's key. Knobs left at their defaults are not recorded in the manifest or
the cache name, so a default corpus keeps the bytes it had before the knob existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from ..config import SYNTH_ATTRIBUTE_TYPES, SYNTH_OBJECT_TYPES, validate_synth
from .io import atomic_write_bytes, unique_tmp_path
from .shards import MANIFEST, Manifest, ShardInfo, ShardWriter, SplitInfo, read_manifest, write_manifest
from .tokenize import build_vocab

OBJECTS = [("dog", "puppy"), ("cat", "kitten"), ("car", "automobile"), ("ball",), ("chair", "seat"),
           ("table", "desk"), ("bike", "bicycle"), ("cup", "mug"), ("hat", "cap"), ("bird",),
           ("boat", "ship"), ("tree",), ("lamp",), ("book",), ("bag", "backpack"), ("kite",),
           ("horse", "pony"), ("umbrella",), ("phone", "cellphone"), ("clock",), ("shirt", "jacket"),
           ("vase", "jar"), ("truck", "lorry"), ("bench",)]
ATTRIBUTES = [("red", "crimson"), ("blue",), ("green",), ("yellow", "golden"), ("black", "dark"),
              ("white", "pale"), ("small", "little"), ("large", "big"), ("striped",), ("wooden",)]
assert (len(OBJECTS), len(ATTRIBUTES)) == (SYNTH_OBJECT_TYPES, SYNTH_ATTRIBUTE_TYPES), "update imram_dist/config.py"
PHRASES = ["a {a} {o}", "a {o} that is {a}", "one {a} {o}", "a {o} which looks {a}"]
TEMPLATES = ["{L} .", "a photo of {L} .", "there is {L} in the picture .", "an image showing {L} .",
             "we can see {L} here", "this scene contains {L} .", "{L} are visible in the image ."]
LATENT = 16
HIDDEN = 96


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return " , ".join(parts[:-1]) + " and " + parts[-1]


class World:
    """Latents and the fixed random non-linear renderer, from the seed alone."""

    def __init__(self, cfg):
        validate_synth(cfg)  # the config's checks (a SynthConfig built in Python has had none)
        rng = np.random.default_rng([cfg.seed, 7919])
        self.obj = rng.standard_normal((cfg.object_types, LATENT))
        self.att = rng.standard_normal((cfg.attribute_types, LATENT))
        self.W1 = rng.standard_normal((3 * LATENT, HIDDEN)) / np.sqrt(3 * LATENT)
        self.W2 = rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)
        self.W3 = rng.standard_normal((HIDDEN, cfg.feature_dim)) / np.sqrt(HIDDEN) * 1.5
        if cfg.binding == "key":  # drawn last: the joint world above is unchanged
            # added to the view of every attribute region: "an attribute, not a thing", so one
            # query direction (key + this) finds the attribute region bound to a matched object
            self.attribute_kind = rng.standard_normal(LATENT)
        self.cfg = cfg

    def render(self, z: np.ndarray) -> np.ndarray:
        return np.tanh(np.tanh(z @ self.W1 * 1.5) @ self.W2 * 1.5) @ self.W3


def _image_plan(rng: np.random.Generator, cfg) -> dict:
    """Everything random about one image and its captions, except which attribute goes where."""
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objs = rng.choice(cfg.object_types, k, replace=False)
    atts = rng.choice(cfg.attribute_types, k, replace=False)
    nreg = [int(rng.integers(1, 3)) for _ in range(k)]
    slots = rng.permutation(cfg.regions)  # region slot of each object view, then distractors
    views = rng.standard_normal((cfg.regions, LATENT)) * 0.5
    distract = rng.standard_normal((cfg.regions, 2 * LATENT))
    noise = rng.standard_normal((cfg.regions, cfg.feature_dim)) * cfg.noise
    caps = []
    for _ in range(5):
        order = list(rng.permutation(k))
        if k > 1 and rng.random() < cfg.omit_prob:
            order.pop(int(rng.integers(len(order))))
        caps.append({"order": order, "template": int(rng.integers(len(TEMPLATES))),
                     "phrases": [int(rng.integers(len(PHRASES))) for _ in range(k)],
                     "osyn": [int(rng.integers(2)) for _ in range(k)],
                     "asyn": [int(rng.integers(2)) for _ in range(k)]})
    plan = {"objs": objs, "atts": atts, "nreg": nreg, "slots": slots, "views": views,
            "distract": distract, "noise": noise, "caps": caps}
    if cfg.binding == "key":  # drawn last, so everything above is what the joint corpus draws
        plan["keys"] = rng.standard_normal((k, LATENT))
    return plan


def _realise(world: World, plan: dict, atts: np.ndarray) -> tuple[np.ndarray, list[str], dict]:
    cfg = world.cfg
    z = np.concatenate([plan["distract"], plan["views"]], axis=1)  # distractors by default
    region_of: list[list[int]] = []
    attribute_region: list[int] = []
    keyed = cfg.binding == "key"
    s = 0
    for j, (o, a) in enumerate(zip(plan["objs"], atts)):
        mine = []
        for _ in range(plan["nreg"][j]):
            r = int(plan["slots"][s])
            s += 1
            z[r, :LATENT] = world.obj[o]
            # joint: the attribute is in the object's own regions; key: only the object's tag is
            z[r, LATENT:2 * LATENT] = plan["keys"][j] if keyed else world.att[a]
            mine.append(r)
        region_of.append(mine)
        if keyed:  # the attribute's own region, bound to object j by carrying the same key
            r = int(plan["slots"][s])
            s += 1
            z[r, :LATENT] = world.att[a]
            z[r, LATENT:2 * LATENT] = plan["keys"][j]
            z[r, 2 * LATENT:] += world.attribute_kind
            attribute_region.append(r)
    feats = world.render(z) + plan["noise"]
    captions = []
    for c in plan["caps"]:
        parts = []
        for j in c["order"]:
            osyn, asyn = OBJECTS[plan["objs"][j]], ATTRIBUTES[atts[j]]
            parts.append(PHRASES[c["phrases"][j]].format(o=osyn[c["osyn"][j] % len(osyn)],
                                                         a=asyn[c["asyn"][j] % len(asyn)]))
        captions.append(TEMPLATES[c["template"]].format(L=_join(parts)))
    meta = {"objects": [int(o) for o in plan["objs"]], "attributes": [int(a) for a in atts],
            "regions": region_of}
    if keyed:
        meta["attribute_regions"] = attribute_region
    return feats.astype(np.float32), captions, meta


def generate_split(world: World, split: str, n: int, split_index: int):
    """Yield (key, regions, captions, image_id, meta) for n images; twins are adjacent."""
    cfg = world.cfg
    rng = np.random.default_rng([cfg.seed, split_index])
    i = 0
    while i < n:
        plan = _image_plan(rng, cfg)
        twin = i + 1 < n and rng.random() < cfg.twin_fraction and len(plan["objs"]) >= 2
        feats, caps, meta = _realise(world, plan, plan["atts"])
        if twin:
            meta["twin"] = f"{split}-{i + 1:06d}"
        yield f"{split}-{i:06d}", feats, caps, f"synth-{split}-{i}", meta
        if twin:
            swapped = np.roll(plan["atts"], 1)
            feats, caps, meta = _realise(world, plan, swapped)
            meta["twin"] = f"{split}-{i:06d}"
            yield f"{split}-{i + 1:06d}", feats, caps, f"synth-{split}-{i + 1}", meta
            i += 1
        i += 1


# SynthConfig fields added after corpora were first generated: at their default they are left out
# of the recorded config (manifest provenance, cache name), so those corpora keep their bytes.
_LATER_KNOBS = ("binding",)


def synth_config_dict(cfg) -> dict:
    """The config as recorded in the manifest and hashed into the cache name."""
    from ..config import SynthConfig

    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(SynthConfig)}
    for name in _LATER_KNOBS:
        if name in d and d[name] == defaults[name]:
            del d[name]
    return d


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(synth_config_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def generate_synthetic(out: str, cfg, progress: bool = False) -> Manifest:
    """Write the synthetic corpus to OUT (shards, vocab.json, manifest.json last)."""
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    world = World(cfg)
    sizes = {"train": cfg.train_images, "dev": cfg.dev_images, "test": cfg.test_images}
    # Vocabulary from train+dev captions (count >= 4), like the real corpora.
    texts = []
    for si, split in enumerate(("train", "dev")):
        texts += [c for _, _, caps, _, _ in _captions_only(world, split, sizes[split], si) for c in caps]
    vocab = build_vocab(texts, 4)
    vocab_bytes = vocab.dumps()
    atomic_write_bytes(os.path.join(out, "vocab.json"), vocab_bytes)
    splits = {}
    for si, (split, n) in enumerate(sizes.items()):
        if n <= 0:
            continue
        shards, w, count = [], None, 0
        bar = tqdm(total=n, desc=f"synth {split}", unit="img", disable=not progress)
        for key, feats, caps, image_id, meta in generate_split(world, split, n, si):
            if w is None:
                name = f"{split}-{len(shards):05d}.tar"
                w = ShardWriter(os.path.join(out, name), cfg.dtype)
            w.write(key, feats, caps, image_id, meta)
            count += 1
            bar.update(1)
            if w.images == cfg.samples_per_shard or count == n:
                sha, size = w.close()
                shards.append(ShardInfo(os.path.basename(w.path), w.images, w.captions, sha, size))
                w = None
        bar.close()
        splits[split] = SplitInfo(split, n, sum(s.captions for s in shards), 5, shards)
    manifest = Manifest(root=out, regions=cfg.regions, feature_dim=cfg.feature_dim, dtype=cfg.dtype,
                        vocab="vocab.json", splits=splits,
                        vocab_sha256=hashlib.sha256(vocab_bytes).hexdigest(),
                        provenance={"tool": "python -m imram_dist.data synth", "generator": "imram_dist.data.synth",
                                    "synth_config": synth_config_dict(cfg)})
    write_manifest(out, manifest)
    return manifest


def _captions_only(world: World, split: str, n: int, si: int):
    # Captions depend only on the plan; rendering is cheap enough at these sizes to reuse the path.
    return generate_split(world, split, n, si)


def ensure_synthetic(cache_dir: str, synth) -> str:
    """The synthetic corpus for this SynthConfig under cache_dir: generated once (into a
    temporary folder renamed into place, so concurrent callers never see half a corpus),
    reused when present with a matching config. Returns the root."""
    cache_dir = os.path.expanduser(str(cache_dir))
    root = os.path.join(cache_dir, f"synth-{config_hash(synth)}")
    if _matches(root, synth):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synth-tmp-", dir=cache_dir)
    try:
        generate_synthetic(tmp, synth)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _matches(root, synth):  # a stale or broken folder: replace it
                stale = unique_tmp_path(root + ".stale")  # unique per call: threads of one process too
                os.rename(root, stale)
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, root)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _matches(root: str, synth) -> bool:
    if not os.path.exists(os.path.join(root, MANIFEST)):
        return False
    try:
        m = read_manifest(root)
    except Exception:
        return False
    return m.provenance.get("synth_config") == synth_config_dict(synth)
