"""A gated E-Branchformer encoder: ESPnet's EBranchformerEncoder whose layers run with pruning
masks, either `masked` (every module computed, output multiplied by the mask: the papers'
implementation, kept as the reference) or `compact` (only the kept frames / utterances are
computed, with the fused ops). The layers' own modules and state-dict keys are untouched; the
gate predictors live under `encoder.pruning`.
"""

from __future__ import annotations

import torch
from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
from espnet.nets.pytorch_backend.transformer.subsampling import TooShortUttError, check_short_utt
from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder
from torch import Tensor, nn

from localgp import ops
from localgp.gates import (
    GateRecord,
    GlobalGatePredictor,
    LocalGatePredictor,
    align_to_frames,
    gate_mask,
    random_keep_logits,
)
from localgp.model.attention import packed_self_attention
from localgp.model.config import ENCODER_MODULES, EXECUTIONS, GateConfig


class EncoderPruning(nn.Module):
    """The encoder's gate predictors and context projections (state-dict prefix `pruning.`)."""

    def __init__(self, config: GateConfig, d_model: int, num_layers: int):
        super().__init__()
        self.config = config
        self.modules_per_layer = ENCODER_MODULES[config.encoder]
        self.context_proj = nn.ModuleDict()
        self.gates = nn.ModuleList()
        if config.predictor == "local":
            for name, size in config.contexts:
                self.context_proj[name] = nn.Linear(d_model if name == "front" else size, d_model)
            self.gates.extend(
                LocalGatePredictor(d_model, len(self.modules_per_layer), config.heads) for _ in range(num_layers)
            )


class GatedEBranchformerEncoder(EBranchformerEncoder):
    """Made by `gate_encoder()` from an EBranchformerEncoder; not constructed directly."""

    pruning: EncoderPruning
    execution: str  # "masked" or "compact"
    forced_keep: float | None  # random masks keeping this share, instead of the gates
    forced_generator: torch.Generator
    external_context: dict[str, Tensor]  # name -> (B, Tc, size), set by set_context()
    global_logits: Tensor | None  # (B, layers, modules, 2) from globalGP, set by the model
    last_record: GateRecord | None

    # ------------------------------------------------------------------ set-up
    def set_context(self, **streams: Tensor) -> None:
        """External context sequences for localGP, e.g. speaker=(B, Tc, 192). Kept until changed."""
        expected = {name for name, _ in self.pruning.config.contexts if name != "front"}
        unknown = set(streams) - expected
        if unknown:
            raise ValueError(f"set_context: unknown context {sorted(unknown)}; this encoder uses {sorted(expected)}")
        for name, seq in streams.items():
            if seq.dim() == 2:  # an utterance-level embedding (B, size)
                seq = seq[:, None]
            if seq.dim() != 3:
                raise ValueError(f"set_context: {name} must be (B, Tc, size) or (B, size), got {tuple(seq.shape)}")
            self.external_context[name] = seq

    # ------------------------------------------------------------------ gates
    def _context(self, front: Tensor, frames: int) -> Tensor:
        """(B, K, T, D): every context stream projected to d_model and aligned to the frames."""
        streams = []
        for name, _ in self.pruning.config.contexts:
            if name == "front":
                seq = front
            elif name in self.external_context:
                seq = self.external_context[name]
            else:
                raise ValueError(f"encoder: context {name!r} is configured but was not given; call set_context({name}=...)")
            if seq.shape[0] != front.shape[0]:
                raise ValueError(f"encoder: context {name!r} has batch {seq.shape[0]}, speech has {front.shape[0]}")
            proj = self.pruning.context_proj[name]
            streams.append(align_to_frames(proj(seq.to(front.dtype)), frames))
        return torch.stack(streams, dim=1)

    def _layer_logits(self, index: int, x: Tensor, context: Tensor | None, valid: Tensor):
        """Logits of layer `index`: (B, T, M, 2) temporal, (B, M, 2) utterance-wise."""
        cfg = self.pruning.config
        shape_tail = (len(self.pruning.modules_per_layer),)
        temporal = cfg.encoder == "temporal"
        if self.forced_keep is not None:
            shape = (*x.shape[:2], *shape_tail) if temporal else (x.shape[0], *shape_tail)
            return random_keep_logits(shape, self.forced_keep, self.forced_generator, x.device).to(x.dtype), x, context
        if cfg.predictor == "global":
            return self.global_logits[:, index], x, context
        logits, x, context = self.pruning.gates[index](x, context)
        if not temporal:  # utterance-wise: pool the frame logits over the valid frames
            weights = valid[..., None, None].to(logits.dtype)
            logits = (logits * weights).sum(1) / weights.sum(1).clamp(min=1)
        return logits, x, context

    # ------------------------------------------------------------------ forward
    def forward(self, xs_pad: Tensor, ilens: Tensor, prev_states=None, masks=None, ctc=None,
                max_layer=None, return_all_hs=False):
        if self.execution not in EXECUTIONS:
            raise ValueError(f"encoder.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.execution == "compact" and self.training and self.forced_keep is None:
            raise RuntimeError("compact execution skips the gates' gradients: train in masked mode, run compact")
        if self.interctc_layer_idx:
            raise NotImplementedError("gated encoder: intermediate CTC layers are not supported")
        masks = (~make_pad_mask(ilens)[:, None, :]).to(xs_pad.device) if masks is None else ~masks[:, None, :]
        short, limit = check_short_utt(self.embed, xs_pad.size(1))
        if short:
            raise TooShortUttError(f"has {xs_pad.size(1)} frames, subsampling needs more than {limit}",
                                   xs_pad.size(1), limit)
        xs_pad, masks = self.embed(xs_pad, masks)
        if isinstance(xs_pad, tuple):
            raise NotImplementedError("gated encoder: relative positional encodings are not supported "
                                      "(OWSM v3.1 uses absolute positions)")
        valid = masks.squeeze(1)
        lengths = valid.sum(-1)
        cfg = self.pruning.config
        context = None
        if cfg.predictor == "local" and self.forced_keep is None:
            context = self._context(xs_pad, xs_pad.shape[1])
        record = GateRecord()
        for index, layer in enumerate(self.encoders):
            if max_layer is not None and index >= max_layer:
                break
            logits, xs_pad, context = self._layer_logits(index, xs_pad, context, valid)
            xs_pad = run_layer(layer, xs_pad, masks, lengths, logits, cfg, self.execution, record, f"encoder.{index}")
        self.last_record = record
        return self.after_norm(xs_pad), lengths, None


def run_layer(layer, x: Tensor, pad_mask: Tensor, lengths: Tensor, logits: Tensor, cfg: GateConfig,
              execution: str, record: GateRecord, prefix: str) -> Tensor:
    """One E-Branchformer layer under its gates. x (B, T, D); pad_mask (B, 1, T)."""
    names = ENCODER_MODULES[cfg.encoder]
    valid = pad_mask.squeeze(1)
    training = layer.training
    if cfg.encoder == "temporal":
        gate = TemporalGate(logits, valid, lengths, cfg, execution, training, record, prefix, names)
    else:
        gate = UtteranceGate(logits, cfg, execution, training, record, prefix, names)

    x = gate.residual("ffn1", x, lambda h: layer.feed_forward_macaron(layer.norm_ff_macaron(h)), layer)
    x_attn = gate.attention(layer, x, pad_mask)
    if "cgmlp" in names:
        x_mlp = gate.branch("cgmlp", x, lambda h, m: _cgmlp(layer, h, m), pad_mask)
    else:
        x_mlp = _cgmlp(layer, x, pad_mask)
    x_mlp = layer.dropout(x_mlp)
    merged = torch.cat([x_attn, x_mlp], dim=-1)
    fused = layer.depthwise_conv_fusion(merged.transpose(1, 2)).transpose(1, 2)
    x = x + layer.dropout(layer.merge_proj(merged + fused))
    x = gate.residual("ffn2", x, lambda h: layer.feed_forward(layer.norm_ff(h)), layer)
    return layer.norm_final(x)


def _cgmlp(layer, x: Tensor, pad_mask: Tensor) -> Tensor:
    out = layer.cgmlp(layer.norm_mlp(x), pad_mask)
    return out[0] if isinstance(out, tuple) else out


class TemporalGate:
    """Per-frame decisions for FFN1, attention and FFN2 of one layer."""

    def __init__(self, logits, valid, lengths, cfg, execution, training, record, prefix, names):
        self.logits, self.valid, self.lengths = logits, valid, lengths
        self.cfg, self.execution, self.training = cfg, execution, training
        self.record, self.prefix, self.names = record, prefix, names

    def _logits(self, name):
        return self.logits[:, :, self.names.index(name)]

    def _mask(self, name):
        """Masked mode: (B, T) float mask; padding counts as skipped."""
        mask = gate_mask(self._logits(name), training=self.training, threshold=self.cfg.threshold, tau=self.cfg.tau)
        mask = mask * self.valid
        self.record.add(f"{self.prefix}.{name}", mask, self.valid)
        return mask

    def residual(self, name, x, module, layer):
        """x + ff_scale * module(x) on the kept frames."""
        if self.execution == "compact":
            c = ops.gate_compact(x, self._logits(name), self.lengths, self.cfg.threshold)
            self.record.add(f"{self.prefix}.{name}", c.keep.to(x.dtype), self.valid)
            return ops.scatter_pad(layer.dropout(module(c.packed)), c.index, x, layer.ff_scale)
        mask = self._mask(name).to(x.dtype)
        return x + layer.ff_scale * layer.dropout(module(x)) * mask[..., None]

    def attention(self, layer, x, pad_mask):
        """The attention branch: queries and keys are the kept frames; zeros at skipped frames."""
        if self.execution == "compact":
            c = ops.gate_compact(x, self._logits("attn"), self.lengths, self.cfg.threshold)
            self.record.add(f"{self.prefix}.attn", c.keep.to(x.dtype), self.valid)
            out = packed_self_attention(layer.attn, layer.norm_mha(c.packed), c.cu_seqlens, x.shape[1])
            return ops.scatter_pad(layer.dropout(out), c.index, torch.zeros_like(x))
        mask = self._mask("attn")
        h = layer.norm_mha(x)
        keys = pad_mask & (mask > 0)[:, None, :]
        return layer.dropout(layer.attn(h, h, h, keys)) * mask.to(x.dtype)[..., None]


class UtteranceGate:
    """Per-utterance decisions: a skipped module is not run for that utterance at all."""

    def __init__(self, logits, cfg, execution, training, record, prefix, names):
        self.logits, self.cfg, self.execution, self.training = logits, cfg, execution, training
        self.record, self.prefix, self.names = record, prefix, names

    def _decision(self, name):
        """(B,) float mask (masked mode, with gradients when training) or kept rows (compact)."""
        logits = self.logits[:, self.names.index(name)]
        mask = gate_mask(logits, training=self.training and self.execution == "masked",
                         threshold=self.cfg.threshold, tau=self.cfg.tau)
        self.record.add(f"{self.prefix}.{name}", mask)
        return mask

    @staticmethod
    def _run_rows(mask, x, fn, *row_args):
        """(kept rows, fn on them) or None when no utterance keeps the module."""
        rows = mask.nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        if rows.numel() == x.shape[0]:
            return rows, fn(x, *row_args)
        return rows, fn(x[rows], *(a[rows] for a in row_args))

    def residual(self, name, x, module, layer):
        mask = self._decision(name)
        if self.execution == "masked":
            return x + layer.ff_scale * layer.dropout(module(x)) * mask.to(x.dtype)[:, None, None]
        done = self._run_rows(mask, x, module)
        if done is None:
            return x
        rows, y = done
        return x.index_add(0, rows, layer.ff_scale * layer.dropout(y))

    def branch(self, name, x, fn, pad_mask):
        """A parallel branch's output, zeros for utterances that skip it."""
        mask = self._decision(name)
        if self.execution == "masked":
            return fn(x, pad_mask) * mask.to(x.dtype)[:, None, None]
        done = self._run_rows(mask, x, fn, pad_mask)
        out = torch.zeros_like(x)
        if done is not None:
            rows, y = done
            out = out.index_copy(0, rows, y)
        return out

    def attention(self, layer, x, pad_mask):
        def attend(h, m):
            h = layer.norm_mha(h)
            return layer.dropout(layer.attn(h, h, h, m))

        return self.branch("attn", x, attend, pad_mask)


def gate_encoder(encoder: EBranchformerEncoder, config: GateConfig) -> GatedEBranchformerEncoder:
    """Turns an ESPnet EBranchformerEncoder into a gated one, in place, reusing its parameters.

    Its state-dict keys are unchanged; the gates add keys under `pruning.`. Starts in masked mode.
    """
    if not isinstance(encoder, EBranchformerEncoder):
        raise TypeError(f"gate_encoder: expected an ESPnet EBranchformerEncoder, got {type(encoder).__name__}")
    if config.encoder is None:
        raise ValueError("gate_encoder: GateConfig.encoder is None (the encoder is not gated)")
    first = encoder.encoders[0]
    if first.feed_forward is None or first.feed_forward_macaron is None:
        raise ValueError("gate_encoder: the layers need both FFNs (use_ffn and macaron_ffn, as in OWSM)")
    encoder.__class__ = GatedEBranchformerEncoder
    d_model = encoder.output_size()
    encoder.pruning = EncoderPruning(config, d_model, len(encoder.encoders)).to(next(encoder.parameters()).device)
    encoder.execution = "masked"
    encoder.forced_keep = None
    encoder.forced_generator = torch.Generator().manual_seed(0)
    encoder.external_context = {}
    encoder.global_logits = None
    encoder.last_record = None
    return encoder
