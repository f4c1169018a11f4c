"""``python -m imram_dist.evaluate``: evaluate a checkpoint on a split (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from imram_dist.config import DEFAULT_PRESET, ConfigError, help_text, load_config
from imram_dist.data.io import atomic_write_bytes
from imram_dist.evaluate.metrics import PROTOCOLS, EvalError, format_table

DESCRIPTION = """Image-text retrieval evaluation of an IMRAM model: R@1/5/10, median and mean rank
for image->text and text->image, and rsum. Settings not given as flags come from the
config (defaults, --config PRESET, then dotted key=value overrides such as
eval.block_images=64 data.root=...)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m imram_dist.evaluate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config keys (key=value):\n" + help_text())
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="imram-dist inference checkpoint (file, or a folder holding one)")
    src.add_argument("--model", metavar="URI", help="MLflow registered model, models:/name@alias or models:/name/version")
    src.add_argument("--reference", metavar="PATH", help="the authors' model_best.pth.tar")
    p.add_argument("--data", metavar="ROOT_OR_URL", help="dataset root (folder or s3:// prefix); default: data.root")
    p.add_argument("--split", help="split to evaluate; default: eval.split")
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: eval.protocol")
    p.add_argument("--workers", type=int, default=1, help="local scoring processes (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--save-sims", metavar="PATH", help="write the score matrix (.npy; [folds, n, m] for coco1k)")
    p.add_argument("--report", metavar="DIR", help="write top-5 results for sampled queries (report.json, report.md)")
    p.add_argument("--config", metavar="PRESET_OR_FILE",
                   help="config preset (f30k, coco, ...) or YAML file; default: the default preset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def checkpoint_vocab(info: dict[str, Any]) -> Any:
    """The vocabulary stored in an inference checkpoint (None for the authors' files)."""
    import imram_dist.data as D

    vocab = info.get("vocab")
    if vocab is None or isinstance(vocab, D.Vocabulary):
        return vocab
    if isinstance(vocab, (dict, str, bytes)):
        try:
            return D.Vocabulary.from_json(vocab) if isinstance(vocab, dict) else D.Vocabulary.loads(vocab)
        except ValueError as e:
            raise EvalError(f"the checkpoint's vocabulary is unusable: {e}") from None
    raise EvalError(f"the checkpoint's vocabulary has an unknown form ({type(vocab).__name__})")


def load_split(root: str, split: str, vocab: Any = None) -> tuple[Any, list[str]]:
    """The split through imram_dist.data (captions encoded with ``vocab`` when given, i.e. the
    model's own vocabulary), with a clear error for a missing dataset or split."""
    import imram_dist.data as D

    notes = []
    try:
        manifest = D.read_manifest(root)
    except (FileNotFoundError, D.DataError) as e:
        raise EvalError(f"no usable dataset at {root}: {e}") from None
    if split not in manifest.splits:
        raise EvalError(f"split {split!r} is not in {root} (available: {', '.join(sorted(manifest.splits))})")
    if vocab is not None:
        if vocab == manifest.load_vocab():
            vocab = None
        else:
            notes.append("captions re-tokenised with the checkpoint's vocabulary (it differs from the dataset's)")
    try:
        return D.load_eval_split(manifest, split, vocab=vocab), notes
    except (FileNotFoundError, KeyError, D.DataError) as e:
        raise EvalError(f"cannot load split {split!r} from {root}: {e}") from None


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EvalError, ConfigError]
    try:
        from imram_dist.model import CheckpointError, ModelInputError
        errors += [CheckpointError, ModelInputError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from imram_dist.data import DataError
        errors.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from imram_dist.evaluate.loading import load_model
    from imram_dist.evaluate.report import build_report, write_report
    from imram_dist.evaluate.scoring import evaluate_split

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise EvalError(f"unexpected argument(s) {bad}: config overrides are key=value")
    cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
    protocol = args.protocol or cfg.eval.protocol
    split = args.split or cfg.eval.split
    root = args.data if args.data is not None else cfg.data.root
    if not root:
        from imram_dist.data import resolve_root
        root = str(resolve_root(cfg.data))
    if args.workers < 1:
        raise EvalError(f"--workers must be at least 1, got {args.workers}")

    model, info = load_model(args.checkpoint, args.model, args.reference)
    eval_split, load_notes = load_split(root, split, checkpoint_vocab(info))
    # the matrix is filled under a temporary name and renamed when whole, so an interrupted run
    # never leaves a complete-looking .npy at --save-sims
    sims_tmp = f"{args.save_sims}.{os.getpid()}.partial" if args.save_sims else None
    try:
        result = evaluate_split(model, eval_split, protocol, args.workers, cfg.eval, sims_path=sims_tmp,
                                keep_sims=bool(args.report), progress=not args.no_progress)
    except BaseException:
        if sims_tmp and os.path.exists(sims_tmp):
            os.remove(sims_tmp)
        raise
    if sims_tmp:
        result.sims.flush()
        os.replace(sims_tmp, args.save_sims)

    header = (f"{info['source']} on {root}:{split} protocol {result.protocol}: "
              f"{result.n_images} images x {result.n_captions} captions, {result.pairs:,} pairs in "
              f"{result.seconds:.1f} s ({result.pairs / max(result.score_seconds, 1e-9):,.0f} pairs/s scoring "
              f"in {cfg.eval.precision}, "
              f"{result.workers} worker{'s' if result.workers > 1 else ''})")
    print(header)
    result.notes = load_notes + result.notes
    for note in result.notes:
        print(f"note: {note}")
    for f, fm in enumerate(result.folds):
        print(format_table(fm, f"fold {f + 1} of {len(result.folds)}"))
    print(format_table(result.metrics, "mean over folds" if result.folds else ""))

    summary = {**result.to_json(), "source": info["source"], "data": root, "split": split,
               "precision": cfg.eval.precision,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.save_sims:
        summary["sims"] = str(args.save_sims)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, json.dumps(summary, indent=2).encode())
    if args.report:
        sims = result.sims if not result.folds else result.sims[0]
        n, m = sims.shape
        c2i = np.arange(m) // (m // n) if result.protocol != "custom" else np.asarray(eval_split.caption_to_image)
        rep = build_report(sims, c2i, getattr(eval_split, "image_ids", None), getattr(eval_split, "captions", None),
                           cfg.eval.report_queries, cfg.eval.seed)
        title = f"{info['source']} on {split} ({result.protocol}{', fold 1' if result.folds else ''})"
        write_report(args.report, rep, summary, title)
    return 0
