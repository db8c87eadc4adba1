"""Acoustic-event context: BEATs through ESPnet's BeatsEncoder, the output of its 2nd layer."""

from __future__ import annotations

from pathlib import Path

import torch

from localgp.context import SAMPLE_RATE, as_waveform, warn_random
from localgp.errors import UserError

PATCHES_PER_STEP = 8  # BEATs' 128 mel bins / 16-bin patches: 8 frequency patches per time step


class BeatsEvents:
    """(T', 768) per utterance, one vector per 160 ms: the frequency patches of each time step
    pooled (BEATs' output is time-major, 8 patches per step)."""

    name, size = "event", 768

    def __init__(self, checkpoint: str | Path | None = None, allow_random: bool = False, max_layer: int = 2,
                 beats_config: dict | None = None, device: str = "cpu"):
        from localgp.quiet import espnet_imports

        with espnet_imports():
            from espnet2.asr.encoder.beats_encoder import BeatsEncoder

        if checkpoint is not None and not Path(checkpoint).exists():
            raise FileNotFoundError(f"BeatsEvents: checkpoint {checkpoint} not found")
        if checkpoint is None:
            if not allow_random:
                raise UserError("BeatsEvents: pass a BEATs checkpoint, or allow_random=True to use random weights")
            warn_random("BeatsEvents")
        self.encoder = BeatsEncoder(input_size=1, beats_ckpt_path=str(checkpoint) if checkpoint else None,
                                    max_layer=max_layer, beats_config=beats_config).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, wav, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        wav = as_waveform(wav, sample_rate, "BeatsEvents").to(self.device)[None]
        out, _, _ = self.encoder(wav, torch.tensor([wav.shape[1]], device=self.device))
        steps = out.shape[1] // PATCHES_PER_STEP
        return out[0, : steps * PATCHES_PER_STEP].reshape(steps, PATCHES_PER_STEP, -1).mean(1)
