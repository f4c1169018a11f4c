"""What a training worker does besides the recipe (train/recipe.py): progress lines, the fault
drill, fp32 consolidation of DeepSpeed's weights, checkpoint file sizes, and the choice of the
checkpoint to resume from."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from imram_dist.train.checkpoints import STATE_FILE


def say(rank: int, msg: str) -> None:
    if rank == 0:
        _stdout(msg)


def _stdout(msg: str) -> None:
    # Straight to the process's stdout (which Ray forwards to the driver once): Ray Train V2
    # patches print() in workers to tee into its logger as well, which printed every line twice.
    sys.__stdout__.write(msg + "\n")
    sys.__stdout__.flush()


def fault_marker(storage_uri: str, name: str, step: int, rank: int) -> tuple[Any, str]:
    """(filesystem, path) of the marker that records that the fault drill already fired: it
    lives in the run's storage, so it survives the worker-group restart (and other nodes)."""
    from imram_dist.train.plan import resolve_storage

    st = resolve_storage(storage_uri)
    return st.filesystem(), f"{st.run_path(name)}/fault_drill/step{step}_rank{rank}.fired"


def maybe_inject_fault(cfg, storage_uri: str, global_step: int, rank: int) -> None:
    t = cfg.train
    if t.fail_at_step < 0 or global_step != t.fail_at_step or rank != t.fail_rank:
        return
    import pyarrow.fs as pafs

    fs, path = fault_marker(storage_uri, cfg.run.name, global_step, rank)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return  # already fired once (before a restart)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(f"rank {rank} killed at step {global_step} at {time.time()}\n".encode())
    _stdout(f"[fault-drill] rank {rank}: killing this worker at global step {global_step}")
    os._exit(17)


def _master_weights(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(low-precision param) -> fp32 master copy, for DeepSpeed's (un)fused fp16/bf16
    optimizers of ZeRO stage 0 (ZeRO 1/2 and BF16_Optimizer expose _hp_mapping instead)."""
    out: dict[int, torch.Tensor] = {}
    lp_groups = getattr(optimizer, "fp16_groups", None)
    if not lp_groups:
        return out
    if getattr(optimizer, "fp32_groups", None):
        for lps, hps in zip(lp_groups, optimizer.fp32_groups):
            for lp, hp in zip(lps, hps):
                out[id(lp)] = hp
    elif getattr(optimizer, "fp32_groups_flat", None):
        from torch._utils import _unflatten_dense_tensors

        for lps, flat in zip(lp_groups, optimizer.fp32_groups_flat):
            for lp, hp in zip(lps, _unflatten_dense_tensors(flat, lps)):
                out[id(lp)] = hp
    return out


def consolidated_fp32_state_dict(model: torch.nn.Module, optimizer: Any = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights (the optimizer's fp32 masters under bf16/fp16) on every rank.
    Collective for ZeRO 1/2 and bf16 params: call it on all ranks."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _master_weights(optimizer) if optimizer is not None else {}
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
    for k, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = masters.get(id(p))
        if full is not None:
            out[k] = full.detach().to("cpu", torch.float32).reshape(p.shape).clone()
    return out


def checkpoint_file_sizes(folder: str, world: int) -> dict[str, list[int]]:
    """{relative path: sizes} of every file all ranks put in their checkpoint folders (a name two
    ranks both write, such as DeepSpeed's "latest", may carry one size per rank)."""
    mine = {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}
    everyone = [mine]
    if world > 1:
        import torch.distributed as dist

        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    merged: dict[str, list[int]] = {}
    for sizes in everyone:
        for path, size in sizes.items():
            if size not in merged.setdefault(path, []):
                merged[path].append(size)
    return merged


def _read_state(ckpt) -> dict[str, Any]:
    with ckpt.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            return json.load(f)


def pick_resume_checkpoint(storage_uri: str, run_name: str, rank: int, world: int):
    """The newest of: Ray's checkpoint for this fit (a restart after a worker failure, or Ray's
    own run snapshot) and the newest complete checkpoint in the run's storage. The scan covers
    what Ray does not: Ray 2.60 writes no snapshot for a run that failed (so a rerun would start
    over), and a checkpoint uploaded just before a worker died may not have been registered by
    the controller yet (so the restart would start over)."""
    import ray.train
    from ray.train import Checkpoint

    from imram_dist.train.checkpoints import scan_checkpoints
    from imram_dist.train.plan import resolve_storage

    ray_ckpt = ray.train.get_checkpoint()
    found: list[Any] = [None]
    if rank == 0:
        complete = scan_checkpoints(resolve_storage(storage_uri), run_name)
        if complete:
            found[0] = {"path": complete[-1]["path"], "epochs_done": complete[-1]["epochs_done"]}
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(found, src=0)
    latest = found[0]
    if latest is None:
        return ray_ckpt
    scanned = Checkpoint(latest["path"], filesystem=resolve_storage(storage_uri).filesystem())
    if ray_ckpt is None:
        return scanned
    if ray_ckpt.path.rstrip("/") == latest["path"].rstrip("/"):
        return ray_ckpt
    return ray_ckpt if _read_state(ray_ckpt)["epochs_done"] >= latest["epochs_done"] else scanned
