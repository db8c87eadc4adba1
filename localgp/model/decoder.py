"""A gated Transformer decoder: ESPnet's TransformerDecoder whose layers run with token-level
or utterance-wise pruning masks, `masked` or `compact` (see gating.py). A token that skips
self-attention still provides its keys and values to later tokens, so both executions compute
the same function. Gate parameters live under `decoder.pruning`.
"""

from __future__ import annotations

import torch
from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from torch import Tensor, nn

from localgp import ops
from localgp.gates import GateRecord, LocalGatePredictor, random_keep_logits
from localgp.model.attention import heads, rows_attention
from localgp.model.config import DECODER_MODULES, EXECUTIONS, GateConfig
from localgp.model.gating import PositionGate, UtteranceGate


class DecoderPruning(nn.Module):
    """localGP predictors of the decoder and its context projections (prefix `pruning.`).

    Context: the configured utterance-level streams (e.g. lang2vec), or, when none is
    configured, the encoder output itself.
    """

    def __init__(self, config: GateConfig, d_model: int, num_layers: int):
        super().__init__()
        self.config = config
        self.modules_per_layer = DECODER_MODULES[config.decoder]
        self.context_proj = nn.ModuleDict(
            {name: nn.Linear(size, d_model) for name, size in config.decoder_contexts}
        )
        self.gates = nn.ModuleList()
        if config.predictor == "local":
            self.gates.extend(
                LocalGatePredictor(d_model, len(self.modules_per_layer), config.heads) for _ in range(num_layers)
            )


class GatedTransformerDecoder(TransformerDecoder):
    """Made by `gate_decoder()` from a TransformerDecoder; not constructed directly."""

    pruning: DecoderPruning
    execution: str
    forced_keep: float | None
    forced_generator: torch.Generator
    external_context: dict[str, Tensor]
    last_record: GateRecord | None

    def set_context(self, **streams: Tensor) -> None:
        """Utterance-level decoder context, e.g. lang2vec=(B, 289). Kept until changed."""
        expected = {name for name, _ in self.pruning.config.decoder_contexts}
        unknown = set(streams) - expected
        if unknown:
            raise ValueError(f"set_context: unknown decoder context {sorted(unknown)}; configured: {sorted(expected)}")
        for name, seq in streams.items():
            self.external_context[name] = seq[:, None] if seq.dim() == 2 else seq

    def _context(self, memory: Tensor, memory_mask: Tensor):
        """(B, K, Tc, D) and its key padding mask (B, K*Tc), True = padding."""
        cfg = self.pruning.config
        if not cfg.decoder_contexts:
            return memory[:, None], ~memory_mask.squeeze(1)
        streams = []
        for name, _ in cfg.decoder_contexts:
            if name not in self.external_context:
                raise ValueError(f"decoder: context {name!r} is configured but was not given; call set_context({name}=...)")
            seq = self.pruning.context_proj[name](self.external_context[name].to(memory.dtype))
            if seq.shape[1] != 1:
                raise ValueError(f"decoder: context {name!r} must be utterance-level (B, size), got {tuple(seq.shape)}")
            streams.append(seq)
        return torch.stack(streams, dim=1), None

    def _layer_logits(self, index, x, context, context_pad):
        cfg = self.pruning.config
        per_layer = len(self.pruning.modules_per_layer)
        token = cfg.decoder == "token"
        if self.forced_keep is not None:
            shape = (*x.shape[:2], per_layer) if token else (x.shape[0], per_layer)
            return random_keep_logits(shape, self.forced_keep, self.forced_generator, x.device).to(x.dtype), x, context
        if cfg.predictor == "global":
            source = self.global_source
            if source.decoder_logits is None:
                raise ValueError("decoder: globalGP's decisions come from the encoder's forward pass; run it first")
            units = source.decoder_logits.unflatten(1, (len(self.decoders), per_layer))
            return units[:, index], x, context
        # The memory context is never aligned to the tokens: it is not updated between layers.
        logits, x, _ = self.pruning.gates[index](x, context, context_pad)
        if not token:  # utterance-wise: the prompt tokens decide (the first position)
            logits = logits[:, 0]
        return logits, x, context

    def forward(self, hs_pad: Tensor, hlens: Tensor, ys_in_pad: Tensor, ys_in_lens: Tensor,
                return_hs: bool = False, return_all_hs: bool = False):
        if self.execution not in EXECUTIONS:
            raise ValueError(f"decoder.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.execution == "compact" and self.training and self.forced_keep is None:
            raise RuntimeError("compact execution skips the gates' gradients: train in masked mode, run compact")
        L = ys_in_pad.shape[1]
        valid = ~make_pad_mask(ys_in_lens, maxlen=L).to(ys_in_pad.device)
        tgt_mask = valid[:, None, :] & subsequent_mask(L, device=ys_in_pad.device)[None]
        memory = hs_pad
        memory_mask = (~make_pad_mask(hlens, maxlen=memory.size(1)))[:, None, :].to(memory.device)
        x = self.embed(ys_in_pad)
        cfg = self.pruning.config
        context, context_pad = (None, None)
        if cfg.predictor == "local" and self.forced_keep is None:
            context, context_pad = self._context(memory, memory_mask)
        record = GateRecord()
        hidden = []
        for index, layer in enumerate(self.decoders):
            logits, x, context = self._layer_logits(index, x, context, context_pad)
            x = run_decoder_layer(layer, x, valid, ys_in_lens, tgt_mask, memory, memory_mask, logits, cfg,
                                  self.execution, record, f"decoder.{index}")
            hidden.append(x)
        self.last_record = record
        x = self.after_norm(x)
        out = self.output_layer(x) if self.output_layer is not None else x
        olens = tgt_mask.sum(1)
        if return_hs:
            return (out, x), olens
        if return_all_hs:
            return (out, hidden), olens
        return out, olens

    def _next_token(self, ys: Tensor, memory: Tensor, memory_mask: Tensor | None = None):
        """Log-probabilities of the token after each prefix ys (n, L), and the last hidden state:
        the gated decoder over the whole prefix, without a cache (ESPnet's interfaces below;
        localgp's own decoder is the fast path)."""
        n, L = ys.shape
        if memory_mask is None:
            hlens = torch.full((n,), memory.shape[1], device=memory.device)
        else:
            hlens = memory_mask.reshape(memory_mask.shape[0], -1).sum(-1).expand(n)
        (logits, hs), _ = self.forward(memory, hlens, ys, torch.full((n,), L, device=ys.device), return_hs=True)
        return torch.log_softmax(logits[:, -1], dim=-1), hs[:, -1]

    def batch_score(self, ys: Tensor, states, xs: Tensor, return_hs: bool = False):
        """ESPnet's batch scorer interface (BatchBeamSearch); no per-hypothesis state is kept."""
        logp, hs = self._next_token(ys, xs)
        return (logp, hs) if return_hs else (logp, [None] * ys.shape[0])

    def forward_one_step(self, tgt: Tensor, tgt_mask: Tensor, memory: Tensor, memory_mask: Tensor | None = None,
                         *, cache=None, return_hs: bool = False):
        """ESPnet's one-step interface (its non-batch beam search scores through it)."""
        logp, hs = self._next_token(tgt, memory, memory_mask)
        new_cache = [None] * len(self.decoders)
        return ((logp, hs), new_cache) if return_hs else (logp, new_cache)


def run_decoder_layer(layer, x, valid, lengths, tgt_mask, memory, memory_mask, logits, cfg, execution,
                      record, prefix) -> Tensor:
    """One pre-norm decoder layer under its gates. x (B, L, D)."""
    names = DECODER_MODULES[cfg.decoder]
    ffn = lambda h, *_: layer.dropout(layer.feed_forward(layer.norm3(h)))  # noqa: E731
    if cfg.decoder == "token":
        gate = PositionGate(logits, valid, lengths, names, cfg, execution, layer.training, record, prefix)
        x = _token_attention(gate, "self_attn", layer.self_attn, layer.norm1, layer.dropout, x, layer.norm1(x),
                             tgt_mask)
        x = _token_attention(gate, "src_attn", layer.src_attn, layer.norm2, layer.dropout, x, memory, memory_mask)
        return gate.residual("ffn", x, ffn)

    gate = UtteranceGate(logits, names, cfg, execution, layer.training, record, prefix)

    def self_attn(h, m):
        n = layer.norm1(h)
        return layer.dropout(layer.self_attn(n, n, n, m))

    def src_attn(h, mem, mem_mask):
        return layer.dropout(layer.src_attn(layer.norm2(h), mem, mem, mem_mask))

    x = gate.residual("self_attn", x, self_attn, row_args=(tgt_mask,))
    x = gate.residual("src_attn", x, src_attn, row_args=(memory, memory_mask))
    return gate.residual("ffn", x, ffn)


def _token_attention(gate: PositionGate, name: str, attn, norm, dropout, x, source, mask):
    """x + attention where kept, for self-attention (source = norm(x), mask (B, L, L) causal)
    and src-attention (source = memory, mask (B, 1, S)). Kept tokens query the keys/values of
    the whole source, so a token that skips self-attention still serves later tokens."""
    if gate.execution == "masked":
        out = dropout(attn(norm(x), source, source, mask))
        return x + out * gate.mask(name).to(x.dtype)[..., None]
    c = gate.compact(name, x)
    keys, values = attn.k_norm(heads(attn, attn.linear_k, source)), heads(attn, attn.linear_v, source)
    L = x.shape[1]
    batch_of_row, position = c.index // L, c.index % L
    key_mask = mask.expand(-1, L, -1)[batch_of_row, position]  # (N, S) of each kept token
    out = rows_attention(attn, norm(c.packed), batch_of_row, keys, values, key_mask)
    return ops.scatter_pad(dropout(out), c.index, x)


def gate_decoder(decoder: TransformerDecoder, config: GateConfig, global_source=None) -> GatedTransformerDecoder:
    """Turns an ESPnet TransformerDecoder into a gated one, in place, reusing its parameters.

    With globalGP the decisions come from the gated encoder `global_source`.
    """
    if not isinstance(decoder, TransformerDecoder):
        raise TypeError(f"gate_decoder: expected an ESPnet TransformerDecoder, got {type(decoder).__name__}")
    if config.decoder is None:
        raise ValueError("gate_decoder: GateConfig.decoder is None (the decoder is not gated)")
    layer = decoder.decoders[0]
    if not layer.normalize_before or layer.concat_after:
        raise ValueError("gate_decoder: only pre-norm layers without concat_after are supported (as in OWSM)")
    if config.predictor == "global" and global_source is None:
        raise ValueError("gate_decoder: globalGP's decisions come from a gated encoder; pass global_source")
    decoder.__class__ = GatedTransformerDecoder
    d_model = decoder.decoders[0].size
    decoder.pruning = DecoderPruning(config, d_model, len(decoder.decoders)).to(next(decoder.parameters()).device)
    decoder.execution = "masked"
    decoder.forced_keep = None
    decoder.forced_generator = torch.Generator().manual_seed(0)
    decoder.external_context = {}
    decoder.last_record = None
    # Not a submodule: the encoder owns the predictor and its parameters.
    object.__setattr__(decoder, "global_source", global_source)
    return decoder
