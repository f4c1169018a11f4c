"""The per-worker training loop that Ray Train runs on every rank (DeepSpeed inside)."""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

from imram_dist.train.checkpoints import CKPT_TAG, STATE_FILE, WEIGHTS_FILE


def _say(rank: int, msg: str) -> None:
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


def _pick_resume_checkpoint(loop_cfg: dict[str, Any], rank: int, world: int):
    """The newest of: Ray's checkpoint for this fit (a restart after a worker failure, or Ray's
    own run snapshot) and the newest complete checkpoint in the run's storage. The scan covers
    what Ray does not: Ray 2.60 writes no snapshot for a run that failed (so a rerun would start
    over), and a checkpoint uploaded just before a worker died may not have been registered by
    the controller yet (so the restart would start over)."""
    import ray.train
    from ray.train import Checkpoint

    from imram_dist.config import from_dict
    from imram_dist.train.checkpoints import scan_checkpoints
    from imram_dist.train.plan import resolve_storage

    ray_ckpt = ray.train.get_checkpoint()
    found: list[Any] = [None]
    if rank == 0:
        storage = resolve_storage(loop_cfg["storage"])
        name = from_dict(loop_cfg["config"]).run.name
        complete = scan_checkpoints(storage, name)
        if complete:
            found[0] = {"path": complete[-1]["path"], "epochs_done": complete[-1]["epochs_done"]}
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(found, src=0)
    latest = found[0]
    if latest is None:
        return ray_ckpt
    scanned = Checkpoint(latest["path"], filesystem=resolve_storage(loop_cfg["storage"]).filesystem())
    if ray_ckpt is None:
        return scanned
    if ray_ckpt.path.rstrip("/") == latest["path"].rstrip("/"):
        return ray_ckpt
    return ray_ckpt if _read_state(ray_ckpt)["epochs_done"] >= latest["epochs_done"] else scanned


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


@contextlib.contextmanager
def _prints_discarded():
    """print() from libraries goes nowhere inside this block. Ray Train routes every worker's
    print() to its logger (which the console shows), so redirecting sys.stdout is not enough."""
    original = builtins.print
    builtins.print = functools.partial(original, file=io.StringIO())
    try:
        yield
    finally:
        builtins.print = original


def _quiet_ray_train_reports() -> None:
    # Ray Train logs each rank's whole TrainingReport at INFO under a logger named by its file,
    # outside the "ray.train" loggers that RunConfig's LoggingConfig filters; the same record stays
    # in the session's ray-train-*.log files
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker)."""
    for k, v in loop_cfg.get("env", {}).items():
        os.environ.setdefault(k, v)
    if not loop_cfg["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    try:
        _quiet_ray_train_reports()
    except ImportError:  # another Ray layout: the reports stay on the console
        pass

    from imram_dist.config import from_dict
    from imram_dist.data import TrainPairs, load_eval_split
    from imram_dist.evaluate import distributed_evaluate
    from imram_dist.model import IMRAM
    from imram_dist.train.dist import PairLoss, all_reduce_min, all_reduce_sum
    from imram_dist.train.plan import deepspeed_config, lr_at_epoch, micro_batch

    cfg = from_dict(loop_cfg["config"])
    root = loop_cfg["root"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if loop_cfg.get("threads"):
        torch.set_num_threads(int(loop_cfg["threads"]))

    torch.manual_seed(cfg.train.seed)
    model = IMRAM(cfg.model)
    net = PairLoss(model, cfg.model.margin, cfg.model.max_violation, grad_scale=float(world))
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    ds_config = deepspeed_config(cfg, world, loop_cfg["use_gpu"])
    with _prints_discarded():  # DeepSpeed prints "... built successfully" once per rank
        engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    gas = cfg.train.grad_accum

    state: dict[str, Any] = {"epochs_done": 0, "global_step": 0, "best_rsum": -math.inf,
                             "best_epoch": 0, "history": []}
    resumed = _pick_resume_checkpoint(loop_cfg, rank, world)
    if resumed is not None:
        with resumed.as_directory() as d:
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
            saved_stage = state.get("zero_stage", cfg.train.zero_stage)
            if state.get("world_size", world) != world and saved_stage > 0:
                raise RuntimeError(
                    f"checkpoint {resumed.path} holds ZeRO-{saved_stage} optimizer partitions of "
                    f"{state['world_size']} workers; resume it with cluster.num_workers={state['world_size']}")
            engine.load_checkpoint(d, tag=CKPT_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        state.setdefault("resumed_at", []).append(state["epochs_done"])
        _say(rank, f"[train] resumed from {resumed.path}: {state['epochs_done']} epochs done, "
                   f"global step {state['global_step']}")

    mb = micro_batch(cfg, world)
    pairs = TrainPairs(root, cfg.data.train_split, batch_size=mb, rank=rank, world_size=world,
                       seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                       loader_workers=cfg.data.loader_workers, skip_bad=cfg.data.skip_bad_samples)
    dev = load_eval_split(root, cfg.data.dev_split)
    node_id = ray.get_runtime_context().get_node_id()
    nodes: list[str] = [node_id]
    if world > 1:
        import torch.distributed as dist

        nodes = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(nodes, node_id)
    _say(rank, f"[train] {world} worker(s) on {len(set(nodes))} node(s), device {device.type}, "
               f"ZeRO {cfg.train.zero_stage}, {cfg.train.precision}, micro batch {mb} x {world} workers x "
               f"{gas} accumulation = global batch {cfg.data.batch_size}")

    if state["epochs_done"] >= cfg.train.epochs and state["history"]:
        # Nothing left to train (a rerun of a finished run, or a search trial resumed after its last
        # checkpoint): report the last epoch again, without a checkpoint, so whoever watches the
        # reports (a Tune search) sees how the run ended.
        ray.train.report(dict(state["history"][-1]))
    for epoch in range(state["epochs_done"], cfg.train.epochs):
        lr = lr_at_epoch(cfg.train, epoch)
        _set_lr(optimizer, lr)
        pairs.set_epoch(epoch)
        n_micro = all_reduce_min(pairs.num_batches, device)  # never wait on a rank with less data
        n_micro -= n_micro % gas
        steps = n_micro // gas
        engine.train()
        it = iter(pairs)
        t_epoch = t_win = time.perf_counter()
        loss_epoch = loss_win = 0.0
        pairs_epoch = pairs_win = 0
        for i in range(n_micro):
            batch = next(it)
            regions = batch.regions.to(device, dtype, non_blocking=True)
            tokens = batch.tokens.to(device, non_blocking=True)
            lengths = batch.lengths.to(device, non_blocking=True)
            loss = engine(regions, tokens, lengths)
            engine.backward(loss)
            local = float(loss.detach()) / world
            if cfg.train.precision != "fp16" and all_reduce_sum(0.0 if math.isfinite(local) else 1.0, device):
                # Every rank stops here together (the flag is summed), before the optimizer applies
                # the step and before any checkpoint of this epoch: no non-finite weights are ever saved.
                # (fp16 is different: DeepSpeed's loss scaler skips an overflowing step by itself.)
                raise FloatingPointError(
                    f"non-finite training loss ({float(loss.detach())}) at epoch {epoch + 1}, step "
                    f"{i // gas + 1} (global step {state['global_step'] + 1}): stopping this run; its last "
                    f"checkpoint (if any) holds the weights from before; lower train.lr or check the data")
            engine.step()
            loss_epoch += local
            loss_win += local
            pairs_epoch += regions.shape[0]
            pairs_win += regions.shape[0]
            if (i + 1) % gas:
                continue
            state["global_step"] += 1
            step_in_epoch = (i + 1) // gas
            maybe_inject_fault(cfg, loop_cfg["storage"], state["global_step"], rank)
            if cfg.train.log_every > 0 and step_in_epoch % cfg.train.log_every == 0 and step_in_epoch < steps:
                tot_loss = all_reduce_sum(loss_win, device) / (cfg.train.log_every * gas)
                tot_pairs = all_reduce_sum(pairs_win, device)
                dt = time.perf_counter() - t_win
                _say(rank, f"[train] epoch {epoch + 1}/{cfg.train.epochs} step {step_in_epoch}/{steps} "
                           f"loss {tot_loss:.4f} lr {lr:.2e} pairs/s {tot_pairs / dt:.1f}")
                t_win, loss_win, pairs_win = time.perf_counter(), 0.0, 0
        it.close()  # a rank may stop before its pass ends: release DataLoader workers and prefetch now
        train_seconds = time.perf_counter() - t_epoch
        epoch_loss = all_reduce_sum(loss_epoch, device) / max(n_micro, 1)
        epoch_pairs = all_reduce_sum(pairs_epoch, device)

        t_eval = time.perf_counter()
        result = distributed_evaluate(model, dev, protocol="auto", cfg=cfg.eval)
        dev_m = {k: float(v) for k, v in result.metrics.items()}
        eval_seconds = time.perf_counter() - t_eval

        state["epochs_done"] = epoch + 1
        if dev_m["rsum"] > state["best_rsum"]:
            state["best_rsum"], state["best_epoch"] = dev_m["rsum"], epoch + 1
        metrics = {**dev_m, "epoch": epoch + 1, "global_step": state["global_step"], "loss": epoch_loss,
                   "lr": lr, "pairs_per_s": epoch_pairs / max(train_seconds, 1e-9),
                   "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                   "world_size": world, "worker_nodes": ",".join(nodes)}
        state["history"].append(dict(metrics))
        _say(rank, f"[train] epoch {epoch + 1}/{cfg.train.epochs} done: loss {epoch_loss:.4f} lr {lr:.2e} "
                   f"pairs/s {metrics['pairs_per_s']:.1f} | dev i2t R@1/5/10 {dev_m['i2t_r1']:.1f}/"
                   f"{dev_m['i2t_r5']:.1f}/{dev_m['i2t_r10']:.1f} t2i R@1/5/10 {dev_m['t2i_r1']:.1f}/"
                   f"{dev_m['t2i_r5']:.1f}/{dev_m['t2i_r10']:.1f} rsum {dev_m['rsum']:.1f} "
                   f"(best {state['best_rsum']:.1f} @ epoch {state['best_epoch']}) "
                   f"[train {train_seconds:.1f}s, eval {eval_seconds:.1f}s]")

        tmp = tempfile.mkdtemp(prefix=f"imram_ckpt_r{rank}_")
        try:
            engine.save_checkpoint(tmp, tag=CKPT_TAG)  # training state goes to STATE_FILE below
            weights = consolidated_fp32_state_dict(model, engine.optimizer)  # collective: every rank
            state["world_size"], state["zero_stage"] = world, cfg.train.zero_stage
            if rank == 0:
                torch.save(weights, os.path.join(tmp, WEIGHTS_FILE))
            # Every rank's file sizes go into the state, so a scan can tell a whole checkpoint
            # from one whose upload a dying rank cut short (names alone would pass).
            state["files"] = checkpoint_file_sizes(tmp, world)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(state, f, indent=1)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
