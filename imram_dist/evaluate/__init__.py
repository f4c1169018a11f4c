"""Retrieval evaluation of IMRAM models: recall metrics, protocols (f30k, coco5k, coco1k,
1to1), blocked scoring spread over torch.distributed ranks or local processes, reports,
and the ``python -m imram_dist.evaluate`` CLI (docs/evaluation.md)."""

from imram_dist.evaluate.metrics import (
    PROTOCOLS,
    EvalError,
    average_folds,
    format_table,
    plan_protocol,
    retrieval_metrics,
    retrieval_ranks,
)
from imram_dist.evaluate.scoring import (
    EvalResult,
    allocate_scores,
    check_compatible,
    distributed_evaluate,
    encode_captions,
    encode_images,
    evaluate_split,
    gather_rows,
    image_rows,
    score_matrix,
)

__all__ = [
    "EvalError", "EvalResult", "PROTOCOLS", "allocate_scores", "average_folds", "check_compatible",
    "distributed_evaluate", "encode_captions", "encode_images", "evaluate_split", "format_table",
    "gather_rows", "image_rows", "plan_protocol", "retrieval_metrics", "retrieval_ranks", "score_matrix",
]
