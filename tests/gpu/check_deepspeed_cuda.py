"""The training engine on a CUDA GPU: the DeepSpeed config our typed config generates, the
loss module the Ray workers wrap, nccl, and fp32 / bf16 / fp16 (loss scaling) with ZeRO
0 / 1 / 2. Ray itself is not needed: this is the code inside one Ray Train worker.

Not collected by the CPU suite (no test_ prefix). On a GPU machine:
    python -m pytest tests/gpu/check_deepspeed_cuda.py -q
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

# tests/conftest.py makes DeepSpeed pick its CPU accelerator for the CPU suite (it sets
# DS_ACCELERATOR=cpu unless already set, and pytest loads it before this file); this file is about
# the CUDA one. DeepSpeed reads the variable at its first get_accelerator(), after this line.
os.environ["DS_ACCELERATOR"] = "cuda"

from imram_dist.config import load_config  # noqa: E402
from imram_dist.model import IMRAM  # noqa: E402
from imram_dist.train.dist import PairLoss  # noqa: E402
from imram_dist.train.plan import deepspeed_config  # noqa: E402
from imram_dist.train.worker import consolidated_fp32_state_dict  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def nccl_world_of_one():
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl")
    assert torch.distributed.get_backend() == "nccl"
    from deepspeed.accelerator import get_accelerator
    assert get_accelerator().device_name() == "cuda"
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("precision, stage", [("fp32", 0), ("bf16", 1), ("fp16", 2), ("bf16", 2)])
def test_engine_trains_and_round_trips(precision, stage, tmp_path):
    import deepspeed

    cfg = load_config("default", [f"train.precision={precision}", f"train.zero_stage={stage}",
                                  "cluster.use_gpu=true", "model.vocab_size=50", "data.batch_size=32"])
    torch.manual_seed(0)
    model = IMRAM(cfg.model)
    module = PairLoss(model, cfg.model.margin, cfg.model.max_violation)
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.train.lr)
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, 1))
    g = torch.Generator().manual_seed(1)
    regions = torch.randn(32, 12, cfg.model.image_dim, generator=g).cuda()
    tokens = torch.randint(4, 50, (32, 10), generator=g).cuda()
    lengths = torch.randint(3, 11, (32,), generator=g)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    losses = []
    for _ in range(15):
        loss = engine(regions.to(dtype), tokens, lengths)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    engine.save_checkpoint(str(tmp_path), tag="t")
    state = consolidated_fp32_state_dict(engine.module.model, optimizer)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    engine.load_checkpoint(str(tmp_path), tag="t")
    with torch.no_grad():
        again = float(engine(regions.to(dtype), tokens, lengths))
    assert abs(again - losses[-1]) < 0.5 * losses[0]
