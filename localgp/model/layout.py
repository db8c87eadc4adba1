"""What localgp's incremental decoder needs of a backbone's decoder, backbone-free: each adapter
(OWSM's espnet_decoder_view in localgp/backbones/owsm/decoder.py, openai-whisper's
whisper_decoder_view in localgp/backbones/whisper/model.py) describes its decoder's layers with
these, and its beam search passes that view to the IncrementalDecoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from localgp.model.attention import Projections


@dataclass(frozen=True)
class DecoderLayerView:
    """One pre-norm decoder layer: x + self_attn(self_norm(x)), + src_attn(src_norm(x), memory),
    + ffn(x) (ffn includes its own norm); `dropout` is applied to each attention output."""

    self_norm: Callable[[Tensor], Tensor]
    self_attn: Projections
    src_norm: Callable[[Tensor], Tensor]
    src_attn: Projections
    ffn: Callable[[Tensor], Tensor]
    ffn_macs: int  # multiply-accumulates of ffn per row
    dropout: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DecoderView:
    layers: list[DecoderLayerView]
    embed: Callable[[Tensor, int], Tensor]  # (token ids (n,), position) -> (n, D)
    final_norm: Callable[[Tensor], Tensor]
    output_weight: Tensor  # (V, D)
    output_bias: Tensor | None
    max_positions: int | None  # None: positions are extended as needed
