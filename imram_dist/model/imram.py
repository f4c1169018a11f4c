"""The IMRAM model: encoders, the two MDUs and all-pairs scoring (chunked, checkpointed)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from imram_dist.config import ModelConfig, validate_model

from . import kernels, scoring
from .encoders import ImageEncoder, TextEncoder

KERNEL_CHOICES = kernels.CHOICES


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the scoring matmuls run in: autocast's for the tensors' device when autocast is on
    there, else the promoted dtype of the tensors."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class ModelInputError(ValueError):
    """An input tensor the model cannot score; the message says what was expected."""


class IMRAM(nn.Module):
    """IMRAM (Chen et al., CVPR 2020) as fixed by IMRAM_SPEC.md.

    Parameter names follow the authors' SCAN class (img_enc.fc_local, txt_enc.embed, txt_enc.rnn,
    linear_t2i, gate_t2i, linear_i2t, gate_i2t). Both MDUs always exist (as in the authors' code),
    whatever the mode, so checkpoints are interchangeable between modes.

    ``kernels`` picks the elementwise kernels of pair scoring (imram_dist.model.kernels): "eager"
    (the reference), "fused" (torch.compile'd), or "auto" (fused where it was measured faster for
    the device and compute dtype); by default the config's ``kernels`` (the ``model.kernels`` key).
    It is a plain attribute (not in the state dict): set ``model.kernels`` to change it.
    """

    def __init__(self, config: ModelConfig, kernels: str | None = None) -> None:
        super().__init__()
        validate_model(config, built=True)  # the one set of checks every config goes through
        self.config = config
        d = config.embed_size
        self.img_enc = ImageEncoder(config.image_dim, d)
        self.txt_enc = TextEncoder(config.vocab_size, config.word_dim, d)
        self.linear_t2i = nn.Linear(2 * d, d)
        self.gate_t2i = nn.Linear(2 * d, d)
        self.linear_i2t = nn.Linear(2 * d, d)
        self.gate_i2t = nn.Linear(2 * d, d)
        self._block = scoring.score_block
        self._compiled_block = None  # built on first no-grad use when config.compile_scoring
        kernels = getattr(config, "kernels", "auto") if kernels is None else kernels
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels: expected one of {list(KERNEL_CHOICES)}, got {kernels!r}")
        self.kernels = kernels

    def kernels_for(self, device: torch.device, dtype: torch.dtype, grad: bool = False) -> kernels.Kernels:
        """The kernels that scoring uses on this device in this compute dtype, with or without
        autograd: the memory update (``kernels``) and the projections' matmul (config.fp32_matmul).
        The whole compiled core (config.compile_scoring, no grad) traces the eager reference itself
        (with torch's matmul)."""
        if self.config.compile_scoring and not grad:
            return kernels.EAGER
        return kernels.select(self.kernels, device, dtype, self.config.embed_size, self.config.fp32_matmul)

    def _block_fn(self, grad: bool):
        """The scoring core for one block: eager, or (no grad, config.compile_scoring) compiled once
        with dynamic shapes, so ragged edge blocks and new batch sizes reuse the same graph (only a
        size-1 block dimension and the width specialise; dynamo's recompile limit bounds the rest)."""
        if grad or not self.config.compile_scoring:
            return self._block
        if self._compiled_block is None:
            compiled = torch.compile(scoring.score_block, dynamic=True, options=kernels.INDUCTOR_OPTIONS)
            d = self.config.embed_size

            def block(*args, **kw):  # widths static, as for the fused kernels (kernels.static_width)
                for t in args:
                    if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in (d, 2 * d):
                        kernels.static_width(t)
                return compiled(*args, **kw)

            self._compiled_block = block
        return self._compiled_block

    # ------------------------------------------------------------------ encoders
    def encode_images(self, regions: torch.Tensor) -> torch.Tensor:
        """regions [N, R, image_dim] float -> [N, R, embed_size], each region L2-normalised."""
        D = self.config.image_dim
        if not isinstance(regions, torch.Tensor) or regions.dim() != 3 or regions.shape[-1] != D:
            shape = tuple(regions.shape) if isinstance(regions, torch.Tensor) else type(regions).__name__
            raise ModelInputError(f"regions: expected a float tensor [N, R, {D}] (image_dim={D}), got {shape}")
        if not regions.is_floating_point():
            raise ModelInputError(f"regions: expected a floating-point tensor, got dtype {regions.dtype}")
        if regions.shape[1] < 1:
            raise ModelInputError("regions: expected at least one region per image, got R=0")
        if regions.numel() and not bool(torch.isfinite(regions).all()):
            raise ModelInputError("regions: expected finite features, found NaN or Inf")
        w = self.img_enc.fc_local.weight
        dtype = regions.dtype if torch.is_autocast_enabled(w.device.type) else w.dtype
        return self.img_enc(regions.to(device=w.device, dtype=dtype))

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [M, L] long (<start> ... <end>, padded), lengths [M] -> [M, L, embed_size].

        A caption needs length >= 1 (a bare <start><end> caption, length 2, is fine) and at most
        min(L, max_caption_len) tokens; ids at positions >= length are ignored (may hold anything)."""
        device = self.txt_enc.embed.weight.device
        tokens, lengths = self._check_tokens(tokens, lengths)
        tokens, lengths = tokens.to(device), lengths.to(device)
        valid = torch.arange(tokens.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
        tokens = torch.where(valid, tokens, torch.zeros((), dtype=tokens.dtype, device=device))
        return self.txt_enc(tokens, lengths)

    def _check_tokens(self, tokens, lengths):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point() \
                or tokens.dtype == torch.bool:
            got = (f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor)
                   else type(tokens).__name__)
            raise ModelInputError(f"tokens: expected an integer tensor [M, L], got {got}")
        lengths = self._check_lengths(lengths, tokens.shape[0], tokens.shape[1], "tokens")
        V = self.config.vocab_size
        if tokens.numel():
            valid = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < \
                lengths.to(tokens.device).unsqueeze(1)
            bad = valid & ((tokens < 0) | (tokens >= V))
            if bool(bad.any()):
                i, j = (int(x) for x in bad.nonzero()[0])
                raise ModelInputError(f"tokens: expected ids in [0, {V}) (vocab_size={V}), got "
                                      f"{int(tokens[i, j])} at caption {i}, position {j}")
        return tokens.long(), lengths

    def _check_lengths(self, lengths, M: int, L: int, what: str) -> torch.Tensor:
        if not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ModelInputError(f"lengths: expected a 1-D integer tensor [M], got {tuple(lengths.shape)} "
                                  f"{lengths.dtype}")
        if lengths.shape[0] != M:
            raise ModelInputError(f"lengths: expected one length per caption ({what} has M={M}), "
                                  f"got {lengths.shape[0]}")
        if M:
            lo, hi = int(lengths.min()), int(lengths.max())
            cap = min(L, self.config.max_caption_len)
            if lo < 1:
                raise ModelInputError(f"lengths: expected every caption to have at least 1 token, got "
                                      f"length {lo} (empty caption)")
            if hi > cap:
                why = (f"max_caption_len={self.config.max_caption_len}" if cap < L
                       else f"the padded width L={L}")
                raise ModelInputError(f"lengths: expected at most {cap} tokens per caption ({why}), got {hi}")
        return lengths.long()

    # ------------------------------------------------------------------ scoring
    def similarity(self, image_emb: torch.Tensor, caption_emb: torch.Tensor, lengths) -> torch.Tensor:
        """All-pairs scores [N, M] of encoded images [N, R, d] and captions [M, L, d].

        Differentiable (chunks are recomputed in backward when there is more than one) and also
        fine under torch.no_grad(). Runs on the embeddings' device; the matmuls run in the compute
        dtype: autocast's when autocast is on for that device, else the embeddings' (promoted).
        Attention, norms, cosines and the scores are computed in fp32 for half-precision compute,
        so the result is fp32 then (fp64 for fp64)."""
        d = self.config.embed_size
        for name, t in (("image_emb", image_emb), ("caption_emb", caption_emb)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != d or not t.is_floating_point():
                got = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__)
                raise ModelInputError(f"{name}: expected a float tensor [*, *, {d}] (embed_size={d}), got {got}")
        if image_emb.shape[1] < 1:
            raise ModelInputError("image_emb: expected at least one region per image, got R=0")
        N, R, _ = image_emb.shape
        M, L, _ = caption_emb.shape
        lengths = self._check_lengths(lengths, M, L, "caption_emb")
        device = image_emb.device
        dtype = compute_dtype(image_emb, caption_emb)
        # our own dtype policy from here on (autocast would mix dtypes inside the fused update)
        with torch.autocast(device.type, enabled=False):
            return self._similarity(image_emb.to(dtype), caption_emb.to(device=device, dtype=dtype), lengths)

    def _similarity(self, V: torch.Tensor, W: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        N, R, d = V.shape
        M, L, _ = W.shape
        dtype, device = V.dtype, V.device
        acc = kernels.accumulation_dtype(dtype)
        if N == 0 or M == 0:
            return V.new_zeros(N, M, dtype=acc)
        lengths = lengths.to(device)
        c = self.config
        text, image = c.mode in ("full", "text"), c.mode in ("full", "image")
        grad = torch.is_grad_enabled() and (V.requires_grad or W.requires_grad or any(
            q.requires_grad for q in self.parameters()))
        mdu_t, mdu_i = self._mdu_weights(dtype, device, text, image)
        kern = self.kernels_for(device, dtype, grad)
        p = scoring.prepare(V, W, lengths, text, image, c.steps, mdu_t, mdu_i, kern)
        mean_words = p.offsets[-1] / M
        per_pair = scoring.bytes_per_pair(R, mean_words, L, d, c.steps, text, image,
                                          V.element_size(), grad)
        pairs = max(1, int(c.score_memory_mb * 2**20 // per_pair))
        m_blk = min(M, pairs)
        n_blk = min(N, max(1, pairs // m_blk))
        n_chunks = math.ceil(N / n_blk) * math.ceil(M / m_blk)
        fn = functools.partial(self._block_fn(grad), text=text, image=image, steps=c.steps,
                               lam=float(c.lambda_softmax), renorm=bool(c.renorm_query),
                               kern=kern)
        Wx_t = mdu_t[0] if text else None
        Wx_i = mdu_i[0] if image else None
        rows = []
        for i0 in range(0, N, n_blk):
            i1 = min(N, i0 + n_blk)
            cols = []
            for j0 in range(0, M, m_blk):
                j1 = min(M, j0 + m_blk)
                lens = p.lengths[j0:j1]
                Lb = int(lens.max())
                o0, o1 = p.offsets[j0], p.offsets[j1]
                seg = (torch.repeat_interleave(torch.arange(j1 - j0, device=device), lens)
                       if text else None)

                def sl(t, a, b, *more):
                    return None if t is None else t[(slice(a, b),) + more]

                args = (V[i0:i1], p.Vn[i0:i1], sl(p.Gv, i0, i1), sl(p.VWc_t, i0, i1), sl(p.VWx_i, i0, i1),
                        p.W[j0:j1, :Lb], p.mask[j0:j1, :Lb], sl(p.Gw, j0, j1, slice(0, Lb), slice(0, Lb)),
                        sl(p.WWc_i, j0, j1, slice(0, Lb)), sl(p.Wp, o0, o1), sl(p.Wpn, o0, o1),
                        sl(p.WpWx_t, o0, o1), seg, lens.to(acc), Wx_t, Wx_i)
                if grad and n_chunks > 1:
                    cols.append(checkpoint(fn, *args, use_reentrant=False))
                else:
                    cols.append(fn(*args))
            rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, 1))
        return rows[0] if len(rows) == 1 else torch.cat(rows, 0)

    def _mdu_weights(self, dtype: torch.dtype, device: torch.device, text: bool, image: bool):
        """(W_x, W_c, b) of each direction's MDU in the compute dtype (recomputed per call: a few ms
        per MDU at paper sizes, nothing next to a block; a cache keyed on weight versions would miss
        DeepSpeed's in-place .data updates)."""
        mdu_t = scoring.split_mdu(self.gate_t2i, self.linear_t2i, dtype, device) if text else None
        mdu_i = scoring.split_mdu(self.gate_i2t, self.linear_i2t, dtype, device) if image else None
        return mdu_t, mdu_i

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor, lengths) -> torch.Tensor:
        """Encode and score all pairs: [N, M]."""
        return self.similarity(self.encode_images(regions), self.encode_captions(tokens, lengths), lengths)


def unwrap(model: Any) -> Any:
    """The model inside a DeepSpeed engine or DDP wrapper (their ``.module``); anything else as is."""
    while not isinstance(model, IMRAM) and hasattr(model, "module"):
        model = model.module
    return model
