"""`localgp train`'s configuration (TrainConfig): every field checked when it is made, a
UserError naming the field for anything amiss; read from YAML. It names backbones, it does not
build them (localgp.backbones does, from it). BACKBONES is the one table of the backbones localgp
knows."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from localgp.errors import UserError
from localgp.evaluate import has_type
from localgp.model.config import gate_config


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone localgp knows; its code lives in one package, localgp/backbones/<home>/."""

    home: str
    # `localgp train` (TrainConfig.backbone; a Backbone in <home>/backbone.py): whether its own
    # parameters are frozen when freeze_backbone is null. None: localgp train does not train it.
    frozen: bool | None
    bench_parts: tuple[str, ...]  # `localgp bench --backbone NAME --part ...` (<home>/bench*.py)


# The backbones localgp knows, the one table every command takes their names from (TrainConfig,
# `localgp bench --backbone`, `localgp demo --backbone`). A pretrained Whisper trains its gates only;
# an OWSM preset model starts from random weights and trains everything; transformers' Whisper
# base takes the gates a whisper-base run trained (localgp.backbones.hf_whisper.model).
BACKBONES = {
    "owsm": BackboneEntry("owsm", frozen=False, bench_parts=("layer", "encoder", "decoder-step", "decode")),
    "whisper-base": BackboneEntry("whisper", frozen=True, bench_parts=("encoder", "decode")),
    "hf-whisper-base": BackboneEntry("hf_whisper", frozen=None, bench_parts=("encoder", "decode")),
}
TRAINED = tuple(name for name, entry in BACKBONES.items() if entry.frozen is not None)  # by localgp train


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str  # checkpoints, tokenizer, log.jsonl
    # Corpus: {"kind": "manifest", "path": "data/demo/manifest.jsonl", "split": "train"}
    # (localgp prepare demo), {"kind": "kaldi", "dirs": {"de": "data/de_train", ...}} or
    # {"kind": "europarl", "root": ..., "source": "de", "targets": ["fr", "it"], "split": "train"}
    data: dict = field(default_factory=dict)
    # The model gated: "owsm" (OWSM v3.1 architecture: a `preset` with random weights or an `init`
    # snapshot) or "whisper-base" (OpenAI's pretrained Whisper base, from `whisper_dir`).
    backbone: str = "owsm"
    preset: str = "tiny"  # owsm: model size when not starting from a snapshot
    init: str | None = None  # owsm: an OWSM snapshot directory to start from (brings its tokenizer)
    whisper_dir: str | None = None  # whisper-base: `localgp prepare whisper`'s directory (None: its default)
    gates: dict = field(default_factory=lambda: {"encoder": "temporal"})  # GateConfig fields
    # Context extractors by context name, for the contexts the gates use, e.g.
    # {"speaker": {"kind": "resemblyzer"}, "lang2vec": {"kind": "lang2vec"}}; "ecapa" and "beats"
    # take "model_dir" / "checkpoint" or "allow_random": true. Features are cached under out_dir.
    context_extractors: dict = field(default_factory=dict)
    # asr: transcript; st: every translation present that the backbone can produce (Whisper:
    # into English only, from another language).
    tasks: tuple[str, ...] = ("asr", "st")
    vocab_size: int = 300  # owsm: BPE pieces of a tokenizer trained on the corpus
    # Train only the gates (parameters whose key contains "pruning."), the backbone's weights
    # frozen; None: the backbone's default (whisper-base: frozen, pretrained; owsm: everything
    # trains, as its preset models start from random weights).
    freeze_backbone: bool | None = None
    unfreeze: tuple[str, ...] = ()  # with a frozen backbone, key prefixes of backbone parameters trained too
    batch_size: int = 4  # examples per optimizer step: the global batch, over every process torchrun starts
    # The batch computed in this many equal parts, each with its own loss (task + sparsity), their
    # gradients averaged into one update: gradient accumulation in one process, and the unit that
    # torchrun's processes share (a multiple of their number), so that a run trains the same on any
    # number of processes and resumes on another.
    micro_batches: int = 1
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    # peak learning rate of the backbone's parameters that train (unfreeze, or an unfrozen backbone),
    # on the same schedule; None: lr for every parameter. Pretrained weights want far less than gates.
    backbone_lr: float | None = None
    warmup_steps: int = 50
    max_steps: int = 200
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training time
    grad_clip: float = 5.0
    target_sparsity: float = 0.3
    # the decoder's gates under a target of their own, target_sparsity then the encoder's alone;
    # None: one joint target over every gate
    decoder_target_sparsity: float | None = None
    sparsity_weight: float = 1.0  # alpha of the sparsity loss
    decoder_sparsity_weight: float | None = None  # alpha of the decoder's, with its own target; None: sparsity_weight
    # Knowledge distillation from the dense model (the same model with every gate keeping, no
    # gradient): distill_weight * T^2 * KL(teacher || student) of the output distributions at
    # temperature T over the target positions, added to the task loss. 0: none.
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    seed: int = 0
    device: str = "cpu"  # cpu, cuda or cuda:N
    # Audio that cannot be used (unreadable, empty, shorter than 0.1 s, cut short, longer than the
    # model reads): false stops before training with the list; true leaves it out, logged.
    skip_bad_audio: bool = False
    # Share of the training examples replaced by joins of several clips of one language and task
    # with pauses between them, up to the model's window (data.examples.join_examples): speech then
    # reaches every part of Whisper's 30 s window, as in long-form transcription. 0: clips alone.
    join_clips: float = 0.0
    log_every: int = 10
    save_every: int = 50

    def __post_init__(self):
        # Every field's type and range, before anything is written; UserError names the field.
        for name in ("out_dir", "backbone", "preset", "device"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"TrainConfig.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("init", "whisper_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserError(f"TrainConfig.{name} must be a directory path (string) or null, "
                                f"got {getattr(self, name)!r}")
        tasks = self.tasks
        if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks \
                or not set(tasks) <= {"asr", "st"}:
            raise UserError(f"TrainConfig.tasks must be a non-empty subset of ('asr', 'st'), got {tasks!r}")
        object.__setattr__(self, "tasks", tuple(tasks))
        for name in ("batch_size", "micro_batches", "max_steps", "log_every", "save_every", "vocab_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise UserError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.micro_batches:
            raise UserError(f"TrainConfig.micro_batches must divide batch_size ({self.batch_size}) into equal parts, "
                            f"got {self.micro_batches}")
        if not _is_number(self.join_clips) or not 0 <= self.join_clips <= 1:
            raise UserError(f"TrainConfig.join_clips must be a share in [0, 1], got {self.join_clips!r}")
        for name in ("warmup_steps", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"TrainConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.backbone not in TRAINED:
            hint = ": localgp train does not train it" if self.backbone in BACKBONES else ""
            raise UserError(f"TrainConfig.backbone must be one of {list(TRAINED)}, got {self.backbone!r}{hint}")
        from localgp.backbones.owsm.weights import PRESETS

        if self.preset not in PRESETS:
            raise UserError(f"TrainConfig.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.backbone != "owsm" and self.init is not None:
            raise UserError(f"TrainConfig.init is an OWSM snapshot; backbone {self.backbone!r} does not take one")
        if self.backbone != "whisper-base" and self.whisper_dir is not None:
            raise UserError(f"TrainConfig.whisper_dir only applies to backbone 'whisper-base', not {self.backbone!r}")
        if self.freeze_backbone is not None and not isinstance(self.freeze_backbone, bool):
            raise UserError(f"TrainConfig.freeze_backbone must be true, false or null, got {self.freeze_backbone!r}")
        if not isinstance(self.skip_bad_audio, bool):
            raise UserError(f"TrainConfig.skip_bad_audio must be true or false, got {self.skip_bad_audio!r}")
        unfreeze = self.unfreeze
        if isinstance(unfreeze, str) or not isinstance(unfreeze, (list, tuple)) \
                or not all(isinstance(p, str) and p for p in unfreeze):
            raise UserError(f"TrainConfig.unfreeze must be a list of parameter key prefixes, got {unfreeze!r}")
        object.__setattr__(self, "unfreeze", tuple(unfreeze))
        if self.unfreeze and self.freeze_backbone is False:
            raise UserError("TrainConfig.unfreeze: the backbone is not frozen (freeze_backbone: false), so every "
                            "parameter trains already; drop unfreeze or freeze the backbone")
        for name, low, strict in (("lr", 0, True), ("grad_clip", 0, True), ("sparsity_weight", 0, False),
                                  ("distill_weight", 0, False), ("distill_temperature", 0, True)):
            value = getattr(self, name)
            if not _is_number(value) or not (value > low if strict else value >= low):
                raise UserError(f"TrainConfig.{name} must be a number {'>' if strict else '>='} {low}, got {value!r}")
        if self.backbone_lr is not None and (not _is_number(self.backbone_lr) or self.backbone_lr <= 0):
            raise UserError(f"TrainConfig.backbone_lr must be a positive number or null, got {self.backbone_lr!r}")
        if not _is_number(self.target_sparsity) or not 0 <= self.target_sparsity <= 1:
            raise UserError(f"TrainConfig.target_sparsity must lie in [0, 1], got {self.target_sparsity!r}")
        if self.decoder_target_sparsity is not None:
            if not _is_number(self.decoder_target_sparsity) or not 0 <= self.decoder_target_sparsity <= 1:
                raise UserError("TrainConfig.decoder_target_sparsity must lie in [0, 1] or be null, got "
                                f"{self.decoder_target_sparsity!r}")
            if not isinstance(self.gates, dict) or not self.gates.get("decoder"):
                raise UserError("TrainConfig.decoder_target_sparsity needs gates on the decoder (gates.decoder), "
                                "and the config has none")
        if self.decoder_sparsity_weight is not None:
            if not _is_number(self.decoder_sparsity_weight) or self.decoder_sparsity_weight < 0:
                raise UserError("TrainConfig.decoder_sparsity_weight must be a number >= 0 or null, got "
                                f"{self.decoder_sparsity_weight!r}")
            if self.decoder_target_sparsity is None:
                raise UserError("TrainConfig.decoder_sparsity_weight weighs the decoder's own target: set "
                                "decoder_target_sparsity too")
        if self.max_minutes is not None and (not _is_number(self.max_minutes) or self.max_minutes <= 0):
            raise UserError(f"TrainConfig.max_minutes must be a positive number or null, got {self.max_minutes!r}")
        _check_data(self.data)
        _check_gates(self.gates)
        if not isinstance(self.context_extractors, dict) or not all(
                isinstance(spec, dict) and isinstance(spec.get("kind"), str) for spec in self.context_extractors.values()):
            raise UserError("TrainConfig.context_extractors must map context names to {kind: ..., options}, got "
                            f"{self.context_extractors!r}")

    @property
    def frozen(self) -> bool:
        """Whether the backbone's own parameters are frozen (freeze_backbone, or its default)."""
        if self.freeze_backbone is not None:
            return self.freeze_backbone
        return BACKBONES[self.backbone].frozen

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """The config of a YAML file; a UserError naming the file and the field for anything amiss."""
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of TrainConfig fields, got {raw!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(known)
        if unknown:
            raise UserError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        if not raw.get("out_dir"):
            raise UserError(f"{path}: TrainConfig.out_dir must be given")
        for name, value in raw.items():
            # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number meant
            if isinstance(value, str) and "float" in str(known[name].type):
                try:
                    raw[name] = float(value)
                except ValueError:
                    pass  # __post_init__ names the field
        try:
            return cls(**raw)
        except UserError as err:
            raise UserError(f"{path}: {err}") from err


# data's keys per corpus kind: (required, optional)
DATA_KEYS = {"manifest": ({"path"}, {"split"}), "kaldi": ({"dirs"}, {"audio_root"}),
             "europarl": ({"root", "source", "targets", "split"}, set())}


def _check_data(data) -> None:
    """TrainConfig.data: a mapping naming a corpus kind and its keys (load_corpus reads it). Empty:
    not given (load_corpus refuses it where a corpus is needed)."""
    if not isinstance(data, dict):
        raise UserError(f"TrainConfig.data must be a mapping such as {{kind: manifest, path: ...}}, got {data!r}")
    if not data:
        return
    kind = data.get("kind")
    if kind not in DATA_KEYS:
        raise UserError(f"TrainConfig.data.kind must be one of {list(DATA_KEYS)}, got {kind!r}")
    required, optional = DATA_KEYS[kind]
    missing, unknown = sorted(required - set(data)), sorted(set(data) - required - optional - {"kind"})
    if missing or unknown:
        raise UserError(f"TrainConfig.data of kind {kind!r} needs {sorted(required)} (optional: {sorted(optional)}); "
                        f"missing {missing}, unknown {unknown}")
    for key, value in data.items():
        if key == "dirs":
            ok = isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values())
        elif key == "targets":
            ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
        else:
            ok = isinstance(value, str) and value
        if not ok:
            expected = {"dirs": "a mapping of language -> data directory",
                        "targets": "a language or a list of languages"}.get(key, "a non-empty string")
            raise UserError(f"TrainConfig.data.{key} must be {expected}, got {value!r}")


def _check_gates(gates) -> None:
    """TrainConfig.gates: a mapping of GateConfig fields that makes a GateConfig."""
    if not isinstance(gates, dict):
        raise UserError(f"TrainConfig.gates must be a mapping of GateConfig fields (e.g. {{encoder: temporal}}), "
                        f"got {gates!r}")
    for key in ("contexts", "decoder_contexts"):
        items = gates.get(key, [])
        if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, (list, tuple)) and len(i) == 2 and isinstance(i[0], str) and _is_int(i[1]) for i in items):
            raise UserError(f"TrainConfig.gates.{key} must be a list of [name, feature size] pairs, got {items!r}")
    try:
        config = gate_config(gates)
    except (TypeError, ValueError) as err:
        raise UserError(f"TrainConfig.gates: {err}") from err
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        if not has_type(value, hint) or isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"TrainConfig.gates.{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    if any(size < 0 for _, size in config.contexts + config.decoder_contexts):
        raise UserError(f"TrainConfig.gates: context sizes must be >= 0, got contexts {config.contexts}, "
                        f"decoder_contexts {config.decoder_contexts}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


