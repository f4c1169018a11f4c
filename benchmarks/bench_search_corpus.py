"""Is the search preset's corpus (configs/search.yaml) a good target for a hyper-parameter search?

Trains single-process trials the way a Ray Train worker does (imram_dist/train/worker.py: IMRAM,
Adam, lr0 x 0.1^(epoch // lr_update), global grad-norm clip, VSE++ hinge loss on the batch,
TrainPairs data order from train.seed, dev rsum after every epoch via distributed_evaluate), on
1 torch thread (a trial's 1 CPU), and prints in one run:

- K: dev rsum for model.steps = 1, 2, 3 at the same epochs (does iterative matching pay?),
- seeds: one config under 3 train.seed values (same data): the seed-to-seed spread,
- configs: a handful of configs from the tuning space (margin, K, lr, lr_update, lambda, mode,
  max_violation): the spread a search can exploit, best vs median vs 3 x seed spread,
- per-trial seconds (train + dev eval, all epochs) and the CPU model.

    python benchmarks/bench_search_corpus.py [--config search] [--studies k,seeds,configs]
        [--seeds 0,1,2] [key=value ...]

Overrides (key=value) apply to every trial, e.g. train.epochs=2 data.synth.binding=joint.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from imram_dist.config import load_config  # noqa: E402
from imram_dist.data import TrainPairs, load_eval_split, read_manifest, resolve_root  # noqa: E402
from imram_dist.evaluate import distributed_evaluate  # noqa: E402
from imram_dist.model import IMRAM, hinge_loss  # noqa: E402
from imram_dist.train.plan import lr_at_epoch  # noqa: E402

# A handful of points from the lead's space (tune/default.yaml: margin 0.05-0.5, K 1-3,
# lr loguniform 3e-4..1e-2, lr_update, lambda 4-20, mode, max_violation), spread over it.
CONFIGS: list[dict[str, object]] = [
    {},  # the preset itself
    {"model.steps": 1},
    {"model.mode": "text"},
    {"model.mode": "image"},
    {"train.lr": 3e-4},
    {"train.lr": 1e-2},
    {"model.margin": 0.05, "model.lambda_softmax": 4.0},
    {"model.margin": 0.5, "model.lambda_softmax": 20.0},
    {"model.max_violation": False},
    {"model.mode": "text", "model.steps": 3, "train.lr": 5e-3, "model.margin": 0.2},
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def as_overrides(over: dict[str, object]) -> list[str]:
    """key=value strings, parsed by the config like command-line overrides."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items()]


def run_trial(preset: str, base: list[str], overrides: dict[str, object], label: str) -> dict[str, object]:
    """One trial as a 1-worker Ray Train trial would run it, minus Ray and DeepSpeed."""
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
    history = []
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
        res = distributed_evaluate(model, dev, protocol="auto", cfg=cfg.eval)
        t2 = time.perf_counter()
        t_train += t1 - t0
        t_eval += t2 - t1
        history.append(float(res.metrics["rsum"]))
        print(f"  [{label}] epoch {epoch + 1}/{cfg.train.epochs}: loss {loss_sum / max(pairs.num_batches, 1):.3f} "
              f"dev rsum {res.metrics['rsum']:.1f} (i2t R@1 {res.metrics['i2t_r1']:.1f}, "
              f"t2i R@1 {res.metrics['t2i_r1']:.1f}) [train {t1 - t0:.1f}s eval {t2 - t1:.1f}s, cpu {time.process_time() - cpu0:.1f}s]", flush=True)
    return {"label": label, "history": history, "final": history[-1], "best": max(history),
            "cpu_s": time.process_time() - cpu0,
            "train_s": t_train, "eval_s": t_eval, "steps": pairs.num_batches, "dev": (dev.num_images, dev.num_captions)}


def describe(over: dict[str, object]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in over.items()) or "preset"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="search", help="preset or YAML file (default: search)")
    ap.add_argument("--studies", default="k,seeds,configs", help="comma list of: k, seeds, configs")
    ap.add_argument("--seeds", default="0,1,2", help="train.seed values for the seed study")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trial has 1 CPU)")
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
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"1-min load average at start {os.getloadavg()[0]:.2f}")
    print(f"corpus {root} (ready in {gen_s:.1f}s): binding={cfg.data.synth.binding} noise={cfg.data.synth.noise} "
          f"train {m.splits['train'].images} images, dev {m.splits['dev'].images}; model d={cfg.model.embed_size} "
          f"K={cfg.model.steps} mode={cfg.model.mode}; {cfg.train.epochs} epochs, batch {cfg.data.batch_size}")
    results: dict[str, list[dict[str, object]]] = {}
    trial_s: list[float] = []

    def trial(over: dict[str, object], label: str) -> dict[str, object]:
        r = run_trial(args.config, base, over, label)
        trial_s.append(float(r["train_s"]) + float(r["eval_s"]))
        return r

    if "k" in studies:
        results["k"] = [trial({"model.steps": k}, f"K={k}") for k in (1, 2, 3)]
    if "seeds" in studies:
        results["seeds"] = [trial({"train.seed": int(s)}, f"seed={s}") for s in args.seeds.split(",")]
    if "configs" in studies:
        results["configs"] = [trial(c, describe(c)) for c in CONFIGS]

    print(f"\n=== summary (dev rsum of 600; final epoch / best epoch; per-epoch history) ===")
    for name, rows in results.items():
        print(f"-- {name}")
        for r in rows:
            hist = " ".join(f"{h:.1f}" for h in r["history"])
            print(f"  {r['label']:45s} final {r['final']:6.1f}  best {r['best']:6.1f}  [{hist}]  "
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
        print(f"per-trial seconds (train + dev eval, all epochs, 1 thread): mean {statistics.mean(trial_s):.1f}, "
              f"min {min(trial_s):.1f}, max {max(trial_s):.1f}; 1-min load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
