"""What is gated, by which predictor, with which context: one frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

ENCODER_MODULES = {
    # Temporal pruning: per frame. cgMLP and the merge look across time and always run.
    "temporal": ("ffn1", "attn", "ffn2"),
    "utterance": ("ffn1", "attn", "cgmlp", "ffn2"),
}
DECODER_MODULES = {
    "token": ("self_attn", "src_attn", "ffn"),
    "utterance": ("self_attn", "src_attn", "ffn"),
}
EXECUTIONS = ("masked", "compact")
PREDICTORS = ("local", "global", "rule")
# No gate at all, every module on every position: what benchmarks measure pruning against. Not a
# pruning execution (set_execution refuses it); a gated part that supports it says so.
DENSE = "dense"


@dataclass(frozen=True)
class GateConfig:
    # "local": localGP, a predictor per layer conditioned on context (the localGP paper);
    # "global": globalGP, one utterance-wise predictor for all modules (the ICLR 2025 paper);
    # "rule": no predictor and no context: the frames a fixed rule keeps (`Rule`; the encoder's
    # set_rule_keep() per batch), the same in every gated module of every layer.
    predictor: str = "local"
    # Encoder pruning granularity: "temporal" (per frame), "utterance", or None (not gated).
    encoder: str | None = "temporal"
    # Decoder pruning granularity: "token", "utterance", or None (not gated).
    decoder: str | None = None
    # Encoder context streams for localGP: (name, feature size); "front" is the subsampled
    # speech itself (size ignored), others are given with set_context() (speaker: 192,
    # event: 768, lang2vec: 289), projected to d_model and aligned to the frames.
    contexts: tuple[tuple[str, int], ...] = (("front", 0),)
    # Decoder context streams for localGP, utterance-level, e.g. (("lang2vec", 289),).
    decoder_contexts: tuple[tuple[str, int], ...] = ()
    # localGP's encoder context: None, every stream aligned to the frames (the paper: "front" is
    # the frames themselves, an utterance-level stream repeated to every frame), so each layer's
    # predictor attends T queries to K*T keys; an int N, "front" average-pooled to N frames and
    # the other streams at their own length (a speaker embedding: one key): T x (N + ...) keys.
    # Whisper's 1500 frames make the aligned predictors cost about as much as the layers they gate.
    context_frames: int | None = None
    heads: int = 4  # cross-attention heads of the localGP predictors
    # Width of the localGP predictors' cross-attention; None: d_model (the paper). Smaller, the frames
    # are projected in and the result back out: Whisper's predictors at 64 cost ~1/5 of d_model's.
    predictor_width: int | None = None
    # localGP adds its attention result to the layer input (the paper); False: the predictors only
    # decide, the model's own computation is untouched (gates trained on a frozen pretrained model).
    inject: bool = True
    # What a skipped encoder module adds to its frame: "zero" (nothing: the papers), or "mean" (the
    # output the dense model gives on average at that position of the window, calibrated on
    # training clips: a constant per layer, module and position, so skipping still computes
    # nothing per frame). Whisper's encoder needs "mean": its 1500-frame window is mostly padding,
    # and zeroing any layer's output there breaks the transcript (WER 6.5 -> 30 to 100).
    skip_fill: str = "zero"
    # Which frames a kept frame's attention sees: "kept" (the kept frames only: skipped frames
    # compute nothing) or "all" (every frame's keys and values; the skipped frames' queries and
    # outputs are what is saved). Whisper loses accuracy with "kept" (WER 6.5 -> 12.9 on the
    # padding-skipped window).
    attention_keys: str = "kept"
    threshold: float = 0.5  # keep when softmax(logits)[keep] > threshold (inference)
    tau: float = 1.0  # Gumbel-softmax temperature (training)
    # A training-free rule under the learned encoder gates (predictor "local", encoder "temporal"):
    # "padding[:MARGIN]" or "silence[:MARGIN]" (parse_rule's text). The frames the rule skips are
    # skipped in every gated module of every layer (they get the skip fill), and the predictors
    # decide only on the frames it keeps: the sparsity they are trained to, and that the target
    # sets, is of those frames (speech, not padding). None: the predictors decide every frame.
    prior: str | None = None
    # A learned stand-in for a skipped encoder module's output, per frame: a rank-r linear map of
    # the frame's layer-normalised input (StandIn), added to the skip fill where the predictors
    # skipped the module (not at the prior rule's frames). Its output layer starts at zero (the
    # fill alone); it trains with the gates (distillation). Costs 4 r / (module's MACs per
    # frame / D) of a frame's module: r=32 is ~3% of Whisper base's MLP. None: no stand-in.
    stand_in_rank: int | None = None

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise ValueError(f"GateConfig.predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.predictor == "rule" and (self.encoder != "temporal" or self.decoder is not None):
            raise ValueError("GateConfig: predictor 'rule' keeps frames of the encoder: encoder='temporal', decoder=None")
        if self.encoder not in (None, *ENCODER_MODULES):
            raise ValueError(f"GateConfig.encoder must be one of {list(ENCODER_MODULES)} or None, got {self.encoder!r}")
        if self.decoder not in (None, *DECODER_MODULES):
            raise ValueError(f"GateConfig.decoder must be one of {list(DECODER_MODULES)} or None, got {self.decoder!r}")
        if self.encoder is None and self.decoder is None:
            raise ValueError("GateConfig: gate the encoder, the decoder or both")
        if self.predictor == "global" and "temporal" == self.encoder or (
            self.predictor == "global" and self.decoder == "token"
        ):
            raise ValueError("GateConfig: globalGP is utterance-wise: use encoder='utterance' and decoder='utterance'")
        if self.predictor == "local" and self.encoder and not self.contexts:
            raise ValueError("GateConfig: localGP needs at least one encoder context (e.g. ('front', 0))")
        if self.skip_fill not in ("zero", "mean"):
            raise ValueError(f"GateConfig.skip_fill must be 'zero' or 'mean', got {self.skip_fill!r}")
        if self.attention_keys not in ("kept", "all"):
            raise ValueError(f"GateConfig.attention_keys must be 'kept' or 'all', got {self.attention_keys!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"GateConfig.threshold must lie in (0, 1), got {self.threshold}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"GateConfig.tau must be positive and finite, got {self.tau}")
        if self.context_frames is not None and (not isinstance(self.context_frames, int) or self.context_frames < 1):
            raise ValueError(f"GateConfig.context_frames must be a positive integer or None, got {self.context_frames!r}")
        if self.heads < 1:
            raise ValueError(f"GateConfig.heads must be at least 1, got {self.heads}")
        if self.stand_in_rank is not None and (not isinstance(self.stand_in_rank, int) or self.stand_in_rank < 1
                                               or self.encoder != "temporal"):
            raise ValueError(f"GateConfig.stand_in_rank must be a positive integer, with encoder='temporal' (per-frame "
                             f"stand-ins), or None; got {self.stand_in_rank!r} with encoder={self.encoder!r}")
        if self.prior is not None:
            if not isinstance(self.prior, str) or self.prior.split(":")[0] not in ("padding", "silence"):
                raise ValueError(f"GateConfig.prior must be padding[:MARGIN], silence[:MARGIN] or None, got {self.prior!r}")
            parse_rule(self.prior)  # its settings
            if self.predictor != "local" or self.encoder != "temporal":
                raise ValueError("GateConfig.prior: a rule under per-frame predictors: predictor='local', "
                                 "encoder='temporal'")
        if self.predictor_width is not None and (not isinstance(self.predictor_width, int) or self.predictor_width < 1
                                                 or self.predictor_width % self.heads):
            raise ValueError(f"GateConfig.predictor_width must be a positive multiple of heads ({self.heads}) or None, "
                             f"got {self.predictor_width!r}")


# The training-free rules (`localgp transcribe/decode --gates RULE`), no predictor, no context:
# "padding": every frame after the audio skipped in every gated encoder module (mean fill);
# "silence": also the frames inside the audio that the VAD marks as non-speech;
# "attention": Early Attentive Sparsification: at encoder block `block` (1-based) the frames are
# ranked by the attention they receive (softmax(QK^T) of that block, mean over heads and
# queries); the top `keep` share stays, in order, and the rest leave the sequence for blocks
# `block`.. and for the decoder's cross-attention.
RULES = ("padding", "silence", "attention")
ATTENTION_BLOCK, ATTENTION_KEEP = 3, 0.5  # DESIGN.md section 8: WER en/fr/it within +1.5 of dense (measured)
RULE_MARGIN = 0


@dataclass(frozen=True)
class Rule:
    name: str
    block: int = ATTENTION_BLOCK  # the attention rule's block (1-based), ignored by the others
    keep: float = ATTENTION_KEEP  # the attention rule's kept share of the frames
    # padding and silence rules: frames kept beside the audio's (padding) or the speech's (silence),
    # on each side (20 ms each): spare frames after the audio, as whisper.cpp users keep them
    margin: int = RULE_MARGIN

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.name!r}")
        if not (isinstance(self.block, int) and self.block >= 1):
            raise ValueError(f"rule {self.name}: block must be an integer >= 1 (1-based), got {self.block!r}")
        if not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise ValueError(f"rule {self.name}: keep must lie in (0, 1], got {self.keep!r}")
        if not (isinstance(self.margin, int) and self.margin >= 0):
            raise ValueError(f"rule {self.name}: margin must be an integer >= 0 (frames), got {self.margin!r}")

    @property
    def label(self) -> str:
        """What reports call it: the name, and its settings unless the defaults."""
        if self.name == "attention":
            same = (self.block, self.keep) == (ATTENTION_BLOCK, ATTENTION_KEEP)
            return self.name if same else f"attention-k{self.block}-{self.keep:g}"
        return self.name if self.margin == RULE_MARGIN else f"{self.name}-m{self.margin}"


FORMS = "padding[:MARGIN], silence[:MARGIN], attention[:BLOCK:KEEP] (e.g. padding:32, attention:3:0.5)"


def parse_rule(text: str) -> Rule:
    """A rule from its text: FORMS."""
    name, *settings = text.split(":")
    if len(settings) not in ((0, 2) if name == "attention" else (0, 1)):
        raise ValueError(f"a rule is {FORMS}, got {text!r}")
    try:
        if name == "attention" and settings:
            return Rule(name, int(settings[0]), float(settings[1]))
        return Rule(name, margin=int(settings[0])) if settings else Rule(name)
    except ValueError as err:
        if str(err).startswith("rule"):
            raise
        raise ValueError(f"rule {text!r}: integers for BLOCK and MARGIN, a share for KEEP: {FORMS}") from None


def is_rule(text: str | None) -> bool:
    """Whether a --gates value names a rule (else a run directory or none)."""
    return text is not None and text.split(":")[0] in RULES


def gate_config(gates: dict) -> GateConfig:
    """A mapping of GateConfig fields (TrainConfig.gates, YAML lists included) as a GateConfig."""
    gates = dict(gates)
    for key in ("contexts", "decoder_contexts"):  # YAML lists -> the dataclass's tuples
        if key in gates:
            gates[key] = tuple(tuple(item) for item in gates[key])
    return GateConfig(**gates)
