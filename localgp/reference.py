"""Plain-PyTorch references of the fused ops: the definition the kernels are tested against.

Slow and simple on purpose; never called by the fast paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def keep_mask(logits: Tensor, lengths: Tensor, threshold: float) -> Tensor:
    """(B, T) bool: the keep rule of every gate op (csrc/checks.h), t < lengths[b] and
    float32(l[1]) - float32(l[0]) > float32(log(threshold / (1 - threshold))):
    softmax(l)[1] > threshold up to float rounding, and defined at infinite logits. A NaN margin
    (a NaN logit, or both classes the same infinity) at a valid frame decides nothing: an error."""
    margin = logits[..., 1].float() - logits[..., 0].float()
    valid = torch.arange(logits.shape[1], device=logits.device) < lengths[:, None]
    if bool((margin.isnan() & valid).any()):
        raise ValueError("keep_mask: logits give no decision at valid frames (a NaN margin)")
    bound = torch.tensor(math.log(threshold / (1 - threshold)), dtype=torch.float32)
    return (margin > bound) & valid


def compact(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packs the kept frames of x (B, T, D): (packed, index, cu_seqlens, max_seqlen)."""
    index = keep.reshape(-1).nonzero().squeeze(1)
    packed = x.reshape(x.shape[0] * x.shape[1], x.shape[2])[index]
    counts = keep.sum(1)
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
    max_seqlen = counts.max().int() if counts.numel() else counts.new_zeros(()).int()
    return packed, index, cu_seqlens, max_seqlen


def gate_compact(x: Tensor, logits: Tensor, lengths: Tensor, threshold: float = 0.5):
    keep = keep_mask(logits, lengths, threshold)
    return (*compact(x, keep), keep)


def gate_compact_linear(x, hidden, weight, bias, lengths, threshold: float = 0.5):
    logits = hidden.float() @ weight.float().T + bias.float()
    return gate_compact(x, logits, lengths, threshold)


def gate_plan(logits: Tensor, lengths: Tensor, threshold: float = 0.5):
    """logits (B, T, M, 2): (index, cu_seqlens (M, B+1), max_seqlen (M,), keep (M, B, T), offsets)."""
    B, T, M, _ = logits.shape
    keep = keep_mask(logits.permute(2, 0, 1, 3).reshape(M * B, T, 2), lengths.repeat(M), threshold).view(M, B, T)
    index = [k.reshape(-1).nonzero().squeeze(1) for k in keep]
    counts = keep.sum(2)  # (M, B)
    cu_seqlens = torch.cat([counts.new_zeros(M, 1), counts.cumsum(1)], dim=1).int()
    max_seqlen = counts.amax(1).int() if B else counts.new_zeros(M).int()
    offsets = torch.tensor([0] + [i.numel() for i in index]).cumsum(0)
    return torch.cat([torch.zeros(0, dtype=torch.int64), *index]), cu_seqlens, max_seqlen, keep, offsets


def _rows(t: Tensor) -> Tensor:
    """t (..., D) viewed as (M, D), also for D = 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    return _rows(src)[index]


def scatter_pad(values: Tensor, index: Tensor, residual: Tensor, scale: float = 1.0) -> Tensor:
    y = values.new_zeros(_rows(residual).shape)
    y[index] = values
    return residual + scale * y.reshape(residual.shape)


def scatter_rows(values: Tensor, index: Tensor, size) -> Tensor:
    out = values.new_zeros(math.prod(size[:-1]), size[-1])
    out[index] = values
    return out.reshape(size)


def group_rows(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Groups ordered by mask (lexicographic, False < True), rows in order inside a group."""
    if masks.shape[0] == 0:
        empty = masks.new_zeros(0, dtype=torch.int64)
        return empty, masks.new_zeros(1, dtype=torch.int64), empty
    _, group_of_row, sizes = torch.unique(
        masks.to(torch.uint8), dim=0, sorted=True, return_inverse=True, return_counts=True
    )
    perm = torch.sort(group_of_row, stable=True).indices
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, offsets, inverse


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, scale=None) -> Tensor:
    """Each packed sequence attends to itself, one sequence at a time."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        q_b, k_b, v_b = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out_b = F.scaled_dot_product_attention(q_b, k_b, v_b, scale=scale)
        out[start:end] = out_b[0].transpose(0, 1)
    return out


def masked_attention(x_heads: Tensor, keep: Tensor, scale=None) -> Tensor:
    """Padded attention restricted to the kept frames: keys of skipped frames are masked out.

    x_heads is (q, k, v) each (B, T, H, Dh); keep (B, T). Rows of skipped queries are zero.
    """
    q, k, v = (t.transpose(1, 2) for t in x_heads)
    attn_mask = keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    # A sequence with no kept frame has no key: its rows are NaN before this where().
    return torch.where(keep[:, :, None, None], out.transpose(1, 2), 0.0)
