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
from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
from espnet.nets.pytorch_backend.transformer.attention import MultiHeadedAttention
from espnet.nets.pytorch_backend.transformer.subsampling import TooShortUttError, check_short_utt
from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder
from torch import Tensor, nn

from localgp import ops
from localgp.gates import GateRecord, GlobalGatePredictor, LocalGatePredictor, align_to_frames, random_keep_logits
from localgp.model.attention import packed_self_attention
from localgp.model.config import DENSE, ENCODER_MODULES, EXECUTIONS, GateConfig
from localgp.model.gating import NoGate, PositionGate, UtteranceGate, profiled

ENCODER_EXECUTIONS = (*EXECUTIONS, DENSE)


class EncoderPruning(nn.Module):
    """The encoder's gate predictors and context projections (state-dict prefix `pruning.`)."""

    def __init__(self, config: GateConfig, d_model: int, num_layers: int, vocab_size: int = 0,
                 decoder_units: int = 0):
        super().__init__()
        self.config = config
        self.modules_per_layer = ENCODER_MODULES[config.encoder]
        self.context_proj = nn.ModuleDict()
        self.gates = nn.ModuleList()
        if config.predictor == "global":  # it also emits the decisions of `decoder_units` decoder units
            if vocab_size <= 0:
                raise ValueError("globalGP needs the vocabulary size (its prompt tokens are embedded)")
            units = num_layers * len(self.modules_per_layer) + decoder_units
            self.global_gate = GlobalGatePredictor(d_model, vocab_size, units)
        else:
            for name, size in config.contexts:
                self.context_proj[name] = nn.Linear(d_model if name == "front" else size, d_model)
            self.gates.extend(
                LocalGatePredictor(d_model, len(self.modules_per_layer), config.heads) for _ in range(num_layers)
            )


class GatedEBranchformerEncoder(EBranchformerEncoder):
    """Made by `gate_encoder()` from an EBranchformerEncoder; not constructed directly."""

    pruning: EncoderPruning
    execution: str  # "masked", "compact", or "dense" (no gates: the benchmarks' baseline)
    forced_keep: float | None  # random masks keeping this share, instead of the gates
    forced_generator: torch.Generator
    external_context: dict[str, Tensor]  # name -> (B, Tc, size), set by set_context()
    prompt: Tensor | None  # (B, P) language and task token ids for globalGP
    decoder_logits: Tensor | None  # (B, decoder units, 2): globalGP's decisions for the decoder
    global_logits: Tensor | None  # (B, layers, modules, 2): globalGP's decisions for the encoder
    last_record: GateRecord | None

    # ------------------------------------------------------------------ set-up
    def set_context(self, prompt: Tensor | None = None, **streams: Tensor) -> None:
        """Context kept until changed: external sequences for localGP, e.g. speaker=(B, Tc, 192),
        or, for globalGP, the prompt's language and task token ids (B, P)."""
        if prompt is not None:
            if self.pruning.config.predictor != "global":
                raise ValueError("set_context: prompt is the context of globalGP; this encoder uses localGP")
            if prompt.dim() != 2 or prompt.dtype != torch.long:
                raise ValueError(f"set_context: prompt must be int64 token ids (B, P), got {prompt.dtype} {tuple(prompt.shape)}")
            self.prompt = prompt
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
    def _context(self, front: Tensor) -> Tensor:
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
            streams.append(align_to_frames(proj(seq.to(front.dtype)), front.shape[1]))
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
            logits = masked_time_mean(logits, valid)
        return logits, x, context

    def _run_global_gate(self, x: Tensor, valid: Tensor) -> None:
        if self.prompt is None or self.prompt.shape[0] != x.shape[0]:
            raise ValueError("encoder: globalGP needs the prompt token ids of the batch; call set_context(prompt=...)")
        logits = self.pruning.global_gate(self.prompt.to(x.device), masked_time_mean(x, valid)).to(x.dtype)
        per_layer = len(self.pruning.modules_per_layer)
        encoder_units = len(self.encoders) * per_layer
        self.global_logits = logits[:, :encoder_units].unflatten(1, (len(self.encoders), per_layer))
        self.decoder_logits = logits[:, encoder_units:]

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
        if gated and self.forced_keep is None:
            with profiled("gate"):
                if cfg.predictor == "local":
                    context = self._context(xs_pad)
                else:
                    self._run_global_gate(xs_pad, valid)
        record = GateRecord()
        for index, layer in enumerate(self.encoders):
            if max_layer is not None and index >= max_layer:
                break
            logits = None
            if gated:
                with profiled("gate"):
                    logits, xs_pad, context = self._layer_logits(index, xs_pad, context, valid)
            xs_pad = run_layer(layer, xs_pad, masks, lengths, logits, cfg, self.execution, record, f"encoder.{index}")
        self.last_record = record
        return self.after_norm(xs_pad), lengths, None


def masked_time_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of x (B, T, ...) over the valid frames (B, T) of each sequence."""
    weights = valid.reshape(*valid.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


def run_layer(layer, x: Tensor, pad_mask: Tensor, lengths: Tensor, logits: Tensor | None, cfg: GateConfig,
              execution: str, record: GateRecord, prefix: str) -> Tensor:
    """One E-Branchformer layer under its gates. x (B, T, D); pad_mask (B, 1, T).
    execution "dense" takes no logits and runs every module on every frame."""
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
        gate = PositionGate(logits, valid, lengths, names, cfg, execution, layer.training, record, prefix)
        x = gate.residual("ffn1", x, ffn1, layer.ff_scale)
        x_attn = _temporal_attention(gate, layer, x, pad_mask)
        with profiled("cgmlp"):
            x_mlp = _cgmlp(layer, x, pad_mask)
    else:
        gate = UtteranceGate(logits, names, cfg, execution, layer.training, record, prefix)
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
            out = packed_self_attention(layer.attn, layer.norm_mha(c.packed), c.cu_seqlens, x.shape[1])
            out = layer.dropout(out)
        with profiled("scatter"):
            return ops.scatter_pad(out, c.index, torch.zeros_like(x))
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
    if encoder.interctc_layer_idx:
        raise ValueError("gate_encoder: intermediate CTC layers (interctc_layer_idx) are not supported")
    encoder.__class__ = GatedEBranchformerEncoder
    d_model = encoder.output_size()
    pruning = EncoderPruning(config, d_model, len(encoder.encoders), vocab_size, decoder_units)
    encoder.pruning = pruning.to(next(encoder.parameters()).device)
    encoder.execution = "masked"
    encoder.forced_keep = None
    encoder.forced_generator = torch.Generator().manual_seed(0)
    encoder.external_context = {}
    encoder.prompt = None
    encoder.global_logits = None
    encoder.decoder_logits = None
    encoder.last_record = None
    return encoder
