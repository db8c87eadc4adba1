"""Decoding, backbone-free: the incremental decoder every backbone's beam search runs on
(incremental.py) and what those searches share (beam.py: DecodeOptions, Hypothesis). The searches
live with their backbones (localgp/backbones/owsm/decoding.py, localgp/backbones/whisper/decoding.py)."""

from localgp.decoding.beam import DecodeOptions, Hypothesis
from localgp.decoding.incremental import MODULES, DecoderCache, IncrementalDecoder, RowSet

__all__ = ["MODULES", "DecodeOptions", "DecoderCache", "Hypothesis", "IncrementalDecoder", "RowSet"]
