"""Gates files: a trained run's gates as one small file, and the release gates shipped in the
package (`localgp transcribe --gates default`, `localgp.transcribe(..., gates="default")`).

A run's checkpoint holds what training added to the backbone's pretrained weights (the gates,
their skip values, any unfrozen parameters) plus optimizer state: 55 MB for Whisper base. A gates
file (safetensors) holds the same model state, smaller, and no optimizer:
- floating-point tensors in float16 (one that float16 cannot hold finitely stays float32);
- the skip values table (SkipValues: layers x modules x frames x D, 37 MB in float32 for Whisper
  base) as a rank-R factorisation of each (frames x D) matrix: its column mean, plus basis
  (frames x R) @ coefficients (R x D). On Whisper base's calibrated tables rank 128 keeps every
  matrix within 2% (relative Frobenius error, recorded in the file; rank 64: up to 29%), and the
  whole file under 10 MB (benchmarks/RESULTS.md, "Release gates", has what it costs);
- metadata: the run's TrainConfig, the backbone weights it was trained on (their sha256), the
  training step, the source checkpoint's sha256, non-tensor state (the skip values' clip count).

Loading builds the backbone's gated model from the recorded config, re-reads the pretrained
weights (refused when they are not the ones trained on), and overlays the file's state: the same
model `load_run` gives on the run, within float16 rounding.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from localgp.errors import DamagedFile, UserError, reader_error
from localgp.files import file_sha256, replace_atomically

FORMAT = "localgp-gates/1"
SUFFIX = ".safetensors"
SKIP_TABLE = "skip_values.values"  # the state-dict key ending of SkipValues' table
FACTORS = (".offset", ".basis", ".coeffs")  # what a factorised table is stored as
DEFAULT_RANK = 128
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Release:
    """A gates file shipped in this package, checked against its sha256 at every load."""

    file: str
    sha256: str
    made_by: str  # the commands that made it


RELEASES = {
    "default": Release(
        "whisper-base.safetensors",
        "aaace989724e2d8ace6a50c360965a260948c7101e9a6e61979033ad0d6ea53e",
        "localgp train configs/whisper_speech.yaml; localgp export-gates out/whisper_speech/run "
        "--out localgp/release/whisper-base.safetensors"),
}


def is_gates_file(name: str | None) -> bool:
    """Whether a --gates value names a gates file: a released name or a path ending .safetensors."""
    return name is not None and (name in RELEASES or str(name).endswith(SUFFIX))


def resolve(name: str) -> tuple[Path, str]:
    """(path, sha256) of the gates file `name` stands for: a released name (its packaged file,
    checked against the recorded sha256), else the path itself (it must exist)."""
    if name in RELEASES:
        release = RELEASES[name]
        path = HERE / release.file
        fix = f"reinstall localgp: the package's {release.file} is the release gates '{name}' ({release.made_by})"
        if not path.is_file():
            raise DamagedFile(path, "missing from the installed package", fix)
        found = file_sha256(path)
        if found != release.sha256:
            raise DamagedFile(path, f"sha256 {found}, not the recorded {release.sha256}", fix)
        return path, found
    path = Path(name)
    if path.is_dir():
        raise DamagedFile(path, "a directory where a file should be",
                          "export the gates file again (localgp export-gates RUN_DIR --out FILE)")
    if not path.is_file():
        raise UserError(f"--gates {name}: no such gates file (`localgp export-gates RUN_DIR --out FILE{SUFFIX}` "
                        f"writes one; or one of {', '.join(RELEASES)}: the release gates)")
    return path, file_sha256(path)


# ------------------------------------------------------------------ writing

def factorise(table: torch.Tensor, rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """A (..., T, D) table as {offset (..., D), basis (..., T, R), coeffs (..., R, D)} with
    table ~ offset[..., None, :] + basis @ coeffs (truncated SVD of the centred matrices, in
    float64), and the worst relative Frobenius error over its matrices."""
    matrices = table.double()
    offset = matrices.mean(-2)
    u, s, vh = torch.linalg.svd(matrices - offset[..., None, :], full_matrices=False)
    rank = min(rank, s.shape[-1])
    basis, coeffs = u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
    approx = offset[..., None, :] + basis @ coeffs
    error = ((approx - matrices).flatten(-2).norm(dim=-1) / matrices.flatten(-2).norm(dim=-1).clamp_min(1e-30))
    return {".offset": offset, ".basis": basis, ".coeffs": coeffs}, float(error.max())


def rebuild(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The table factorise() stored under `key`, in float32."""
    offset, basis, coeffs = (tensors[key + part].float() for part in FACTORS)
    return offset[..., None, :] + basis @ coeffs


def compact_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """float16 where it holds the tensor finitely, else the tensor as it is."""
    if tensor.is_floating_point() and tensor.dtype != torch.float16:
        half = tensor.half()
        if torch.isfinite(half).all() or not torch.isfinite(tensor).all():
            return half
    return tensor


def export_gates(run_dir: str | Path, out: str | Path, rank: int = DEFAULT_RANK) -> dict:
    """Writes the gates file of the `localgp train` run in run_dir to `out` (atomically); returns
    what it wrote: path, bytes, sha256, step, tensors, rank, skip_values_error."""
    from safetensors.torch import save_file

    from localgp.runs import checkpoint_path, load_run, read_checkpoint

    if rank < 1:
        raise UserError(f"--rank must be >= 1, got {rank}")
    out = Path(out)
    if out.suffix != SUFFIX:
        raise UserError(f"--out {out}: a gates file's name ends {SUFFIX}")
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise UserError(f"{run_dir}: no {path.name} (`localgp train CONFIG.yaml` writes it into out_dir)")
    load_run(run_dir)  # the run loads: its config and state are whole and fit its backbone
    state = read_checkpoint(path, "train the run again (localgp train --overwrite)")
    if state.get("weights") is None:
        raise UserError(f"{run_dir}: its checkpoint holds the whole model (a backbone built with random weights), "
                        f"not gates over pretrained weights that can be read again: there is no gates file to make")
    tensors, extra, error = {}, {}, None
    for key, value in state["model"].items():
        if not torch.is_tensor(value):
            extra[key] = value  # e.g. SkipValues' clip count
        elif key.endswith(SKIP_TABLE) and value.dim() >= 2:
            factors, worst = factorise(value, rank)
            tensors.update({key + part: compact_tensor(t.float()).contiguous() for part, t in factors.items()})
            error = worst if error is None else max(error, worst)
        else:
            tensors[key] = compact_tensor(value).contiguous()
    metadata = {"format": FORMAT, "config": json.dumps(state["config"]), "weights": json.dumps(state["weights"]),
                "step": str(state["step"]), "checkpoint_sha256": file_sha256(path), "extra_state": json.dumps(extra),
                "skip_values": json.dumps({"rank": rank, "relative_error": error})}
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return {"path": str(out), "bytes": out.stat().st_size, "sha256": file_sha256(out), "step": state["step"],
            "tensors": len(tensors), "rank": rank, "skip_values_error": error}


# ------------------------------------------------------------------ reading

def read_gates_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a gates file; DamagedFile when it is not one."""
    from safetensors import safe_open

    fix = "export it again from its run (localgp export-gates RUN_DIR --out FILE)"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except IsADirectoryError:
        raise DamagedFile(path, "a directory where a file should be", fix) from None
    except Exception as err:  # safetensors' header and size checks
        raise DamagedFile(path, reader_error(err), fix) from err
    if metadata.get("format") != FORMAT:
        raise DamagedFile(path, f"not a localgp gates file (format {metadata.get('format')!r}, expected {FORMAT!r})",
                          fix)
    try:
        for field in ("config", "weights", "extra_state", "skip_values"):
            metadata[field] = json.loads(metadata[field])
        metadata["step"] = int(metadata["step"])
    except (KeyError, ValueError) as err:
        raise DamagedFile(path, f"its metadata: {reader_error(err)}", fix) from err
    return tensors, metadata


def factored_table(key: str) -> str | None:
    """The key of the skip-values table a factor's key (export_gates) belongs to, else None."""
    part = next((p for p in FACTORS if key.endswith(SKIP_TABLE + p)), None)
    return None if part is None else key[: -len(part)]


def model_state_of(tensors: dict[str, torch.Tensor], extra: dict) -> dict:
    """The state dict a gates file stands for: its factorised tables rebuilt, float32 again."""
    state = dict(extra)
    for key, value in tensors.items():
        table = factored_table(key)
        if table is None:
            state[key] = value.float() if value.is_floating_point() else value
        elif table not in state:
            state[table] = rebuild(tensors, table)
    return state


def load_gates(name: str, whisper_dir: str | None = None):
    """(run, identity): the gated model of a gates file (a released name, or a path: resolve()) as
    a runs.Run, in eval mode, masked execution (as load_run gives a run directory's), and what names
    the file in records and summaries (its name and sha256). whisper_dir: where the backbone's
    pretrained weights are (None: the recorded config's)."""
    from localgp.backbones import get_backbone
    from localgp.model.convert import GATE_KEY, set_execution
    from localgp.runs import Run, restore_model
    from localgp.train_config import TrainConfig

    path, sha256 = resolve(name)
    tensors, metadata = read_gates_file(path)
    try:
        config = TrainConfig(**metadata["config"])
    except (TypeError, ValueError) as err:
        raise DamagedFile(path, f"its config: {err}", "export it again from its run with this localgp") from err
    config = dataclasses.replace(config, out_dir="", whisper_dir=whisper_dir or config.whisper_dir)
    backbone = get_backbone(config)
    model, tokenizer = backbone.build()
    state = model_state_of(tensors, metadata["extra_state"])
    missing = [k for k in model.state_dict() if GATE_KEY in k and k not in state]
    if missing:
        raise DamagedFile(path, f"no tensor for the gates' {missing[:3]}", "export it again from its run")
    restore_model(model, {"weights": metadata["weights"], "model": state}, backbone, path)
    set_execution(model, "masked")
    identity = {"gates file": name if name in RELEASES else str(path.resolve()), "gates sha256": sha256}
    return Run(model.eval(), tokenizer, config, backbone), identity
