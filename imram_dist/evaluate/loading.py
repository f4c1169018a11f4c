"""Where the CLI gets a model: an inference checkpoint file, an MLflow registry URI
(``models:/name@alias`` or ``models:/name/version``), or the authors' model_best.pth.tar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imram_dist.evaluate.metrics import EvalError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".ckpt", ".bin")


def find_checkpoint_files(path: str | Path) -> list[Path]:
    """``[path]`` if it is a file; in a folder, every checkpoint-looking file under it
    (``.pt`` files first, then by path)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise EvalError(f"checkpoint {path} does not exist")
    found = sorted((p for p in path.rglob("*") if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES)),
                   key=lambda p: (not p.name.endswith(".pt"), str(p)))
    if not found:
        raise EvalError(f"no checkpoint file ({'/'.join(CHECKPOINT_SUFFIXES)}) under {path}")
    return found


def find_checkpoint_file(path: str | Path) -> Path:
    """``path`` itself if it is a file; in a folder, the one checkpoint file under it."""
    found = find_checkpoint_files(path)
    if len(found) != 1:
        names = ", ".join(str(p) for p in found[:10])
        raise EvalError(f"expected one checkpoint file under {path}, found {len(found)}: {names}")
    return found[0]


def _load_first_inference(candidates: list[Path]) -> tuple[Any, dict[str, Any], Path]:
    """The first candidate that is an imram-dist inference checkpoint (a registered model's
    artifacts may hold other files too, e.g. an MLflow-pickled module)."""
    import imram_dist.model as M

    errors = []
    for path in candidates:
        try:
            model, meta = M.load_inference_checkpoint(str(path))
            return model, meta, path
        except (M.CheckpointError, KeyError, AttributeError, RuntimeError) as e:
            errors.append(f"{path}: {e}")
    raise EvalError("no imram-dist inference checkpoint found: " + "; ".join(errors))


def download_registered_model(uri: str, dst: str | Path | None = None) -> Path:
    """Download the artifacts of a registered model version (``models:/name@alias``) and
    return the local folder (or file) they were downloaded to. MLflow is imported only here; the tracking URI comes
    from MLFLOW_TRACKING_URI as usual."""
    if not uri.startswith("models:/"):
        raise EvalError(f"--model expects a registry URI like models:/name@alias, got {uri!r}")
    try:
        import mlflow.artifacts
    except ImportError as e:  # pragma: no cover - mlflow is a dependency
        raise EvalError(f"--model needs mlflow: {e}") from None
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=None if dst is None else str(dst))
    except Exception as e:  # mlflow raises its own exception types; say what failed
        raise EvalError(f"could not download {uri} from the MLflow registry: {e}") from None
    return Path(local)


def load_model(checkpoint: str | None = None, model_uri: str | None = None,
               reference: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Exactly one source -> (IMRAM model in eval mode, info dict with at least ``source``;
    ``vocab`` when the checkpoint carries one)."""
    given = [x for x in (checkpoint, model_uri, reference) if x]
    if len(given) != 1:
        raise EvalError("give exactly one model: --checkpoint PATH (eval.checkpoint), --model models:/name@alias "
                        f"(eval.model_uri) or --reference PATH (eval.reference); got {len(given)}")
    import imram_dist.model as M

    if reference:
        path = find_checkpoint_file(reference)
        try:
            model, mcfg = M.load_reference_checkpoint(str(path))
        except (M.CheckpointError, KeyError, AttributeError, RuntimeError) as e:
            raise EvalError(f"{path} is not a usable authors' checkpoint: {e}") from None
        info: dict[str, Any] = {"source": f"reference:{path}", "model_config": mcfg}
    else:
        where = download_registered_model(model_uri) if model_uri else Path(checkpoint)  # type: ignore[arg-type]
        model, meta, path = _load_first_inference(find_checkpoint_files(where))
        info = dict(meta) if isinstance(meta, dict) else {"meta": meta}
        info["source"] = f"{model_uri} ({path.name})" if model_uri else str(path)
    model.eval()
    return model, info
