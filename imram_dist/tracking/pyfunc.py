"""An IMRAM model as an MLflow pyfunc: the consolidated inference checkpoint (fp32 weights,
resolved config and vocabulary) wrapped so that

    mlflow.pyfunc.load_model("models:/NAME@champion").predict(
        {"regions": float32 [N, R, D], "captions": ["a red dog", ...]})

returns the [N, M] score matrix, exactly what load_inference_checkpoint + similarity give."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import mlflow.pyfunc
import numpy as np

CHECKPOINT_ARTIFACT = "checkpoint"


@contextlib.contextmanager
def _mlflow_advice_hidden() -> Iterator[None]:
    """Hide MLflow's advice that does not apply to this model: type hints on predict (ours has none
    on purpose: MLflow would read them as a schema; the signature is given explicitly) and an input
    example. MLflow resets the warning filters inside its calls, so the display hook is swapped."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if not any(a in str(message) for a in ("type hints", "input example", "input_example")):
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


with _mlflow_advice_hidden():  # MLflow inspects predict when the subclass is defined

    class IMRAMScorer(mlflow.pyfunc.PythonModel):
        """Scores every image against every caption (captions tokenised with the bundled vocabulary)."""

        def load_context(self, context: Any) -> None:
            from imram_dist.data import Vocabulary
            from imram_dist.model import load_inference_checkpoint

            self.model, meta = load_inference_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
            self.vocab = Vocabulary.from_json(meta["vocab"])

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
            import torch

            from imram_dist.data import pad_tokens

            regions, captions = _unpack(model_input)
            tokens, lengths = pad_tokens([self.vocab.encode(c) for c in captions])
            with torch.no_grad():
                scores = self.model(torch.from_numpy(regions), tokens, lengths)
            return scores.float().numpy()


def _unpack(model_input: Any) -> tuple[np.ndarray, list[str]]:
    try:
        regions, captions = model_input["regions"], model_input["captions"]
    except (KeyError, TypeError, IndexError):
        raise ValueError('IMRAM model input: expected {"regions": float32 [N, R, D], "captions": [str, ...]}, '
                         f"got {type(model_input).__name__}") from None
    regions = np.ascontiguousarray(np.asarray(regions, dtype=np.float32))
    if regions.ndim != 3:
        raise ValueError(f"IMRAM model input: regions must be [N, R, D], got shape {regions.shape}")
    captions = [str(c) for c in np.asarray(captions, dtype=object).reshape(-1)]
    if not captions:
        raise ValueError("IMRAM model input: captions is empty")
    return regions, captions


def signature(regions: int, feature_dim: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, regions, feature_dim), "regions"),
                     TensorSpec(np.dtype(str), (-1,), "captions")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "scores")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """The serving environment: this package and its pins (skips MLflow's slow inference)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"imram-dist=={version('imram-dist')}"]
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return ["imram-dist"]


def log_model(run_id: str, checkpoint_path: str, regions: int, feature_dim: int) -> str:
    """Log the checkpoint as a pyfunc model named "model" in run_id; returns its model URI."""
    import logging

    import mlflow

    # MLflow's note that a Python object is cloudpickled (ours is a stateless class whose weights
    # travel as the checkpoint artifact) would print on every trial
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with _mlflow_advice_hidden(), mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=IMRAMScorer(), artifacts={CHECKPOINT_ARTIFACT: checkpoint_path},
                signature=signature(regions, feature_dim), pip_requirements=pip_requirements())
    finally:
        pyfunc_log.setLevel(level)
    return info.model_uri
