"""Checkpoints: the authors' model_best.pth.tar, and our own consolidated fp32 inference files.

Both are read with torch.load(weights_only=True): plain containers and tensors only, plus (for the
authors' files) argparse.Namespace, which is how their options were pickled. Anything else in the
pickle (an arbitrary class, a function) is refused by the restricted unpickler.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from imram_dist.config import ModelConfig, model_config

from .imram import IMRAM, unwrap


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why."""


# ------------------------------------------------------------------------- authors' checkpoints

MODEL_MODES = {"full_IMRAM": "full", "text_IMRAM": "text", "image_IMRAM": "image"}

# Options of the authors' opts.py that change what the model computes, with the only value we
# implement (their defaults, or what their published scripts pass).
REQUIRED_OPTIONS = {
    "raw_feature_norm": "clipped_l2norm",
    "num_layers": 1,
    "bi_gru": True,
    "precomp_enc_type": "basic",
    "no_imgnorm": False,
    "no_txtnorm": False,
}
# Defaults of their opts.py, used when an option is missing from the pickled Namespace.
AUTHOR_DEFAULTS = {
    "raw_feature_norm": "clipped_l2norm", "num_layers": 1, "bi_gru": False, "precomp_enc_type": "basic",
    "no_imgnorm": False, "no_txtnorm": False, "lambda_softmax": 9.0, "iteration_step": 3,
    "no_IMRAM_norm": False, "model_mode": "vse", "margin": 0.2, "max_violation": False,
}

_EXPECTED_KEYS = [
    "img_enc.fc_local.weight", "img_enc.fc_local.bias", "txt_enc.embed.weight",
    *(f"txt_enc.rnn.{w}_{g}_l0{s}" for s in ("", "_reverse") for w in ("weight", "bias") for g in ("ih", "hh")),
    *(f"{n}_{dr}.{p}" for dr in ("t2i", "i2t") for n in ("linear", "gate") for p in ("weight", "bias")),
]


def _opt(opt: Any, name: str) -> Any:
    if isinstance(opt, dict):
        return opt.get(name, AUTHOR_DEFAULTS.get(name))
    return getattr(opt, name, AUTHOR_DEFAULTS.get(name))


def _torch_load(path: str | os.PathLike, allow: list) -> Any:
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError for bad files
        first = str(e).strip().splitlines()
        hint = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        hint = hint.strip().split(" Please use")[0]
        if not allow and "argparse.Namespace" in hint:
            hint += " (this looks like the authors' model_best.pth.tar: use load_reference_checkpoint)"
        raise CheckpointError(f"{path}: refused or unreadable checkpoint (only tensors, plain containers"
                              f"{' and argparse.Namespace' if allow else ''} are accepted): {hint}") from e


def config_from_reference_options(opt: Any, state: dict[str, torch.Tensor]) -> ModelConfig:
    """ModelConfig equivalent to the authors' options (and weight shapes); refuses what we lack."""
    problems = []
    for name, want in REQUIRED_OPTIONS.items():
        got = _opt(opt, name)
        if got != want:
            problems.append(f"{name}={got!r} (only {want!r} is implemented)")
    mode = _opt(opt, "model_mode")
    if mode not in MODEL_MODES:
        problems.append(f"model_mode={mode!r} (expected one of {sorted(MODEL_MODES)})")
    steps = _opt(opt, "iteration_step")
    if not isinstance(steps, int) or steps < 1:
        problems.append(f"iteration_step={steps!r} (expected a positive integer)")
    if problems:
        raise CheckpointError("unsupported options in the authors' checkpoint: " + "; ".join(problems))
    embed_size, image_dim = state["img_enc.fc_local.weight"].shape
    vocab_size, word_dim = state["txt_enc.embed.weight"].shape
    mismatch = [f"{name}={_opt(opt, name)!r} but the weights say {val}"
                for name, val in (("embed_size", embed_size), ("img_dim", image_dim),
                                  ("vocab_size", vocab_size), ("word_dim", word_dim))
                if _opt(opt, name) is not None and _opt(opt, name) != val]
    if mismatch:
        raise CheckpointError("options disagree with the weights: " + "; ".join(mismatch))
    return ModelConfig(
        image_dim=int(image_dim), embed_size=int(embed_size), word_dim=int(word_dim),
        vocab_size=int(vocab_size), mode=MODEL_MODES[mode], steps=int(steps),
        lambda_softmax=float(_opt(opt, "lambda_softmax")),
        renorm_query=not bool(_opt(opt, "no_IMRAM_norm")),
        margin=float(_opt(opt, "margin")), max_violation=bool(_opt(opt, "max_violation")),
    )


def load_reference_checkpoint(path: str | os.PathLike) -> tuple[IMRAM, ModelConfig]:
    """Load the authors' model_best.pth.tar (HuiChen24/IMRAM) into an IMRAM that scores identically.

    The file is a pickled dict {"model": DataParallel state dict ("module." keys), "opt":
    argparse.Namespace, "epoch", "best_rsum"}. Returns (model in eval mode, fp32, CPU; its config)."""
    ckpt = _torch_load(path, [argparse.Namespace])
    if not isinstance(ckpt, dict) or "model" not in ckpt or "opt" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected the authors' dict with 'model' and 'opt', got {keys}")
    raw = ckpt["model"]
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
    missing = [k for k in _EXPECTED_KEYS if k not in state]
    extra = [k for k in state if k not in _EXPECTED_KEYS]
    if missing or extra:
        raise CheckpointError(f"{path}: state dict does not match IMRAM: missing {missing}, unexpected {extra}")
    config = config_from_reference_options(ckpt["opt"], state)
    model = IMRAM(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    return model, config


# ------------------------------------------------------------------------- our inference files

FORMAT = "imram-dist/inference/1"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int to load with weights_only, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: expected plain data (dict/list/str/number/bool/None/tensor) so the file "
                        f"loads with weights_only=True, got {type(value).__name__}")


def _unwrap(model: Any) -> IMRAM:
    model = unwrap(model)
    if not isinstance(model, IMRAM):
        raise TypeError(f"model: expected an IMRAM (or a wrapper with .module), got {type(model).__name__}")
    return model


def save_inference_checkpoint(path: str | os.PathLike, model: Any, extra: dict | None = None,
                              vocab: Any = None) -> None:
    """Write a consolidated fp32 checkpoint atomically (temp file, then os.replace).

    extra: plain data stored next to the weights; by convention {"config": resolved config dict,
    "vocab": vocabulary (e.g. {"word2idx": ..., "idx2word": ...})}. The docs/interfaces.md form
    save_inference_checkpoint(path, model, config_dict, vocab) is accepted too: when vocab is given,
    extra is taken as the config dict and stored under "config"."""
    net = _unwrap(model)
    payload_extra = dict(extra or {}) if vocab is None else {"config": extra, "vocab": vocab}
    _check_plain(payload_extra, "extra")
    for reserved in ("format", "model_config", "state_dict"):
        if reserved in payload_extra:
            raise ValueError(f"extra: key {reserved!r} is reserved")
    payload = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(net.config),
        "state_dict": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                       for k, v in net.state_dict().items()},
        **payload_extra,
    }
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name says "whole"
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_inference_checkpoint(path: str | os.PathLike) -> tuple[IMRAM, dict]:
    """Read a save_inference_checkpoint file: (model in eval mode on CPU, fp32; everything else)."""
    payload = _torch_load(path, [])
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: expected an imram-dist inference checkpoint ({FORMAT}), got {got!r}"
                              + (" (for the authors' model_best.pth.tar use load_reference_checkpoint)"
                                 if isinstance(payload, dict) and "opt" in payload else ""))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = payload["model_config"]
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise CheckpointError(f"{path}: model_config has keys this version does not know: {unknown}")
    try:
        config = model_config(cfg, where=f"{path}: model_config")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = IMRAM(config)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}
