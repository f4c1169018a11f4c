"""Is the search preset's corpus (configs/search.yaml) a good target for a hyper-parameter search?

Trains single-process trials the way a Ray Train worker does (imram_dist/train/worker.py: IMRAM,
Adam, lr0 x 0.1^(epoch // lr_update), global grad-norm clip, VSE++ hinge loss on the batch,
TrainPairs data order from train.seed, dev rsum after every epoch via distributed_evaluate), on
1 torch thread (a trial's 1 CPU), and prints in one run:

- K: dev rsum for model.steps = 1, 2, 3 at the same epochs (does iterative matching pay?),
- seeds: one config under 3 train.seed values (same data): the seed-to-seed spread,
- configs: a handful of configs from the tuning space (margin, K, lr, lr_update, lambda, mode,
  max_violation): the spread a search can exploit, best vs median vs 3 x seed spread,
- twin: % of dev captions of twinned images scored higher with their own image than with its
  attribute-swapped twin (50% = chance; only the object-attribute binding tells them apart),
- per-trial seconds (train + dev eval, all epochs) and the CPU model.

    python benchmarks/bench_search_corpus.py [--config search] [--studies k,seeds,configs]
        [--seeds 0,1,2] [key=value ...]

Overrides (key=value) apply to every trial, e.g. train.epochs=2 data.synth.binding=joint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# imram_dist before torch: importing it turns on torch's huge pages (see imram_dist/__init__.py)
import imram_dist  # noqa: E402, F401, I001
import torch  # noqa: E402

from imram_dist.config import load_config  # noqa: E402
from imram_dist.data import TrainPairs, iter_shard, load_eval_split, read_manifest, resolve_root  # noqa: E402
from imram_dist.evaluate import distributed_evaluate  # noqa: E402
from imram_dist.machine import describe_cpu  # noqa: E402
from imram_dist.model import IMRAM, hinge_loss  # noqa: E402
from imram_dist.train.plan import lr_at_epoch  # noqa: E402

# A handful of points from the lead's space (tune/default.yaml: margin 0.05-0.5, K 1-3,
# lr loguniform 3e-4..1e-2, lr_update, lambda 4-20, mode, max_violation), spread over it.
# The K study's K=1 and K=2 and the preset itself (seed 0 of the seed study) count as configs too.
CONFIGS: list[dict[str, object]] = [
    {"model.mode": "text"},
    {"model.mode": "image"},
    {"train.lr": 1e-3},
    {"train.lr": 1e-2},
    {"model.margin": 0.05, "model.lambda_softmax": 4.0},
    {"model.margin": 0.5, "model.lambda_softmax": 20.0},
    {"model.max_violation": False},
    {"train.lr_update": 1},
]


def twin_rows(root: str, split: str, keys: list[str]) -> list[int]:
    """Row of each image's attribute-swapped twin in the split (-1: none), from the samples' meta."""
    m = read_manifest(root)
    twin = {s.key: s.meta["twin"] for sh in m.splits[split].shards
            for s in iter_shard(m.shard_url(sh), with_regions=False) if s.meta and "twin" in s.meta}
    row = {k: i for i, k in enumerate(keys)}
    return [row.get(twin.get(k, ""), -1) for k in keys]


def twin_accuracy(sims, caption_to_image, twins: list[int]) -> float:
    """% of captions of twinned images that score higher with their own image than with its twin
    (chance 50%): what only the binding tells apart."""
    img = caption_to_image.numpy()
    tw = np.asarray(twins)[img]
    has = tw >= 0
    cols = np.nonzero(has)[0]
    own = np.asarray(sims)[img[cols], cols]
    other = np.asarray(sims)[tw[cols], cols]
    return 100.0 * float(np.mean(own > other)) if cols.size else float("nan")


def as_overrides(over: dict[str, object]) -> list[str]:
    """key=value strings, parsed by the config like command-line overrides."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items()]


def run_trial(preset: str, base: list[str], overrides: dict[str, object], label: str,
              threads: int = 1) -> dict[str, object]:
    """One trial as a 1-worker Ray Train trial would run it, minus Ray and DeepSpeed."""
    torch.set_num_threads(threads)
    cfg = load_config(preset, base + as_overrides(overrides))
    root = resolve_root(cfg.data)
    m = read_manifest(root)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = len(m.load_vocab())
    torch.manual_seed(cfg.train.seed)
    model = IMRAM(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    pairs = TrainPairs(root, cfg.data.train_split, batch_size=cfg.data.batch_size, seed=cfg.train.seed,
                       shuffle_buffer=cfg.data.shuffle_buffer)
    dev = load_eval_split(root, cfg.data.dev_split)
    twins = twin_rows(root, cfg.data.dev_split, dev.keys)
    history, twin_hist = [], []
    t_train = t_eval = 0.0
    cpu0 = time.process_time()
    for epoch in range(cfg.train.epochs):
        lr = lr_at_epoch(cfg.train, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        pairs.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        it = iter(pairs)
        loss_sum = 0.0
        for _ in range(pairs.num_batches):
            b = next(it)
            img = model.encode_images(b.regions)
            cap = model.encode_captions(b.tokens, b.lengths)
            scores = model.similarity(img, cap, b.lengths).float()
            loss = hinge_loss(scores, cfg.model.margin, cfg.model.max_violation)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            loss_sum += float(loss.detach())
        it.close()
        t1 = time.perf_counter()
        res = distributed_evaluate(model, dev, protocol="auto", cfg=cfg.eval, keep_sims=True)
        t2 = time.perf_counter()
        twin_hist.append(twin_accuracy(res.sims, dev.caption_to_image, twins))
        t_train += t1 - t0
        t_eval += t2 - t1
        history.append(float(res.metrics["rsum"]))
        print(f"  [{label}] epoch {epoch + 1}/{cfg.train.epochs}: loss {loss_sum / max(pairs.num_batches, 1):.3f} "
              f"dev rsum {res.metrics['rsum']:.1f} (i2t R@1 {res.metrics['i2t_r1']:.1f}, "
              f"t2i R@1 {res.metrics['t2i_r1']:.1f}, twin {twin_hist[-1]:.1f}%) "
              f"[train {t1 - t0:.1f}s eval {t2 - t1:.1f}s, cpu {time.process_time() - cpu0:.1f}s]", flush=True)
    return {"label": label, "history": history, "final": history[-1], "best": max(history),
            "cpu_s": time.process_time() - cpu0, "twin": twin_hist[-1],
            "train_s": t_train, "eval_s": t_eval, "steps": pairs.num_batches, "dev": (dev.num_images, dev.num_captions)}


def describe(over: dict[str, object]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in over.items()) or "preset"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="search", help="preset or YAML file (default: search)")
    ap.add_argument("--studies", default="k,seeds,configs", help="comma list of: k, seeds, configs")
    ap.add_argument("--seeds", default="0,1,2", help="train.seed values for the seed study")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trial has 1 CPU)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="trials run at once, each in its own process (a search runs 2 at once)")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every trial")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = list(args.overrides)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    cfg = load_config(args.config, base)
    t0 = time.perf_counter()
    root = resolve_root(cfg.data)
    gen_s = time.perf_counter() - t0
    m = read_manifest(root)
    print(f"CPU: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"1-min load average at start {os.getloadavg()[0]:.2f}")
    print(f"corpus {root} (ready in {gen_s:.1f}s): binding={cfg.data.synth.binding} noise={cfg.data.synth.noise} "
          f"train {m.splits['train'].images} images, dev {m.splits['dev'].images}; model d={cfg.model.embed_size} "
          f"K={cfg.model.steps} mode={cfg.model.mode}; {cfg.train.epochs} epochs, batch {cfg.data.batch_size}")
    seeds = [int(s) for s in args.seeds.split(",")]
    planned: list[tuple[str, dict[str, object], str]] = []  # (study, overrides, label)
    if "seeds" in studies or "k" in studies:  # seed 0 is also the preset's K and config point
        planned += [("seeds", {"train.seed": s}, f"preset seed={s}") for s in (seeds if "seeds" in studies else seeds[:1])]
    if "k" in studies:
        planned += [("k", {"model.steps": k}, f"K={k}") for k in (1, 2, 3) if k != cfg.model.steps]
    if "configs" in studies:
        planned += [("configs", c, describe(c)) for c in CONFIGS]
    if args.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(run_trial, args.config, base, o, label, args.threads) for _, o, label in planned]
            done = [f.result() for f in futs]
    else:
        done = [run_trial(args.config, base, o, label, args.threads) for _, o, label in planned]
    trial_s = [float(r["train_s"]) + float(r["eval_s"]) for r in done]
    cpu_s = [float(r["cpu_s"]) for r in done]
    preset_row = done[0]
    results: dict[str, list[dict[str, object]]] = {}
    if "k" in studies:
        by_k = {cfg.model.steps: preset_row}
        by_k.update({o["model.steps"]: r for (st, o, _), r in zip(planned, done) if st == "k"})
        results["k"] = [by_k[k] for k in sorted(by_k)]
    if "seeds" in studies:
        results["seeds"] = [r for (st, _, _), r in zip(planned, done) if st == "seeds"]
    if "configs" in studies:
        results["configs"] = ([preset_row] + [r for (st, _, _), r in zip(planned, done) if st in ("k", "configs")])

    print("\n=== summary (dev rsum of 600; final epoch / best epoch; per-epoch history) ===")
    for name, rows in results.items():
        print(f"-- {name}")
        for r in rows:
            hist = " ".join(f"{h:.1f}" for h in r["history"])
            print(f"  {r['label']:45s} final {r['final']:6.1f}  best {r['best']:6.1f}  [{hist}]  twin {r['twin']:5.1f}%  "
                  f"train {r['train_s']:.1f}s eval {r['eval_s']:.1f}s cpu {r['cpu_s']:.1f}s")
    spread = None
    if "seeds" in results and len(results["seeds"]) > 1:
        finals = [float(r["best"]) for r in results["seeds"]]
        spread = max(finals) - min(finals)
        print(f"seed spread (best-epoch rsum, max - min over {len(finals)} seeds): {spread:.1f}; "
              f"std {statistics.stdev(finals):.1f}")
    if "configs" in results:
        bests = sorted(float(r["best"]) for r in results["configs"])
        med = statistics.median(bests)
        line = f"configs: best {bests[-1]:.1f}, median {med:.1f}, worst {bests[0]:.1f}; best - median {bests[-1] - med:.1f}"
        if spread is not None:
            line += f" vs 3 x seed spread {3 * spread:.1f}"
        print(line)
    if trial_s:
        print(f"per-trial wall seconds (train + dev eval, all epochs, {args.threads} thread(s), {args.jobs} at once): "
              f"mean {statistics.mean(trial_s):.1f}, min {min(trial_s):.1f}, max {max(trial_s):.1f}")
        print(f"per-trial CPU seconds (the trial process, start-up excluded): mean {statistics.mean(cpu_s):.1f}, "
              f"min {min(cpu_s):.1f}, max {max(cpu_s):.1f}; preset {float(preset_row['cpu_s']):.1f}; "
              f"1-min load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
