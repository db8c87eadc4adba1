"""transformers' WhisperForConditionalGeneration gated in place (ToMe's pattern): the encoder and
decoder, and their layers, re-classed to subclasses; state-dict keys unchanged, gate parameters
under `model.encoder.pruning.` / `model.decoder.pruning.`. The shared method (gates.py,
model/gating.py, model/pruning.py) does the work, as for openai-whisper (backbones/whisper/model.py):

- encoder layers: attention and MLP per frame ("temporal") or per utterance; masked, compact and
  dense execution; `padding_rule`: with the feature extractor's `attention_mask` given, every
  frame after the audio is skipped in every gated module (with the calibrated mean fill);
- decoder layers: self-attention, cross-attention (`src_attn`) and MLP (`ffn`) per token, through
  transformers' cache: a token that skips self-attention still appends its keys and values, so
  every layer's cache keeps the length of layer 0's (positions and masks come from it); each
  layer's decisions live in its cache layer (`GatedCacheLayer`), so they follow the beams when
  generate() reorders, selects, repeats or crops the cache;
- decoder cross-attention, gated or not: inside generate() the encoder output is projected once
  per clip, not once per beam, and a beam reordering moves an index instead of copying every
  beam's keys and values (`SharedCrossAttention`, `SharedCrossLayer`).

Dense and masked execution run transformers' own attention (eager or sdpa, as the model is set);
compact runs the kept rows only, with localgp's varlen attention (attention_keys "kept") or
per-utterance SDPA over every key. With every gate keeping, masked execution computes what the
ungated model computes, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache
from transformers.models.whisper.modeling_whisper import (
    WhisperAttention, WhisperDecoder, WhisperDecoderLayer, WhisperEncoder, WhisperEncoderLayer,
    WhisperForConditionalGeneration,
)

from localgp.gates import GateRecord
from localgp.model.attention import Projections, rows_attention
from localgp.model.config import DECODER_MODULES, DENSE, EXECUTIONS, GateConfig
from localgp.model.gating import PositionGate, UtteranceGate, profiled
from localgp.model.pruning import (
    DecoderPruning, EncoderPruning, GatedDecoderMixin, GatedEncoderMixin, init_decoder_gating, init_encoder_gating,
    layer_fill,
)

ENCODER_MODULES = {"temporal": ("attn", "mlp"), "utterance": ("attn", "mlp")}  # openai-whisper's names: one set of gates
ENCODER_EXECUTIONS = (*EXECUTIONS, DENSE)


class HFAttention(Projections):
    """transformers' WhisperAttention as localgp's projections (the softmax scale applied by
    the attention call, as its q pre-scaling does)."""

    def __init__(self, attn):
        self.module, self.heads, self.head_dim = attn, attn.num_heads, attn.head_dim

    def query(self, x):
        return self.split(self.module.q_proj(x))

    def key(self, x):
        return self.split(self.module.k_proj(x))

    def value(self, x):
        return self.split(self.module.v_proj(x))

    def out(self, o):
        return self.module.out_proj(o.flatten(-2))


def _mlp(layer):
    return lambda h, *_: layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))


class _Pass:
    """One encoder forward's shared state (ToMe's per-forward dict): the context the predictors
    pass on from layer to layer, the frames the gates may keep, the record."""

    def __init__(self, valid: Tensor, lengths: Tensor):
        self.valid, self.lengths = valid, lengths
        self.context = None
        self.record = GateRecord()


# ------------------------------------------------------------------ encoder
class GatedHFWhisperEncoder(GatedEncoderMixin, WhisperEncoder):
    """Made by gate_hf_whisper() from a WhisperEncoder. padding_rule (attribute, default False):
    with `attention_mask` (B, 3000) given (the feature extractor's, return_attention_mask=True),
    the frames after the audio are skipped in every gated module."""

    @property
    def gated_layers(self):
        return self.layers

    def forward(self, input_features, attention_mask=None, **kwargs):
        if self.execution not in ENCODER_EXECUTIONS:
            raise ValueError(f"encoder.execution must be one of {ENCODER_EXECUTIONS}, got {self.execution!r}")
        if self.execution == "compact" and self.training and self.forced_keep is None:
            raise RuntimeError("compact execution skips the gates' gradients: train in masked mode, run compact")
        B, T = input_features.shape[0], self.config.max_source_positions
        lengths = torch.full((B,), T, dtype=torch.long, device=input_features.device)
        if self.padding_rule:
            if attention_mask is None:
                raise ValueError("encoder.padding_rule: pass the feature extractor's attention_mask "
                                 "(return_attention_mask=True) to know where the audio ends")
            if self.pruning.config.encoder != "temporal":
                raise ValueError("encoder.padding_rule skips frames: it needs GateConfig.encoder='temporal'")
            lengths = (attention_mask.sum(-1).to(lengths) + 1) // 2  # mel frames -> encoder frames (stride 2)
        valid = torch.arange(T, device=lengths.device)[None] < lengths[:, None]
        if self.context_queue:  # pipeline(): the next B clips' contexts
            left = min(len(v) for v in self.context_queue.values())
            if left < B:
                raise ValueError(f"encoder: {B} clips but the queued contexts hold {left} more (queue_context)")
            self.external_context = {name: v[:B] for name, v in self.context_queue.items()}
            self.context_queue = {name: v[B:] for name, v in self.context_queue.items()}
        self._pass = _Pass(valid, lengths)
        try:
            out = super().forward(input_features, attention_mask, **kwargs)
            self.last_record = self._pass.record
        finally:
            self._pass = None
        return out


class GatedHFWhisperEncoderLayer(WhisperEncoderLayer):
    """A WhisperEncoderLayer run under its encoder's gates (encoder and index set by gating)."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        encoder = self._localgp_parent
        state = encoder._pass
        if state is None or encoder.execution == DENSE:
            return super().forward(hidden_states, attention_mask, **kwargs)
        index, cfg, x = self._localgp_index, encoder.pruning.config, hidden_states
        every = torch.ones_like(state.valid)  # the predictors see every frame, as openai-whisper's adapter
        with profiled("gate"):
            if index == 0:
                state.context = encoder.start_gates(x, every)
            logits, x, state.context = encoder.layer_logits(index, x, state.context, every)
        fill = layer_fill(encoder.pruning, index)
        names, prefix = ENCODER_MODULES[cfg.encoder], f"encoder.{index}"
        inplace = not self.training and not torch.is_grad_enabled()
        attention = lambda h, *_: self.self_attn(self.self_attn_layer_norm(h))[0]  # noqa: E731
        if cfg.encoder == "temporal":
            gate = PositionGate(logits, state.valid, state.lengths, names, cfg, encoder.execution, self.training,
                                state.record, prefix, inplace, fill)
            x = gate.self_attention("attn", x.contiguous() if inplace else x, HFAttention(self.self_attn),
                                    self.self_attn_layer_norm, lambda h: self.self_attn(h)[0])
        else:
            gate = UtteranceGate(logits, names, cfg, encoder.execution, self.training, state.record, prefix, inplace,
                                 fill)
            x = gate.residual("attn", x, attention)
        x = gate.residual("mlp", x, _mlp(self))
        if x.dtype == torch.float16:  # transformers' clamp
            clamp = torch.finfo(x.dtype).max - 1000
            x = torch.clamp(x, min=-clamp, max=clamp)
        return x


# ------------------------------------------------------------------ decoder
class GatedCacheLayer(DynamicLayer):
    """A decoder layer's self-attention cache with that layer's gate decisions beside its keys
    and values: `masks` (B, S, M), one row per cached token. Every batch operation generate()
    applies to the cache (beam reordering, selection, repetition, cropping) applies to them too."""

    masks: Tensor | None = None

    def add_masks(self, masks: Tensor) -> None:
        self.masks = masks if self.masks is None else torch.cat([self.masks, masks], dim=1)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.masks is not None:
            self.masks = self.masks.index_select(0, beam_idx.to(self.masks.device))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        if self.masks is not None:
            self.masks = self.masks[indices]

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        if self.masks is not None:
            self.masks = self.masks.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove):
        super().crop(tokens_to_remove)
        if self.masks is not None and tokens_to_remove < 0:
            self.masks = self.masks[:, :tokens_to_remove]

    def reset(self):
        super().reset()
        self.masks = None


class SharedCrossLayer(DynamicLayer):
    """A decoder layer's cross-attention cache holding each clip's keys and values once:
    `keys`/`values` (C, H, S, Dh) for the C distinct encoder rows and `rows` (R,) the one each of the
    decoder's R rows reads. generate() repeats the encoder output once per beam; transformers' own
    cache keeps R copies and copies all of them on every beam reordering (half the time of a beam-5
    generate() of Whisper base on the CPU, RESULTS.md). Here a reordering moves `rows` only."""

    rows: Tensor

    def reorder_cache(self, beam_idx):
        self.rows = self.rows.index_select(0, beam_idx.to(self.rows.device))

    def batch_select_indices(self, indices):
        self.rows = self.rows[indices]

    def batch_repeat_interleave(self, repeats):
        self.rows = self.rows.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove):
        pass  # the encoder's keys: no decoded token to remove


def _clip_of_row(memory: Tensor, cache) -> Tensor:
    """(R,) the run of equal consecutive rows of the encoder output (R, S, D) that each row is in
    (generate() repeats each clip's rows once per beam). Compared once per generate(): the layers
    after the first read it from the first one's cache (no reordering happens between them)."""
    done = next((layer for layer in cache.cross_attention_cache.layers if isinstance(layer, SharedCrossLayer)), None)
    if done is not None:
        return done.rows
    new = torch.tensor([True] + [not torch.equal(memory[r], memory[r - 1]) for r in range(1, memory.shape[0])],
                       device=memory.device)
    return new.cumsum(0) - 1


def shared_cross_keys(attention, memory: Tensor, cache) -> tuple[Tensor, Tensor, Tensor]:
    """A cross-attention module's keys and values (C, S, H, Dh) for the distinct clips of `memory`
    (R, S, D) and the clip of each row (R,): computed at the first step of a generate() and kept
    in its cache (SharedCrossLayer), read from there after; without a cache, one clip per row."""
    i, attn = attention.layer_idx, HFAttention(attention)
    if cache is None:
        return attn.key(memory), attn.value(memory), torch.arange(memory.shape[0], device=memory.device)
    if cache.is_updated.get(i):
        layer = cache.cross_attention_cache.layers[i]
        return layer.keys.transpose(1, 2), layer.values.transpose(1, 2), layer.rows
    rows = _clip_of_row(memory, cache)
    first = torch.searchsorted(rows, torch.arange(int(rows[-1]) + 1, device=rows.device))  # each run's first row
    keys, values = attn.key(memory[first]), attn.value(memory[first])
    cache.cross_attention_cache.update(keys.transpose(1, 2), values.transpose(1, 2), i)
    layer = cache.cross_attention_cache.layers[i]
    layer.__class__ = SharedCrossLayer  # in place, as GatedCacheLayer
    layer.rows = rows
    cache.is_updated[i] = True
    return keys, values, rows


class SharedCrossAttention(WhisperAttention):
    """A decoder layer's cross-attention (`encoder_attn`) that, inside generate(), projects the
    encoder output once per clip instead of once per beam and keeps it so (SharedCrossLayer); the
    queries of a clip's rows attend to it in one call (rows_attention). Anywhere else (no cache,
    attention weights asked for, a mask) it is transformers' own."""

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, output_attentions=False,
                **kwargs):
        if (key_value_states is None or not isinstance(cache, EncoderDecoderCache) or output_attentions
                or attention_mask is not None):
            return super().forward(hidden_states, key_value_states, cache, attention_mask, output_attentions, **kwargs)
        R, L, D = hidden_states.shape
        keys, values, rows = shared_cross_keys(self, key_value_states, cache)
        out = rows_attention(HFAttention(self), hidden_states.reshape(R * L, D), rows.repeat_interleave(L), keys,
                             values, None)
        return out.view(R, L, -1), None


def cache_masks(cache: EncoderDecoderCache) -> list[Tensor | None]:
    """Each decoder layer's decisions for the cached tokens (B, S, M) float, or None."""
    return [getattr(layer, "masks", None) for layer in cache.self_attention_cache.layers]


class GatedHFWhisperDecoder(GatedDecoderMixin, WhisperDecoder):
    """Made by gate_hf_whisper() from a WhisperDecoder; token-level gates."""

    @property
    def gated_layers(self):
        return self.layers

    def forward(self, *args, **kwargs):
        if self.execution not in EXECUTIONS:
            raise ValueError(f"decoder.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.execution == "compact" and self.training and self.forced_keep is None:
            raise RuntimeError("compact execution skips the gates' gradients: train in masked mode, run compact")
        self._record = GateRecord()
        out = super().forward(*args, **kwargs)
        self.last_record = self._record
        return out


class GatedHFWhisperDecoderLayer(WhisperDecoderLayer):
    """A WhisperDecoderLayer under its decoder's token-level gates, with or without a cache."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, use_cache=True, **kwargs):
        decoder = self._localgp_parent
        index, cfg, x = self._localgp_index, decoder.pruning.config, hidden_states
        B, L = x.shape[:2]
        with profiled("gate"):
            context, pad = decoder.gate_context(encoder_hidden_states, None) if decoder.forced_keep is None \
                else (None, None)
            logits, x = decoder.layer_logits(index, x, context, pad)
        past = cache.self_attention_cache.get_seq_length(self.self_attn.layer_idx) if cache is not None else 0
        valid = torch.ones(B, L, dtype=torch.bool, device=x.device)
        lengths = torch.full((B,), L, dtype=torch.long, device=x.device)
        names = DECODER_MODULES[cfg.decoder]
        gate = PositionGate(logits, valid, lengths, names, cfg, decoder.execution, self.training, decoder._record,
                            f"decoder.{index}")
        if decoder.execution == "masked":
            x = gate.residual("self_attn", x, lambda h: self.self_attn(self.self_attn_layer_norm(h), cache=cache,
                                                                        attention_mask=attention_mask, **kwargs)[0])
            x = gate.residual("src_attn", x, lambda h: self.encoder_attn(
                self.encoder_attn_layer_norm(h), key_value_states=encoder_hidden_states, cache=cache, **kwargs)[0])
        else:
            x = self._compact_self_attention(gate, x, cache, past)
            x = self._compact_cross_attention(gate, x, encoder_hidden_states, cache)
        x = gate.residual("ffn", x, _mlp(self))
        if cache is not None:
            layer = cache.self_attention_cache.layers[self.self_attn.layer_idx]
            if type(layer) is DynamicLayer:
                layer.__class__ = GatedCacheLayer  # in place (ToMe's pattern): its decisions follow its keys/values
        if cache is not None and isinstance(layer, GatedCacheLayer):
            layer.add_masks(torch.stack([decoder._record.masks[f"decoder.{index}.{n}"] for n in names], dim=-1))
        return x

    def _compact_self_attention(self, gate: PositionGate, x: Tensor, cache, past: int) -> Tensor:
        """Every token's keys and values into the cache (kept or not), queries of the kept ones."""
        attn = HFAttention(self.self_attn)
        c = gate.compact("self_attn", x)
        with profiled("self_attn"):
            h = self.self_attn_layer_norm(x)
            keys, values = attn.key(h), attn.value(h)  # (B, L, H, Dh)
            if cache is not None:
                k, v = cache.self_attention_cache.update(keys.transpose(1, 2), values.transpose(1, 2),
                                                         self.self_attn.layer_idx)
                keys, values = k.transpose(1, 2), v.transpose(1, 2)
            if c.index.numel() == 0:
                return x
            L, S = x.shape[1], keys.shape[1]
            batch_of_row, position = c.index // L, c.index % L
            key_mask = None
            if L > 1:  # causal: a token at `past + position` sees the keys up to itself
                key_mask = torch.arange(S, device=x.device)[None] <= (past + position)[:, None]
            out = rows_attention(attn, self.self_attn_layer_norm(c.packed), batch_of_row, keys, values, key_mask)
        return gate.add_kept("self_attn", x, out, c.index)

    def _compact_cross_attention(self, gate: PositionGate, x: Tensor, memory: Tensor, cache) -> Tensor:
        c = gate.compact("src_attn", x)
        with profiled("src_attn"):
            keys, values, rows = shared_cross_keys(self.encoder_attn, memory, cache)
            if c.index.numel() == 0:
                return x
            out = rows_attention(HFAttention(self.encoder_attn), self.encoder_attn_layer_norm(c.packed),
                                 rows[c.index // x.shape[1]], keys, values, None)
        return gate.add_kept("src_attn", x, out, c.index)


# ------------------------------------------------------------------ conversion
def gate_hf_whisper(model: WhisperForConditionalGeneration, config: GateConfig) -> WhisperForConditionalGeneration:
    """Gates a transformers WhisperForConditionalGeneration in place, reusing its weights: the
    same GateConfig, predictors and parameter names as localgp's openai-whisper adapter
    (gate_whisper), so that gates trained there load here (load_gates)."""
    if not isinstance(model, WhisperForConditionalGeneration):
        raise TypeError(f"gate_hf_whisper: expected transformers' WhisperForConditionalGeneration, "
                        f"got {type(model).__name__}")
    if config.predictor == "global":
        raise ValueError("gate_hf_whisper: globalGP is not supported on the transformers backbone yet "
                         "(its decisions for the decoder would have to follow generate()'s beams)")
    if config.decoder not in (None, "token"):
        raise ValueError(f"gate_hf_whisper: the decoder is gated per token here, got decoder={config.decoder!r}")
    if config.prior is not None or config.stand_in_rank is not None:
        raise ValueError(f"gate_hf_whisper: gates trained under a rule or with stand-ins (GateConfig.prior "
                         f"{config.prior!r}, stand_in_rank {config.stand_in_rank!r}) are not supported on the "
                         f"transformers backbone yet (its encoder takes neither)")
    c = model.config
    if config.encoder:
        encoder = model.model.encoder
        encoder.__class__ = GatedHFWhisperEncoder
        init_encoder_gating(encoder, EncoderPruning(config, c.d_model, c.encoder_layers, ENCODER_MODULES[config.encoder],
                                                    c.vocab_size, 0, frames=c.max_source_positions))
        encoder.padding_rule = False
        encoder.context_queue = {}
        encoder._pass = None
        _reclass_layers(encoder, GatedHFWhisperEncoderLayer)
    for layer in model.model.decoder.layers:  # gated or not: the encoder projected once per clip in generate()
        layer.encoder_attn.__class__ = SharedCrossAttention
    if config.decoder:
        decoder = model.model.decoder
        decoder.__class__ = GatedHFWhisperDecoder
        init_decoder_gating(decoder, DecoderPruning(config, c.d_model, c.decoder_layers, DECODER_MODULES["token"]), None)
        decoder._record = GateRecord()
        _reclass_layers(decoder, GatedHFWhisperDecoderLayer)
    return model


def _reclass_layers(part, cls) -> None:
    for index, layer in enumerate(part.layers):
        layer.__class__ = cls
        object.__setattr__(layer, "_localgp_parent", part)  # not a submodule: no state-dict keys, no cycle
        layer._localgp_index = index


def queue_context(model: WhisperForConditionalGeneration, **streams: Tensor) -> None:
    """Contexts of N clips (e.g. speaker=(N, 256)) that the encoder takes in order, B rows per call:
    for pipeline(clips, batch_size=B), whose batches it forms itself (the clips in order, each at
    most 30 s: a long-form file is several calls of one clip). set_context() for one call."""
    encoder = model.model.encoder
    if not isinstance(encoder, GatedHFWhisperEncoder):
        raise ValueError("queue_context: the encoder is not gated (gate_hf_whisper first)")
    encoder.set_context(**streams)  # checks the names and shapes
    encoder.context_queue = {name: encoder.external_context[name] for name in streams}


def set_padding_rule(model: WhisperForConditionalGeneration, on: bool = True) -> None:
    """Skip every frame after the audio in every gated encoder module (the encoder must be given
    the feature extractor's attention_mask), on top of the gates' own decisions."""
    encoder = model.model.encoder
    if not isinstance(encoder, GatedHFWhisperEncoder):
        raise ValueError("set_padding_rule: the encoder is not gated (gate_hf_whisper first)")
    encoder.padding_rule = on


def gates_from_openai(model: WhisperForConditionalGeneration, source) -> WhisperForConditionalGeneration:
    """Gates `model` with the gates of an openai-whisper model gated by gate_whisper (e.g. a
    `localgp train` run's model): the same config, every gate tensor (predictors, context
    projections, skip values) and the contexts set on it."""
    parts = [(getattr(source.encoder, "pruning", None), "encoder"), (getattr(source.decoder, "pruning", None), "decoder")]
    configs = [p.config for p, _ in parts if p is not None]
    if not configs:
        raise ValueError("gates_from_openai: the source model is not gated")
    gate_hf_whisper(model, configs[0])
    for pruning, name in parts:
        if pruning is not None:
            target = getattr(model.model, name)
            target.pruning.load_state_dict(pruning.state_dict())
            target.external_context = dict(getattr(source, name).external_context)
    return model


def load_gates(model: WhisperForConditionalGeneration, run_dir) -> WhisperForConditionalGeneration:
    """Gates `model` with the trained gates of a `localgp train` run of Whisper base."""
    from localgp.errors import UserError
    from localgp.runs import load_run

    run = load_run(run_dir)
    if run.config.backbone != "whisper-base":
        raise UserError(f"load_gates: {run_dir} is a {run.config.backbone} run, not a whisper-base one")
    return gates_from_openai(model, run.model)
