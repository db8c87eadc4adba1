"""A gated E-Branchformer encoder: ESPnet's EBranchformerEncoder whose layers run with pruning
masks, either `masked` (every module computed, output multiplied by the mask: the papers'
implementation, kept as the reference) or `compact` (only the kept frames / utterances are
computed, with the fused ops). A third execution, `dense`, runs no gate at all: ESPnet's
computation through this code, the baseline benchmarks measure pruning against. The layers' own
modules and state-dict keys are untouched; the gate predictors live under `encoder.pruning`.
Profiler labels (`localgp.subsampling`, `.gate`, `.ffn1`, ...) are described in gating.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from localgp import ops
from localgp.gates import GateRecord
from localgp.model.attention import packed_self_attention
from localgp.backbones.owsm.weights import EspnetAttention
from localgp.model.config import DENSE, ENCODER_MODULES, EXECUTIONS, GateConfig
from localgp.model.gating import NoGate, PositionGate, UtteranceGate, profiled
from localgp.model.pruning import EncoderPruning, GatedEncoderMixin, init_encoder_gating
from localgp.quiet import espnet_imports

with espnet_imports():  # ESPnet's modules, without their notices (localgp.quiet)
    from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
    from espnet.nets.pytorch_backend.transformer.attention import MultiHeadedAttention
    from espnet.nets.pytorch_backend.transformer.subsampling import TooShortUttError, check_short_utt
    from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder

ENCODER_EXECUTIONS = (*EXECUTIONS, DENSE)


class GatedEBranchformerEncoder(GatedEncoderMixin, EBranchformerEncoder):
    """Made by `gate_encoder()` from an EBranchformerEncoder; not constructed directly."""

    @property
    def gated_layers(self):
        return self.encoders

    # ------------------------------------------------------------------ forward
    def forward(self, xs_pad: Tensor, ilens: Tensor, prev_states=None, masks=None, ctc=None,
                max_layer=None, return_all_hs=False):
        if self.execution not in ENCODER_EXECUTIONS:
            raise ValueError(f"encoder.execution must be one of {ENCODER_EXECUTIONS}, got {self.execution!r}")
        if self.execution == "compact" and self.training and self.forced_keep is None:
            raise RuntimeError("compact execution skips the gates' gradients: train in masked mode, run compact")
        masks = (~make_pad_mask(ilens)[:, None, :]).to(xs_pad.device) if masks is None else ~masks[:, None, :]
        short, limit = check_short_utt(self.embed, xs_pad.size(1))
        if short:
            raise TooShortUttError(f"has {xs_pad.size(1)} frames, subsampling needs more than {limit}",
                                   xs_pad.size(1), limit)
        with profiled("subsampling"):
            xs_pad, masks = self.embed(xs_pad, masks)  # absolute positions: a tensor (gate_encoder checked)
        valid = masks.squeeze(1)
        lengths = valid.sum(-1)
        cfg = self.pruning.config
        gated = self.execution != DENSE
        context = None
        if gated:
            with profiled("gate"):
                context = self.start_gates(xs_pad, valid)
        record = GateRecord()
        for index, layer in enumerate(self.encoders):
            if max_layer is not None and index >= max_layer:
                break
            logits = None
            if gated:
                with profiled("gate"):
                    logits, xs_pad, context = self.layer_logits(index, xs_pad, context, valid)
            # In place: the layers' inputs are this forward's own tensors (the embedding's output on).
            xs_pad = run_layer(layer, xs_pad, masks, lengths, logits, cfg, self.execution, record, f"encoder.{index}",
                               inplace=True)
        self.last_record = record
        return self.after_norm(xs_pad), lengths, None


def run_layer(layer, x: Tensor, pad_mask: Tensor, lengths: Tensor, logits: Tensor | None, cfg: GateConfig,
              execution: str, record: GateRecord, prefix: str, inplace: bool = False) -> Tensor:
    """One E-Branchformer layer under its gates. x (B, T, D); pad_mask (B, 1, T).
    execution "dense" takes no logits and runs every module on every frame. inplace: compact
    execution may overwrite x (inference only; the caller does not need x afterwards)."""
    names = ENCODER_MODULES[cfg.encoder]
    valid = pad_mask.squeeze(1)
    ffn1 = lambda h, *_: layer.dropout(layer.feed_forward_macaron(layer.norm_ff_macaron(h)))  # noqa: E731
    ffn2 = lambda h, *_: layer.dropout(layer.feed_forward(layer.norm_ff(h)))  # noqa: E731
    if execution == DENSE:
        gate = NoGate()
        x = gate.residual("ffn1", x, ffn1, layer.ff_scale)
        with profiled("attention"):
            x_attn = _attention(layer, x, pad_mask)
        with profiled("cgmlp"):
            x_mlp = _cgmlp(layer, x, pad_mask)
    elif cfg.encoder == "temporal":
        gate = PositionGate(logits, valid, lengths, names, cfg, execution, layer.training, record, prefix, inplace)
        x = gate.residual("ffn1", x, ffn1, layer.ff_scale)
        x_attn = _temporal_attention(gate, layer, x, pad_mask)
        with profiled("cgmlp"):
            x_mlp = _cgmlp(layer, x, pad_mask)
    else:
        gate = UtteranceGate(logits, names, cfg, execution, layer.training, record, prefix, inplace)
        x = gate.residual("ffn1", x, ffn1, layer.ff_scale)
        x_attn = gate.branch("attn", x, lambda h, m: _attention(layer, h, m), (pad_mask,))
        x_mlp = gate.branch("cgmlp", x, lambda h, m: _cgmlp(layer, h, m), (pad_mask,))
    with profiled("merge"):
        merged = torch.cat([x_attn, layer.dropout(x_mlp)], dim=-1)
        fused = layer.depthwise_conv_fusion(merged.transpose(1, 2)).transpose(1, 2)
        x = x + layer.dropout(layer.merge_proj(merged + fused))
    x = gate.residual("ffn2", x, ffn2, layer.ff_scale)
    return layer.norm_final(x)


def _attention(layer, x: Tensor, pad_mask: Tensor) -> Tensor:
    h = layer.norm_mha(x)
    return layer.dropout(layer.attn(h, h, h, pad_mask))


def _cgmlp(layer, x: Tensor, pad_mask: Tensor) -> Tensor:
    out = layer.cgmlp(layer.norm_mlp(x), pad_mask)
    return out[0] if isinstance(out, tuple) else out


def _temporal_attention(gate: PositionGate, layer, x: Tensor, pad_mask: Tensor) -> Tensor:
    """The attention branch: queries and keys are the kept frames only; zeros elsewhere."""
    if gate.execution == "compact":
        c = gate.compact("attn", x)
        with profiled("attention"):
            out = packed_self_attention(EspnetAttention(layer.attn), layer.norm_mha(c.packed), c.cu_seqlens, x.shape[1])
            out = layer.dropout(out)
        with profiled("scatter"):
            return ops.scatter_rows(out, c.index, x.shape)
    mask = gate.mask("attn")
    with profiled("attention"):
        out = _attention(layer, x, pad_mask & (mask > 0)[:, None, :])
    with profiled("scatter"):
        return out * mask.to(x.dtype)[..., None]


def gate_encoder(encoder: EBranchformerEncoder, config: GateConfig, vocab_size: int = 0,
                 decoder_units: int = 0) -> GatedEBranchformerEncoder:
    """Turns an ESPnet EBranchformerEncoder into a gated one, in place, reusing its parameters.

    Its state-dict keys are unchanged; the gates add keys under `pruning.`. Starts in masked mode.
    globalGP (config.predictor == "global") needs `vocab_size` for its prompt embedding, and
    `decoder_units` when it also decides for a gated decoder.
    """
    if not isinstance(encoder, EBranchformerEncoder):
        raise TypeError(f"gate_encoder: expected an ESPnet EBranchformerEncoder, got {type(encoder).__name__}")
    if config.encoder is None:
        raise ValueError("gate_encoder: GateConfig.encoder is None (the encoder is not gated)")
    first = encoder.encoders[0]
    if first.feed_forward is None or first.feed_forward_macaron is None:
        raise ValueError("gate_encoder: the layers need both FFNs (use_ffn and macaron_ffn, as in OWSM)")
    # Compact attention runs the module's projections on kept frames with absolute positions
    # added before the first layer; relative positions would need each kept frame's offsets.
    if type(first.attn) is not MultiHeadedAttention:
        raise ValueError(f"gate_encoder: the layers' attention must be plain self-attention (attention_layer_type="
                         f"selfattn with absolute positions, as in OWSM v3.1), got {type(first.attn).__name__}")
    if config.attention_keys != "kept":
        raise ValueError("gate_encoder: OWSM's gated attention sees the kept frames only (GateConfig.attention_keys="
                         "'kept'); 'all' is implemented for Whisper")
    if config.prior is not None or config.stand_in_rank is not None:
        raise ValueError("gate_encoder: GateConfig.prior and stand_in_rank are implemented for Whisper's encoder, "
                         "not OWSM's")
    if encoder.interctc_layer_idx:
        raise ValueError("gate_encoder: intermediate CTC layers (interctc_layer_idx) are not supported")
    encoder.__class__ = GatedEBranchformerEncoder
    modules = ENCODER_MODULES[config.encoder]
    init_encoder_gating(encoder, EncoderPruning(config, encoder.output_size(), len(encoder.encoders), modules,
                                                vocab_size, decoder_units))
    return encoder
