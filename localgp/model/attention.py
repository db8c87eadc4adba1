"""Attention modules run on packed rows: the module's own weights, only the rows that keep it.
Shapes: N packed rows of width D, H heads of Dh.

A backbone's attention module is seen through `Projections` (query, key, value, out): each
backbone adapter wraps its own module kind (ESPnet's MultiHeadedAttention, Whisper's
MultiHeadAttention) in one, and everything here runs on any of them."""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from localgp import ops


class Projections(abc.ABC):
    """One attention module's projections: query/key/value (..., D) -> (..., H, Dh), out
    (..., H, Dh) -> (..., D), with the softmax scale 1/sqrt(Dh). Subclassed per module kind
    (owsm.EspnetAttention, whisper.WhisperAttention)."""

    heads: int
    head_dim: int

    @abc.abstractmethod
    def query(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def key(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def value(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def out(self, o: Tensor) -> Tensor: ...

    @property
    def scale(self) -> float:
        return 1 / math.sqrt(self.head_dim)

    def split(self, y: Tensor) -> Tensor:
        return y.unflatten(-1, (self.heads, self.head_dim))


def packed_self_attention(attn: Projections, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """Self-attention of each packed sequence over its own kept frames. x (N, D) -> (N, D)."""
    out = ops.varlen_attention(attn.query(x), attn.key(x), attn.value(x), cu_seqlens, max_seqlen, scale=attn.scale)
    return attn.out(out)


def rows_attention(attn: Projections, q_rows: Tensor, batch_of_row: Tensor, keys: Tensor, values: Tensor,
                   key_mask: Tensor) -> Tensor:
    """Queries of selected rows attend to their own utterance's keys.

    q_rows (N, D) normalised inputs of the rows; batch_of_row (N,) int64 their utterance;
    keys, values (B, S, H, Dh) already projected; key_mask (N, S) bool, True = may attend, or
    None: every key (no mask: the fused attention kernel instead of the masked math path).
    Rows are processed per utterance, so keys are never copied per row.
    """
    q = attn.query(q_rows)  # (N, H, Dh)
    out = q.new_empty(q.shape)
    ops.count_host_reads()  # the rows per utterance size the calls
    counts = torch.bincount(batch_of_row, minlength=keys.shape[0]).tolist()
    order = torch.argsort(batch_of_row, stable=True)
    start = 0
    for b, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        q_b = q[rows].transpose(0, 1)[None]  # (1, H, n, Dh): 4-D, which the CPU's fused kernel takes
        mask = None if key_mask is None else key_mask[rows][None, None]  # (1, 1, n, S)
        o = torch.nn.functional.scaled_dot_product_attention(
            q_b, keys[b].transpose(0, 1)[None], values[b].transpose(0, 1)[None], attn_mask=mask,
            scale=attn.scale,
        )[0]
        if mask is not None:  # a row with no key to attend to contributes zeros, as ESPnet's masked softmax does
            o = torch.where(mask[0].any(-1)[..., None], o, 0.0)
        out[rows] = o.transpose(0, 1)
    return attn.out(out)


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


def attention_received(attn: Projections, h: Tensor) -> Tensor:
    """The attention each frame receives: softmax(q k^T * scale) of the module on h (B, T, D), the
    mean over heads and queries -> (B, T) (each row of it sums to 1). One utterance at a time, so
    the (H, T, T) probabilities of one are all that is held."""
    q, k = attn.query(h).transpose(1, 2), attn.key(h).transpose(1, 2)  # (B, H, T, Dh)
    rows = []
    for b in range(h.shape[0]):
        probs = torch.softmax((q[b] @ k[b].transpose(-1, -2)).float() * attn.scale, dim=-1)  # (H, T, T)
        rows.append(probs.mean(dim=(0, 1)))
    return torch.stack(rows)


def top_attended(received: Tensor, keep: float) -> Tensor:
    """The frames (B, K) int64, in order, that receive the most attention (received (B, T)): the
    top `keep` share of the T frames (K = round(keep * T), at least 1), the same K for every row."""
    if not 0 < keep <= 1:
        raise ValueError(f"top_attended: keep must lie in (0, 1], got {keep}")
    count = max(1, round(keep * received.shape[1]))
    return received.topk(count, dim=1, sorted=False).indices.sort(dim=1).values
