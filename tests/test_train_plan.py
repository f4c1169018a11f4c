"""Pure pieces of imram_dist.train: DeepSpeed config, LR schedule, batch arithmetic, fail-fast
config checks (with and without a cluster), storage and fault-drill markers. Fast."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imram_dist.config import ConfigError, load_config
from imram_dist.train import check_resources, check_static, deepspeed_config, lr_at_epoch, micro_batch
from imram_dist.train.plan import resolve_storage, storage_filesystem


def cfg(**ov):
    return load_config("default", ov)


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_config(stage, precision):
    c = cfg(**{"train.zero_stage": stage, "train.precision": precision, "data.batch_size": 64,
               "train.grad_accum": 2})
    ds = deepspeed_config(c, world_size=2)
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 2.0
    assert ds["zero_optimization"] == {"stage": stage}
    assert "optimizer" not in ds and "scheduler" not in ds  # client torch Adam, LR set per epoch
    assert ("bf16" in ds) == (precision == "bf16")
    assert "fp16" not in ds


def test_bf16_on_a_cpu_that_torch_can_only_emulate_it_on_gets_a_warning_per_key(monkeypatch):
    """The worker's warning (recipe.train) where bf16 matmuls would run in torch's reference loops:
    for each of train.precision and eval.precision set to bf16, on CPU only."""
    import torch

    from imram_dist.model import kernels
    from imram_dist.train.plan import precision_warnings

    both = cfg(**{"train.precision": "bf16", "eval.precision": "bf16"})
    monkeypatch.setattr(kernels, "cpu_bf16_matmul_native", lambda: False)
    warned = precision_warnings(both, torch.device("cpu"))
    assert [w.split(":")[0] for w in warned] == ["train.precision=bf16", "eval.precision=bf16"]
    assert all("this CPU has no bf16 matmul" in w and "use fp32 on this machine" in w for w in warned)
    assert [w.split(":")[0] for w in precision_warnings(cfg(**{"eval.precision": "bf16"}), torch.device("cpu"))] \
        == ["eval.precision=bf16"]
    assert precision_warnings(cfg(), torch.device("cpu")) == []
    assert precision_warnings(both, torch.device("cuda")) == []
    monkeypatch.setattr(kernels, "cpu_bf16_matmul_native", lambda: True)
    assert precision_warnings(both, torch.device("cpu")) == []


def test_fp16_only_on_gpu():
    c = cfg(**{"train.precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        check_static(c)
    c.cluster.use_gpu = True
    ds = deepspeed_config(c, world_size=2)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_lr_schedule():
    c = cfg(**{"train.lr": 2e-4, "train.lr_update": 15})
    assert [lr_at_epoch(c.train, e) for e in (0, 14, 15, 29, 30)] == pytest.approx(
        [2e-4, 2e-4, 2e-5, 2e-5, 2e-6])


def test_micro_batch():
    assert micro_batch(cfg(**{"data.batch_size": 128}), 4) == 32
    with pytest.raises(ConfigError, match="not divisible"):
        micro_batch(cfg(**{"data.batch_size": 30, "train.grad_accum": 4}), 2)


def test_unknown_key_and_bad_values():
    with pytest.raises(ConfigError, match="unknown config key 'train.zero'"):
        load_config("default", ["train.zero=2"])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config("default", ["train.zero_stage=3"])


def test_check_resources():
    c = cfg(**{"cluster.num_workers": 3})
    with pytest.raises(ConfigError, match="needs 3 CPUs but the Ray cluster has 2"):
        check_resources(c, {"CPU": 2.0})
    check_resources(c, {"CPU": 3.0})
    c.cluster.use_gpu = True
    with pytest.raises(ConfigError, match="needs 3 GPUs but the Ray cluster has 0"):
        check_resources(c, {"CPU": 8.0})


def test_storage_resolution(monkeypatch):
    st = resolve_storage("s3://bucket/some/prefix/")
    assert st.is_s3 and st.path == "bucket/some/prefix" and st.run_path("r") == "bucket/some/prefix/r"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    fs = storage_filesystem("s3://bucket/x")
    assert fs.type_name == "s3"
    local = resolve_storage("./runs")
    assert not local.is_s3 and os.path.isabs(local.path)


def test_fault_drill_fires_once(tmp_path):
    """The drill kills the process (os._exit) the first time only: the marker in storage
    survives the restart."""
    code = (
        "import sys\n"
        "from imram_dist.config import load_config\n"
        "from imram_dist.train.worker import maybe_inject_fault\n"
        f"c = load_config('default', ['run.storage={tmp_path}', 'run.name=drill', 'train.fail_at_step=7', 'train.fail_rank=1'])\n"
        "maybe_inject_fault(c, c.run.storage, 6, 1)\n"
        "maybe_inject_fault(c, c.run.storage, 7, 0)\n"
        "maybe_inject_fault(c, c.run.storage, 7, 1)\n"
        "print('survived')\n"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert first.returncode == 17 and "survived" not in first.stdout
    assert (tmp_path / "drill" / "fault_drill" / "step7_rank1.fired").exists()
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "survived" in second.stdout


def test_scan_skips_a_checkpoint_whose_upload_was_cut_short(tmp_path):
    """Names alone would pass a truncated rank file: the sizes recorded before upload decide."""
    import json as json_

    from imram_dist.train.checkpoints import CKPT_TAG, STATE_FILE, WEIGHTS_FILE, scan_checkpoints
    from imram_dist.train.worker import checkpoint_file_sizes

    storage = resolve_storage(str(tmp_path / "runs"))
    for n, cut in ((1, False), (2, True)):
        ckpt = tmp_path / "runs" / "r" / f"checkpoint_{n}"
        (ckpt / CKPT_TAG).mkdir(parents=True)
        (ckpt / WEIGHTS_FILE).write_bytes(b"w" * 10)
        (ckpt / CKPT_TAG / "mp_rank_00_model_states.pt").write_bytes(b"m" * 20)
        (ckpt / CKPT_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"z" * 30)
        state = {"epochs_done": n, "world_size": 1, "zero_stage": 1, "history": [{"rsum": 100.0 + n}],
                 "files": checkpoint_file_sizes(str(ckpt), 1)}
        assert state["files"][WEIGHTS_FILE] == [10]
        (ckpt / STATE_FILE).write_text(json_.dumps(state))
        if cut:
            (ckpt / CKPT_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"z" * 7)
    found = scan_checkpoints(storage, "r")
    assert [c["name"] for c in found] == ["checkpoint_1"]
