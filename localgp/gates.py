"""Gates: the straight-through Gumbel-softmax estimator (SGSE), the sparsity loss, and the two
gate predictors of the papers, globalGP (utterance-wise, one predictor for the whole model)
and localGP (per layer, conditioned on external context through cross-attention).

A gate emits two-class logits (..., 2) per gated unit, class 1 = keep. Training samples a hard
keep/skip decision and passes gradients through the soft probability; inference thresholds the
keep probability. Both give a binary mask in the forward pass, so the computation trained is
the computation run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

KEEP = 1  # index of the keep class in the two-class logits


def keep_probability(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=-1)[..., KEEP]


def gate_mask(logits: Tensor, *, training: bool, threshold: float = 0.5, tau: float = 1.0) -> Tensor:
    """Binary keep mask (float, 1 = keep) from two-class logits (..., 2).

    training: straight-through Gumbel-softmax: the forward value is the hard sample, the
    gradient is that of the Gumbel-softmax probability of keeping (temperature tau).
    inference: keep where softmax(logits)[1] > threshold.
    """
    if logits.shape[-1] != 2:
        raise ValueError(f"gate_mask: logits must end in 2 classes (skip, keep), got {tuple(logits.shape)}")
    if not training:
        # softmax(l)[1] > threshold  <=>  l[1] - l[0] > logit(threshold), in float32: exactly
        # the decision the fused gate_compact kernels take, so masked and compact agree.
        margin = logits[..., KEEP].float() - logits[..., 1 - KEEP].float()
        return (margin > math.log(threshold / (1 - threshold))).float()
    uniform = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1 - 1e-10)
    gumbel = -torch.log(-torch.log(uniform))
    soft = torch.softmax((logits.float() + gumbel) / tau, dim=-1)[..., KEEP]
    hard = (soft > 0.5).float()  # argmax of the two perturbed classes
    # soft - soft.detach() is exactly 0 forward (binary mask) and carries soft's gradient.
    return hard + (soft - soft.detach())


@dataclass
class GateRecord:
    """The masks one forward pass applied, kept for the sparsity loss and reports."""

    masks: dict[str, Tensor] = field(default_factory=dict)  # name -> mask (B,) or (B, T)
    valid: dict[str, Tensor] = field(default_factory=dict)  # name -> bool, same shape
    # name -> bool, same shape: the valid positions the gates decided, where a rule decided the others
    # (GateConfig.prior: skipped); absent: every valid position
    decided: dict[str, Tensor] = field(default_factory=dict)

    def add(self, name: str, mask: Tensor, valid: Tensor | None = None, decided: Tensor | None = None) -> None:
        self.masks[name] = mask
        self.valid[name] = torch.ones_like(mask, dtype=torch.bool) if valid is None else valid
        if decided is not None:
            self.decided[name] = decided

    def sparsity(self, part: str | None = None) -> Tensor:
        """Fraction of gated units (module x frame/token) skipped over the valid positions the
        gates decided (what the sparsity loss targets); part ('encoder', 'decoder'): of the
        masks whose names start with it only."""
        names = [k for k in self.masks if part is None or k.startswith(f"{part}.")]
        if not names:
            raise ValueError(f"sparsity: no {part + ' ' if part else ''}gate was applied in this forward pass")
        use = [self.valid[k] & self.decided[k] if k in self.decided else self.valid[k] for k in names]
        # in float32 whatever the masks' dtype: a bfloat16 sum of thousands of ones is off by tens
        kept = sum((self.masks[k] * u).sum(dtype=torch.float32) for k, u in zip(names, use, strict=True))
        total = sum(u.sum() for u in use)
        return 1 - kept / total.clamp(min=1)

    def sparsity_per_module(self) -> dict[str, float]:
        """Skipped fraction per module kind (e.g. 'encoder.ffn1'), over all layers."""
        kept: dict[str, float] = {}
        total: dict[str, float] = {}
        for name, mask in self.masks.items():
            kind = module_kind(name)
            valid = self.valid[name]
            kept[kind] = kept.get(kind, 0.0) + float((mask.detach() * valid).sum())
            total[kind] = total.get(kind, 0.0) + float(valid.sum())
        return {k: 1 - kept[k] / total[k] if total[k] else 0.0 for k in kept}


def utterance_record(record: GateRecord, b: int) -> GateRecord:
    """The masks of utterance b of a batch's record."""
    return GateRecord({k: m[b : b + 1] for k, m in record.masks.items()},
                      {k: v[b : b + 1] for k, v in record.valid.items()},
                      {k: d[b : b + 1] for k, d in record.decided.items()})


def module_kind(name: str) -> str:
    """'encoder.3.ffn1' -> 'encoder.ffn1'."""
    parts = name.split(".")
    return ".".join(p for p in parts if not p.isdigit())


def sparsity_loss(sparsity: Tensor, target: float, alpha: float = 1.0) -> Tensor:
    """alpha * (|s - s_target| + (s - s_target)^2): the squared term of the globalGP paper."""
    gap = sparsity - target
    return alpha * (gap.abs() + gap**2)


def random_keep_logits(shape, keep: float, generator: torch.Generator, device=None) -> Tensor:
    """Logits (*shape, 2) whose decisions keep a random `keep` share: forced masks for
    benchmarks and tests."""
    return mask_logits(torch.rand(shape, generator=generator) < keep).to(device)


def mask_logits(kept: Tensor) -> Tensor:
    """Logits (*kept.shape, 2) whose decisions are the bool mask `kept` (margin 4: kept at any
    threshold up to 0.98)."""
    margin = torch.where(kept, 4.0, -4.0)
    return torch.stack([-margin / 2, margin / 2], dim=-1)


def align_to_frames(sequence: Tensor, frames: int) -> Tensor:
    """(B, Tc, D) -> (B, frames, D): trimmed, or the last frame repeated (the paper's rule)."""
    if sequence.shape[1] == 0:
        raise ValueError("align_to_frames: the context sequence is empty")
    if sequence.shape[1] >= frames:
        return sequence[:, :frames]
    tail = sequence[:, -1:].expand(-1, frames - sequence.shape[1], -1)
    return torch.cat([sequence, tail], dim=1)


class LocalGatePredictor(nn.Module):
    """localGP for one layer (Algorithm 1 of the localGP paper).

    The K context sequences (B, K, Tc, D), projected to d_model and aligned to the frames,
    give keys and values after a linear layer; the layer input x (B, T, D) is the query.
    Cross-attention with a residual gives h; a linear layer turns h into two-class logits for
    each of the layer's gated modules. The attention result is added to the layer input
    (through `inject`, zero-initialised so that a freshly gated model computes exactly what
    the original did) and to the context handed to the next layer. inject=False leaves the
    layer input alone: the gates only decide (gates trained on a frozen pretrained model, whose
    computation a trained injection would change).
    """

    def __init__(self, d_model: int, num_modules: int, heads: int = 4, inject: bool = True, width: int | None = None):
        super().__init__()
        self.num_modules = num_modules
        self.norm = nn.LayerNorm(d_model)
        # width < d_model: the cross-attention runs in `width` dims, the frames projected in and the
        # result back out (a cheaper predictor: ~2*d_model*width MACs a frame instead of 2*d_model^2)
        width = d_model if width is None else width
        self.query_in = nn.Linear(d_model, width) if width != d_model else None
        self.attended_out = nn.Linear(width, d_model) if width != d_model else None
        self.key_value = nn.Linear(d_model, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        # Normalised features keep the logits in the range where the Gumbel-softmax has
        # gradients (un-normalised layer inputs saturate it within a few steps).
        self.logits_norm = nn.LayerNorm(d_model)
        self.to_logits = nn.Linear(d_model, 2 * num_modules)
        self.inject = nn.Linear(d_model, d_model) if inject else None
        if inject:
            nn.init.zeros_(self.inject.weight)
            nn.init.zeros_(self.inject.bias)
        # Start by keeping everything: the keep logit leads by 3 (p_keep ~ 0.95).
        nn.init.zeros_(self.to_logits.weight)
        with torch.no_grad():
            self.to_logits.bias.view(num_modules, 2).copy_(torch.tensor([-1.5, 1.5]))

    def forward(self, x: Tensor, context: Tensor, context_pad: Tensor | None = None):
        """x (B, T, D); context (B, K, Tc, D); context_pad (B, K*Tc) bool, True = padding.

        Returns logits (B, T, M, 2), the layer input with the attention result added, and the
        context for the next layer.
        """
        B, K, Tc, D = context.shape
        kv = self.key_value(context.reshape(B, K * Tc, D))
        attended, _ = self.attention(self._query(x), kv, kv, key_padding_mask=context_pad, need_weights=False)
        attended = self._out(attended)
        h = x + attended
        logits = self.to_logits(self.logits_norm(h)).view(*x.shape[:2], self.num_modules, 2)
        if Tc == x.shape[1]:  # aligned to the frames: add the result to every context stream
            context = context + attended[:, None]
        return logits, self._injected(x, attended), context

    def _query(self, x: Tensor) -> Tensor:
        q = self.norm(x)
        return q if self.query_in is None else self.query_in(q)

    def _out(self, attended: Tensor) -> Tensor:
        return attended if self.attended_out is None else self.attended_out(attended)

    def _injected(self, x: Tensor, attended: Tensor) -> Tensor:
        return x if self.inject is None else x + self.inject(attended)

    # Incremental decoding: the context's keys and values once per utterance, then one query
    # per hypothesis and step. Computes what forward() computes for that token.
    def project_context(self, context: Tensor, context_pad: Tensor | None = None):
        """context (B, K, Tc, D) -> keys, values (B, H, K*Tc, Dh) and allowed (B, K*Tc) bool or None."""
        B, K, Tc, D = context.shape
        kv = self.key_value(context.reshape(B, K * Tc, D))
        _, w_k, w_v = self.attention.in_proj_weight.chunk(3)
        _, b_k, b_v = self.attention.in_proj_bias.chunk(3)
        heads = self.attention.num_heads
        keys = nn.functional.linear(kv, w_k, b_k).unflatten(-1, (heads, -1)).transpose(1, 2)
        values = nn.functional.linear(kv, w_v, b_v).unflatten(-1, (heads, -1)).transpose(1, 2)
        return keys, values, None if context_pad is None else ~context_pad

    def step(self, x: Tensor, projected, rows_of_utterance) -> tuple[Tensor, Tensor]:
        """x (n, D) one token per row; projected: project_context()'s output; rows_of_utterance:
        see attention.memory_attention. Returns logits (n, M, 2) and x with the result injected."""
        from localgp.model.attention import memory_attention

        w_q = self.attention.in_proj_weight.chunk(3)[0]
        b_q = self.attention.in_proj_bias.chunk(3)[0]
        q = nn.functional.linear(self._query(x), w_q, b_q).unflatten(-1, (self.attention.num_heads, -1))
        attended = self._out(self.attention.out_proj(memory_attention(q, *projected, rows_of_utterance).flatten(-2)))
        logits = self.to_logits(self.logits_norm(x + attended)).view(x.shape[0], self.num_modules, 2)
        return logits, self._injected(x, attended)


class GlobalGatePredictor(nn.Module):
    """globalGP: one predictor for every gated module of encoder and decoder, utterance-wise.

    Inputs: the discrete context, the prompt's language and task token ids (B, P), and the
    time-pooled encoder input (B, D). Output: logits (B, num_units, 2).
    """

    def __init__(self, d_model: int, vocab_size: int, num_units: int, prompt_dim: int = 64, hidden: int = 256):
        super().__init__()
        self.num_units = num_units
        self.prompt_embedding = nn.Embedding(vocab_size, prompt_dim)
        self.net = nn.Sequential(
            nn.LayerNorm(prompt_dim + d_model), nn.Linear(prompt_dim + d_model, hidden), nn.GELU(),
            nn.Linear(hidden, 2 * num_units),
        )
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.view(num_units, 2).copy_(torch.tensor([-1.5, 1.5]))

    def forward(self, prompt_ids: Tensor, pooled_input: Tensor) -> Tensor:
        features = torch.cat([self.prompt_embedding(prompt_ids).mean(1), pooled_input], dim=-1)
        return self.net(features).view(-1, self.num_units, 2)
