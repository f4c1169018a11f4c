"""Does the synthetic corpus reward fine-grained matching? Train a pooled model (mean-pool
regions and words into one vector each, cosine) and IMRAM (region-word attention,
imram_dist.model.IMRAM) briefly with the same budget and print R@1 side by side, plus how
often each tells a test caption's image from its attribute-swapped twin.

    python benchmarks/bench_synth_pooling.py [--epochs 4] [--embed 128] [--cache-dir DIR]

Plain PyTorch, one process. Same encoders (Linear on regions, Embedding + bi-GRU on words),
same optimiser (Adam), learning rate, batches, epochs and hinge loss for both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# imram_dist before torch: importing it turns on torch's huge pages (see imram_dist/__init__.py)
import imram_dist  # noqa: E402, F401, I001
import torch  # noqa: E402

from imram_dist.config import ModelConfig, SynthConfig  # noqa: E402
from imram_dist.data import TrainPairs, ensure_synthetic, load_eval_split, read_manifest  # noqa: E402
from imram_dist.model import IMRAM, ImageEncoder, TextEncoder, hinge_loss  # noqa: E402


class Pooled(torch.nn.Module):
    """Mean-pool each side into one vector; score = cosine."""

    def __init__(self, image_dim, vocab_size, word_dim, d):
        super().__init__()
        self.img_enc = ImageEncoder(image_dim, d)
        self.txt_enc = TextEncoder(vocab_size, word_dim, d)

    def embed(self, regions, tokens, lengths):
        im = self.img_enc(regions).mean(1)
        w = self.txt_enc(tokens, lengths)  # padded words are zeros
        tx = w.sum(1) / lengths.unsqueeze(1).to(w.dtype)
        return torch.nn.functional.normalize(im, dim=-1), torch.nn.functional.normalize(tx, dim=-1)

    def forward(self, regions, tokens, lengths):
        im, tx = self.embed(regions, tokens, lengths)
        return im @ tx.t()


@torch.no_grad()
def evaluate(model, ev, block=200):
    model.eval()
    N, M = ev.num_images, ev.num_captions
    scores = torch.empty(N, M)
    regions = ev.regions.float()
    for j in range(0, M, block):
        t, ln = ev.tokens[j:j + block], ev.lengths[j:j + block]
        t = t[:, : int(ln.max())]
        scores[:, j:j + block] = model(regions, t, ln)
    c2i = ev.caption_to_image
    # t2i: rank of the caption's image; i2t: best rank among the image's captions
    t2i_r1 = (scores.argmax(0) == c2i).float().mean().item() * 100
    best = scores.argmax(1)
    i2t_r1 = (c2i[best] == torch.arange(N)).float().mean().item() * 100
    # twins: caption scored higher with its own image than with its attribute-swapped twin
    key_index = {k: i for i, k in enumerate(ev.keys)}
    twin_of = ev.twin_of
    wins, total = 0, 0
    for j in range(M):
        i = int(c2i[j])
        t = twin_of.get(ev.keys[i])
        if t is not None:
            total += 1
            wins += bool(scores[i, j] > scores[key_index[t], j])
    model.train()
    return i2t_r1, t2i_r1, 100.0 * wins / max(1, total)


def train(name, model, root, args, ev):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = TrainPairs(root, "train", batch_size=args.batch, seed=args.seed, shuffle_buffer=2000)
    t0 = time.time()
    steps = 0
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        for b in data:
            scores = model(b.regions, b.tokens[:, : int(b.lengths.max())], b.lengths)
            # warm-up: all violations in epoch 0, hardest negative afterwards (VSE++ practice)
            loss = hinge_loss(scores, 0.2, max_violation=epoch > 0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            steps += 1
        r = evaluate(model, ev)
        print(f"  {name:8s} epoch {epoch}: loss {loss.item():7.3f}  i2t R@1 {r[0]:5.1f}  t2i R@1 {r[1]:5.1f}  "
              f"twin {r[2]:5.1f}%  ({time.time() - t0:.0f}s)", flush=True)
    return r, steps, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--embed", type=int, default=96)
    ap.add_argument("--word-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps-k", type=int, default=2, help="IMRAM matching steps K")
    ap.add_argument("--mode", default="full", choices=["full", "text", "image"], help="IMRAM mode")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: oversubscribed OpenMP threads were ~50x slower on a busy 2-core box)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/imram_dist"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    synth = SynthConfig()  # the built-in corpus as configured by default
    root = ensure_synthetic(args.cache_dir, synth)
    m = read_manifest(root)
    vocab_size = len(m.load_vocab())
    ev = load_eval_split(root, "test")
    from imram_dist.data import iter_shard

    ev.twin_of = {s.key: s.meta["twin"] for sh in m.splits["test"].shards
                  for s in iter_shard(m.shard_url(sh), with_regions=False) if s.meta and "twin" in s.meta}
    print(f"synthetic corpus {root}: R={m.regions} D={m.feature_dim}, vocab {vocab_size}, "
          f"train {m.splits['train'].images} images, test {ev.num_images} images / {ev.num_captions} captions, "
          f"{len(ev.twin_of)} test images with a twin")
    results = {}
    for name in ("pooled", "imram"):
        torch.manual_seed(args.seed)
        if name == "pooled":
            model = Pooled(m.feature_dim, vocab_size, args.word_dim, args.embed)
        else:
            model = IMRAM(ModelConfig(image_dim=m.feature_dim, embed_size=args.embed, word_dim=args.word_dim,
                                      vocab_size=vocab_size, steps=args.steps_k, lambda_softmax=9.0,
                                      mode=args.mode))
        results[name] = train(name, model, root, args, ev)
    print(f"\nsame budget: {args.epochs} epochs x {results['pooled'][1] // args.epochs} steps of {args.batch} pairs, "
          f"Adam lr {args.lr}, d={args.embed}; IMRAM {args.mode} K={args.steps_k}")
    print(f"{'model':10s} {'i2t R@1':>8s} {'t2i R@1':>8s} {'twin acc':>9s} {'train s':>8s}")
    for name, (r, _steps, secs) in results.items():
        print(f"{name:10s} {r[0]:8.1f} {r[1]:8.1f} {r[2]:8.1f}% {secs:8.0f}")


if __name__ == "__main__":
    main()
