"""What training, decoding and evaluation need to know about a backbone, behind one interface.

`Backbone` is the glue between localgp's backbone-free parts (the Trainer, `localgp decode`, the
context feeder, scoring) and one family of speech models: how to build the gated model and its
tokenizer, which tasks it can do, how a batch of examples becomes its inputs, the forward pass
that gives the task loss and the decoder's logits, globalGP's prompt context, and its corpus
decoder. One implementation per backbone localgp train trains, in the backbone's home package:
`owsm` (localgp/backbones/owsm/backbone.py) and `whisper-base` (localgp/backbones/whisper/backbone.py);
`get_backbone(config)` picks it by `config.backbone`. The backbones are named in one table,
localgp.train_config.BACKBONES.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from localgp.errors import UserError

from localgp.train_config import TRAINED, TrainConfig

if TYPE_CHECKING:
    from localgp.data.examples import Example


@dataclass
class StepOutput:
    """A training forward pass: the task loss, the decoder's logits (B, L, V) and the positions
    (B, L) bool whose next token the loss counts (the distillation's positions too)."""

    loss: Tensor
    logits: Tensor
    targets: Tensor


class Backbone(abc.ABC):
    """Backbone-specific glue, for one TrainConfig. `build()` must come first: the prompts and
    the batches need the tokenizer it makes (kept as `self.tokenizer`)."""

    name: ClassVar[str]
    normalizer: ClassVar[str]  # the text normalisation its WER uses (localgp.evaluate.NORMALIZERS)
    max_seconds: ClassVar[float | None] = None  # longest audio the model reads whole (None: no limit)

    def __init__(self, config: TrainConfig):
        self.config = config
        self.tokenizer = None

    # ---------------------------------------------------------------- the model
    @abc.abstractmethod
    def build(self, texts=None, gated: bool = True) -> tuple[nn.Module, object]:
        """(model, tokenizer): the backbone's model, gated by config.gates unless gated=False.
        texts() gives the training text when a tokenizer has to be trained (None: it must exist)."""

    def prepare_gates(self, model: nn.Module, examples: list[Example]) -> None:
        """Before a fresh run's first step: whatever the gates need from the dense model on training
        examples (Whisper: the skip values of GateConfig.skip_fill "mean"). Nothing by default."""

    def apply_rule(self, model: nn.Module, rule, calibration=None) -> None:
        """The plain model under a training-free rule (localgp.model.config.Rule), in place."""
        raise UserError(f"the {rule.name} rule: backbone {self.name} has no rules (whisper-base has)")

    def weights_identity(self) -> dict | None:
        """What identifies the backbone weights build() reads, when it can read them again (then a
        checkpoint needs only the trained state); None: they cannot be re-read (random weights)."""
        return None

    # ---------------------------------------------------------------- data
    def supports(self, source: str, target: str) -> bool:
        """Whether the model can turn speech in `source` into text in `target`."""
        return True

    def check_examples(self, examples: list[Example]) -> None:
        """Refuses, before any training, what the model cannot take (unknown language, too long)."""

    @abc.abstractmethod
    def prompt_context(self, example: Example) -> list[int]:
        """globalGP's discrete context: the [<language>, <task>] token ids of the example's prompt."""

    @abc.abstractmethod
    def collate(self, examples: list[Example]) -> dict[str, Tensor]:
        """The model inputs of a batch (CPU tensors; the trainer moves them)."""

    @abc.abstractmethod
    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        """The training forward pass of `model` on a collated batch."""

    # ---------------------------------------------------------------- analysis
    @abc.abstractmethod
    def encoder_masks(self, model: nn.Module, speech: Tensor):
        """The model's encoder on one utterance (speech (samples,) 16 kHz; contexts set), masked
        execution, inference decisions: (log-mel (T_in, mels) as the model saw it, on a 10 ms
        hop; 'encoder.<layer>.<module>' -> (T_enc,) keep masks spanning the same time)."""

    # ---------------------------------------------------------------- decoding
    @abc.abstractmethod
    def decode_options(self, options=None):
        """The backbone's beam-search options from `options` (None: its defaults; a DecodeOptions is
        converted where the backbone has its own, refusing settings it has no use for)."""

    @abc.abstractmethod
    def corpus_decoder(self, model: nn.Module, contexts, options, device: str = "cpu", dtype: str = "float32"):
        """An object whose .batch(examples) decodes a batch into evaluate.Decoded records, the model
        in `dtype` (see ready_for_decoding)."""


def ready_for_decoding(model: nn.Module, execution: str, device: str, dtype: str = "float32") -> torch.device:
    """Moves a model (plain or gated) to `device` for decoding a corpus: eval mode, the gated
    parts' execution, and `set_precision` at `dtype` (--dtype; on the CPU its linears through packed
    weights: in float32 1.2-2.8x faster there than PyTorch's own path, the same function up to
    rounding)."""
    from localgp.model.convert import gated_parts, set_execution, set_precision

    set_precision(model.eval(), dtype, device)
    if gated_parts(model):
        set_execution(model, execution)
    return torch.device(device)


def backbone_class(name: str) -> type[Backbone]:
    if name == "owsm":
        from localgp.backbones.owsm.backbone import OwsmBackbone

        return OwsmBackbone
    if name == "whisper-base":
        from localgp.backbones.whisper.backbone import WhisperBaseBackbone

        return WhisperBaseBackbone
    raise UserError(f"backbone must be one of {list(TRAINED)}, got {name!r}")


def get_backbone(config: TrainConfig) -> Backbone:
    return backbone_class(config.backbone)(config)
