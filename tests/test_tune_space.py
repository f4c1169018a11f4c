"""Search spaces and the tune CLI's checks: everything that must fail before any trial starts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from imram_dist.config import ConfigError, load_config, to_dict
from imram_dist.tune.__main__ import SHORTHANDS, default_preset, gpu_flag, main
from imram_dist.tune.space import SPACES_DIR, check_samples, load_space, trial_config

SHIPPED = {"default": default_preset(), "f30k": "f30k", "coco": "coco"}


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_every_shipped_space_is_listed():
    assert sorted(p.stem for p in SPACES_DIR.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_space_loads_and_20_samples_validate(name):
    space = load_space(name)
    for key in ("model.margin", "model.steps", "train.lr", "train.lr_update", "model.lambda_softmax",
                "model.mode", "model.max_violation"):
        assert key in space.searched_keys, f"{name} does not search {key}"
    base = to_dict(load_config(SHIPPED[name]))
    check_samples(space, base, n=20)
    rng = np.random.default_rng(1)
    seen_steps = set()
    for _ in range(20):
        params = space.sample(rng)
        cfg = trial_config(base, params)
        assert cfg.model.steps == params["model.steps"] and cfg.train.lr == pytest.approx(params["train.lr"])
        lo, hi = space.dists["train.lr"][1]
        assert lo <= cfg.train.lr <= hi
        assert cfg.model.mode in ("full", "text", "image")
        seen_steps.add(cfg.model.steps)
    assert seen_steps == {1, 2, 3}


def test_ray_param_space_has_the_distributions():
    from ray import tune

    ray_space = load_space("default").to_ray()
    assert isinstance(ray_space["train.lr"], tune.search.sample.Float)
    assert ray_space["model.steps"].categories == [1, 2, 3]
    lr = ray_space["train.lr"]
    assert lr.lower == pytest.approx(3e-4) and lr.upper == pytest.approx(1e-2)


def test_plain_values_fix_a_key(tmp_path):
    space = load_space(write(tmp_path, "train.epochs: 2\nmodel.margin: {uniform: [0.1, 0.2]}\n"))
    assert space.fixed == {"train.epochs": 2} and space.searched_keys == ["model.margin"]
    assert "train.epochs" not in space.to_ray()  # searchers such as Optuna drop constants: the base config holds them
    cfg = load_config("default")
    space.apply_fixed(cfg)
    assert cfg.train.epochs == 2


@pytest.mark.parametrize("text, expected", [
    ("model.margn: {uniform: [0.1, 0.2]}\n", "unknown config key 'model.margn' (did you mean model.margin"),
    ("model.margin: {uniform: [0.3, 0.1]}\n", "model.margin: empty range uniform[0.3, 0.1]"),
    ("train.lr_update: {randint: [3, 3]}\n", "train.lr_update: empty range randint[3, 3]"),
    ("model.steps: {uniform: [1, 3]}\n", "model.steps is an integer: use randint"),
    ("model.mode: {uniform: [0, 1]}\n", "model.mode is one of ['full', 'text', 'image']: use choice"),
    ("model.mode: {choice: [full, both]}\n", "model.mode: expected one of ['full', 'text', 'image'], got 'both'"),
    ("model.margin: {choice: [0.1, fast]}\n", "model.margin: expected a number, got 'fast'"),
    ("train.lr: {loguniform: [0, 0.1]}\n", "train.lr: loguniform needs low > 0"),
    ("train.lr: {normal: [0, 1]}\n", "unknown distribution 'normal'"),
    ("train.lr: {uniform: [0.1]}\n", "uniform expects [low, high]"),
    ("tune.trials: {randint: [1, 5]}\n", "the tune section describes the search itself"),
    ("- model.margin\n", "expected a mapping of dotted config keys"),
])
def test_bad_space_names_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_space(path)
    assert expected in str(e.value) and path in str(e.value)


def test_sampled_config_that_fails_validation_is_caught(tmp_path):
    # every value is a valid integer, but most batch sizes do not divide over 2 workers
    space = load_space(write(tmp_path, "data.batch_size: {randint: [3, 40]}\n"))
    with pytest.raises(ConfigError, match="a sampled configuration .* data.batch_size=.* is not divisible"):
        check_samples(space, to_dict(load_config("default")))


def test_missing_space_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"tune.space='nope': no such file, and not one of \['coco', 'default', 'f30k'\]"):
        load_space("nope")


# --- the CLI ------------------------------------------------------------------------


def test_flags_are_shorthands_for_config_keys(capsys):
    from imram_dist.config import flat_keys

    keys = flat_keys()
    assert all(key in keys for key in SHORTHANDS.values())
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--trials               tune.trials  (default 50)" in out
    assert "--tracking-uri         tracking.uri  (default 'sqlite:///mlflow.db')" in out
    assert "tune.scheduler='asha'" in out  # every key is listed too


def test_gpu_flag_turns_gpu_training_on():
    assert gpu_flag(["--gpus-per-worker", "1", "x=1"]) == ["cluster.gpus_per_worker=1", "cluster.use_gpu=true", "x=1"]
    assert gpu_flag(["--gpus-per-worker=0"]) == ["cluster.use_gpu=false"]


def no_ray(monkeypatch) -> None:
    """Fail the test if the command gets as far as joining or starting Ray."""
    from imram_dist.train import driver

    def refuse(*a, **k):
        raise AssertionError("Ray was started before the bad input was caught")

    monkeypatch.setattr(driver, "ensure_ray", refuse)


@pytest.mark.parametrize("argv, expected", [
    (["--trials", "0"], "tune.trials: expected at least 1, got 0"),
    (["--trials", "many"], "tune.trials: expected an integer, got 'many'"),
    (["--scheduler", "pbt"], "tune.scheduler: expected one of ['asha', 'fifo'], got 'pbt'"),
    (["--space", "nope"], "tune.space='nope'"),
    (["--trails", "3"], "unknown flag '--trails'"),
    (["--max-concurrent"], "--max-concurrent needs a value (it sets tune.max_concurrent)"),
])
def test_cli_errors_before_any_trial(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_ray(monkeypatch)
    assert main(argv + [f"run.storage={tmp_path}/runs"]) == 2
    assert expected in capsys.readouterr().err


def test_eval_device_cuda_without_a_gpu_fails_before_any_trial(capsys, tmp_path, monkeypatch):
    """The best trial's test run scores in the search's own process, after every trial: a device
    it cannot have must fail the command at once."""
    import torch

    monkeypatch.chdir(tmp_path)
    no_ray(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without a GPU
    assert main(["eval.device=cuda", f"run.storage={tmp_path}/runs"]) == 2
    assert "eval.device=cuda: torch sees no CUDA GPU here" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_in_seconds_naming_the_uri(capsys, tmp_path, monkeypatch):
    from conftest import free_port

    monkeypatch.chdir(tmp_path)
    no_ray(monkeypatch)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    assert main(["--tracking-uri", uri, f"run.storage={tmp_path}/runs"]) == 2
    assert time.perf_counter() - t0 < 15
    err = capsys.readouterr().err
    assert f"tracking.uri={uri}: the MLflow server does not answer" in err


def test_exponents_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as the string '1e-4'; spaces and presets read it as a number
    space = load_space(write(tmp_path, "train.lr: {loguniform: [1e-4, 1e-2]}\nmodel.lambda_softmax: {choice: [9, 5e39]}\n"))
    assert space.dists["train.lr"] == ("loguniform", [1e-4, 1e-2])
    assert space.dists["model.lambda_softmax"] == ("choice", [9.0, 5e39])


def test_optuna_searcher_suggests_configs_of_the_space():
    from imram_dist.tune.search import _searcher

    cfg = load_config(default_preset(), {"tune.search": "optuna", "tune.seed": 3})
    space = load_space("default")
    searcher = _searcher(cfg, n_concurrent=2)
    assert type(searcher).__name__ == "ConcurrencyLimiter"
    assert searcher.set_search_properties("rsum", "max", space.to_ray())
    base = to_dict(cfg)
    for i in range(4):
        params = searcher.suggest(f"t{i}") if i < 2 else None
        if params is None:  # the limiter holds two at once
            break
        trial = trial_config(base, params)
        assert 0.05 <= trial.model.margin <= 0.5 and trial.model.steps in (1, 2, 3)
        assert 3e-4 <= trial.train.lr <= 1e-2 and trial.model.mode in ("full", "text", "image")
    assert searcher.suggest("t-over-the-limit") is None


def test_progress_line_counts_and_time_left(monkeypatch):
    """The search's progress line: counts of the whole search and the time left at the pace so far."""
    from types import SimpleNamespace

    from imram_dist.tune import callbacks

    cfg = load_config("default", ["tune.trials=10"])
    clock = iter([100.0, 160.0, 400.0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    printer = callbacks.ProgressPrinter(cfg, None)
    running = [SimpleNamespace(status="RUNNING")] * 2
    assert printer.counts(running) == "0 done (0 stopped early), 2 running, 0 failed, 8 pending | 1m00s elapsed"
    trials = [SimpleNamespace(status="TERMINATED")] * 3 + [SimpleNamespace(status="ERROR")] + running
    # 4 of 10 ended in 300 s: 6 more at that pace is 450 s
    assert printer.counts(trials) == ("3 done (0 stopped early), 2 running, 1 failed, 4 pending | 5m00s elapsed, "
                                      "about 7m30s left")
