"""Image and caption encoders (IMRAM_SPEC.md, "Inputs and encoders").

Parameter names mirror the authors' code (img_enc.fc_local, txt_enc.embed, txt_enc.rnn) so that
their checkpoints load with a plain key mapping.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

EPS = 1e-8


def norm_eps(dtype: torch.dtype, eps: float = EPS) -> float:
    """eps as a tensor of this dtype can hold it. fp16 rounds 1e-8 to 0, so an all-zero vector (a
    padded word position, a zero region) normalised to 0/0 = NaN; in fp16 it is fp16's smallest
    normal number (6.1e-5) instead, which changes x / ||x|| by a relative 6.1e-5 / ||x||: less than
    fp16's own rounding (2^-11) for ||x|| >= 1/8. fp32 and bf16 keep eps (their smallest normal
    number is ~1e-38)."""
    return max(eps, torch.finfo(dtype).tiny)


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """x / (||x|| + eps) along dim (the authors' l2norm)."""
    # vector_norm's backward is 0 (not NaN) at an all-zero vector, e.g. a padded word position
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + norm_eps(x.dtype, eps))


class ImageEncoder(nn.Module):
    """Linear(D -> d), Xavier-uniform weight, zero bias, then per-region L2 normalisation."""

    def __init__(self, image_dim: int, embed_size: int) -> None:
        super().__init__()
        self.fc_local = nn.Linear(image_dim, embed_size)
        r = math.sqrt(6.0) / math.sqrt(image_dim + embed_size)
        with torch.no_grad():
            self.fc_local.weight.uniform_(-r, r)
            self.fc_local.bias.zero_()

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return l2norm(self.fc_local(regions), dim=-1)


class TextEncoder(nn.Module):
    """Embedding(V, word_dim) U(-0.1, 0.1); 1-layer bidirectional GRU over the packed sequence;
    (forward + backward) / 2; per-word L2 normalisation. Padded positions come out as zeros."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers=1, batch_first=True, bidirectional=True)
        with torch.no_grad():
            self.embed.weight.uniform_(-0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [M, L] (already cleaned: ids beyond each length are 0), lengths [M] -> [M, L, d]."""
        m, L = tokens.shape
        if m == 0:
            return self.embed.weight.new_zeros(0, L, self.rnn.hidden_size)
        x = self.embed(tokens)
        packed = pack_padded_sequence(x, lengths.detach().to("cpu", torch.int64), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)
        d = out.shape[-1] // 2
        out = (out[..., :d] + out[..., d:]) / 2
        return l2norm(out, dim=-1)
