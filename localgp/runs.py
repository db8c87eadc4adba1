"""Training runs on disk: the configuration `localgp train` reads (TrainConfig), and a run
directory's checkpoint: written atomically, read back with a clear error, and loaded into the
backbone's model.

A checkpoint holds what training changed. When the backbone's own weights can be read again
from where they came from (Whisper base: base.pt, identified by its sha256), it holds the
trainable state only (the gates, plus any unfrozen backbone parameters) and what identifies
those weights; loading re-reads them and overlays the trained state. Otherwise (OWSM built with
random weights) it holds the whole model, as before.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from localgp.backbones import BACKBONES, Backbone, backbone_class, get_backbone

CHECKPOINT = "checkpoint.pth"


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
    batch_size: int = 4
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    warmup_steps: int = 50
    max_steps: int = 200
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training time
    grad_clip: float = 5.0
    target_sparsity: float = 0.3
    sparsity_weight: float = 1.0  # alpha of the sparsity loss
    # Knowledge distillation from the dense model (the same model with every gate keeping, no
    # gradient): distill_weight * T^2 * KL(teacher || student) of the output distributions at
    # temperature T over the target positions, added to the task loss. 0: none.
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    seed: int = 0
    device: str = "cpu"  # cpu, cuda or cuda:N
    log_every: int = 10
    save_every: int = 50

    def __post_init__(self):
        if not self.tasks or not set(self.tasks) <= {"asr", "st"}:
            raise ValueError(f"TrainConfig.tasks must be a non-empty subset of ('asr', 'st'), got {self.tasks}")
        for name in ("batch_size", "max_steps", "log_every", "save_every"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"TrainConfig.backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.backbone != "owsm" and self.init is not None:
            raise ValueError(f"TrainConfig.init is an OWSM snapshot; backbone {self.backbone!r} does not take one")
        if self.backbone != "whisper-base" and self.whisper_dir is not None:
            raise ValueError(f"TrainConfig.whisper_dir only applies to backbone 'whisper-base', not {self.backbone!r}")
        if self.whisper_dir is not None and not isinstance(self.whisper_dir, str):
            raise ValueError(f"TrainConfig.whisper_dir must be a directory path (string), got {self.whisper_dir!r}")
        if self.freeze_backbone is not None and not isinstance(self.freeze_backbone, bool):
            raise ValueError(f"TrainConfig.freeze_backbone must be true, false or null, got {self.freeze_backbone!r}")
        unfreeze = self.unfreeze
        if isinstance(unfreeze, str) or not isinstance(unfreeze, (list, tuple)) \
                or not all(isinstance(p, str) and p for p in unfreeze):
            raise ValueError(f"TrainConfig.unfreeze must be a list of parameter key prefixes, got {unfreeze!r}")
        object.__setattr__(self, "unfreeze", tuple(unfreeze))
        if self.unfreeze and self.freeze_backbone is False:
            raise ValueError("TrainConfig.unfreeze: the backbone is not frozen (freeze_backbone: false), so every "
                             "parameter trains already; drop unfreeze or freeze the backbone")
        for name, low, strict in (("lr", 0, True), ("grad_clip", 0, True), ("sparsity_weight", 0, False),
                                  ("distill_weight", 0, False), ("distill_temperature", 0, True)):
            value = getattr(self, name)
            if not _is_number(value) or not (value > low if strict else value >= low):
                raise ValueError(f"TrainConfig.{name} must be a number {'>' if strict else '>='} {low}, got {value!r}")
        if not _is_number(self.target_sparsity) or not 0 <= self.target_sparsity <= 1:
            raise ValueError(f"TrainConfig.target_sparsity must lie in [0, 1], got {self.target_sparsity!r}")
        if self.max_minutes is not None and (not _is_number(self.max_minutes) or self.max_minutes <= 0):
            raise ValueError(f"TrainConfig.max_minutes must be a positive number or null, got {self.max_minutes!r}")

    @property
    def frozen(self) -> bool:
        """Whether the backbone's own parameters are frozen (freeze_backbone, or its default)."""
        if self.freeze_backbone is not None:
            return self.freeze_backbone
        return backbone_class(self.backbone).freeze_by_default

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        if isinstance(raw.get("tasks"), list):
            raw["tasks"] = tuple(raw["tasks"])
        return cls(**raw)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ checkpoints

def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def read_checkpoint(path: Path, message: str) -> dict:
    """torch.load of a training checkpoint; a corrupt file raises RuntimeError(message) with
    {path} and {err} filled in, never a half-loaded model."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(message.format(path=path, err=err)) from err


def write_checkpoint(state: dict, path: Path) -> None:
    """torch.save through a temporary file renamed over `path`: never a half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def model_state(model: torch.nn.Module, trainable: set[str], weights: dict | None) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the trainable parameters and every gate tensor when
    the backbone's weights can be re-read (`weights`: what identifies them), else everything."""
    from localgp.model.convert import GATE_KEY

    state = model.state_dict()
    if weights is None:
        return state
    return {k: v for k, v in state.items() if k in trainable or GATE_KEY in k}


def restore_model(model: torch.nn.Module, state: dict, backbone: Backbone, path: Path) -> None:
    """Loads a checkpoint's model state into `model` built by `backbone` (its weights re-read):
    the whole state of a full checkpoint, strictly; a trainable-state checkpoint on top of the
    backbone weights it was trained from (refused when they differ)."""
    weights = state.get("weights")
    if weights is None:
        model.load_state_dict(state["model"])
        return
    current = backbone.weights_identity()
    if weights != current:
        raise ValueError(f"{path}: trained on backbone weights {weights}, but the weights found now are {current}")
    result = model.load_state_dict(state["model"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: the checkpoint has tensors the {backbone.name} model does not: "
                         f"{result.unexpected_keys[:5]}")


@dataclass
class Run:
    """A loaded model with everything needed to feed and decode it."""

    model: torch.nn.Module
    tokenizer: object
    config: TrainConfig
    backbone: Backbone


def load_run(out_dir: str | Path) -> Run:
    """The model `localgp train` left in out_dir, in eval mode, masked execution; config.out_dir
    is `out_dir`, so a moved run directory still loads."""
    from localgp.model.convert import set_execution

    out = Path(out_dir)
    path = checkpoint_path(out)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (localgp train CONFIG.yaml writes it into out_dir)")
    state = read_checkpoint(path, "cannot load the trained model {path}: {err}")
    config = dataclasses.replace(TrainConfig(**state["config"]), out_dir=str(out))
    backbone = get_backbone(config)
    model, tokenizer = backbone.build()
    restore_model(model, state, backbone, path)
    set_execution(model, "masked")
    return Run(model.eval(), tokenizer, config, backbone)


def load_trained(out_dir: str | Path):
    """load_run's (model, tokenizer, config)."""
    run = load_run(out_dir)
    return run.model, run.tokenizer, run.config


def dense_model(backbone: str, data: dict, whisper_dir: str | None = None) -> Run:
    """A backbone's plain (ungated) pretrained model, with no run behind it: the zero-shot
    baseline. `data` is the corpus it will see (TrainConfig.data)."""
    config = TrainConfig(out_dir="", data=data, backbone=backbone, whisper_dir=whisper_dir)
    chosen = get_backbone(config)
    model, tokenizer = chosen.build(gated=False)
    return Run(model.eval(), tokenizer, config, chosen)
