"""What every backbone's beam search shares, backbone-free: `DecodeOptions` (the decoding settings
`localgp decode` and `evaluate` take; a backbone with its own options converts them: see
Backbone.decode_options), `Hypothesis` (a finished hypothesis with its gates) and `decoder_keep`.
The beam searches themselves live with their backbones: ESPnet's, `BatchBeamSearch`, in
localgp/backbones/owsm/decoding.py; openai-whisper's, `WhisperBeamSearch`, in
localgp/backbones/whisper/decoding.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from localgp.decoding.incremental import MODULES
from localgp.errors import UserError
from localgp.model.config import EXECUTIONS


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 5  # hypotheses kept per utterance
    nbest: int = 1  # hypotheses returned per utterance, best first
    ctc_weight: float = 0.0  # weight of CTC prefix scores; the decoder gets 1 - ctc_weight (as ESPnet)
    pre_beam_ratio: float = 1.5  # with CTC, only each hypothesis' best int(ratio * beam) tokens get CTC scores
    penalty: float = 0.0  # length bonus added per output token (ESPnet's length_bonus weight)
    # 0: at most one token per encoder frame, and ESPnet's end detection; > 0: at most this ratio of
    # the encoder frames; < 0: at most -maxlenratio tokens.
    maxlenratio: float = 0.0
    minlenratio: float = 0.0  # shortest accepted hypothesis: ratio of encoder frames, or -N tokens
    # Benchmarks: exactly this many steps for every utterance (<eos> is never chosen; it is appended
    # after the last step, as ESPnet does at its length limit). None: decode normally.
    fixed_length: int | None = None
    # Gated decoders: "compact" skips pruned modules, "masked" computes them and multiplies by the mask.
    execution: str = "compact"

    def __post_init__(self):
        if self.beam_size < 1:
            raise UserError(f"DecodeOptions.beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise UserError(f"DecodeOptions.nbest must lie in [1, beam_size={self.beam_size}], got {self.nbest}")
        if not 0 <= self.ctc_weight < 1:
            raise UserError(f"DecodeOptions.ctc_weight must lie in [0, 1), got {self.ctc_weight}")
        if self.pre_beam_ratio < 1:
            raise UserError(f"DecodeOptions.pre_beam_ratio must be >= 1, got {self.pre_beam_ratio}")
        if self.fixed_length is not None and self.fixed_length < 1:
            raise UserError(f"DecodeOptions.fixed_length must be >= 1 or None, got {self.fixed_length}")
        if self.execution not in EXECUTIONS:
            raise UserError(f"DecodeOptions.execution must be one of {EXECUTIONS}, got {self.execution!r}")


@dataclass
class Hypothesis:
    yseq: list[int]  # primer, output tokens, <eos>
    score: float  # the weighted sum of log-probabilities (ESPnet's Hypothesis.score)
    primer_length: int
    # (positions, layers, modules) bool: the gates of each fed position (primer included), for
    # gated decoders; the last output token has none when the length limit ended the hypothesis.
    keep: Tensor | None = None
    slots: Tensor | None = field(default=None, repr=False)  # where `keep` is read from, until it is

    @property
    def token_ids(self) -> list[int]:
        """The output tokens, without primer and <eos>."""
        return self.yseq[self.primer_length : -1]


def decoder_keep(hypothesis, primer_length: int) -> tuple[dict[str, float], list[float]]:
    """Skipped share per decoder module over the hypothesis' fed positions, and for each output
    token the share of layers that kept src-attention while predicting it (the position before)."""
    keep = hypothesis.keep
    if keep is None:
        return {}, []
    skipped = {f"decoder.{m}": 1 - float(keep[:, :, i].float().mean()) for i, m in enumerate(MODULES)}
    src = keep[:, :, MODULES.index("src_attn")].float().mean(1)  # (positions,)
    per_token = [float(src[primer_length - 1 + j]) for j in range(len(hypothesis.token_ids))]
    return skipped, per_token
