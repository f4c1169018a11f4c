"""``python -m imram_dist.evaluate``: evaluate a checkpoint on a split (docs/evaluation.md)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from imram_dist.config import Config, ConfigError, parse_cli
from imram_dist.data.io import atomic_write_bytes
from imram_dist.evaluate.metrics import EvalError, format_table

DESCRIPTION = """Image-text retrieval evaluation of an IMRAM model: R@1/5/10, median and mean rank
for image->text and text->image, and rsum. Give the model with one of --checkpoint, --model or
--reference; the other settings come from the config (defaults, --config PRESET, then dotted
key=value overrides such as eval.block_images=64)."""

# every flag is another spelling of a config key, as in train and tune
SHORTHANDS = {
    "--checkpoint": "eval.checkpoint",
    "--model": "eval.model_uri",
    "--reference": "eval.reference",
    "--data": "data.root",
    "--split": "eval.split",
    "--protocol": "eval.protocol",
    "--workers": "eval.workers",
    "--device": "eval.device",
    "--json": "eval.json_path",
    "--save-sims": "eval.save_sims",
    "--report": "eval.report_dir",
    "--no-progress": "eval.progress",
}


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
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv, "imram_dist.evaluate", DESCRIPTION, SHORTHANDS)
        return _run(cfg)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(cfg: Config) -> int:
    from imram_dist.evaluate.loading import load_model
    from imram_dist.evaluate.report import build_report, write_report
    from imram_dist.evaluate.scoring import eval_device, evaluate_split

    ev = cfg.eval
    protocol, split, root = ev.protocol, ev.split, cfg.data.root
    if not root:
        from imram_dist.data import resolve_root
        root = str(resolve_root(cfg.data))

    device = eval_device(ev.device)  # before loading: a CUDA request on a CPU-only machine fails first
    model, info = load_model(ev.checkpoint or None, ev.model_uri or None, ev.reference or None)
    model.to(device)
    eval_split, load_notes = load_split(root, split, checkpoint_vocab(info))
    # the matrix is filled under a temporary name and renamed when whole, so an interrupted run
    # never leaves a complete-looking .npy at --save-sims
    sims_tmp = f"{ev.save_sims}.{os.getpid()}.partial" if ev.save_sims else None
    try:
        result = evaluate_split(model, eval_split, protocol, ev.workers, ev, sims_path=sims_tmp,
                                keep_sims=bool(ev.report_dir), progress=ev.progress)
    except BaseException:
        if sims_tmp and os.path.exists(sims_tmp):
            os.remove(sims_tmp)
        raise
    if sims_tmp:
        result.sims.flush()
        os.replace(sims_tmp, ev.save_sims)

    header = (f"{info['source']} on {root}:{split} protocol {result.protocol}: "
              f"{result.n_images} images x {result.n_captions} captions, {result.pairs:,} pairs in "
              f"{result.seconds:.1f} s ({result.pairs / max(result.score_seconds, 1e-9):,.0f} pairs/s scoring "
              f"in {cfg.eval.precision} on {device.type}, "
              f"{result.workers} worker{'s' if result.workers > 1 else ''})")
    print(header)
    result.notes = load_notes + result.notes
    for note in result.notes:
        print(f"note: {note}")
    for f, fm in enumerate(result.folds):
        print(format_table(fm, f"fold {f + 1} of {len(result.folds)}"))
    print(format_table(result.metrics, "mean over folds" if result.folds else ""))

    summary = {**result.to_json(), "source": info["source"], "data": root, "split": split,
               "precision": cfg.eval.precision, "device": device.type,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if ev.save_sims:
        summary["sims"] = ev.save_sims
    if ev.json_path:
        Path(ev.json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(ev.json_path, json.dumps(summary, indent=2).encode())
    if ev.report_dir:
        sims = result.sims if not result.folds else result.sims[0]
        n, m = sims.shape
        c2i = np.arange(m) // (m // n) if result.protocol != "custom" else np.asarray(eval_split.caption_to_image)
        rep = build_report(sims, c2i, getattr(eval_split, "image_ids", None), getattr(eval_split, "captions", None),
                           cfg.eval.report_queries, cfg.eval.seed)
        title = f"{info['source']} on {split} ({result.protocol}{', fold 1' if result.folds else ''})"
        write_report(ev.report_dir, rep, summary, title)
    return 0
