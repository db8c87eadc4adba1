"""Decoding: the incremental decoder shared by every backbone, and the beam searches (ESPnet's
rules for OWSM, Whisper's rules for Whisper) over many utterances at once."""

from localgp.decoding.beam import BatchBeamSearch, CTCPrefixScores, DecodeOptions, Hypothesis, timestamp_ids
from localgp.decoding.incremental import MODULES, DecoderCache, IncrementalDecoder, RowSet, decoder_view

__all__ = ["MODULES", "BatchBeamSearch", "CTCPrefixScores", "DecodeOptions", "DecoderCache", "Hypothesis",
           "IncrementalDecoder", "RowSet", "decoder_view", "timestamp_ids"]
