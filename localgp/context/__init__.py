"""External context for localGP: speaker, acoustic events, language.

Each extractor maps one utterance (16 kHz mono float waveform) to a context sequence
(Tc, size); the gated model projects it to d_model and aligns it to the encoder frames
(`localgp.gates.align_to_frames`). The speech itself ("front") needs no extractor: the gated
encoder takes its subsampled features directly.

Pretrained weights come from local files; random initialisation happens only when asked for
(`allow_random=True`) and is logged, so a results table never silently rests on random
context models.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from localgp.data.audio import MIN_SAMPLES
from localgp.errors import UserError

SAMPLE_RATE = 16000
log = logging.getLogger(__name__)


def as_waveform(wav, sample_rate: int, who: str) -> torch.Tensor:
    """A 1-D float32 16 kHz tensor, or a clear error."""
    if sample_rate != SAMPLE_RATE:
        raise UserError(f"{who}: sample_rate must be 16000 Hz (resample first, as localgp.data.audio.load_audio "
                         f"does), got {sample_rate}")
    wav = torch.as_tensor(np.asarray(wav), dtype=torch.float32)
    if wav.dim() != 1:
        raise UserError(f"{who}: expected mono audio (samples,), got shape {tuple(wav.shape)}")
    if wav.numel() < MIN_SAMPLES:
        raise UserError(f"{who}: audio of {wav.numel()} samples is shorter than {MIN_SAMPLES / SAMPLE_RATE} s")
    return wav


def warn_random(who: str) -> None:
    log.warning("%s: no pretrained weights given, using RANDOM initialisation as asked (allow_random=True)", who)
