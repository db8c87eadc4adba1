"""Encoder compute as the papers count it: multiply-accumulates ("GFLOPs" in the papers, fvcore's
convention), LayerNorm at 5 ops per element, elementwise activations not counted.

The count is of what a forward pass executes: in masked execution every module runs on every
frame whatever its mask; in compact execution a module runs only on its kept frames (and an
utterance-wise skipped module not at all). Frames are counted per utterance (valid frames), as
the papers report per-utterance figures. Dense OWSM v3.1 medium on 30 s: 568.47 GMACs; dense
Whisper base (its 30 s window): see whisper_encoder_macs.
"""

from __future__ import annotations

from dataclasses import dataclass

from localgp.backbones.owsm.weights import HOP, PRESETS, SAMPLE_RATE

N_MELS = 80
LN_OPS = 5  # per element, fvcore's LayerNorm count
MODULES = ("subsampling", "ffn1", "attn", "cgmlp", "merge", "ffn2", "norms")


@dataclass(frozen=True)
class EncoderShape:
    d_model: int
    ffn_units: int
    cgmlp_units: int
    conv_kernel: int
    layers: int

    @classmethod
    def of_preset(cls, name: str) -> "EncoderShape":
        p = PRESETS[name]
        return cls(p.d_model, p.ffn_units, p.cgmlp_units, p.conv_kernel, p.encoder_layers)

    @classmethod
    def of_encoder(cls, encoder) -> "EncoderShape":
        layer = encoder.encoders[0]
        return cls(encoder.output_size(), layer.feed_forward.w_1.out_features,
                   layer.cgmlp.channel_proj1[0].out_features, layer.depthwise_conv_fusion.kernel_size[0],
                   len(encoder.encoders))


def input_frames(seconds: float) -> int:
    """fbank frames of `seconds` of 16 kHz audio (hop 160, centred): 30 s -> 3001."""
    return int(round(seconds * SAMPLE_RATE)) // HOP + 1


def subsampled_frames(frames: int) -> int:
    """Frames after OWSM's conv2d subsampling (two 3x3 convolutions, stride 2): 3001 -> 749;
    0 below 7 frames (audio too short for one output frame, never a negative count)."""
    return max(((frames - 1) // 2 - 1) // 2, 0)


def subsampling_macs(s: EncoderShape, frames: int) -> int:
    t1, f1 = max((frames - 1) // 2, 0), (N_MELS - 1) // 2
    t2, f2 = max((t1 - 1) // 2, 0), (f1 - 1) // 2
    c = s.d_model
    return t1 * f1 * c * 9 + t2 * f2 * c * c * 9 + t2 * (c * f2) * s.d_model


def ffn_macs(s: EncoderShape, n: int) -> int:
    return 2 * n * s.d_model * s.ffn_units + LN_OPS * n * s.d_model


def attention_macs(s: EncoderShape, kept_per_sequence: list[int] | int) -> int:
    """Projections on the kept frames, products quadratic in them (queries and keys kept)."""
    kept = [kept_per_sequence] if isinstance(kept_per_sequence, int) else kept_per_sequence
    n = sum(kept)
    return 4 * n * s.d_model**2 + sum(2 * k * k * s.d_model for k in kept) + LN_OPS * n * s.d_model


def cgmlp_macs(s: EncoderShape, n: int) -> int:
    half = s.cgmlp_units // 2
    linear = n * s.d_model * s.cgmlp_units + n * half * s.d_model
    # depthwise conv over the gate half, the gating product, and its LayerNorm; plus norm_mlp.
    return linear + n * half * s.conv_kernel + n * half + LN_OPS * n * half + LN_OPS * n * s.d_model


def merge_macs(s: EncoderShape, n: int) -> int:
    return n * 2 * s.d_model * s.conv_kernel + n * 2 * s.d_model * s.d_model


LAYER_MODULES = ("ffn1", "attn", "cgmlp", "merge", "ffn2", "norms")


def layer_macs(s: EncoderShape, t: int, kept: dict[str, int] | None = None) -> dict[str, int]:
    """MACs per module of one E-Branchformer layer on one utterance of `t` encoder frames.

    kept: module ('ffn1', 'attn', 'cgmlp', 'ffn2') -> frames it ran on (compact execution);
    missing modules run on every frame. 'norms' is the layer's norm_final.
    """
    kept = kept or {}
    return {
        "ffn1": ffn_macs(s, kept.get("ffn1", t)),
        "attn": attention_macs(s, kept.get("attn", t)),
        "cgmlp": cgmlp_macs(s, kept.get("cgmlp", t)),
        "merge": merge_macs(s, t),
        "ffn2": ffn_macs(s, kept.get("ffn2", t)),
        "norms": LN_OPS * t * s.d_model,
    }


def encoder_macs(s: EncoderShape, frames: int, kept: dict[str, list[int]] | None = None) -> dict[str, int]:
    """MACs per module of one utterance of `frames` fbank frames.

    kept: module ('ffn1', 'attn', 'cgmlp', 'ffn2') -> frames kept in each layer, as executed
    (compact execution); missing modules run on every frame (dense or masked execution).
    """
    t = subsampled_frames(frames)
    kept = kept or {}
    for name, counts in kept.items():
        if len(counts) != s.layers or any(not 0 <= c <= t for c in counts):
            raise ValueError(f"encoder_macs: kept[{name!r}] must hold {s.layers} counts in [0, {t}], got {counts}")
    out = dict.fromkeys(MODULES, 0)
    out["subsampling"] = subsampling_macs(s, frames)
    for index in range(s.layers):
        for module, value in layer_macs(s, t, {m: counts[index] for m, counts in kept.items()}).items():
            out[module] += value
    out["norms"] += LN_OPS * t * s.d_model  # the encoder's after_norm
    out["total"] = sum(out[m] for m in MODULES)
    return out


def kept_frames(record, b: int, t: int, layers: int) -> dict[str, list[int]]:
    """Frames each gated module of each layer ran on for utterance b (of t encoder frames), read
    from a forward pass's GateRecord (names 'encoder.<layer>.<module>')."""
    kept: dict[str, list[int]] = {}
    for name, mask in record.masks.items():
        _, layer, module = name.split(".")
        m = mask[b]
        count = int(m.float().sum()) if m.dim() else int(m) * t  # per frame, or the whole utterance
        kept.setdefault(module, [0] * layers)[int(layer)] = count
    return kept


def executed_layer_macs(s: EncoderShape, record, encoder_lengths, execution: str) -> dict[str, int]:
    """MACs the `s.layers` layers of a gated forward pass executed, per module, summed over its
    utterances (encoder_lengths: encoder frames of each). Masked and dense execution compute every
    module on every frame; compact only what its masks (record) kept."""
    total = dict.fromkeys(LAYER_MODULES, 0)
    for b, t in enumerate(int(n) for n in encoder_lengths):
        kept = kept_frames(record, b, t, s.layers) if execution == "compact" else {}
        for index in range(s.layers):
            for module, value in layer_macs(s, t, {m: counts[index] for m, counts in kept.items()}).items():
                total[module] += value
    total["total"] = sum(total[m] for m in LAYER_MODULES)
    return total


def executed_encoder_macs(encoder, input_lengths, execution: str | None = None, record=None) -> dict[str, int]:
    """MACs a gated encoder's last forward pass (or the one `record` holds the masks of)
    executed, summed over its utterances.

    input_lengths: fbank frames of each utterance. Masked (and dense) execution computes every
    module on every frame; compact only what its masks kept.
    """
    s = EncoderShape.of_encoder(encoder)
    frames = [int(f) for f in input_lengths]
    t = [subsampled_frames(f) for f in frames]
    record = encoder.last_record if record is None else record
    total = executed_layer_macs(s, record, t, execution or encoder.execution)
    total["subsampling"] = sum(subsampling_macs(s, f) for f in frames)
    total["norms"] += sum(LN_OPS * n * s.d_model for n in t)  # the encoder's after_norm
    total["total"] = sum(total[m] for m in MODULES)
    return total


def keep_ratio_macs(s: EncoderShape, frames: int, keep: float, granularity: str = "temporal") -> dict[str, int]:
    """MACs when FFN1/attention/FFN2 (temporal) or all four modules (utterance, as an
    expectation) keep a `keep` share."""
    t = subsampled_frames(frames)
    if granularity == "temporal":
        n = round(keep * t)
        return encoder_macs(s, frames, {m: [n] * s.layers for m in ("ffn1", "attn", "ffn2")})
    dense = encoder_macs(s, frames)
    out = {m: round(dense[m] * keep) if m in ("ffn1", "attn", "cgmlp", "ffn2") else dense[m] for m in MODULES}
    out["total"] = sum(out[m] for m in MODULES)
    return out


# ------------------------------------------------------------------ Whisper
# Whisper's encoder: two convolutions (the "subsampling"), then blocks of attention and an MLP of
# 4 x d_model, every one of the window's 1500 frames whatever the audio (it pads to 30 s).
WHISPER_MODULES = ("subsampling", "attn", "mlp", "norms")


@dataclass(frozen=True)
class WhisperShape:
    n_mels: int
    frames: int  # encoder frames of the 30 s window (1500)
    d_model: int
    layers: int

    @property
    def ffn_units(self) -> int:  # the MLP's width: ffn_macs reads it
        return 4 * self.d_model

    @classmethod
    def of_dims(cls, dims) -> "WhisperShape":
        return cls(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_layer)

    @classmethod
    def of_encoder(cls, encoder) -> "WhisperShape":
        """openai-whisper's AudioEncoder or transformers' WhisperEncoder (plain or gated)."""
        if hasattr(encoder, "embed_positions"):  # transformers
            frames, d_model = encoder.embed_positions.weight.shape
            return cls(encoder.conv1.in_channels, frames, d_model, len(encoder.layers))
        frames, d_model = encoder.positional_embedding.shape
        return cls(encoder.conv1.in_channels, frames, d_model, len(encoder.blocks))


WHISPER_BACKBONES = {"whisper-base": WhisperShape(n_mels=80, frames=1500, d_model=512, layers=6)}


def whisper_layer_macs(s: WhisperShape, kept: dict[str, int] | None = None, all_keys: bool = False) -> dict[str, int]:
    """MACs of one block on one utterance; kept: module ('attn', 'mlp') -> frames it ran on.
    all_keys (GateConfig.attention_keys "all"): the kept frames' queries attend to every frame,
    whose keys and values (and attention norm) are computed on all frames."""
    kept = kept or {}
    n_attn = kept.get("attn", s.frames)
    if all_keys:
        t, d = s.frames, s.d_model
        attn = 2 * n_attn * d * d + 2 * t * d * d + 2 * n_attn * t * d + LN_OPS * t * d
    else:
        attn = attention_macs(s, n_attn)
    return {"attn": attn, "mlp": ffn_macs(s, kept.get("mlp", s.frames))}


def whisper_encoder_macs(s: WhisperShape, kept: dict[str, list[int]] | None = None,
                         all_keys: bool = False) -> dict[str, int]:
    """MACs per module of one utterance (its 30 s window). kept: module -> frames kept in each
    layer (compact execution); missing modules run on every frame. all_keys: as whisper_layer_macs."""
    kept = kept or {}
    for name, counts in kept.items():
        if len(counts) != s.layers or any(not 0 <= c <= s.frames for c in counts):
            raise ValueError(f"whisper_encoder_macs: kept[{name!r}] must hold {s.layers} counts in [0, {s.frames}], "
                             f"got {counts}")
    out = dict.fromkeys(WHISPER_MODULES, 0)
    t = s.frames
    out["subsampling"] = 2 * t * s.n_mels * s.d_model * 3 + t * s.d_model * s.d_model * 3  # conv1 (k 3), conv2 (k 3, stride 2)
    for index in range(s.layers):
        for module, value in whisper_layer_macs(s, {m: c[index] for m, c in kept.items()}, all_keys).items():
            out[module] += value
    out["norms"] = LN_OPS * t * s.d_model  # ln_post
    out["total"] = sum(out[m] for m in WHISPER_MODULES)
    return out


def executed_whisper_encoder_macs(encoder, record=None, execution: str | None = None,
                                  utterances: int | None = None) -> dict[str, int]:
    """MACs a gated Whisper encoder's last forward pass (or the one `record` holds the masks of)
    executed, summed over its utterances: every module on every frame in masked and dense
    execution, only what the masks kept in compact execution (and "stand_in": the stand-ins'
    MACs, GateConfig.stand_in_rank). `utterances`: the batch size, needed when the record holds
    no mask (dense execution)."""
    s = WhisperShape.of_encoder(encoder)
    record = encoder.last_record if record is None else record
    if record is not None and record.masks:
        utterances = next(iter(record.masks.values())).shape[0]
    elif utterances is None:
        raise ValueError("executed_whisper_encoder_macs: the record holds no mask; give the number of utterances")
    rule = getattr(encoder, "rule", None)
    removes = rule is not None and rule.name == "attention" and (execution or encoder.execution) != "dense"
    compact = removes or (execution or encoder.execution) == "compact"  # the attention rule removes frames in any
    pruning = getattr(encoder, "pruning", None)
    all_keys = pruning is not None and pruning.config.attention_keys == "all"
    total = dict.fromkeys((*WHISPER_MODULES, "total"), 0)
    for b in range(utterances):
        kept = kept_frames(record, b, s.frames, s.layers) if compact else {}
        for module, value in whisper_encoder_macs(s, kept, all_keys and compact).items():
            total[module] += value
        if removes:  # its ranking: the block's queries and keys on every frame, and q k^T
            ranking = 2 * s.frames * s.d_model * s.d_model + s.frames * s.frames * s.d_model
            total["attn"] += ranking
            total["total"] += ranking
    if pruning is not None and pruning.config.stand_in_rank and (execution or encoder.execution) != "dense":
        # GateConfig.stand_in_rank: each gated module's stand-in runs on every frame (its down and up maps)
        total["stand_in"] = (utterances * s.layers * len(pruning.modules_per_layer) * s.frames * 2 * s.d_model
                             * pruning.config.stand_in_rank)
        total["total"] += total["stand_in"]
    return total
