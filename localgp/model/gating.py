"""How a layer's modules run under their gates, in both executions:

- masked: the module runs on everything, its output is multiplied by the mask (the papers'
  implementation; gradients reach the gates through the straight-through estimator);
- compact: the module runs only where it is kept (fused compaction for frames/tokens, row
  selection for utterances); a module that no row keeps is not run at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from localgp import ops
from localgp.gates import GateRecord, gate_mask
from localgp.model.config import GateConfig


class PositionGate:
    """Per-position decisions (frames of the encoder, tokens of the decoder).

    logits (B, T, M, 2) for the M module names; valid (B, T) bool; lengths (B,).
    """

    def __init__(self, logits: Tensor, valid: Tensor, lengths: Tensor, names, cfg: GateConfig,
                 execution: str, training: bool, record: GateRecord, prefix: str):
        self.logits, self.valid, self.lengths, self.names = logits, valid, lengths, names
        self.cfg, self.execution, self.training = cfg, execution, training
        self.record, self.prefix = record, prefix

    def logits_of(self, name: str) -> Tensor:
        return self.logits[:, :, self.names.index(name)]

    def mask(self, name: str) -> Tensor:
        """Masked execution: (B, T) float mask, padding counted as skipped."""
        mask = gate_mask(self.logits_of(name), training=self.training, threshold=self.cfg.threshold,
                         tau=self.cfg.tau) * self.valid
        self.record.add(f"{self.prefix}.{name}", mask, self.valid)
        return mask

    def compact(self, name: str, x: Tensor) -> ops.Compacted:
        """Compact execution: the kept positions of x packed."""
        c = ops.gate_compact(x, self.logits_of(name), self.lengths, self.cfg.threshold)
        self.record.add(f"{self.prefix}.{name}", c.keep.to(x.dtype), self.valid)
        return c

    def residual(self, name: str, x: Tensor, fn, scale: float = 1.0) -> Tensor:
        """x + scale * fn(x) where the module is kept, x elsewhere."""
        if self.execution == "compact":
            c = self.compact(name, x)
            return ops.scatter_pad(fn(c.packed), c.index, x, scale)
        return x + scale * fn(x) * self.mask(name).to(x.dtype)[..., None]


class UtteranceGate:
    """Per-utterance decisions: logits (B, M, 2)."""

    def __init__(self, logits: Tensor, names, cfg: GateConfig, execution: str, training: bool,
                 record: GateRecord, prefix: str):
        self.logits, self.names, self.cfg = logits, names, cfg
        self.execution, self.training = execution, training
        self.record, self.prefix = record, prefix

    def mask(self, name: str) -> Tensor:
        """(B,) float mask; with gradients in masked training."""
        logits = self.logits[:, self.names.index(name)]
        mask = gate_mask(logits, training=self.training and self.execution == "masked",
                         threshold=self.cfg.threshold, tau=self.cfg.tau)
        self.record.add(f"{self.prefix}.{name}", mask)
        return mask

    @staticmethod
    def _on_kept_rows(mask: Tensor, x: Tensor, fn, row_args):
        """(kept rows, fn on those rows), or None when no utterance keeps the module."""
        rows = mask.nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        if rows.numel() == x.shape[0]:
            return rows, fn(x, *row_args)
        return rows, fn(x[rows], *(a[rows] for a in row_args))

    def residual(self, name: str, x: Tensor, fn, scale: float = 1.0, row_args=()) -> Tensor:
        mask = self.mask(name)
        if self.execution == "masked":
            return x + scale * fn(x, *row_args) * mask.to(x.dtype)[:, None, None]
        done = self._on_kept_rows(mask, x, fn, row_args)
        if done is None:
            return x
        rows, y = done
        return x.index_add(0, rows, y, alpha=scale)

    def branch(self, name: str, x: Tensor, fn, row_args=()) -> Tensor:
        """A parallel branch's output, zeros for utterances that skip it."""
        mask = self.mask(name)
        if self.execution == "masked":
            return fn(x, *row_args) * mask.to(x.dtype)[:, None, None]
        out = torch.zeros_like(x)
        done = self._on_kept_rows(mask, x, fn, row_args)
        if done is not None:
            rows, y = done
            out = out.index_copy(0, rows, y)
        return out
