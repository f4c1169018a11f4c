"""Training throughput: Ray Train + DeepSpeed workers vs a plain single-process PyTorch loop.

Same model (configs/default.yaml unless --config/overrides), same batches (read once from
the training split and held in memory, so the data loader is not measured), same optimiser
(Adam, clip 2.0), 1 torch thread per process. Reports per-step time, pairs/s per worker and
peak RSS for: plain loop (global batch), Ray+DeepSpeed 1 worker (global batch), Ray+DeepSpeed
2 workers (global batch split over ranks, with the cross-rank gather for global negatives).
Overhead = (1-worker Ray+DS step time - plain step time) / plain step time.

    python benchmarks/bench_train.py [--config PRESET] [--steps N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def load_batches(cfg, root, n, batch_size, rank=0, world=1):
    from imram_dist.data import TrainPairs

    tp = TrainPairs(root, cfg.data.train_split, batch_size, rank=rank, world_size=world, seed=0,
                    shuffle_buffer=cfg.data.shuffle_buffer)
    out = []
    epoch = 0
    while len(out) < n:
        tp.set_epoch(epoch)
        for b in tp:
            out.append((b.regions, b.tokens, b.lengths))
            if len(out) == n:
                break
        epoch += 1
    return out


def plain_loop(cfg_dict, root, warmup, steps):
    import torch

    from imram_dist.config import from_dict
    from imram_dist.model import IMRAM, hinge_loss

    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict)
    batches = load_batches(cfg, root, warmup + steps, cfg.data.batch_size)
    torch.manual_seed(0)
    model = IMRAM(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    times = []
    for i, (r, t, lengths) in enumerate(batches):
        t0 = time.perf_counter()
        loss = hinge_loss(model(r, t, lengths), cfg.model.margin, cfg.model.max_violation)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": sum(times) / len(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ds_loop(c):
    import deepspeed
    import ray.train
    import torch

    from imram_dist.config import from_dict
    from imram_dist.model import IMRAM
    from imram_dist.train.dist import PairLoss
    from imram_dist.train.plan import deepspeed_config, micro_batch
    from imram_dist.train.recipe import skip_shm_comm_op

    torch.set_num_threads(1)
    cfg = from_dict(c["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batches = load_batches(cfg, c["root"], c["warmup"] + c["steps"], micro_batch(cfg, world), rank, world)
    torch.manual_seed(0)
    model = IMRAM(cfg.model)
    net = PairLoss(model, cfg.model.margin, cfg.model.max_violation, grad_scale=float(world))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    skip_shm_comm_op()  # as the training workers do
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=deepspeed_config(cfg, world, False))
    times = []
    for i, (r, t, lengths) in enumerate(batches):
        t0 = time.perf_counter()
        loss = engine(r, t, lengths)
        engine.backward(loss)
        engine.step()
        if i >= c["warmup"]:
            times.append(time.perf_counter() - t0)
    res = {"rank": rank, "step_s": sum(times) / len(times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import tempfile

    import torch.distributed as dist

    allres = [None] * world
    dist.all_gather_object(allres, res)
    # Train V2 keeps Result.metrics only when reported with a checkpoint.
    with tempfile.TemporaryDirectory() as d:
        ray.train.report({"ranks": json.dumps(allres)}, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_ray(cfg, root, workers, warmup, steps):
    import ray.train
    from ray.train.torch import TorchTrainer

    from imram_dist.config import to_dict

    cfg.cluster.num_workers = workers
    tr = TorchTrainer(ds_loop, train_loop_config={"cfg": to_dict(cfg), "root": root, "warmup": warmup, "steps": steps},
                      scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                      run_config=ray.train.RunConfig(name=f"bench-{workers}-{time.time_ns()}",
                                                     storage_path="/tmp/imram_bench_runs"))
    return tr.fit()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the numbers here")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    from imram_dist.config import load_config, to_dict
    from imram_dist.data import read_manifest, resolve_root

    cfg = load_config(a.config, a.overrides)
    root = resolve_root(cfg.data)
    cfg.model.vocab_size = cfg.model.vocab_size or len(read_manifest(root).load_vocab())
    B = cfg.data.batch_size
    out = {"config": a.config, "overrides": a.overrides, "global_batch": B, "steps": a.steps,
           "model": {k: getattr(cfg.model, k) for k in ("image_dim", "embed_size", "word_dim", "steps", "mode")}}

    import ray

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    # The plain loop runs as a 1-CPU Ray task so that it gets the same process setup
    # (environment, niceness) as the Train workers; it runs before and after them, and the
    # mean is used, to even out drift from other load on the machine.
    plain_task = ray.remote(num_cpus=1)(plain_loop)
    load = [os.getloadavg()[0]]
    plains = [ray.get(plain_task.remote(to_dict(cfg), root, a.warmup, a.steps))]
    for w in (1, 2):
        res = run_ray(cfg, root, w, a.warmup, a.steps)
        ranks = json.loads(res.metrics["ranks"])
        step = max(r["step_s"] for r in ranks)
        out[f"ray_ds_{w}"] = {"step_s": step, "pairs_per_s_per_worker": B / w / step,
                              "pairs_per_s_total": B / step,
                              "peak_rss_mb_per_worker": max(r["peak_rss_mb"] for r in ranks), "ranks": ranks}
        load.append(os.getloadavg()[0])
    plains.append(ray.get(plain_task.remote(to_dict(cfg), root, a.warmup, a.steps)))
    load.append(os.getloadavg()[0])
    ray.shutdown()
    plain = {"step_s": sum(p["step_s"] for p in plains) / len(plains),
             "peak_rss_mb": max(p["peak_rss_mb"] for p in plains), "runs_step_s": [p["step_s"] for p in plains]}
    out["plain"] = {**plain, "pairs_per_s": B / plain["step_s"]}
    out["load_avg_1min"] = load
    out["overhead_1_worker_pct"] = 100 * (out["ray_ds_1"]["step_s"] - plain["step_s"]) / plain["step_s"]
    out["speedup_2_workers"] = plain["step_s"] / out["ray_ds_2"]["step_s"]
    print(f"model {out['model']}, global batch {B}, {a.steps} timed steps, 1 torch thread per process")
    print(f"{'setup':<26}{'step ms':>10}{'pairs/s/worker':>16}{'pairs/s total':>15}{'peak RSS MB':>13}")
    print(f"{'plain PyTorch, 1 proc':<26}{1e3 * plain['step_s']:>10.1f}{B / plain['step_s']:>16.1f}"
          f"{B / plain['step_s']:>15.1f}{plain['peak_rss_mb']:>13.0f}")
    for w in (1, 2):
        r = out[f"ray_ds_{w}"]
        print(f"{f'Ray+DeepSpeed, {w} worker(s)':<26}{1e3 * r['step_s']:>10.1f}{r['pairs_per_s_per_worker']:>16.1f}"
              f"{r['pairs_per_s_total']:>15.1f}{r['peak_rss_mb_per_worker']:>13.0f}")
    print(f"Ray+DeepSpeed overhead (1 worker vs plain, same batch): {out['overhead_1_worker_pct']:+.1f}% of step time")
    print(f"2 workers vs plain: {out['speedup_2_workers']:.2f}x faster per global step")
    print(f"plain runs (before/after) {[round(1e3 * x, 1) for x in plain['runs_step_s']]} ms; "
          f"1-min load average during the run {[round(x, 1) for x in load]} on {os.cpu_count()} CPUs")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
