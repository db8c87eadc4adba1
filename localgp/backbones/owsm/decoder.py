"""A gated Transformer decoder: ESPnet's TransformerDecoder whose layers run with token-level
or utterance-wise pruning masks, `masked` or `compact` (see gating.py). A token that skips
self-attention still provides its keys and values to later tokens, so both executions compute
the same function. Gate parameters live under `decoder.pruning`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from localgp.gates import GateRecord
from localgp.model.config import DECODER_MODULES, EXECUTIONS, GateConfig
from localgp.model.gating import PositionGate, UtteranceGate
from localgp.model.layout import DecoderLayerView, DecoderView
from localgp.backbones.owsm.weights import EspnetAttention
from localgp.model.pruning import DecoderPruning, GatedDecoderMixin, init_decoder_gating
from localgp.quiet import espnet_imports

with espnet_imports():  # ESPnet's modules, without their notices (localgp.quiet)
    from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
    from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder


class GatedTransformerDecoder(GatedDecoderMixin, TransformerDecoder):
    """Made by `gate_decoder()` from a TransformerDecoder; not constructed directly."""

    @property
    def gated_layers(self):
        return self.decoders

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
            context, context_pad = self.gate_context(memory, memory_mask.squeeze(1))
        record = GateRecord()
        hidden = []
        for index, layer in enumerate(self.decoders):
            logits, x = self.layer_logits(index, x, context, context_pad)
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
        self_attn, src_attn = EspnetAttention(layer.self_attn), EspnetAttention(layer.src_attn)
        source = layer.norm1(x)
        x = gate.token_attention("self_attn", x, self_attn, layer.norm1, source, tgt_mask, layer.dropout,
                                 full=lambda h: layer.self_attn(h, source, source, tgt_mask))
        x = gate.token_attention("src_attn", x, src_attn, layer.norm2, memory, memory_mask, layer.dropout,
                                 full=lambda h: layer.src_attn(h, memory, memory, memory_mask))
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
    pruning = DecoderPruning(config, decoder.decoders[0].size, len(decoder.decoders), DECODER_MODULES[config.decoder])
    init_decoder_gating(decoder, pruning, global_source)
    return decoder


def espnet_decoder_view(decoder: TransformerDecoder) -> DecoderView:
    """ESPnet's TransformerDecoder (plain or gated) as localgp's incremental decoder sees it."""
    layer = decoder.decoders[0]
    if not layer.normalize_before or layer.concat_after:
        raise ValueError("IncrementalDecoder: only pre-norm layers without concat_after are supported (as in OWSM)")
    if not isinstance(decoder.embed, torch.nn.Sequential) or not hasattr(decoder.embed[1], "pe"):
        raise ValueError("IncrementalDecoder: the decoder's input layer must be ESPnet's 'embed' "
                         "(Embedding + PositionalEncoding)")
    embedding, positional = decoder.embed[0], decoder.embed[1]

    def embed(tokens: Tensor, position: int) -> Tensor:
        if position >= positional.pe.shape[1] or positional.pe.dtype != embedding.weight.dtype:
            positional.extend_pe(embedding.weight.new_empty(1, 2 * position + 1))
        return embedding(tokens) * positional.xscale + positional.pe[0, position]

    layers = [
        DecoderLayerView(
            self_norm=layer.norm1, self_attn=EspnetAttention(layer.self_attn), src_norm=layer.norm2,
            src_attn=EspnetAttention(layer.src_attn),
            ffn=lambda x, layer=layer: layer.dropout(layer.feed_forward(layer.norm3(x))),
            ffn_macs=2 * layer.feed_forward.w_1.weight.numel(), dropout=layer.dropout)
        for layer in decoder.decoders
    ]
    output = decoder.output_layer
    return DecoderView(layers, embed, decoder.after_norm, output.weight, output.bias, max_positions=None)
