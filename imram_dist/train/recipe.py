"""The training recipe that Ray Train runs on every rank, read top to bottom: set up (config,
device, model, DeepSpeed engine), resume, load the data, then for each epoch train, evaluate on
dev, save a checkpoint and report. The driver (train/driver.py) hands each worker one WorkerArgs."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from imram_dist.train.checkpoints import CKPT_TAG, STATE_FILE, WEIGHTS_FILE
from imram_dist.train.worker import (
    checkpoint_file_sizes,
    consolidated_fp32_state_dict,
    maybe_inject_fault,
    pick_resume_checkpoint,
    say,
)


@dataclass
class WorkerArgs:
    """What the driver hands every worker (pickled into Ray's state, so: no secrets; workers take
    credentials from their own environment, see plan.forwarded_env)."""

    config: dict[str, Any]
    """The resolved config as to_dict output; rebuilt (and validated) in the worker."""
    root: str
    """Dataset root (folder or s3:// prefix), already resolved by the driver."""
    storage: str
    """Run storage URI (local path or s3://bucket/prefix)."""
    use_gpu: bool
    threads: int
    """torch threads per worker."""
    env: dict[str, str] = field(default_factory=dict)
    """Non-secret environment the workers may lack (S3 endpoint and region, extension cache)."""


@dataclass
class TrainState:
    """What a checkpoint's STATE_FILE holds besides the weights; resume restores it."""

    epochs_done: int = 0
    global_step: int = 0
    best_rsum: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)
    world_size: int = 0
    zero_stage: int = 0
    files: dict[str, list[int]] = field(default_factory=dict)


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
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the reports stay on the console
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU accelerator from building and loading its shared-memory all-reduce op.

    DeepSpeed's communication backend JIT-compiles that C++ op when it starts (g++ and ninja: ~18 s
    alone, ~26 s beside a second starting trial, in every new environment and on every node, the
    other workers waiting on its build lock) and loads it into every worker. It serves only
    deepspeed.comm.inference_all_reduce (tensor-parallel inference), which training never calls: the
    gradient all-reduce and the embedding gathers go through torch.distributed's gloo. DeepSpeed
    skips an op that its probe table deepspeed.ops.__compatible_ops__ marks incompatible; the table
    is built once per process and keeps this edit. Call before deepspeed.initialize."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and table is not None:
        table[builder.NAME] = False


def format_duration(seconds: float) -> str:
    """1m05s, 2h01m: the time-left notes of the progress lines."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker): ``loop_cfg = {"args": WorkerArgs}``."""
    recipe = TrainRecipe(loop_cfg["args"])
    recipe.resume()
    recipe.train()


class TrainRecipe:
    """One worker's share of a training run."""

    def __init__(self, args: WorkerArgs):
        for k, v in args.env.items():
            os.environ.setdefault(k, v)
        if not args.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import ray.train
        import ray.train.torch

        from imram_dist.config import from_dict
        from imram_dist.model import IMRAM
        from imram_dist.train.dist import PairLoss
        from imram_dist.train.plan import deepspeed_config

        _quiet_ray_train_reports()
        self.args = args
        self.cfg = cfg = from_dict(args.config)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if args.threads:
            torch.set_num_threads(int(args.threads))

        torch.manual_seed(cfg.train.seed)
        self.model = IMRAM(cfg.model)
        net = PairLoss(self.model, cfg.model.margin, cfg.model.max_violation, grad_scale=float(self.world))
        self.optimizer = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
        ds_config = deepspeed_config(cfg, self.world, args.use_gpu)
        if not args.use_gpu:
            skip_shm_comm_op()
        with _prints_discarded():  # DeepSpeed prints "... built successfully" once per rank and op
            self.engine, _, _, _ = deepspeed.initialize(model=net, optimizer=self.optimizer, config=ds_config)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        self.gas = cfg.train.grad_accum
        self.state = TrainState()

    # -- resume -------------------------------------------------------------------------------
    def resume(self) -> None:
        """Model, optimizer, epoch, step and history from the newest complete checkpoint (if any)."""
        cfg, world = self.cfg, self.world
        resumed = pick_resume_checkpoint(self.args.storage, cfg.run.name, self.rank, world)
        if resumed is None:
            return
        with resumed.as_directory() as d:
            with open(os.path.join(d, STATE_FILE)) as f:
                saved = json.load(f)
            saved_stage = saved.get("zero_stage", cfg.train.zero_stage)
            if saved.get("world_size", world) != world and saved_stage > 0:
                raise RuntimeError(
                    f"checkpoint {resumed.path} holds ZeRO-{saved_stage} optimizer partitions of "
                    f"{saved['world_size']} workers; resume it with cluster.num_workers={saved['world_size']}")
            self.engine.load_checkpoint(d, tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        known = set(TrainState.__dataclass_fields__)
        self.state = TrainState(**{k: v for k, v in saved.items() if k in known})
        self.state.resumed_at.append(self.state.epochs_done)
        say(self.rank, f"[train] resumed from {resumed.path}: {self.state.epochs_done} epochs done, "
                       f"global step {self.state.global_step}")

    # -- the run ------------------------------------------------------------------------------
    def train(self) -> None:
        import ray.train

        from imram_dist.data import TrainPairs, load_eval_split
        from imram_dist.train.plan import micro_batch, precision_warnings

        cfg, st = self.cfg, self.state
        mb = micro_batch(cfg, self.world)
        pairs = TrainPairs(self.args.root, cfg.data.train_split, batch_size=mb, rank=self.rank,
                           world_size=self.world, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                           loader_workers=cfg.data.loader_workers, skip_bad=cfg.data.skip_bad_samples)
        dev = load_eval_split(self.args.root, cfg.data.dev_split)
        self.nodes = self._worker_nodes()
        say(self.rank, f"[train] {self.world} worker(s) on {len(set(self.nodes))} node(s), device "
                       f"{self.device.type}, ZeRO {cfg.train.zero_stage}, {cfg.train.precision}, micro batch "
                       f"{mb} x {self.world} workers x {self.gas} accumulation = global batch {cfg.data.batch_size}")
        for warning in precision_warnings(cfg, self.device):
            say(self.rank, f"[train] warning: {warning}")
        if st.epochs_done >= cfg.train.epochs and st.history:
            # Nothing left to train (a rerun of a finished run, or a search trial resumed after its
            # last checkpoint): report the last epoch again, without a checkpoint, so whoever watches
            # the reports (a Tune search) sees how the run ended.
            ray.train.report(dict(st.history[-1]))
        for epoch in range(st.epochs_done, cfg.train.epochs):
            stats = self.train_epoch(pairs, epoch)
            dev_metrics, eval_seconds = self.evaluate(dev)
            self.save_and_report(epoch, stats, dev_metrics, eval_seconds)

    def _worker_nodes(self) -> list[str]:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        if self.world == 1:
            return [node_id]
        import torch.distributed as dist

        nodes: list[Any] = [None] * self.world
        dist.all_gather_object(nodes, node_id)
        return nodes

    def train_epoch(self, pairs: Any, epoch: int) -> dict[str, float]:
        """One pass over this rank's share of the training pairs; every rank takes the same number
        of steps. Returns the epoch's global loss, lr, pairs/s and seconds."""
        from imram_dist.train.dist import all_reduce_min, all_reduce_sum
        from imram_dist.train.plan import lr_at_epoch

        cfg, st, device, engine, gas, world = self.cfg, self.state, self.device, self.engine, self.gas, self.world
        lr = lr_at_epoch(cfg.train, epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
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
            regions = batch.regions.to(device, self.dtype, non_blocking=True)
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
                    f"{i // gas + 1} (global step {st.global_step + 1}): stopping this run; its last "
                    f"checkpoint (if any) holds the weights from before; lower train.lr or check the data")
            engine.step()
            loss_epoch += local
            loss_win += local
            pairs_epoch += regions.shape[0]
            pairs_win += regions.shape[0]
            if (i + 1) % gas:
                continue
            st.global_step += 1
            step_in_epoch = (i + 1) // gas
            maybe_inject_fault(cfg, self.args.storage, st.global_step, self.rank)
            if cfg.train.log_every > 0 and step_in_epoch % cfg.train.log_every == 0 and step_in_epoch < steps:
                tot_loss = all_reduce_sum(loss_win, device) / (cfg.train.log_every * gas)
                tot_pairs = all_reduce_sum(pairs_win, device)
                now = time.perf_counter()
                left = (now - t_epoch) / step_in_epoch * (steps - step_in_epoch)
                say(self.rank, f"[train] epoch {epoch + 1}/{cfg.train.epochs} step {step_in_epoch}/{steps} "
                               f"loss {tot_loss:.4f} lr {lr:.2e} pairs/s {tot_pairs / (now - t_win):.1f} "
                               f"(epoch ends in {format_duration(left)})")
                t_win, loss_win, pairs_win = time.perf_counter(), 0.0, 0
        it.close()  # a rank may stop before its pass ends: release DataLoader workers and prefetch now
        train_seconds = time.perf_counter() - t_epoch
        return {"loss": all_reduce_sum(loss_epoch, device) / max(n_micro, 1), "lr": lr,
                "pairs_per_s": all_reduce_sum(pairs_epoch, device) / max(train_seconds, 1e-9),
                "train_seconds": train_seconds}

    def evaluate(self, dev: Any) -> tuple[dict[str, float], float]:
        """Dev R@K, scored by all workers together; returns (metrics, seconds)."""
        from imram_dist.evaluate import distributed_evaluate

        t0 = time.perf_counter()
        result = distributed_evaluate(self.model, dev, protocol="auto", cfg=self.cfg.eval)
        return {k: float(v) for k, v in result.metrics.items()}, time.perf_counter() - t0

    def save_and_report(self, epoch: int, stats: dict[str, float], dev: dict[str, float], eval_seconds: float) -> None:
        """Record the epoch, print it, save a checkpoint (DeepSpeed's state, the consolidated fp32
        weights, the train state with every rank's file sizes) and report it to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        cfg, st, rank, world = self.cfg, self.state, self.rank, self.world
        st.epochs_done = epoch + 1
        if dev["rsum"] > st.best_rsum:
            st.best_rsum, st.best_epoch = dev["rsum"], epoch + 1
        metrics = {**dev, "epoch": epoch + 1, "global_step": st.global_step, **stats,
                   "eval_seconds": eval_seconds, "world_size": world, "worker_nodes": ",".join(self.nodes)}
        st.history.append(dict(metrics))
        epochs_left = cfg.train.epochs - epoch - 1
        time_left = (f"; about {format_duration(epochs_left * (stats['train_seconds'] + eval_seconds))} left"
                     if epochs_left else "")
        say(rank, f"[train] epoch {epoch + 1}/{cfg.train.epochs} done: loss {stats['loss']:.4f} lr {stats['lr']:.2e} "
                  f"pairs/s {stats['pairs_per_s']:.1f} | dev i2t R@1/5/10 {dev['i2t_r1']:.1f}/"
                  f"{dev['i2t_r5']:.1f}/{dev['i2t_r10']:.1f} t2i R@1/5/10 {dev['t2i_r1']:.1f}/"
                  f"{dev['t2i_r5']:.1f}/{dev['t2i_r10']:.1f} rsum {dev['rsum']:.1f} "
                  f"(best {st.best_rsum:.1f} @ epoch {st.best_epoch}) "
                  f"[train {stats['train_seconds']:.1f}s, eval {eval_seconds:.1f}s{time_left}]")

        tmp = tempfile.mkdtemp(prefix=f"imram_ckpt_r{rank}_")
        try:
            self.engine.save_checkpoint(tmp, tag=CKPT_TAG)  # training state goes to STATE_FILE below
            weights = consolidated_fp32_state_dict(self.model, self.engine.optimizer)  # collective: every rank
            st.world_size, st.zero_stage = world, cfg.train.zero_stage
            if rank == 0:
                torch.save(weights, os.path.join(tmp, WEIGHTS_FILE))
            # Every rank's file sizes go into the state, so a scan can tell a whole checkpoint
            # from one whose upload a dying rank cut short (names alone would pass).
            st.files = checkpoint_file_sizes(tmp, world)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(dataclasses.asdict(st), f, indent=1)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
