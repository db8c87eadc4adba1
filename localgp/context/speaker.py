"""Speaker context: ECAPA-TDNN through speechbrain, or resemblyzer's GE2E encoder (offline)."""

from __future__ import annotations

from pathlib import Path

import torch

from localgp.context import SAMPLE_RATE, as_waveform, warn_random
from localgp.errors import UserError


class EcapaSpeaker:
    """speechbrain's ECAPA-TDNN with the spkrec-ecapa-voxceleb architecture: (1, 192) per utterance.

    model_dir: a local copy of that model (embedding_model.ckpt, and mean_var_norm_emb.ckpt is
    not needed for the embedding itself). Without it, allow_random=True builds random weights.
    """

    name, size = "speaker", 192

    def __init__(self, model_dir: str | Path | None = None, allow_random: bool = False, device: str = "cpu"):
        from speechbrain.lobes.features import Fbank
        from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
        from speechbrain.processing.features import InputNormalization

        self.fbank = Fbank(n_mels=80)
        self.norm = InputNormalization(norm_type="sentence", std_norm=False)
        self.model = ECAPA_TDNN(
            input_size=80, channels=[1024, 1024, 1024, 1024, 3072], kernel_sizes=[5, 3, 3, 3, 1],
            dilations=[1, 2, 3, 4, 1], attention_channels=128, lin_neurons=192,
        )
        if model_dir is not None:
            ckpt = Path(model_dir) / "embedding_model.ckpt"
            if not ckpt.exists():
                raise FileNotFoundError(f"EcapaSpeaker: {ckpt} not found (a speechbrain spkrec-ecapa-voxceleb directory has it)")
            self.model.load_state_dict(torch.load(ckpt, map_location="cpu"))
        elif allow_random:
            warn_random("EcapaSpeaker")
        else:
            raise UserError("EcapaSpeaker: pass model_dir (a local speechbrain spkrec-ecapa-voxceleb copy), "
                             "or allow_random=True to use random weights")
        self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, wav, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        wav = as_waveform(wav, sample_rate, "EcapaSpeaker").to(self.device)[None]
        feats = self.norm(self.fbank(wav), torch.ones(1, device=self.device))
        return self.model(feats)[0]  # (1, 192)


class ResemblyzerSpeaker:
    """resemblyzer's pretrained GE2E encoder (its weights ship in the wheel): one 256-dim
    embedding per partial window of the utterance, a sequence over time (Tc, 256)."""

    name, size = "speaker", 256

    def __init__(self, device: str = "cpu"):
        from resemblyzer import VoiceEncoder

        self.encoder = VoiceEncoder(device, verbose=False)

    def __call__(self, wav, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        wav = as_waveform(wav, sample_rate, "ResemblyzerSpeaker").numpy()
        _, partials, _ = self.encoder.embed_utterance(wav, return_partials=True)
        return torch.from_numpy(partials).float()
