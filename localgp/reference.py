"""Plain-PyTorch references of the fused ops: the definition the kernels are tested against.

Slow and simple on purpose; never called by the fast paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def keep_mask(logits: Tensor, lengths: Tensor, threshold: float) -> Tensor:
    """(B, T) bool: softmax(logits)[..., 1] > threshold, and t < lengths[b]."""
    prob = torch.softmax(logits.float(), dim=-1)[..., 1]
    valid = torch.arange(logits.shape[1], device=logits.device) < lengths[:, None]
    return (prob > threshold) & valid


def compact(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packs the kept frames of x (B, T, D): (packed, index, cu_seqlens, max_seqlen)."""
    index = keep.reshape(-1).nonzero().squeeze(1)
    packed = x.reshape(-1, x.shape[-1])[index]
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


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    return src.reshape(-1, src.shape[-1])[index]


def scatter_pad(values: Tensor, index: Tensor, residual: Tensor, scale: float = 1.0) -> Tensor:
    y = values.new_zeros(residual.reshape(-1, residual.shape[-1]).shape)
    y[index] = values
    return residual + scale * y.reshape(residual.shape)


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
