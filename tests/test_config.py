"""The typed config: presets load one by one (so they cannot drift), overrides are
type-checked, and bad keys or values name the key."""

from __future__ import annotations

import re

import pytest

from imram_dist.config import (
    PRESETS_DIR,
    Config,
    ConfigError,
    flat_keys,
    from_dict,
    help_text,
    load_config,
    parse_cli,
    to_dict,
)

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"default", "f30k", "coco"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)


def test_paper_presets_match_the_spec():
    f30k, coco = load_config("f30k"), load_config("coco")
    assert (f30k.model.lambda_softmax, f30k.train.lr, f30k.train.lr_update, f30k.train.epochs) == (9.0, 2e-4, 15, 30)
    assert (coco.model.lambda_softmax, coco.train.lr, coco.train.lr_update, coco.train.epochs) == (11.0, 5e-4, 10, 20)
    for cfg in (f30k, coco):
        assert (cfg.model.embed_size, cfg.model.steps, cfg.model.mode) == (1024, 3, "full")
        assert (cfg.model.renorm_query, cfg.model.margin, cfg.train.grad_clip) == (False, 0.2, 2.0)
        assert cfg.data.batch_size == 128


def test_default_preset_is_consistent_with_the_synthetic_corpus():
    cfg = load_config("default")
    assert cfg.data.root == ""
    assert cfg.model.image_dim == cfg.data.synth.feature_dim


def test_dotted_overrides_and_types():
    cfg = load_config("default", ["model.steps=2", "train.lr=1e-3", "model.mode=text",
                                  "model.renorm_query=true", "run.name=abc", "train.epochs=3"])
    assert cfg.model.steps == 2 and cfg.train.lr == 1e-3 and cfg.model.mode == "text"
    assert cfg.model.renorm_query is True and cfg.run.name == "abc" and cfg.train.epochs == 3
    # Ints widen to floats; nested sections take mappings.
    cfg = load_config(None, {"model": {"lambda_softmax": 10}, "data.synth.seed": 7})
    assert cfg.model.lambda_softmax == 10.0 and isinstance(cfg.model.lambda_softmax, float)
    assert cfg.data.synth.seed == 7


@pytest.mark.parametrize("override, named", [
    (["model.stepz=2"], "model.stepz"),
    (["nosuch.key=1"], "nosuch"),
    (["model.steps=two"], "model.steps"),
    (["model.steps=1.5"], "model.steps"),
    (["model.mode=both"], "model.mode"),
    (["model.renorm_query=3"], "model.renorm_query"),
    (["train.zero_stage=3"], "train.zero_stage"),
    (["model=3"], "model"),
    (["model.steps.x=3"], "model.steps"),
    (["model.steps"], "key=value"),
    (["eval.block_images=0"], "eval.block_images"),
])
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("default", override)


def test_bad_preset_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embed_size: 64\n  lamda: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "bad.yaml" in str(err.value) and "model.lamda" in str(err.value)
    with pytest.raises(ConfigError, match=r"--config='no_such_preset': no such file, and not one of \[.*'default'"):
        load_config("no_such_preset")


def test_round_trip_through_dict():
    cfg = load_config("coco", ["model.steps=2"])
    assert from_dict(to_dict(cfg)) == cfg


def test_every_key_has_a_docstring_and_help_lists_it():
    keys = flat_keys()
    undocumented = [k for k, (_, doc, _) in keys.items() if not doc]
    assert not undocumented
    text = help_text()
    for key in ("model.steps", "train.zero_stage", "data.synth.seed", "cluster.num_workers"):
        assert key in text


def test_parse_cli(capsys):
    cfg = parse_cli(["--config", "f30k", "model.steps=1"], "imram_dist.train", "x")
    assert cfg.model.steps == 1 and cfg.model.lambda_softmax == 9.0
    with pytest.raises(SystemExit) as exit_:
        parse_cli(["--help"], "imram_dist.train", "Train IMRAM.")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "model.lambda_softmax" in out and "Attention temperature" in out


def test_cli_without_config_uses_the_default_preset():
    assert parse_cli([], "imram_dist.train", "x") == load_config("default")
    assert parse_cli(["model.steps=1"], "imram_dist.train", "x").model.image_dim == load_config("default").model.image_dim


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=3", "train.zero_stage: expected 0, 1 or 2 (ZeRO-3 is not supported"),
    ("run.name=a/b", "run.name: expected a non-empty name without '/', got 'a/b'"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints: expected at least 1, got 0"),
    ("run.max_failures=-2", "run.max_failures: expected -1 (forever) or more, got -2"),
    ("data.synth.regions=5", "data.synth.regions: expected at least 2 x max_objects = 8 with binding='joint', got 5"),
    ("data.synth.min_objects=5", "data.synth.min_objects: expected 1..max_objects (4), got 5"),
])
def test_value_checks_run_wherever_a_config_is_built(override, message):
    """One set of value checks: the CLI parser, from_dict (saved configs) and the generator all hit it."""
    from imram_dist.config import from_dict, to_dict

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("default", [override])
    key, value = override.split("=")
    raw = to_dict(load_config("default"))
    section = raw
    *path, leaf = key.split(".")
    for part in path:
        section = section[part]
    section[leaf] = type(section[leaf])(value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(raw)
