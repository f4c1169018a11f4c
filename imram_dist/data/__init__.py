"""Shards, vocabulary, tokeniser and loaders (webdataset + boto3; no Ray/DeepSpeed/MLflow).

See docs/data.md for the format and docs/interfaces.md for the API contract.
"""

from .io import DataError, expand_urls, open_stream, read_bytes
from .loader import Batch, EvalSplit, TrainPairs, collate, load_eval_split, pad_tokens
from .shards import BadSampleReport, Manifest, Sample, ShardInfo, ShardWriter, SplitInfo, iter_shard, read_manifest
from .synth import ensure_synthetic, generate_synthetic
from .tokenize import END, PAD, START, UNK, Vocabulary, build_vocab, tokenize


def resolve_root(data_cfg) -> str:
    """DataConfig -> dataset root: data.root, or the built-in synthetic corpus when it is empty."""
    return data_cfg.root or ensure_synthetic(data_cfg.cache_dir, data_cfg.synth)


__all__ = [
    "BadSampleReport", "Batch", "DataError", "END", "EvalSplit", "Manifest", "PAD", "START", "Sample",
    "ShardInfo", "ShardWriter", "SplitInfo", "TrainPairs", "UNK", "Vocabulary", "build_vocab", "collate",
    "ensure_synthetic", "expand_urls", "generate_synthetic", "iter_shard", "load_eval_split", "open_stream",
    "pad_tokens", "read_bytes", "read_manifest", "resolve_root", "tokenize",
]
