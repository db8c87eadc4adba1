"""ESPnet MultiHeadedAttention modules run on packed rows: the module's own weights, only the
rows that keep it. Shapes: N packed rows of width D, H heads of Dh."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from localgp import ops


def heads(attn, linear, x: Tensor) -> Tensor:
    """(..., D) -> (..., H, Dh) through one of the module's projections."""
    return linear(x).unflatten(-1, (attn.h, attn.d_k))


def packed_self_attention(attn, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """Self-attention of each packed sequence over its own kept frames. x (N, D) -> (N, D)."""
    q = attn.q_norm(heads(attn, attn.linear_q, x))
    k = attn.k_norm(heads(attn, attn.linear_k, x))
    v = heads(attn, attn.linear_v, x)
    out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=1 / math.sqrt(attn.d_k))
    return attn.linear_out(out.flatten(-2))


def rows_attention(attn, q_rows: Tensor, batch_of_row: Tensor, keys: Tensor, values: Tensor,
                   key_mask: Tensor) -> Tensor:
    """Queries of selected rows attend to their own utterance's keys.

    q_rows (N, D) normalised inputs of the rows; batch_of_row (N,) int64 their utterance;
    keys, values (B, S, H, Dh) already projected; key_mask (N, S) bool, True = may attend.
    Rows are processed per utterance, so keys are never copied per row.
    """
    q = attn.q_norm(heads(attn, attn.linear_q, q_rows))  # (N, H, Dh)
    out = q.new_empty(q.shape)
    counts = torch.bincount(batch_of_row, minlength=keys.shape[0]).tolist()
    order = torch.argsort(batch_of_row, stable=True)
    start = 0
    for b, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        q_b = q[rows].transpose(0, 1)  # (H, n, Dh)
        mask = key_mask[rows][None]  # (1, n, S)
        o = torch.nn.functional.scaled_dot_product_attention(
            q_b, keys[b].transpose(0, 1), values[b].transpose(0, 1), attn_mask=mask,
            scale=1 / math.sqrt(attn.d_k),
        )
        # A row with no key to attend to contributes zeros, as ESPnet's masked softmax does.
        out[rows] = torch.where(mask.any(-1)[..., None], o, 0.0).transpose(0, 1)
    return attn.linear_out(out.flatten(-2))


def memory_attention(q: Tensor, keys: Tensor, values: Tensor, allowed: Tensor | None, rows_of_utterance) -> Tensor:
    """One query per row against its utterance's memory (incremental decoding).

    q (n, H, Dh); keys, values (A, H, S, Dh) projected once per utterance; allowed (A, S) bool
    (True = may attend) or None. The rows of q are ordered by utterance; rows_of_utterance is an
    int R when every utterance has R of them (one batched call), else a list of A counts (a call
    per utterance that has rows). Returns (n, H, Dh).
    """
    scale = 1 / math.sqrt(q.shape[-1])
    if isinstance(rows_of_utterance, int):
        A, R = keys.shape[0], rows_of_utterance
        mask = None if allowed is None else allowed[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(A, R, *q.shape[1:]).transpose(1, 2), keys, values, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)
    out = q.new_empty(q.shape)
    start = 0
    for a, count in enumerate(rows_of_utterance):
        if count == 0:
            continue
        mask = None if allowed is None else allowed[a : a + 1, None, None, :]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[start : start + count].transpose(0, 1)[None], keys[a : a + 1], values[a : a + 1], attn_mask=mask,
            scale=scale)
        out[start : start + count] = o[0].transpose(0, 1)
        start += count
    return out
