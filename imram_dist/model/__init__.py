"""IMRAM model library (pure PyTorch; IMRAM_SPEC.md is the contract, docs/model.md the guide)."""

from . import kernels
from .checkpoint import (
    CheckpointError,
    load_inference_checkpoint,
    load_reference_checkpoint,
    save_inference_checkpoint,
)
from .encoders import ImageEncoder, TextEncoder, l2norm
from .imram import IMRAM, ModelInputError, compute_dtype, unwrap
from .loss import directional_hinge_loss, hinge_loss

__all__ = [
    "IMRAM",
    "CheckpointError",
    "ImageEncoder",
    "ModelInputError",
    "compute_dtype",
    "TextEncoder",
    "directional_hinge_loss",
    "hinge_loss",
    "kernels",
    "l2norm",
    "load_inference_checkpoint",
    "load_reference_checkpoint",
    "save_inference_checkpoint",
    "unwrap",
]
