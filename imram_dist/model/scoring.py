"""Fast all-pairs IMRAM scoring (IMRAM_SPEC.md, "Cross attention" .. "Iterative matching").

Exact algebra, no approximation (see docs/model.md, "Factorisation"):
  * W [x ; c] = W_x x + W_c c, and c = weights @ C, so W_c c = weights @ (C W_c^T): the context half
    of each MDU is projected once per image (regions) / per caption (words), never per pair.
  * The first-step query projection W_x x_0 + b is also per image / per caption.
  * The first-step raw attention C x_0^T of every pair comes from ONE matmul (all regions x all words),
    and it doubles as the cosine numerator of every step: x_0 . c_k = weights_k @ (C x_0^T).
  * |c_k|^2 = weights_k G weights_k^T with the per-image / per-caption Gram matrix G = C C^T, so the
    attended vectors c_k are never materialised.
  * No MDU after the last step (its output is unused).
Only the later-step query projections W_x x_k (k >= 1) are paid per pair, as one big matmul over
(pairs x query rows) x d.

Precision: the matmuls run in the compute dtype (fp32, or bf16/fp16 for mixed precision); the
attention-sized work (leaky ReLU, the query-axis norms, softmax, Gram products, cosines, the score
sums) runs in the accumulation dtype acc = promote(compute dtype, fp32): fp32 for half precision.
It is ~1/50 of the per-pair work, so fp32 there costs little and keeps the softmax, the norms and
the scores accurate (a bf16 score near 4 would be rounded to a multiple of 1/64, tying ranks).

Layouts inside a block of n images x m captions:
  * text direction (query = words, context = regions): the block's real words are packed
    ([T] = all words of the m captions, no padding), tensors are [n, T, ...];
  * image direction (query = regions, context = words): tensors are [m, n*R, ...], caption-major,
    so that every per-caption operand is one batched matmul; words are padded to the block's
    longest caption and masked out of the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoders import EPS, l2norm, norm_eps
from .kernels import EAGER, Kernels, accumulation_dtype, gate_eager

TINY = 1e-30  # floor under squared norms before sqrt: keeps gradients finite, never changes a value


@dataclass
class Prepared:
    """Per-image and per-caption tensors computed once per similarity() call."""

    # images
    V: torch.Tensor  # [N, R, d]
    Vn: torch.Tensor  # [N, R] region norms
    Gv: torch.Tensor | None  # [N, R, R] region Gram (text direction)
    VWc_t: torch.Tensor | None  # [N, R, 2d] regions through W_c (+ b) of the t2i MDU
    VWx_i: torch.Tensor | None  # [N, R, 2d] regions through W_x of the i2t MDU
    # captions, padded (image direction)
    W: torch.Tensor  # [M, L, d] words, padded rows zeroed
    mask: torch.Tensor  # [M, L] bool
    Gw: torch.Tensor | None  # [M, L, L] word Gram (image direction)
    WWc_i: torch.Tensor | None  # [M, L, 2d] words through W_c (+ b) of the i2t MDU
    # captions, packed (text direction)
    Wp: torch.Tensor | None  # [T, d] real words, caption after caption
    Wpn: torch.Tensor | None  # [T] their norms
    WpWx_t: torch.Tensor | None  # [T, 2d] words through W_x of the t2i MDU
    lengths: torch.Tensor  # [M] long, on the compute device
    offsets: list[int]  # word offsets of each caption in the packed tensors (M + 1 entries)


def split_mdu(gate: torch.nn.Linear, linear: torch.nn.Linear, dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack gate and candidate linears: W_x [2d, d] (query half), W_c [2d, d] (context half), b [2d],
    in dtype on device (default: the parameters').

    The authors' MDU concatenates [query ; attended] (query first), so columns :d act on the query.
    Each half is cast on its own, then stacked: under autograd the backward is then one
    concatenation of the halves' gradients per weight (a slice of a parameter gives its gradient a
    zero-filled full-size tensor; a cast after stacking copies the fp32 stack once more). Measured
    on the AMD EPYC (family 25) of docs/model.md, d = 1,024, forward + backward of one MDU: bf16
    6.0 ms against 14.5 for stacking, slicing and then casting, fp32 4.2 against 10.9 (same bits)."""
    d = gate.out_features
    g_x, g_c = gate.weight.split(d, 1)
    l_x, l_c = linear.weight.split(d, 1)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return (torch.cat([cast(g_x), cast(l_x)]), torch.cat([cast(g_c), cast(l_c)]),
            cast(torch.cat([gate.bias, linear.bias])))


def prepare(V: torch.Tensor, W: torch.Tensor, lengths: torch.Tensor, text: bool, image: bool,
            steps: int, mdu_t: tuple | None, mdu_i: tuple | None, kern: Kernels = EAGER) -> Prepared:
    """V, W and the MDU weights are in the compute dtype; norms and Gram matrices come out in the
    accumulation dtype (computed from the same, possibly rounded, vectors the matmuls see). The MDU
    projections go through kern.linear, the per-pair projection's matmul backend."""
    N, R, d = V.shape
    M, L, _ = W.shape
    acc = accumulation_dtype(V.dtype)
    mask = torch.arange(L, device=W.device).unsqueeze(0) < lengths.unsqueeze(1)
    W = torch.where(mask.unsqueeze(-1), W, torch.zeros((), dtype=W.dtype, device=W.device))
    Va = V.to(acc)
    Vn = torch.linalg.vector_norm(Va, dim=-1)
    more = steps > 1
    Gv = VWc_t = VWx_i = Gw = WWc_i = Wp = Wpn = WpWx_t = None
    len_list = lengths.tolist()
    offsets = [0]
    for n_words in len_list:
        offsets.append(offsets[-1] + n_words)
    if text:
        Gv = torch.bmm(Va, Va.transpose(1, 2))
        Wp = W[mask]  # [T, d], row-major order = caption after caption
        Wpn = torch.linalg.vector_norm(Wp.to(acc), dim=-1)
        if more:
            Wx_t, Wc_t, b_t = mdu_t
            # the bias rides on the context projection: attention weights sum to 1 over the context
            VWc_t = kern.linear(V.reshape(N * R, d), Wc_t, b_t).view(N, R, 2 * d)
            WpWx_t = kern.linear(Wp, Wx_t)
    if image:
        Wa = W.to(acc)
        Gw = torch.bmm(Wa, Wa.transpose(1, 2))
        if more:
            Wx_i, Wc_i, b_i = mdu_i
            VWx_i = kern.linear(V.reshape(N * R, d), Wx_i).view(N, R, 2 * d)
            WWc_i = kern.linear(W.reshape(M * L, d), Wc_i, b_i).view(M, L, 2 * d)
    return Prepared(V, Vn, Gv, VWc_t, VWx_i, W, mask, Gw, WWc_i, Wp, Wpn, WpWx_t, lengths, offsets)


def _renorm(X: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and X.requires_grad:
        return l2norm(X)
    return X.div_(torch.linalg.vector_norm(X, dim=-1, keepdim=True).add_(norm_eps(X.dtype)))


# torch's CPU softmax over the last dim takes a scalar path for rows shorter than this: ~16 ns per
# element on the AMD EPYC of docs/model.md's CPU figures, against ~3 ns for rows of 16 and more. The synthetic
# corpus's 9 regions and blocks of short captions (the image direction's context) hit it.
SHORT_SOFTMAX_ROW = 16


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; for short rows on CPU, exp(x - row max) over the row sum in
    vectorised passes (3.5x faster there, same arithmetic; the max is a constant shift, so it is
    detached and the gradient is softmax's own). -inf entries (masked words) come out 0."""
    if x.shape[-1] >= SHORT_SOFTMAX_ROW or x.device.type != "cpu":
        return torch.softmax(x, dim=-1)
    e = (x - x.amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True)


def later_update(kern: Kernels, proj: torch.Tensor, X: torch.Tensor, w: torch.Tensor,
                 ctx: torch.Tensor) -> torch.Tensor:
    """The memory update of a later step: query projection proj = W_x x_k (a fresh matmul output)
    plus the context projection w @ (C W_c^T + b). Without autograd the eager update adds the latter
    inside the batched matmul's output (baddbmm_: one pass over proj instead of a second [.., 2d]
    tensor written, then read back by the add)."""
    if kern.gate is gate_eager and not (torch.is_grad_enabled() and (proj.requires_grad or w.requires_grad)):
        return kern.gate(proj.baddbmm_(w, ctx), X)
    return kern.gate(proj, X, torch.bmm(w, ctx))


def segment_sum(x: torch.Tensor, seg: torch.Tensor, m: int) -> torch.Tensor:
    """Sums of x [n, T, ...] over its packed words (dim 1) per caption: [n, m, ...]; seg [T] holds
    each word's caption. On CPU index_add: O(T) per row, exact and deterministic (the [m, T] one-hot
    matmul it replaced there cost O(m T) per row and dominated scoring at small widths, where the
    memory budget makes blocks of hundreds of captions). Elsewhere the one-hot matmul (exact:
    products with 1 and 0): on CUDA index_add's atomics would make the scores differ from run to run
    in the last bits."""
    if x.device.type == "cpu":
        return x.new_zeros(x.shape[0], m, *x.shape[2:]).index_add(1, seg, x)
    onehot = (torch.arange(m, device=seg.device).unsqueeze(1) == seg.unsqueeze(0)).to(x.dtype)
    return torch.matmul(onehot, x) if x.dim() == 3 else x @ onehot.t()


def text_direction(V, Gv, VWc, Wp, Wpn, WpWx, seg, lens, Wx, *, m: int, steps: int, lam: float,
                   renorm: bool, kern: Kernels = EAGER) -> torch.Tensor:
    """Text-IMRAM for n images x m captions whose T real words are packed in Wp; returns [n, m]
    in the accumulation dtype (Gv's)."""
    n, R, d = V.shape
    T = Wp.shape[0]
    acc = Gv.dtype
    # [n, T, R] raw first-step attention, in acc (also the cosine numerators of every step)
    S0 = (V.reshape(n * R, d) @ Wp.t()).view(n, R, T).transpose(1, 2).to(acc).contiguous()
    score = Gv.new_zeros(n, m)
    X = None
    for k in range(steps):
        A = S0 if k == 0 else torch.bmm(X, V.transpose(1, 2)).to(acc)
        A = F.leaky_relu(A, 0.1)
        # L2 over the query axis = over the words of each caption
        sq = segment_sum(A * A, seg, m)  # [n, m, R]
        A = A / (sq.clamp_min(TINY).sqrt().index_select(1, seg) + EPS)
        wts = softmax_last(A * lam)  # over regions
        num = (wts * S0).sum(-1)  # [n, T] = word . attended
        c2 = (torch.bmm(wts, Gv) * wts).sum(-1)  # |attended|^2
        cos = num / (Wpn * c2.clamp_min(TINY).sqrt()).clamp_min(EPS)
        score = score + segment_sum(cos, seg, m) / lens
        if k + 1 < steps:
            w = wts.to(V.dtype)
            if k == 0:  # first-step query projection: per caption, broadcast over the images
                X = kern.gate(torch.bmm(w, VWc), Wp.unsqueeze(0), WpWx.unsqueeze(0))
            else:
                X = later_update(kern, kern.linear(X.reshape(n * T, d), Wx).view(n, T, 2 * d), X, w, VWc)
            if renorm:
                X = _renorm(X)
    return score


def image_direction(V, Vn, VWx, W, mask, Gw, WWc, Wx, *, steps: int, lam: float,
                    renorm: bool, kern: Kernels = EAGER) -> torch.Tensor:
    """Image-IMRAM for n images x m captions (words padded to L, masked); returns [n, m] in the
    accumulation dtype (Gw's)."""
    n, R, d = V.shape
    m, L, _ = W.shape
    acc = Gw.dtype
    S0 = (W.reshape(m * L, d) @ V.reshape(n * R, d).t()).view(m, L, n * R).transpose(1, 2).to(acc).contiguous()
    neg = ~mask.view(m, 1, 1, L)
    score = Gw.new_zeros(m, n)
    X = None
    for k in range(steps):
        A = S0 if k == 0 else torch.bmm(X, W.transpose(1, 2)).to(acc)  # [m, nR, L]
        A = F.leaky_relu(A, 0.1).view(m, n, R, L)
        A = A / (A.pow(2).sum(2, keepdim=True).clamp_min(TINY).sqrt() + EPS)  # over regions
        wts = softmax_last((A * lam).masked_fill(neg, float("-inf"))).view(m, n * R, L)
        num = (wts * S0).sum(-1)  # [m, nR]
        c2 = (torch.bmm(wts, Gw) * wts).sum(-1)
        cos = num / (Vn.reshape(1, n * R) * c2.clamp_min(TINY).sqrt()).clamp_min(EPS)
        score = score + cos.view(m, n, R).mean(-1)
        if k + 1 < steps:
            w = wts.to(V.dtype)
            if k == 0:  # first-step query projection: per image, broadcast over the captions
                X = kern.gate(torch.bmm(w, WWc), V.reshape(1, n * R, d), VWx.reshape(1, n * R, 2 * d))
            else:
                X = later_update(kern, kern.linear(X.reshape(m * n * R, d), Wx).view(m, n * R, 2 * d), X, w, WWc)
            if renorm:
                X = _renorm(X)
    return score.t()


def score_block(V, Vn, Gv, VWc_t, VWx_i, W, mask, Gw, WWc_i, Wp, Wpn, WpWx_t, seg, lens,
                Wx_t, Wx_i, *, text: bool, image: bool, steps: int, lam: float,
                renorm: bool, kern: Kernels = EAGER) -> torch.Tensor:
    """Scores [n, m] of one block (accumulation dtype); every tensor argument is already sliced
    to the block."""
    m = W.shape[0]
    out = None
    if text:
        out = text_direction(V, Gv, VWc_t, Wp, Wpn, WpWx_t, seg, lens, Wx_t, m=m, steps=steps,
                             lam=lam, renorm=renorm, kern=kern)
    if image:
        s = image_direction(V, Vn, VWx_i, W, mask, Gw, WWc_i, Wx_i, steps=steps, lam=lam,
                            renorm=renorm, kern=kern)
        out = s if out is None else out + s
    return out


def bytes_per_pair(R: int, mean_words: float, L: int, d: int, steps: int, text: bool, image: bool,
                   elem: int, grad: bool) -> float:
    """Working-set estimate of one pair inside a block (what sizes the chunks)."""
    rows = (R if image else 0) + (mean_words if text else 0)
    att = (R * L if image else 0) + (R * mean_words if text else 0)
    if grad:  # what autograd saves for K steps: per query row and memory update the gate's
        # pre-activation (2d) and the new query (d), plus the first-step operands. Measured at paper
        # sizes, fp32, from the peak RSS of a batch-32 step in one chunk against four chunks:
        # 1.5 MB/pair fused, 1.7 MB/pair eager; this formula gives 1.7 MB/pair
        return elem * (rows * d * (3 * max(steps - 1, 0) + 2) + att * 10 * steps)
    return elem * (rows * d * 6 + att * 8)
