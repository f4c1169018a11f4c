"""A slow, literal IMRAM written straight from ../shared/IMRAM_SPEC.md: one pair at a time, Python
loops, no factorisation, no batching, no masks (padding is removed by slicing). Tests compare the
fast model against it. It reads parameters from an IMRAM module but shares no code with it.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.sqrt((x * x).sum(-1, keepdim=True)) + EPS)


def encode_image(model, regions: torch.Tensor) -> torch.Tensor:
    """[R, D] -> [R, d]."""
    fc = model.img_enc.fc_local
    return l2n(regions @ fc.weight.t() + fc.bias)


def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    H = h.shape[0]
    gi = w_ih @ x + b_ih
    gh = w_hh @ h + b_hh
    r = torch.sigmoid(gi[:H] + gh[:H])
    z = torch.sigmoid(gi[H:2 * H] + gh[H:2 * H])
    n = torch.tanh(gi[2 * H:] + r * gh[2 * H:])
    return (1 - z) * n + z * h


def encode_caption(model, tokens: list[int]) -> torch.Tensor:
    """One caption's real tokens -> [n_words, d]: embedding, bi-GRU by hand, (fwd+bwd)/2, L2."""
    rnn = model.txt_enc.rnn
    emb = model.txt_enc.embed.weight
    xs = [emb[t] for t in tokens]
    H = rnn.hidden_size
    fwd, h = [], emb.new_zeros(H)
    for x in xs:
        h = _gru_cell(x, h, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        fwd.append(h)
    bwd, h = [None] * len(xs), emb.new_zeros(H)
    for i in reversed(range(len(xs))):
        h = _gru_cell(xs[i], h, rnn.weight_ih_l0_reverse, rnn.weight_hh_l0_reverse,
                      rnn.bias_ih_l0_reverse, rnn.bias_hh_l0_reverse)
        bwd[i] = h
    return torch.stack([l2n((f + b) / 2) for f, b in zip(fwd, bwd)])


def attend(Q: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """Spec 'Cross attention': Q [Lq, d], C [Lc, d] -> attended [Lq, d]."""
    A = C @ Q.t()  # Lc x Lq
    A = torch.nn.functional.leaky_relu(A, 0.1)
    A = A / (torch.sqrt((A * A).sum(1, keepdim=True)) + EPS)  # over queries
    weights = torch.softmax(lam * A.t(), dim=1)  # Lq x Lc, over context
    return weights @ C


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine as the authors compute it: a.b / max(|a||b|, eps)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=EPS)


def mdu(x: torch.Tensor, c: torch.Tensor, gate: torch.nn.Linear, linear: torch.nn.Linear) -> torch.Tensor:
    xc = torch.cat([x, c], -1)
    g = torch.sigmoid(xc @ gate.weight.t() + gate.bias)
    o = torch.tanh(xc @ linear.weight.t() + linear.bias)
    return g * x + (1 - g) * o


def direction_score(query0, context, steps, lam, gate, linear, renorm):
    """sum_k F_k for one direction of one pair (cosines against the ORIGINAL query)."""
    x = query0
    total = 0.0
    for _ in range(steps):
        c = attend(x, context, lam)
        total = total + cos(query0, c).mean()
        x = mdu(x, c, gate, linear)  # (also after the last step, as the authors do; unused)
        if renorm:
            x = l2n(x)
    return total


def pair_score(model, img: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """img [R, d] encoded regions; words [n_words, d] encoded real words."""
    cfg = model.config
    s = 0.0
    if cfg.mode in ("full", "text"):
        s = s + direction_score(words, img, cfg.steps, cfg.lambda_softmax, model.gate_t2i,
                                model.linear_t2i, cfg.renorm_query)
    if cfg.mode in ("full", "image"):
        s = s + direction_score(img, words, cfg.steps, cfg.lambda_softmax, model.gate_i2t,
                                model.linear_i2t, cfg.renorm_query)
    return s


def similarity(model, image_emb: torch.Tensor, caption_emb: torch.Tensor, lengths) -> torch.Tensor:
    """[N, M] from encoded inputs, one pair at a time."""
    lengths = [int(x) for x in lengths]
    rows = []
    for i in range(image_emb.shape[0]):
        rows.append(torch.stack([torch.as_tensor(pair_score(model, image_emb[i], caption_emb[j, :lengths[j]]))
                                 for j in range(caption_emb.shape[0])]))
    return torch.stack(rows)


def forward(model, regions: torch.Tensor, tokens: torch.Tensor, lengths) -> torch.Tensor:
    """[N, M] from raw inputs: encoders by hand, then one pair at a time."""
    lengths = [int(x) for x in lengths]
    imgs = [encode_image(model, regions[i]) for i in range(regions.shape[0])]
    caps = [encode_caption(model, tokens[j, :lengths[j]].tolist()) for j in range(tokens.shape[0])]
    return torch.stack([torch.stack([torch.as_tensor(pair_score(model, im, cp)) for cp in caps]) for im in imgs])


def hinge_loss(scores: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """VSE++ loss, element by element."""
    B = scores.shape[0]
    total = scores.new_zeros(())
    for q in range(B):  # image queries: negatives in the row
        costs = [torch.clamp(margin + scores[q, j] - scores[q, q], min=0) for j in range(B) if j != q]
        total = total + (torch.stack(costs).max() if max_violation else torch.stack(costs).sum()) if costs else total
    for q in range(B):  # caption queries: negatives in the column
        costs = [torch.clamp(margin + scores[i, q] - scores[q, q], min=0) for i in range(B) if i != q]
        total = total + (torch.stack(costs).max() if max_violation else torch.stack(costs).sum()) if costs else total
    return total
