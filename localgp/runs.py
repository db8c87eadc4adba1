"""Training runs on disk (their configuration, TrainConfig, is localgp.train_config's): a run
directory's config record and checkpoint: written atomically, read back with a clear error, and
loaded into the backbone's model.

A checkpoint holds what training changed. When the backbone's own weights can be read again
from where they came from (Whisper base: base.pt, identified by its sha256), it holds the
trainable state only (the gates, plus any unfrozen backbone parameters) and what identifies
those weights; loading re-reads them and overlays the trained state. Otherwise (OWSM built with
random weights) it holds the whole model, as before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from localgp.backbones import Backbone, get_backbone
from localgp.errors import DamagedFile, UserError, reader_error
from localgp.files import read_json, write_text_atomically
from localgp.train_config import TrainConfig

CHECKPOINT = "checkpoint.pth"
# The checkpoint before it, kept: a checkpoint.pth damaged on disk then costs save_every steps, not
# the run (a resume goes on from this one and says so), for its size again on disk (a Whisper run:
# the gates, their skip values and optimizer state, 50 MB).
PREVIOUS = "checkpoint.prev.pth"
RECORD = "config.json"  # the config a run directory was trained with
LOG = "log.jsonl"
# What `localgp train` writes into its out_dir (and --overwrite removes): nothing else there is touched.
RUN_FILES = (CHECKPOINT, PREVIOUS, "checkpoint.tmp", LOG, "tokenizer", "context", RECORD)
CHECKPOINT_KEYS = {"model", "optimizer", "step", "config"}  # what every checkpoint holds (and "weights")
# Fields that may change between a run and its resume: how long, how often, where, where from.
RESUMABLE = ("out_dir", "max_steps", "max_minutes", "log_every", "save_every", "device")

log = logging.getLogger(__name__)


def check_device(name: str, field: str = "--device") -> torch.device:
    """The torch device `name` names, refused (UserError) when unknown or absent here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"{field}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{field}: {name!r} but torch {torch.__version__} sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{field}: {name!r}; localgp runs on cpu or cuda")
    return device


# ------------------------------------------------------------------ run directories

def recorded_config(out_dir: str | Path) -> dict | None:
    """The config a run directory records: its config.json, else (a run from before that file) its
    checkpoint's; None when it holds neither (a new run, or a setup that failed before training)."""
    out = Path(out_dir)
    if (out / RECORD).exists():
        return read_record(out)
    if checkpoint_path(out).exists() or (out / PREVIOUS).exists():
        return last_whole_checkpoint(out)[1]["config"]
    return None


def read_record(out: Path) -> dict:
    """out/config.json, read back (DamagedFile with what recreates it when it is not what was written)."""
    if checkpoint_path(out).is_file():
        fix = (f"delete it: {checkpoint_path(out)} holds the run's config too, and `localgp train` with that config "
               f"writes {RECORD} again")
    else:
        fix = "delete the run directory's files and train again (localgp train --overwrite)"
    return read_json(out / RECORD, fix)


def config_changes(recorded: dict, config: TrainConfig) -> list[str]:
    """'field: old -> new' for every field but RESUMABLE's where `config` differs from a recorded
    one (a field the record lacks, from an older version, has its default)."""
    as_json = lambda value: json.loads(json.dumps(value))  # noqa: E731 (tuples -> lists, as recorded)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig) if f.name != "out_dir"}
    old, new = as_json({**defaults, **recorded}), as_json(dataclasses.asdict(config))
    return [f"{name}: {old.get(name)!r} -> {value!r}" for name, value in new.items()
            if name not in RESUMABLE and old.get(name) != value]


def claim_run_dir(config: TrainConfig, overwrite: bool = False) -> None:
    """Makes config.out_dir the run of `config`, before anything is written there: refuses a
    directory that recorded another config (with overwrite: removes its RUN_FILES first). Without
    a record, a tokenizer there was left by a setup that failed: it goes, as another config (its
    vocab_size, its corpus) must not reuse it."""
    out = Path(config.out_dir)
    if overwrite:
        removed = [out / name for name in RUN_FILES if (out / name).exists()]
    else:
        recorded = recorded_config(out)
        if recorded is not None:
            changes = config_changes(recorded, config)
            if changes:
                raise UserError(f"{out} holds a run of another config ({'; '.join(changes)}): use another out_dir, "
                                f"or start over (localgp train --overwrite removes its checkpoint, log, tokenizer "
                                f"and context cache)")
            return
        removed = [out / "tokenizer"] if (out / "tokenizer" / "tokens.txt").is_file() else []
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        log.info("removed %s (%s)", path, "--overwrite" if overwrite else "left by a setup that failed")


def record_config(config: TrainConfig) -> None:
    """Writes out_dir/config.json (atomically): the run's config, once its setup succeeded."""
    write_text_atomically(Path(config.out_dir) / RECORD, json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drops the rows of log.jsonl after `step` (written after the checkpoint a run resumes from,
    by a process that was killed): the resumed run writes them again."""
    if not path.exists():
        return
    fix = "delete it (the run's log: training goes on without it, and writes its rows from there on)"
    if path.is_dir():
        raise DamagedFile(path, "a directory where a file should be", fix)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as err:
        raise DamagedFile(path, f"not UTF-8 text: {err}", fix) from err
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            if json.loads(line)["step"] > step:
                break
        except (ValueError, KeyError, TypeError) as err:
            if number < len(lines) or "\0" in line:  # a bad row before the last, or zeroes: no kill did that
                raise DamagedFile(path, f"line {number}: not a log row: {reader_error(err)}", fix) from err
            break  # the last row, cut short by the kill
        kept.append(line)
    if len(kept) < len(lines):
        write_text_atomically(path, "".join(kept))
        log.info("%s: dropped %d rows after step %d (the checkpoint resumed from)", path, len(lines) - len(kept), step)


# ------------------------------------------------------------------ checkpoints

def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def read_checkpoint(path: Path, fix: str) -> dict:
    """torch.load of a training checkpoint, checked to be one (torch's zip reader checks each
    record's CRC-32): DamagedFile(path, what is wrong, `fix`) otherwise, never a half-loaded model.
    A checkpoint of another run (its config not the one config.json beside it records) is
    damaged too."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except IsADirectoryError:
        raise DamagedFile(path, "a directory where a file should be", fix) from None
    except FileNotFoundError:
        raise
    except Exception as err:  # torch's zip reader, unpickling
        raise DamagedFile(path, reader_error(err), fix) from err
    if (not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state) or not isinstance(state["config"], dict)
            or not isinstance(state["step"], int)):
        raise DamagedFile(path, "not a localgp training checkpoint", fix)
    record = path.parent / RECORD
    if record.is_file():
        try:
            changes = config_changes(json.loads(record.read_text()), TrainConfig(**state["config"]))
        except (ValueError, TypeError):
            changes = []  # config.json's own damage is named where it is read
        if changes:
            raise DamagedFile(path, f"a checkpoint of another run: {'; '.join(changes)} against {RECORD}", fix)
    return state


def last_whole_checkpoint(out: Path) -> tuple[Path, dict, DamagedFile | None]:
    """(path, state, damage) of a run's last whole checkpoint: checkpoint.pth, else (damage: what
    is wrong with checkpoint.pth) the previous one kept beside it. DamagedFile when neither is
    whole, with the fix: train again."""
    path, previous = checkpoint_path(out), out / PREVIOUS
    fix = (f"no whole checkpoint is left{'' if previous.exists() else f' ({PREVIOUS} is not there)'}: train the "
           f"run again (localgp train --overwrite)")
    try:
        return path, read_checkpoint(path, fix), None
    except DamagedFile as damage:
        if not previous.exists():
            raise
        try:
            return previous, read_checkpoint(previous, fix), damage
        except DamagedFile:
            raise damage from None
    except FileNotFoundError:  # a save killed between its two renames
        return previous, read_checkpoint(previous, fix), None


def write_checkpoint(state: dict, path: Path, keep_previous: bool = True) -> None:
    """torch.save through a temporary file renamed over `path`: never a half-written checkpoint.
    The checkpoint it replaces becomes PREVIOUS (keep_previous=False: it goes, e.g. when it is
    damaged and PREVIOUS is the whole one)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    if keep_previous and path.is_file():
        path.replace(path.with_name(PREVIOUS))
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
        raise UserError(f"{path}: trained on backbone weights {weights}, but the weights found now are {current}")
    result = model.load_state_dict(state["model"], strict=False)
    if result.unexpected_keys:
        raise UserError(f"{path}: the checkpoint has tensors the {backbone.name} model does not: "
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
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist (localgp train CONFIG.yaml writes it into out_dir)")
    try:
        state = read_checkpoint(path, "")
    except DamagedFile as damage:
        _, earlier, _ = last_whole_checkpoint(out)  # DamagedFile (train again) when none is whole
        raise DamagedFile(path, damage.why, f"`localgp train` with this run's config resumes from {PREVIOUS} (step "
                                            f"{earlier['step']}, its last whole checkpoint) and writes it again") from None
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


def rule_model(backbone: str, rule: str, data: dict, whisper_dir: str | None = None,
               calibration: str | None = None) -> Run:
    """A backbone's plain pretrained model under a training-free rule (localgp.model.config.RULES,
    parse_rule's text: padding, silence, attention[:BLOCK:KEEP]): no predictor, no context, the
    padding and silence rules' fill calibrated on `calibration`'s training clips (Backbone.apply_rule)."""
    from localgp.model.config import parse_rule

    try:
        parsed = parse_rule(rule)
    except ValueError as err:
        raise UserError(f"--gates: {err}") from None
    run = dense_model(backbone, data, whisper_dir)
    run.backbone.apply_rule(run.model, parsed, calibration)
    run.model.eval()
    return run
