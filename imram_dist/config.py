"""The one typed configuration of imram-dist: every default lives here.

A config is a tree of dataclasses. YAML presets (configs/*.yaml) and command-line
``key=value`` pairs override it by dotted keys (``model.steps=2``), and Ray Tune search
spaces do the same, so no default or flag is ever defined twice. Each field's docstring
(the string literal right under it) is its help text: ``python -m imram_dist.train --help``
prints them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.resources
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# the repository's configs/, installed as the data package imram_dist.presets (pyproject.toml)
PRESETS_DIR = Path(str(importlib.resources.files("imram_dist.presets")))
DEFAULT_PRESET = "default"


class ConfigError(ValueError):
    """A config key, value or file that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    """IMRAM itself (../shared/IMRAM_SPEC.md fixes the math)."""

    image_dim: int = 2048
    """Width D of the precomputed region features; must match the dataset."""
    embed_size: int = 1024
    """Joint embedding size d."""
    word_dim: int = 300
    """Word embedding size fed to the GRU."""
    vocab_size: int = 0
    """Vocabulary size; 0 means: take it from the dataset's vocab.json."""
    mode: Literal["full", "text", "image"] = "full"
    """Full-IMRAM (both directions), Text-IMRAM (words attend to regions) or Image-IMRAM."""
    steps: int = 3
    """Number of matching steps K."""
    lambda_softmax: float = 9.0
    """Attention temperature lambda (9 for Flickr30K, 11 for COCO)."""
    renorm_query: bool = False
    """L2-normalise the query after each memory update (off in the authors' scripts)."""
    max_caption_len: int = 128
    """Longest caption (tokens including <start>/<end>) the model accepts."""
    margin: float = 0.2
    """Hinge triplet loss margin."""
    max_violation: bool = True
    """Hardest in-batch negative (VSE++); False sums all violations."""
    score_memory_mb: float = 2048.0
    """Memory budget (MB) for one chunk of pair scoring; larger chunks are faster. Under autograd, when
    the pairs need more than one chunk, each chunk is recomputed in backward (activation checkpointing)
    so training memory stays near it; the default fits a batch of 32 (1,024 pairs at paper sizes) in one
    chunk, with nothing recomputed."""
    compile_scoring: bool = False
    """torch.compile the pair-scoring core (fuses the elementwise passes; costs a compile on first use)."""
    kernels: Literal["auto", "eager", "fused"] = "auto"
    """Elementwise kernels of pair scoring: eager (the reference), fused (compiled memory update), or auto
    (fused for bf16/fp16, CUDA and CPU fp32 from embed_size 512 where a compiler is available; eager for
    smaller CPU fp32 models, where the compile would dominate)."""
    fp32_matmul: Literal["auto", "torch", "onednn"] = "auto"
    """Backend of the MDU projection matmuls (the per-pair one is most of the FLOPs) when scoring in fp32
    on CPU: torch (MKL on x86), onednn, or auto (oneDNN on x86 CPUs with AVX-512 not made by Intel, where
    MKL's sgemm runs its AVX2 code at about half the rate; torch's everywhere else, AVX2-only CPUs
    included). Other dtypes and GPUs always use torch's."""


@dataclass
class SynthConfig:
    """The built-in synthetic corpus (see docs/data.md)."""

    train_images: int = 2000
    """Images in the train split (5 captions each)."""
    dev_images: int = 200
    """Images in the dev split."""
    test_images: int = 200
    """Images in the test split."""
    regions: int = 12
    """Regions per image R."""
    feature_dim: int = 64
    """Region feature width D (set model.image_dim to the same value)."""
    seed: int = 0
    """Generator seed: same seed, same bytes."""
    object_types: int = 24
    """Distinct object nouns (each with a synonym or two); at most 24."""
    attribute_types: int = 10
    """Distinct attribute adjectives (colours, sizes, materials); at most 10."""
    min_objects: int = 2
    """Fewest objects in one image."""
    max_objects: int = 4
    """Most objects in one image (each fills 1-2 regions; the rest are distractors)."""
    twin_fraction: float = 0.5
    """Fraction of images that come as attribute-swapped twins (same objects, attributes permuted)."""
    omit_prob: float = 0.2
    """Probability that a caption leaves one of the image's objects out."""
    noise: float = 0.3
    """Standard deviation of the Gaussian noise added to every region feature."""
    binding: Literal["joint", "key"] = "joint"
    """How an object's attribute is drawn: "joint" renders object and attribute together in the
    object's regions; "key" renders the object's regions from (object, key) and one separate region
    from (attribute, key), where the key is a random per-image tag that no caption names, so which
    attribute belongs to which object is only visible by matching the object first, then the region
    sharing its key (two attention hops; see docs/synthetic.md). Needs regions >= 3 * max_objects."""
    samples_per_shard: int = 250
    """Images per shard file."""
    dtype: Literal["float16", "float32"] = "float16"
    """Stored region feature dtype."""


@dataclass
class DataConfig:
    """Where the shards are and how they are read."""

    root: str = ""
    """Dataset root (folder or s3:// prefix) in the imram-dist shard format; empty means the built-in synthetic corpus."""
    cache_dir: str = "~/.cache/imram_dist"
    """Where the synthetic corpus is generated (once) when data.root is empty."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """The synthetic corpus used when data.root is empty."""
    train_split: str = "train"
    """Split used for training."""
    dev_split: str = "dev"
    """Split evaluated after each epoch for model selection."""
    batch_size: int = 128
    """Global batch size in (image, caption) pairs, summed over all workers."""
    loader_workers: int = 0
    """DataLoader worker processes per training worker."""
    shuffle_buffer: int = 1000
    """Pairs held in the shuffle buffer."""
    skip_bad_samples: bool = False
    """Skip (and count) malformed samples instead of failing."""


@dataclass
class TrainConfig:
    """Optimisation (authors' recipe by default) and DeepSpeed."""

    epochs: int = 30
    """Training epochs."""
    lr: float = 2e-4
    """Initial learning rate lr0."""
    lr_update: int = 15
    """Multiply the learning rate by 0.1 every lr_update epochs."""
    grad_clip: float = 2.0
    """Global gradient-norm clipping."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 (with loss scaling) needs GPUs."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1 or 2."""
    seed: int = 0
    """Seed for initialisation and data order."""
    log_every: int = 50
    """Print a progress line every N steps within an epoch."""
    fail_at_step: int = -1
    """Fault-injection drill: kill rank fail_rank at this global step, once (-1: never)."""
    fail_rank: int = 1
    """Rank that the fault-injection drill kills."""


@dataclass
class ClusterConfig:
    """Ray: where and how many workers."""

    address: str = ""
    """Ray cluster address; empty starts (or joins) a local cluster."""
    num_workers: int = 2
    """Training workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """One GPU per worker, nccl; otherwise CPU and gloo."""
    cpus_per_worker: int = 1
    """CPUs reserved for each worker."""
    torch_threads: int = 0
    """torch intra-op threads per worker; 0: cluster.cpus_per_worker."""
    gpus_per_worker: float = 1.0
    """GPUs reserved for each worker when cluster.use_gpu is true (a fraction shares a GPU)."""


@dataclass
class RunConfig:
    """Run identity, storage and fault tolerance."""

    name: str = "imram"
    """Run name; rerunning with the same name and storage resumes."""
    storage: str = "./runs"
    """Where checkpoints and results go: a local path or s3://bucket/prefix."""
    max_failures: int = 1
    """Worker-group restarts from the last checkpoint before giving up."""
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Ray Train's own messages on the console from this level up; all of them are in Ray's session
    logs either way (/tmp/ray/session_latest/logs/ray-train-*.log on each node)."""
    keep_checkpoints: int = 2
    """Checkpoints kept, ranked by dev rsum."""
    export_path: str = ""
    """Consolidated fp32 inference checkpoint of the best epoch; empty: <storage>/<name>/model_best.pt
    (for s3 storage: ./exports/<name>/model_best.pt, also uploaded there)."""


@dataclass
class EvalConfig:
    """Retrieval evaluation."""

    protocol: Literal["f30k", "coco5k", "coco1k", "1to1", "auto"] = "auto"
    """Protocol: f30k, coco5k, coco1k (5 folds), 1to1, or auto (5 captions per image if they fit, else 1:1)."""
    split: str = "test"
    """Split to evaluate."""
    image_batch: int = 128
    """Images encoded per batch."""
    block_images: int = 128
    """Images per scoring block."""
    block_captions: int = 640
    """Captions per scoring block."""
    fold_images: int = 1000
    """Images per fold for the coco1k protocol (folds are taken in order from the split)."""
    memmap_mb: int = 1024
    """Keep the images x captions score matrix in a .npy memmap on disk when it is larger than this (MB)."""
    report_queries: int = 20
    """Queries per direction sampled into the --report files."""
    seed: int = 0
    """Seed for sampling the --report queries."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Scoring precision for evaluation: fp32 (exact reference) or bf16 (faster on AMX CPUs and GPUs)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where python -m imram_dist.evaluate and a search's final test run score: auto (CUDA if torch sees it), cpu, cuda."""
    # what python -m imram_dist.evaluate scores and where it writes (its flags are shorthands for these)
    checkpoint: str = ""
    """python -m imram_dist.evaluate: an imram-dist inference checkpoint (file, or a folder holding one)."""
    model_uri: str = ""
    """python -m imram_dist.evaluate: an MLflow registered model, models:/name@alias or models:/name/version."""
    reference: str = ""
    """python -m imram_dist.evaluate: the authors' model_best.pth.tar."""
    workers: int = 1
    """python -m imram_dist.evaluate: local scoring processes."""
    json_path: str = ""
    """python -m imram_dist.evaluate: write the results as JSON to this file."""
    save_sims: str = ""
    """python -m imram_dist.evaluate: write the score matrix to this .npy ([folds, n, m] for coco1k)."""
    report_dir: str = ""
    """python -m imram_dist.evaluate: write top-5 results of sampled queries (report.json, report.md) here."""
    progress: bool = True
    """Show a progress bar while scoring."""


@dataclass
class TuneConfig:
    """Ray Tune hyper-parameter search (python -m imram_dist.tune); see docs/tuning.md."""

    name: str = "imram-search"
    """Search name: its folder under run.storage and its MLflow parent run; --resume continues it."""
    space: str = "default"
    """Search space: a name in tune/ (default, f30k, coco) or a YAML file mapping dotted keys to distributions."""
    trials: int = 50
    """Trials to run (configurations sampled from the space)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha stops trials whose dev metric lags at each rung; fifo runs every trial to the end."""
    search: Literal["random", "optuna"] = "random"
    """Searcher: random sampling or Optuna's TPE."""
    metric: str = "rsum"
    """Dev metric that the scheduler, the searcher and model selection maximise."""
    grace_epochs: int = 1
    """ASHA: epochs every trial trains before it can be stopped."""
    reduction_factor: int = 3
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    max_concurrent: int = 0
    """Trials running at once; 0: as many as the cluster's CPUs (or GPUs) can hold."""
    driver_resource: str = "trial_driver"
    """Custom Ray resource a trial driver takes 0.01 of, so drivers land on the nodes that offer it
    (the head node of the cluster configs) and never take a CPU from their own workers."""
    seed: int = 0
    """Seed of the searcher's sampling."""
    resume: bool = False
    """Continue an interrupted search of the same tune.name and run.storage (Tuner.restore)."""
    evaluate_best: bool = True
    """Evaluate the best trial on eval.split and register its model."""
    verbose: int = 0
    """Ray Tune's own console output (0: off, only imram-dist's progress lines; 1-3: Ray's status table)."""


@dataclass
class TrackingConfig:
    """MLflow tracking and model registry."""

    enabled: bool = True
    """Track runs in MLflow (python -m imram_dist.train and every search)."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: an sqlite file (artifacts beside it in mlartifacts/) or http://host:port of an mlflow server."""
    experiment: str = "imram"
    """MLflow experiment that holds the runs."""
    registered_model: str = "imram-synth"
    """Registry name the best model of a search is registered under (one per preset)."""
    champion_alias: str = "champion"
    """Registry alias that marks the best registered version on the same dataset and protocol."""
    log_model: bool = True
    """Log each trial's best epoch as an MLflow pyfunc model (weights, config and vocabulary)."""


@dataclass
class Config:
    """Everything a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and storage."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyper-parameter search."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""


# ---------------------------------------------------------------------------------------
# Loading, overriding, printing


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # source not available (e.g. frozen app)
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())  # a docstring may wrap
    return docs


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and, for int->float, widen) one value against its declared type."""
    if isinstance(value, CliText):
        value = _from_text(key, value, tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {str(value)!r}")
        return choices[choices.index(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def apply_overrides(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict or flat dotted-key dict to a config, in place, type-checked."""
    hints = _field_types(type(cfg))
    for raw_key, value in overrides.items():
        head, _, rest = str(raw_key).partition(".")
        full = f"{prefix}{head}"
        if head not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown config key {full!r} (known here: {known})")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            if rest:
                apply_overrides(current, {rest: value}, prefix=f"{full}.")
            elif isinstance(value, dict):
                apply_overrides(current, value, prefix=f"{full}.")
            else:
                raise ConfigError(f"{full}: is a section; expected a mapping, got {value!r}")
        else:
            if rest:
                raise ConfigError(f"unknown config key {full}.{rest!r}: {full} is not a section")
            setattr(cfg, head, _coerce(full, value, hints[head]))


class CliText(str):
    """A value typed on the command line: converted by the declared type of its key, so
    ``run.name=123`` stays a string and ``train.lr=1e-3`` becomes a float."""


def _from_text(key: str, text: CliText, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if text in ("null", "none", "None", "~") and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _from_text(key, text, arg)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}: expected {tp}, got {str(text)!r}")
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {str(text)!r}")
    try:
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        kind = "an integer" if tp is int else "a number"
        raise ConfigError(f"{key}: expected {kind}, got {str(text)!r}") from None
    return str(text)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` and ``5e39`` as numbers (YAML 1.2) where YAML 1.1 reads
    strings (it wants a dot and a signed exponent), so a preset or a search space means what it says."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> Any:
    """A YAML file through YamlLoader; ConfigError naming the file when it is not valid YAML."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def named_yaml(name_or_path: str, folder: Path, what: str) -> Path:
    """A YAML file path, or the name of one of the YAML files shipped in folder."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"{what}={name_or_path!r}: no such file, and not one of {names} in {folder}")


def preset_path(name_or_path: str) -> Path:
    """A preset name (``f30k``) or a YAML file path."""
    return named_yaml(name_or_path, PRESETS_DIR, "--config")


def load_config(preset: str | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults, then a YAML preset or file, then dotted ``key=value`` overrides."""
    cfg = Config()
    if preset:
        path = preset_path(preset)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        try:
            apply_overrides(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if isinstance(overrides, dict):
        apply_overrides(cfg, overrides)
    else:
        for item in overrides or []:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"expected key=value, got {item!r}")
            apply_overrides(cfg, {key.strip(): CliText(text.strip())})
    validate(cfg)
    return cfg


def _model_checks(m: ModelConfig, prefix: str) -> list[tuple[str, bool, str]]:
    return [
        (f"{prefix}steps", m.steps >= 1, "at least 1"),
        (f"{prefix}embed_size", m.embed_size >= 1, "positive"),
        (f"{prefix}image_dim", m.image_dim >= 1, "positive"),
        (f"{prefix}word_dim", m.word_dim >= 1, "positive"),
        (f"{prefix}max_caption_len", m.max_caption_len >= 1, "positive"),
        (f"{prefix}vocab_size", m.vocab_size >= 0, "0 (from the dataset) or more"),
        (f"{prefix}lambda_softmax", m.lambda_softmax > 0, "positive"),
        (f"{prefix}margin", m.margin >= 0, "non-negative"),
        (f"{prefix}score_memory_mb", m.score_memory_mb > 0, "positive"),
    ]


def _raise_first(cfg: Any, checks: list[tuple[str, bool, str]], strip: str = "") -> None:
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: expected {expected}, got {_get(cfg, key.removeprefix(strip))!r}")


def _check_types(section: Any, prefix: str) -> None:
    for name, tp in _field_types(type(section)).items():
        setattr(section, name, _coerce(f"{prefix}{name}", getattr(section, name), tp))


def validate_model(m: ModelConfig, prefix: str = "model.", built: bool = False) -> None:
    """The value checks of a model config (also run by validate); built=True is the model's own
    check: the vocabulary size must then be known (0 means 'from the dataset'). A ModelConfig
    built in Python has had no type check yet, so every field's type is checked here too."""
    _check_types(m, prefix)
    checks = _model_checks(m, prefix)
    if built:
        checks.append((f"{prefix}vocab_size", m.vocab_size >= 1,
                       "at least 1 once the model is built (0 means 'from the dataset' and is resolved first)"))
    _raise_first(m, checks, strip=prefix)


def model_config(data: dict[str, Any], where: str = "model_config") -> ModelConfig:
    """A ModelConfig from a plain dict (a checkpoint's model_config): type-checked and validated
    like every other way of building a config; errors name ``where`` and the key."""
    m = ModelConfig()
    try:
        apply_overrides(m, data, prefix="model.")
        validate_model(m)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return m


# the synthetic generator's object and attribute vocabularies (imram_dist/data/synth.py asserts
# its lists have these lengths)
SYNTH_OBJECT_TYPES, SYNTH_ATTRIBUTE_TYPES = 24, 10


def validate_synth(s: SynthConfig, prefix: str = "data.synth.") -> None:
    """The type and value checks of the synthetic corpus's knobs (also run by validate and by the
    generator, which may be handed a SynthConfig built in Python)."""
    _check_types(s, prefix)
    per_object = 3 if s.binding == "key" else 2  # key binding: 2 object regions + 1 attribute region each
    _raise_first(s, [
        (f"{prefix}object_types", 1 <= s.object_types <= SYNTH_OBJECT_TYPES, f"1..{SYNTH_OBJECT_TYPES}"),
        (f"{prefix}attribute_types", 2 <= s.attribute_types <= SYNTH_ATTRIBUTE_TYPES, f"2..{SYNTH_ATTRIBUTE_TYPES}"),
        (f"{prefix}min_objects", 1 <= s.min_objects <= s.max_objects, f"1..max_objects ({s.max_objects})"),
        (f"{prefix}max_objects", s.max_objects <= s.attribute_types, f"at most attribute_types ({s.attribute_types})"),
        (f"{prefix}regions", s.regions >= per_object * s.max_objects,
         f"at least {per_object} x max_objects = {per_object * s.max_objects} with binding={s.binding!r}"),
    ], strip=prefix)


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    checks = _model_checks(cfg.model, "model.") + [
        ("train.zero_stage", cfg.train.zero_stage in (0, 1, 2),
         "0, 1 or 2 (ZeRO-3 is not supported: scoring calls into submodules)"),
        ("train.epochs", cfg.train.epochs >= 1, "at least 1"),
        ("train.grad_accum", cfg.train.grad_accum >= 1, "at least 1"),
        ("train.lr", cfg.train.lr > 0, "positive"),
        ("train.lr_update", cfg.train.lr_update >= 1, "at least 1"),
        ("cluster.num_workers", cfg.cluster.num_workers >= 1, "at least 1"),
        ("data.batch_size", cfg.data.batch_size >= 2, "at least 2"),
        ("data.loader_workers", cfg.data.loader_workers >= 0, "0 or more"),
        ("eval.image_batch", cfg.eval.image_batch >= 1, "at least 1"),
        ("eval.block_images", cfg.eval.block_images >= 1, "at least 1"),
        ("eval.block_captions", cfg.eval.block_captions >= 1, "at least 1"),
        ("eval.fold_images", cfg.eval.fold_images >= 1, "at least 1"),
        ("eval.workers", cfg.eval.workers >= 1, "at least 1"),
        ("cluster.gpus_per_worker", cfg.cluster.gpus_per_worker > 0, "positive"),
        ("tune.trials", cfg.tune.trials >= 1, "at least 1"),
        ("tune.grace_epochs", cfg.tune.grace_epochs >= 1, "at least 1"),
        ("tune.reduction_factor", cfg.tune.reduction_factor >= 2, "at least 2"),
        ("tune.max_concurrent", cfg.tune.max_concurrent >= 0, "0 (auto) or more"),
        ("tune.name", bool(cfg.tune.name) and "/" not in cfg.tune.name, "a non-empty name without '/'"),
        ("run.name", bool(cfg.run.name) and "/" not in cfg.run.name, "a non-empty name without '/'"),
        ("run.keep_checkpoints", cfg.run.keep_checkpoints >= 1, "at least 1"),
        ("run.max_failures", cfg.run.max_failures >= -1, "-1 (forever) or more"),
        ("cluster.cpus_per_worker", cfg.cluster.cpus_per_worker >= 1 or cfg.cluster.use_gpu,
         "at least 1 (on CPU workers)"),
    ]
    _raise_first(cfg, checks)
    validate_synth(cfg.data.synth)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from to_dict output (e.g. saved in a checkpoint), checked like any other."""
    cfg = Config()
    apply_overrides(cfg, data)
    validate(cfg)
    return cfg


def flat_keys(cfg: Any = None, prefix: str = "") -> dict[str, tuple[Any, str, Any]]:
    """Every leaf key -> (default value, help text, type), in declaration order."""
    cfg = Config() if cfg is None else cfg
    out: dict[str, tuple[Any, str, Any]] = {}
    docs = field_docs(type(cfg))
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (value, docs.get(f.name, ""), hints[f.name])
    return out


def help_text(cfg: Config | None = None) -> str:
    """All keys with defaults and docs, for --help."""
    lines = []
    for key, (value, doc, _) in flat_keys(cfg).items():
        lines.append(f"  {key}={value!r}\n      {doc}")
    return "\n".join(lines)


_DOTTED_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def parse_cli(argv: list[str], prog: str, description: str,
              shorthands: dict[str, str] | None = None, default_preset: str = DEFAULT_PRESET) -> Config:
    """``[--config FILE|PRESET] [--flag VALUE ...] [key=value ...]`` -> Config; ``--help`` lists
    every key.

    ``shorthands`` maps a few named flags to config keys (``{"--trials": "tune.trials"}``): a
    flag is only another spelling of its key, so its default and help come from the config; a
    flag whose key is a bool takes no value and sets it true (false for a ``--no-...`` flag). Without --config the ``default``
    preset (small, CPU, synthetic corpus) applies, so a bare command works on a laptop; the paper
    settings are ``--config f30k`` / ``--config coco``."""
    shorthands = shorthands or {}
    keys = flat_keys()
    for flag, key in shorthands.items():
        if key not in keys:  # a programming error, caught by the CLI tests
            raise ConfigError(f"shorthand {flag} names unknown config key {key!r}")
    preset = default_preset
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in ("-h", "--help"):
            flags = "".join(f" [{f}{'' if keys[k][2] is bool else ' ' + k.split('.')[-1].upper()}]"
                            for f, k in shorthands.items())
            print(f"usage: python -m {prog} [--config PRESET_OR_FILE]{flags} [key=value ...]\n\n"
                  f"{description}\nWithout --config the {default_preset!r} preset applies.\n")
            if shorthands:
                print("flags (shorthands for config keys; defaults and help from the keys below):")
                for f, k in shorthands.items():
                    print(f"  {f:<22} {k}  (default {keys[k][0]!r})")
                print()
            print(f"presets: {sorted(p.stem for p in PRESETS_DIR.glob('*.yaml'))}\n\nkeys:")
            print(help_text())
            raise SystemExit(0)
        if flag == "--config":
            if not eq and not args:
                raise ConfigError("--config needs a preset name or a YAML file")
            preset = inline if eq else args.pop(0)
        elif flag in shorthands:
            key = shorthands[flag]
            if keys[key][2] is bool and not eq:
                overrides.append(f"{key}={'false' if flag.startswith('--no-') else 'true'}")
            elif eq:
                overrides.append(f"{key}={inline}")
            elif args and not args[0].startswith("--") and not _DOTTED_OVERRIDE.match(args[0]):
                overrides.append(f"{key}={args.pop(0)}")
            else:
                raise ConfigError(f"{flag} needs a value (it sets {key})")
        elif arg.startswith("-") and "=" not in arg.split(".")[0]:
            known = ", ".join(["--config", *shorthands])
            raise ConfigError(f"unknown flag {arg!r} (flags: {known}; everything else is key=value)")
        else:
            overrides.append(arg)
    return load_config(preset, overrides)
