"""python -m imram_dist.data {convert-precomp,synth,inspect,upload} ... (see docs/data.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import ConfigError, SynthConfig, parse_cli
from .io import DataError

# synth follows the convention of train, tune and evaluate: [--config PRESET] [flags] [key=value],
# each flag a shorthand for a data.synth key; without --config the default preset's corpus (the one
# `python -m imram_dist.train` trains on) is generated
SYNTH_SHORTHANDS = {"--train-images": "data.synth.train_images", "--seed": "data.synth.seed",
                    "--binding": "data.synth.binding"}
SYNTH_DESCRIPTION = "Generate the synthetic corpus into OUT (keys: data.synth.*; docs/data.md, docs/synthetic.md)."


def _synth_config(argv: list[str]) -> SynthConfig:
    other = [a for a in argv if "=" in a and not a.startswith("-") and not a.startswith("data.synth.")]
    if other:
        raise ConfigError(f"synth takes data.synth.* keys only, got {other}")
    return parse_cli(argv, "imram_dist.data synth OUT", SYNTH_DESCRIPTION, SYNTH_SHORTHANDS).data.synth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imram_dist.data",
                                 description="Build, check and upload imram-dist shard datasets.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert-precomp", help="public precomp folder -> shards")
    c.add_argument("src", help="folder with {split}_caps.txt and {split}_ims.npy or {split}_feat.npy")
    c.add_argument("out", help="output dataset folder")
    c.add_argument("--samples-per-shard", type=int, default=1000, help="images per shard (default: %(default)s)")
    c.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored feature dtype (default: %(default)s)")
    c.add_argument("--vocab", default=None, help="use this existing vocabulary JSON instead of building one")
    c.add_argument("--vocab-threshold", type=int, default=4,
                   help="minimum count in train+dev captions for a word (default: %(default)s)")

    s = sub.add_parser("synth", help="generate the synthetic corpus", add_help=False)
    s.add_argument("out", help="output dataset folder")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="[--config PRESET] [--train-images N] [data.synth.KEY=VALUE ...]")

    i = sub.add_parser("inspect", help="statistics and a full validation pass")
    i.add_argument("root", help="dataset folder or s3://bucket/prefix")
    i.add_argument("--json", action="store_true", help="print the report as JSON")

    u = sub.add_parser("upload", help="upload a dataset folder to S3 and verify it")
    u.add_argument("root", help="local dataset folder")
    u.add_argument("dest", help="s3://bucket/prefix")
    u.add_argument("--chunk-mb", type=int, default=16, help="multipart chunk size in MiB (default: %(default)s)")

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["synth"] and {"-h", "--help"} & set(argv):  # synth's help is parse_cli's, OUT or not
        try:
            _synth_config(["--help"])
        except SystemExit:
            return 0
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "convert-precomp":
            from .convert import convert_precomp

            m = convert_precomp(args.src, args.out, args.samples_per_shard, args.dtype, args.vocab,
                                args.vocab_threshold)
            print(f"wrote {args.out}: " + ", ".join(f"{k} {v.images} images / {v.captions} captions in "
                                                     f"{len(v.shards)} shards" for k, v in m.splits.items()))
        elif args.cmd == "synth":
            from .synth import generate_synthetic

            cfg = _synth_config(args.rest)
            m = generate_synthetic(args.out, cfg, progress=True)
            print(f"wrote {args.out}: " + ", ".join(f"{k} {v.images} images" for k, v in m.splits.items()))
        elif args.cmd == "inspect":
            from .tools import inspect_dataset

            rep = inspect_dataset(args.root)
            if args.json:
                print(json.dumps(rep, indent=1))
            else:
                print(f"{rep['root']}: R={rep['regions']} D={rep['feature_dim']} dtype={rep['dtype']} "
                      f"vocabulary={rep.get('vocab_size')} words")
                for name, st in rep["splits"].items():
                    cw = st["caption_words"]
                    print(f"  {name}: {st['images']}/{st['manifest_images']} images, {st['captions']}/"
                          f"{st['manifest_captions']} captions, {st['shards']} shards, stored {st['stored_dtypes']}, "
                          f"caption words min {cw['min']} mean {cw['mean']} p95 {cw['p95']} max {cw['max']}, "
                          f"unknown-word rate {st['unknown_word_rate']}, bad {st['bad']}")
                print(f"{len(rep['errors'])} problems" + (":" if rep["errors"] else ""))
                for e in rep["errors"]:
                    print("  " + e)
            return 1 if rep["errors"] else 0
        elif args.cmd == "upload":
            from .tools import upload_dataset

            r = upload_dataset(args.root, args.dest, chunk_mb=args.chunk_mb)
            how = ", ".join(f"{n} by {'the store' + chr(39) + 's SHA-256 checksum' if k == 's3-checksum' else 'reading back'}"
                            for k, n in sorted(r["verified"].items()))
            print(f"uploaded {r['files']} files ({r['bytes']} bytes) to {r['dest']}, all verified ({how})")
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
