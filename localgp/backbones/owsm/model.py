"""The gated OWSM model: ESPnet's S2T model with its encoder (encoder.py) and decoder (decoder.py)
gated in place, as gate_whisper gates openai-whisper's (localgp/backbones/whisper/model.py)."""

from __future__ import annotations

from torch import nn

from localgp.backbones.owsm.decoder import gate_decoder
from localgp.backbones.owsm.encoder import gate_encoder
from localgp.model.config import DECODER_MODULES, GateConfig


def gate_s2t_model(model: nn.Module, config: GateConfig) -> nn.Module:
    """Gates the encoder and/or decoder of an ESPnetS2TModel in place, reusing its weights.

    The original state-dict keys are unchanged (real OWSM weights load as before); gate
    parameters are under `encoder.pruning.` and `decoder.pruning.`.
    """
    decoder_units = 0
    if config.decoder and config.predictor == "global":
        decoder_units = len(model.decoder.decoders) * len(DECODER_MODULES[config.decoder])
    if config.encoder:
        gate_encoder(model.encoder, config, vocab_size=model.vocab_size, decoder_units=decoder_units)
    if config.decoder:
        gate_decoder(model.decoder, config, global_source=model.encoder if config.predictor == "global" else None)
    return model
