"""The Whisper adapter: openai-whisper's `Whisper` gated in place, as gate_encoder/gate_decoder
do for ESPnet's OWSM. Its layers are mapped onto the shared gating (gating.py, pruning.py):

- encoder blocks: attention and MLP gated per frame ("temporal") or per utterance. Whisper
  computes all 1500 frames of its 30 s window, padding included: to the gates those are frames
  like any other (they may learn to skip them); `speech_frames()` tells which carry the audio.
- decoder blocks: self-attention, cross-attention (`src_attn`) and MLP (`ffn`) per token or per
  utterance; `whisper_decoder_view()` lets localgp's incremental decoder run them.

State-dict keys are unchanged (real Whisper weights load as before); gate parameters sit under
`encoder.pruning.` and `decoder.pruning.`. With every gate keeping, masked execution computes
exactly what openai-whisper computes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.model import AudioEncoder, MultiHeadAttention, ResidualAttentionBlock, TextDecoder, Whisper

from localgp.gates import GateRecord
from localgp.model.attention import Projections, attention_received, packed_self_attention, top_attended
from localgp.model.config import DECODER_MODULES, DENSE, EXECUTIONS, GateConfig, Rule, parse_rule
from localgp.model.gating import NoGate, PositionGate, UtteranceGate, profiled
from localgp.model.layout import DecoderLayerView, DecoderView
from localgp.model.pruning import (
    DecoderPruning, EncoderPruning, GatedDecoderMixin, GatedEncoderMixin, init_decoder_gating, init_encoder_gating,
    layer_fill, layer_stand_ins,
)

# The gated modules of a Whisper encoder block, per granularity (both modules are per frame).
ENCODER_MODULES = {"temporal": ("attn", "mlp"), "utterance": ("attn", "mlp")}
ENCODER_EXECUTIONS = (*EXECUTIONS, DENSE)
SAMPLE_RATE, HOP, WINDOW_SECONDS = 16000, 160, 30  # whisper.audio's constants
FRAME_SAMPLES = 2 * HOP  # samples per encoder frame (20 ms)
# The padding and silence rules' gates: no predictor, every gated module of every layer runs on the
# rule's frames, a skipped one adds the calibrated mean output at its position (skip_fill "mean"),
# kept frames attend to every frame (what kept the dense WER with every padding frame skipped).
RULE_GATES = GateConfig(predictor="rule", encoder="temporal", decoder=None, contexts=(), skip_fill="mean",
                        attention_keys="all")
# The attention rule's: frames leave the sequence (no fill), the kept attend to the kept.
ATTENTION_RULE_GATES = dataclasses.replace(RULE_GATES, skip_fill="zero", attention_keys="kept")
PADDING, SILENCE, SPEECH = 0, 1, 2  # frame_kinds()


def speech_frames(num_samples: Tensor | int) -> Tensor | int:
    """Encoder frames that carry audio of `num_samples` samples (16 kHz; the rest of the 1500 are
    the padding of the 30 s window): mel frames at hop 160, halved by the stride-2 convolution."""
    mel = (num_samples + HOP - 1) // HOP
    return (mel + 1) // 2


def frame_kinds(samples: list[int], speech: list[list[tuple[int, int]]], frames: int = 1500) -> Tensor:
    """(B, frames) int8: each encoder frame of each clip PADDING (after its audio: t >=
    speech_frames(samples)), SPEECH (inside it and overlapping one of its VAD speech regions,
    (start, end) sample ranges of the clip; frame t covers samples [320 t, 320 (t + 1))) or SILENCE
    (inside it, in no region)."""
    if len(samples) != len(speech):
        raise ValueError(f"frame_kinds: {len(samples)} clips but speech regions of {len(speech)}")
    kinds = torch.full((len(samples), frames), PADDING, dtype=torch.int8)
    for b, (n, regions) in enumerate(zip(samples, speech)):
        inside = min(speech_frames(int(n)), frames)
        kinds[b, :inside] = SILENCE
        for start, end in regions:
            first, last = start // FRAME_SAMPLES, min(-(-end // FRAME_SAMPLES), inside)
            if last > first:
                kinds[b, first:last] = SPEECH
    return kinds


def rule_keep(rule: Rule, kinds: Tensor) -> Tensor:
    """The frames (B, T) bool the padding rule (every frame inside the audio) or the silence rule
    (the speech frames) keeps, from frame_kinds(), and rule.margin frames on each side of them."""
    if rule.name == "padding":
        keep = kinds != PADDING
    elif rule.name == "silence":
        keep = kinds == SPEECH
    else:
        raise ValueError(f"rule_keep: the {rule.name} rule chooses its frames inside the encoder")
    if rule.margin:
        width = 2 * rule.margin + 1
        keep = F.max_pool1d(keep[:, None].float(), width, stride=1, padding=rule.margin)[:, 0] > 0
    return keep


def gate_whisper_rule(model: Whisper, rule: Rule) -> Whisper:
    """openai-whisper's model under a training-free rule (no predictor, no context): its encoder
    gated with RULE_GATES (padding, silence: calibrate_skip_values, then set_rule_keep(rule_keep())
    per batch) or ATTENTION_RULE_GATES (attention: the encoder removes the frames itself)."""
    layers = model.dims.n_audio_layer
    if rule.name == "attention" and rule.block > layers:
        raise ValueError(f"rule attention: block must be at most the encoder's {layers} blocks, got {rule.block}")
    gate_whisper(model, ATTENTION_RULE_GATES if rule.name == "attention" else RULE_GATES)
    model.encoder.rule = rule
    return model


class WhisperAttention(Projections):
    """Whisper's MultiHeadAttention as localgp's attention projections. Whisper scales q and k by
    Dh^-1/4 each: the same 1/sqrt(Dh) on their product."""

    def __init__(self, attn: MultiHeadAttention):
        self.module, self.heads = attn, attn.n_head
        self.head_dim = attn.query.out_features // attn.n_head

    def query(self, x):
        return self.split(self.module.query(x))

    def key(self, x):
        return self.split(self.module.key(x))

    def value(self, x):
        return self.split(self.module.value(x))

    def out(self, o):
        return self.module.out(o.flatten(-2))


# ------------------------------------------------------------------ encoder
class GatedWhisperEncoder(GatedEncoderMixin, AudioEncoder):
    """Made by `gate_whisper()` from an AudioEncoder; not constructed directly."""

    rule: Rule | None = None  # gate_whisper_rule's or GateConfig.prior's; the attention rule runs in attention_rule()
    kept_frames: Tensor | None = None  # the attention rule's kept frames (B, K) of the last pass

    @property
    def gated_layers(self):
        return self.blocks

    def forward(self, x: Tensor) -> Tensor:
        """x (B, n_mels, 3000) log-mel spectrogram -> (B, 1500, D), as AudioEncoder.forward (the
        attention rule: (B, K, D), the kept frames in order)."""
        if self.execution not in ENCODER_EXECUTIONS:
            raise ValueError(f"encoder.execution must be one of {ENCODER_EXECUTIONS}, got {self.execution!r}")
        if self.execution == "compact" and self.training and self.forced_keep is None:
            raise RuntimeError("compact execution skips the gates' gradients: train in masked mode, run compact")
        x = self.embed(x)
        if self.rule is not None and self.rule.name == "attention" and self.execution != DENSE:
            return self.ln_post(self.attention_rule(x))
        B, T = x.shape[:2]
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)  # every frame of the window is a frame
        lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        cfg = self.pruning.config
        gated = self.execution != DENSE
        context = decided = None
        if gated:
            with profiled("gate"):
                context = self.start_gates(x, valid)
                decided = self.prior_frames(x)
        record = GateRecord()
        for index, block in enumerate(self.blocks):
            logits = fill = stand_ins = None
            if gated:
                with profiled("gate"):
                    logits, x, context = self.layer_logits(index, x, context, valid)
                fill = layer_fill(self.pruning, index)
                stand_ins = layer_stand_ins(self.pruning, index)
            # In place: the blocks' inputs are this forward's own tensors (x + positions on).
            x = run_encoder_block(block, x, valid, lengths, logits, cfg, self.execution, record, f"encoder.{index}",
                                  inplace=True, fill=fill, decided=decided, stand_ins=stand_ins)
        self.last_record = record
        return self.ln_post(x)

    def attention_rule(self, x: Tensor) -> Tensor:
        """The attention rule's blocks on the first block's input x (B, T, D): blocks before
        rule.block on every frame; at it, the frames its attention ranks highest (attention_received
        on its attn_ln input, top_attended) are kept in order and the others leave the sequence:
        that block and the later ones run on (B, K, D). The record holds every block's kept frames."""
        rule, record = self.rule, GateRecord()
        B, T = x.shape[:2]
        start = rule.block - 1
        kept = torch.ones(B, T, device=x.device)
        for index, block in enumerate(self.blocks):
            if index == start:
                with profiled("gate"):
                    received = attention_received(WhisperAttention(block.attn), block.attn_ln(x))
                    self.kept_frames = top_attended(received, rule.keep)
                    kept = torch.zeros(B, T, device=x.device).scatter_(1, self.kept_frames, 1.0)
                    x = x.gather(1, self.kept_frames[..., None].expand(-1, -1, x.shape[-1]))
            with profiled("attention"):
                x = x + block.attn(block.attn_ln(x))[0]
            with profiled("mlp"):
                x = x + block.mlp(block.mlp_ln(x))
            for name in ENCODER_MODULES["temporal"]:
                record.add(f"encoder.{index}.{name}", kept)
        self.last_record = record
        return x

    def embed(self, mel: Tensor) -> Tensor:
        """(B, n_mels, 3000) -> the first block's input (B, 1500, D): convolutions and positions."""
        with profiled("subsampling"):
            x = F.gelu(self.conv1(mel))
            x = F.gelu(self.conv2(x))
            x = x.permute(0, 2, 1)
            if x.shape[1:] != self.positional_embedding.shape:
                raise ValueError(f"encoder: the mel input gives {tuple(x.shape[1:])} frames x width, the model expects "
                                 f"{tuple(self.positional_embedding.shape)} (pad or trim the audio to 30 s)")
            return (x + self.positional_embedding).to(x.dtype)

    @torch.no_grad()
    def calibrate_skip_values(self, mels, speech=None) -> int:
        """GateConfig.skip_fill "mean": sets what each skipped (block, module, position) adds to the
        mean output of that module at that position of the window, over the clips of `mels` (an
        iterable of (B, n_mels, 3000) batches) run densely. speech: the batches' speech frame counts
        ((B,) each, speech_frames()): then the mean over the padding frames after the speech, which
        are what the gates learn to skip (over every frame at positions no clip's padding reaches).
        Returns the number of clips."""
        names = ENCODER_MODULES[self.pruning.config.encoder]
        table = self.pruning.skip_values.values
        frames = table.shape[2]
        sums = torch.zeros_like(table, dtype=torch.float64)  # over every frame
        padding_sums = torch.zeros_like(sums)  # over the padding frames
        padding_counts = torch.zeros(frames, dtype=torch.float64, device=table.device)
        clips = 0
        for mel, counts in zip(mels, speech if speech is not None else itertools.repeat(None)):
            x = self.embed(mel.to(table.device, self.conv1.weight.dtype))
            if counts is not None:
                after = torch.arange(frames, device=x.device)[None] >= counts.to(x.device)[:, None]  # (B, T)
                padding_counts += after.sum(0)
            for index, block in enumerate(self.blocks):
                outputs = block_modules(block)
                for m, name in enumerate(names):
                    y = outputs[name](x)
                    sums[index, m] += y.sum(0, dtype=torch.float64)
                    if counts is not None:
                        padding_sums[index, m] += (y * after[..., None]).sum(0, dtype=torch.float64)
                    x = x + y
            clips += mel.shape[0]
        if clips == 0:
            raise ValueError("calibrate_skip_values: no clip given")
        mean = sums / clips
        if speech is not None:
            reached = padding_counts > 0
            mean[:, :, reached] = padding_sums[:, :, reached] / padding_counts[reached][:, None]
        self.pruning.skip_values.set(mean.to(table.dtype), clips)
        return clips


def block_modules(block: ResidualAttentionBlock) -> dict:
    """A block's residual branches as functions of the residual stream h (extra arguments
    ignored: the gates pass row arguments): "attn" = attn(attn_ln(h)), "mlp" = mlp(mlp_ln(h))."""
    return {"attn": lambda h, *_: block.attn(block.attn_ln(h))[0], "mlp": lambda h, *_: block.mlp(block.mlp_ln(h))}


def run_encoder_block(block: ResidualAttentionBlock, x: Tensor, valid: Tensor, lengths: Tensor, logits: Tensor | None,
                      cfg: GateConfig, execution: str, record: GateRecord, prefix: str, inplace: bool = False,
                      fill: Tensor | None = None, decided: Tensor | None = None, stand_ins=None) -> Tensor:
    """One Whisper encoder block under its gates: x + attn(attn_ln(x)), then x + mlp(mlp_ln(x)).
    inplace: compact execution may overwrite x (inference only; the caller does not need x afterwards).
    fill (modules, T, D): what a skipped module adds (skip_fill "mean"), None: nothing.
    decided (B, T): the frames the predictors decide (GateConfig.prior), None: all. stand_ins: the
    block's StandIn per module (GateConfig.stand_in_rank), None: none."""
    names = ENCODER_MODULES[cfg.encoder]
    modules = block_modules(block)
    attention, mlp = modules["attn"], modules["mlp"]
    if execution == DENSE:
        gate = NoGate()
        x = gate.residual("attn", x, attention)
    elif cfg.encoder == "temporal":
        gate = PositionGate(logits, valid, lengths, names, cfg, execution, block.training, record, prefix, inplace,
                            fill, decided, stand_ins)
        x = _temporal_attention(gate, block, x)
    else:
        gate = UtteranceGate(logits, names, cfg, execution, block.training, record, prefix, inplace, fill)
        x = gate.residual("attn", x, attention)
    return gate.residual("mlp", x, mlp)


def _temporal_attention(gate: PositionGate, block: ResidualAttentionBlock, x: Tensor) -> Tensor:
    """x + attention where kept (PositionGate.self_attention: the keys GateConfig.attention_keys says)."""
    return gate.self_attention("attn", x, WhisperAttention(block.attn), block.attn_ln, lambda h: block.attn(h)[0])


# ------------------------------------------------------------------ decoder
class GatedWhisperDecoder(GatedDecoderMixin, TextDecoder):
    """Made by `gate_whisper()` from a TextDecoder; not constructed directly. Its forward runs
    the whole prefix (training, and the masked reference); decoding goes through localgp's
    incremental decoder (`whisper_decoder_view`)."""

    @property
    def gated_layers(self):
        return self.blocks

    def forward(self, x: Tensor, xa: Tensor, kv_cache: dict | None = None, lengths: Tensor | None = None) -> Tensor:
        """x (B, L) token ids, xa (B, S, D) encoder output, lengths (B,) valid tokens (None: all)
        -> logits (B, L, V) in float32, as TextDecoder.forward."""
        if kv_cache:
            raise ValueError("decoder: the gated Whisper decoder keeps no kv_cache; decode with localgp.decoding")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"decoder.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.execution == "compact" and self.training and self.forced_keep is None:
            raise RuntimeError("compact execution skips the gates' gradients: train in masked mode, run compact")
        B, L = x.shape
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"decoder: {L} tokens, the model has {self.positional_embedding.shape[0]} positions")
        lengths = torch.full((B,), L, device=x.device) if lengths is None else lengths.to(x.device)
        valid = torch.arange(L, device=x.device)[None] < lengths[:, None]
        h = (self.token_embedding(x) + self.positional_embedding[:L]).to(xa.dtype)
        cfg = self.pruning.config
        context, context_pad = None, None
        if cfg.predictor == "local" and self.forced_keep is None:
            context, context_pad = self.gate_context(xa, None)
        record = GateRecord()
        for index, block in enumerate(self.blocks):
            logits, h = self.layer_logits(index, h, context, context_pad)
            h = run_decoder_block(block, h, valid, lengths, xa, logits, cfg, self.execution, record, f"decoder.{index}",
                                  self.mask)
        self.last_record = record
        h = self.ln(h)
        return (h @ self.token_embedding.weight.to(h.dtype).t()).float()


def run_decoder_block(block: ResidualAttentionBlock, x: Tensor, valid: Tensor, lengths: Tensor, xa: Tensor,
                      logits: Tensor, cfg: GateConfig, execution: str, record: GateRecord, prefix: str,
                      causal: Tensor) -> Tensor:
    """One Whisper decoder block under its gates. x (B, L, D); causal: the decoder's additive mask."""
    names = DECODER_MODULES[cfg.decoder]
    mlp = block_modules(block)["mlp"]
    if cfg.decoder == "token":
        gate = PositionGate(logits, valid, lengths, names, cfg, execution, block.training, record, prefix)
        L, S = x.shape[1], xa.shape[1]
        allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None]
        source = block.attn_ln(x)
        x = gate.token_attention("self_attn", x, WhisperAttention(block.attn), block.attn_ln, source, allowed,
                                 _identity, full=lambda h: block.attn(h, mask=causal)[0])
        every_frame = torch.ones(1, 1, S, dtype=torch.bool, device=x.device)
        x = gate.token_attention("src_attn", x, WhisperAttention(block.cross_attn), block.cross_attn_ln, xa,
                                 every_frame, _identity, full=lambda h: block.cross_attn(h, xa)[0])
        return gate.residual("ffn", x, mlp)
    gate = UtteranceGate(logits, names, cfg, execution, block.training, record, prefix)
    x = gate.residual("self_attn", x, lambda h: block.attn(block.attn_ln(h), mask=causal)[0])
    x = gate.residual("src_attn", x, lambda h, a: block.cross_attn(block.cross_attn_ln(h), a)[0], row_args=(xa,))
    return gate.residual("ffn", x, mlp)


def _identity(x: Tensor) -> Tensor:
    return x


def whisper_decoder_view(decoder: TextDecoder) -> DecoderView:
    """Whisper's TextDecoder (plain or gated) as localgp's incremental decoder sees it."""

    def embed(tokens: Tensor, position: int) -> Tensor:
        return decoder.token_embedding(tokens) + decoder.positional_embedding[position]

    layers = [
        DecoderLayerView(
            self_norm=block.attn_ln, self_attn=WhisperAttention(block.attn), src_norm=block.cross_attn_ln,
            src_attn=WhisperAttention(block.cross_attn), ffn=lambda x, block=block: block.mlp(block.mlp_ln(x)),
            ffn_macs=2 * block.mlp[0].weight.numel(), dropout=_identity)
        for block in decoder.blocks
    ]
    return DecoderView(layers, embed, decoder.ln, decoder.token_embedding.weight, None,
                       max_positions=decoder.positional_embedding.shape[0])


# ------------------------------------------------------------------ conversion
def gate_whisper(model: Whisper, config: GateConfig) -> Whisper:
    """Gates the encoder and/or decoder of an openai-whisper model in place, reusing its weights.

    globalGP (config.predictor == "global") decides from the prompt's language and task tokens
    (set with model.encoder.set_context(prompt=...)) and the pooled encoder input.
    """
    if not isinstance(model, Whisper):
        raise TypeError(f"gate_whisper: expected an openai-whisper Whisper model, got {type(model).__name__}")
    dims = model.dims
    decoder_units = 0
    if config.decoder and config.predictor == "global":
        decoder_units = dims.n_text_layer * len(DECODER_MODULES[config.decoder])
    if config.encoder:
        encoder = model.encoder
        encoder.__class__ = GatedWhisperEncoder
        init_encoder_gating(encoder, EncoderPruning(config, dims.n_audio_state, dims.n_audio_layer,
                                                    ENCODER_MODULES[config.encoder], dims.n_vocab, decoder_units,
                                                    frames=dims.n_audio_ctx))
        # GateConfig.prior: its rule, whose frames the decoders set per batch (set_rule_keep) as for a rule
        encoder.rule = parse_rule(config.prior) if config.prior else None
    if config.decoder:
        if config.predictor == "global" and not config.encoder:
            raise ValueError("gate_whisper: globalGP's decisions come from the gated encoder; gate the encoder too")
        if dims.n_audio_state != dims.n_text_state:
            raise ValueError("gate_whisper: the decoder's gates read the encoder output; its width must be the decoder's")
        decoder = model.decoder
        decoder.__class__ = GatedWhisperDecoder
        pruning = DecoderPruning(config, dims.n_text_state, dims.n_text_layer, DECODER_MODULES[config.decoder])
        init_decoder_gating(decoder, pruning, model.encoder if config.predictor == "global" else None)
    return model


def frames_sparsity(record: GateRecord, speech: Tensor | None = None) -> float:
    """Share of (frame, encoder module) units skipped, over all frames of the window, or only over
    the frames that carry speech (speech (B,) from speech_frames()). Temporal masks only."""
    kept = total = 0.0
    for name, mask in record.masks.items():
        if not name.startswith("encoder.") or mask.dim() != 2:
            continue
        use = record.valid[name]
        if speech is not None:
            use = use & (torch.arange(mask.shape[1], device=mask.device)[None] < speech.to(mask.device)[:, None])
        kept += float((mask.detach().float() * use).sum())
        total += float(use.sum())
    if total == 0:
        return math.nan
    return 1 - kept / total


def sparsity_by_kind(record: GateRecord, kinds: Tensor) -> dict[str, float | None]:
    """Shares of the encoder's (frame, module) units skipped among the frames of each kind of
    frame_kinds() (B, T): {"padding", "silence", "speech"}; None where the batch has no such frame
    (or no temporal mask)."""
    kept = torch.zeros(3, dtype=torch.float64)
    total = torch.zeros(3, dtype=torch.float64)
    for name, mask in record.masks.items():
        if not name.startswith("encoder.") or mask.dim() != 2:
            continue
        use = record.valid[name].cpu()
        mask = mask.detach().cpu().double()
        for kind in (PADDING, SILENCE, SPEECH):
            where = use & (kinds == kind)
            kept[kind] += float((mask * where).sum())
            total[kind] += float(where.sum())
    return {label: (1 - float(kept[k] / total[k]) if total[k] else None)
            for label, k in (("padding", PADDING), ("silence", SILENCE), ("speech", SPEECH))}
