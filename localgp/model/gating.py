"""How a layer's modules run under their gates, in both executions:

- masked: the module runs on everything, its output is multiplied by the mask (the papers'
  implementation; gradients reach the gates through the straight-through estimator);
- compact: the module runs only where it is kept (fused compaction for frames/tokens, row
  selection for utterances); a module that no row keeps is not run at all.

Under a profiler, every step carries one `localgp.<name>` label (`profiled()`), mutually
exclusive so that a per-module breakdown adds up: `gate` (deciding: predictors, thresholds),
`compaction` (selecting the rows a module runs on), the module itself (`ffn1`, `attention`, ...:
its own compute only), `scatter` (putting its output back: scatter_pad, or in masked execution
the multiply by the mask with the residual add).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from localgp import ops
from localgp.gates import GateRecord, gate_mask
from localgp.model.attention import Projections, packed_self_attention, rows_attention
from localgp.model.config import GateConfig

LABEL_PREFIX = "localgp."
# A gated unit's profiler label where it differs from its gate name.
MODULE_LABELS = {"attn": "attention"}
_NO_LABEL = contextlib.nullcontext()


def profiled(name: str):
    """record_function('localgp.<name>') while a torch profiler runs, else nothing: a forward
    pass has hundreds of these, and each costs microseconds of host time when recorded."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(LABEL_PREFIX + name)
    return _NO_LABEL


def module_label(name: str) -> str:
    return MODULE_LABELS.get(name, name)


class NoGate:
    """No gate at all: every module on every position, no mask (the dense baseline)."""

    def residual(self, name: str, x: Tensor, fn, scale: float = 1.0) -> Tensor:
        with profiled(module_label(name)):
            y = fn(x)
        return x + scale * y


def device_rows(rows: list[int], device: torch.device) -> Tensor:
    """Row indices decided on the host, on `device`: through pinned memory on a GPU, so that the
    copy is queued instead of waiting for the GPU to drain."""
    index = torch.tensor(rows, dtype=torch.long)
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


# Logits (skip, keep) that any threshold in (0, 1) reads as skip, in any float dtype: a rule's decision.
_SKIP = torch.tensor([30.0, -30.0])


def module_fill(fill: Tensor | None, names, name: str, dtype: torch.dtype) -> Tensor | None:
    """Module `name`'s slice of a layer's fill (modules first), in `dtype`; None without a fill."""
    return None if fill is None else fill[names.index(name)].to(dtype)


class PositionGate:
    """Per-position decisions (frames of the encoder, tokens of the decoder).

    logits (B, T, M, 2) for the M module names; valid (B, T) bool; lengths (B,).
    Compact execution decides every module of the layer at once (`ops.gate_plan`: one host read
    per layer). inplace: compact residual adds write into x itself (inference only, and only
    where the caller owns x: the layer's input is not needed afterwards). fill (M, T, D): what a
    skipped module adds at each position (GateConfig.skip_fill "mean"), None: nothing.
    decided (B, T) bool: the positions the gates decide, a rule skipping the others in every
    module (GateConfig.prior); None: every valid position. stand_ins: a module per name
    (GateConfig.stand_in_rank) whose output on a skipped position's input is added there too
    (at the positions the gates decide).
    """

    def __init__(self, logits: Tensor, valid: Tensor, lengths: Tensor, names, cfg: GateConfig,
                 execution: str, training: bool, record: GateRecord, prefix: str, inplace: bool = False,
                 fill: Tensor | None = None, decided: Tensor | None = None, stand_ins=None):
        if decided is not None:  # the rule's skipped positions: skipped whatever the logits say
            logits = torch.where(decided[..., None, None], logits, _SKIP.to(logits))
        self.logits, self.valid, self.lengths, self.names = logits, valid, lengths, names
        self.decided = decided
        self.cfg, self.execution, self.training = cfg, execution, training
        self.record, self.prefix = record, prefix
        self.inplace = inplace and not torch.is_grad_enabled()
        self.fill, self.stand_ins = fill, stand_ins
        self.plan = None
        if execution == "compact":
            with profiled("compaction"):
                self.plan = ops.gate_plan(logits, lengths, cfg.threshold)

    def logits_of(self, name: str) -> Tensor:
        return self.logits[:, :, self.names.index(name)]

    def mask(self, name: str) -> Tensor:
        """Masked execution: (B, T) float mask, padding counted as skipped."""
        with profiled("gate"):
            mask = gate_mask(self.logits_of(name), training=self.training, threshold=self.cfg.threshold,
                             tau=self.cfg.tau) * self.valid
            if self.decided is not None:  # exactly 0 there in training too (Gumbel noise could flip a logit)
                mask = mask * self.decided
            self.record.add(f"{self.prefix}.{name}", mask, self.valid, self.decided)
        return mask

    def compact(self, name: str, x: Tensor) -> ops.Compacted:
        """Compact execution: the kept positions of x packed."""
        with profiled("compaction"):
            c = self.plan.compact(self.names.index(name), x)
            self.record.add(f"{self.prefix}.{name}", c.keep.to(x.dtype), self.valid, self.decided)
        return c

    def add_kept(self, name: str, x: Tensor, y: Tensor, index: Tensor, scale: float = 1.0) -> Tensor:
        """Compact: x + scale * y at the rows `index` of x, x (+ the fill) elsewhere: in place where
        allowed, else a new tensor."""
        with profiled("scatter"):
            fill = self._fill(name, x)
            if fill is not None:  # every frame gets the fill; the kept ones trade it for their output
                rows = index % x.shape[1] if fill.dim() == 2 else index  # by position, or by frame (B, T, D)
                kept_fill = ops.gather_rows(fill, rows)
                x = x.add_(fill) if self.inplace and x.is_contiguous() else x + fill
                y, scale = scale * y - kept_fill, 1.0
            if self.inplace and x.is_contiguous():
                return ops.scatter_add_(x, y, index, scale)
            return ops.scatter_pad(y, index, x, scale)

    def add_masked(self, name: str, x: Tensor, y: Tensor, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
        """Masked: x + scale * y where kept, x (+ the fill) where skipped. mask: mask(name) when
        the caller has drawn it already (it draws anew in training)."""
        mask = self.mask(name) if mask is None else mask
        with profiled("scatter"):
            m = mask.to(x.dtype)[..., None]
            fill = self._fill(name, x)
            out = x + scale * y * m
            return out if fill is None else out + (1 - m) * fill

    def _fill(self, name: str, x: Tensor) -> Tensor | None:
        """What the skipped positions of module `name` add: the fill (T, D), or with a stand-in the
        fill plus its output on x at the positions the gates decide (B, T, D); None: nothing."""
        fill = module_fill(self.fill, self.names, name, x.dtype)
        if self.stand_ins is None:
            return fill
        # (inside the caller's `scatter` label: the profile's labels stay exclusive)
        extra = self.stand_ins[self.names.index(name)](x)
        if self.decided is not None:  # the rule's frames keep the fill alone
            extra = extra * self.decided[..., None].to(extra.dtype)
        return extra if fill is None else extra + fill

    def residual(self, name: str, x: Tensor, fn, scale: float = 1.0) -> Tensor:
        """x + scale * fn(x) where the module is kept, x elsewhere."""
        if self.execution == "compact":
            c = self.compact(name, x)
            with profiled(module_label(name)):
                y = fn(c.packed)
            return self.add_kept(name, x, y, c.index, scale)
        with profiled(module_label(name)):
            y = fn(x)
        return self.add_masked(name, x, y, scale)

    def token_attention(self, name: str, x: Tensor, attn: Projections, norm, source: Tensor, mask: Tensor | None,
                        dropout, full) -> Tensor:
        """x + attention where kept, for decoder self-attention (source = norm(x), mask (B|1, L, L)
        causal) and src-attention (source = memory, mask (B|1, 1|L, S)); True = may attend; None:
        every position of the source (Whisper's encoder with attention_keys "all"). Kept
        tokens query the keys/values of the whole source, so a token that skips self-attention
        still serves later tokens. full(h): the backbone's own module on every token (masked)."""
        if self.execution == "masked":
            with profiled(module_label(name)):
                out = dropout(full(norm(x)))
            return self.add_masked(name, x, out)
        c = self.compact(name, x)
        with profiled(module_label(name)):
            keys, values = attn.key(source), attn.value(source)
            B, L = x.shape[:2]
            batch_of_row, position = c.index // L, c.index % L
            key_mask = None if mask is None else mask.expand(B, L, -1)[batch_of_row, position]  # (N, S) per kept token
            out = dropout(rows_attention(attn, norm(c.packed), batch_of_row, keys, values, key_mask))
        return self.add_kept(name, x, out, c.index)

    def self_attention(self, name: str, x: Tensor, attn: Projections, norm, full) -> Tensor:
        """x + an encoder's self-attention where kept, any backbone. Queries are the kept frames;
        keys and values the kept frames (cfg.attention_keys "kept": localgp's varlen attention in
        compact execution) or every frame ("all"). full(h): the backbone's own attention module
        on every frame (masked execution with every frame kept: the backbone's call, bit for bit)."""
        if self.cfg.attention_keys == "all":
            return self.token_attention(name, x, attn, norm, norm(x), None, _identity, full=full)
        if self.execution == "compact":
            c = self.compact(name, x)
            with profiled(module_label(name)):
                out = packed_self_attention(attn, norm(c.packed), c.cu_seqlens, x.shape[1])
            return self.add_kept(name, x, out, c.index)
        mask = self.mask(name)
        with profiled(module_label(name)):
            keys = mask > 0
            ops.count_host_reads()
            if bool(keys.all()):
                out = full(norm(x))
            else:
                h = norm(x)
                keys = keys | ~keys.any(-1, keepdim=True)  # nothing kept: any keys (the output is masked out)
                q, k, v = (p(h).transpose(1, 2) for p in (attn.query, attn.key, attn.value))
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :],
                                                                     scale=attn.scale)
                out = attn.out(o.transpose(1, 2))
        return self.add_masked(name, x, out, mask=mask)


def _identity(x: Tensor) -> Tensor:
    return x


class UtteranceGate:
    """Per-utterance decisions: logits (B, M, 2). Compact execution reads every module's
    decisions to the host once per layer; inplace and fill (residual modules only) as for
    PositionGate."""

    def __init__(self, logits: Tensor, names, cfg: GateConfig, execution: str, training: bool,
                 record: GateRecord, prefix: str, inplace: bool = False, fill: Tensor | None = None):
        self.logits, self.names, self.cfg = logits, names, cfg
        self.execution, self.training = execution, training
        self.record, self.prefix = record, prefix
        self.inplace = inplace and not torch.is_grad_enabled()
        self.fill = fill
        self.kept_rows = None
        if execution == "compact":
            with profiled("compaction"):
                keep = gate_mask(logits, training=False, threshold=cfg.threshold) > 0  # (B, M)
                ops.count_host_reads()
                host = keep.t().tolist()
                self.kept_rows = {n: [b for b, k in enumerate(host[m]) if k] for m, n in enumerate(names)}

    def mask(self, name: str) -> Tensor:
        """(B,) float mask; with gradients in masked training."""
        with profiled("gate"):
            logits = self.logits[:, self.names.index(name)]
            mask = gate_mask(logits, training=self.training and self.execution == "masked",
                             threshold=self.cfg.threshold, tau=self.cfg.tau)
            self.record.add(f"{self.prefix}.{name}", mask)
        return mask

    def _on_kept_rows(self, name: str, x: Tensor, fn, row_args):
        """(kept rows, fn on those rows), or None when no utterance keeps the module."""
        with profiled("compaction"):
            kept = self.kept_rows[name]
            if not kept:
                return None
            rows = device_rows(kept, x.device)
            if len(kept) < x.shape[0]:
                x, row_args = x.index_select(0, rows), tuple(a.index_select(0, rows) for a in row_args)
        with profiled(module_label(name)):
            return rows, fn(x, *row_args)

    def _masked(self, name: str, x: Tensor, fn, row_args) -> Tensor:
        with profiled(module_label(name)):
            return fn(x, *row_args)

    def residual(self, name: str, x: Tensor, fn, scale: float = 1.0, row_args=()) -> Tensor:
        mask = self.mask(name)
        fill = module_fill(self.fill, self.names, name, x.dtype)
        if self.execution == "masked":
            y = self._masked(name, x, fn, row_args)
            with profiled("scatter"):
                m = mask.to(x.dtype)[:, None, None]
                out = x + scale * y * m
                return out if fill is None else out + (1 - m) * fill
        done = self._on_kept_rows(name, x, fn, row_args)
        with profiled("scatter"):
            if fill is not None:  # every utterance gets the fill; the kept ones trade it for their output
                x = x.add_(fill) if self.inplace else x + fill
            if done is None:
                return x
            rows, y = done
            if fill is not None:
                y, scale = scale * y - fill, 1.0
            if self.inplace:
                return x.index_add_(0, rows, y, alpha=scale)
            return x.index_add(0, rows, y, alpha=scale)

    def branch(self, name: str, x: Tensor, fn, row_args=()) -> Tensor:
        """A parallel branch's output, zeros for utterances that skip it."""
        mask = self.mask(name)
        if self.execution == "masked":
            y = self._masked(name, x, fn, row_args)
            with profiled("scatter"):
                return y * mask.to(x.dtype)[:, None, None]
        done = self._on_kept_rows(name, x, fn, row_args)
        with profiled("scatter"):
            out = torch.zeros_like(x)
            if done is not None:
                rows, y = done
                out = out.index_copy(0, rows, y)
        return out
