"""`localgp transcribe`: real speech (the demo corpus's clips, conftest's real_speech) assembled
into recordings written in the test (wav, flac, ogg), cut by the real Silero VAD, decoded by a
tiny random Whisper saved as `localgp prepare whisper` saves base.pt (so the real loading code
runs); the text of a random model means nothing, its times, files, resumes and failures do."""

import dataclasses
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from localgp.cli import main
from localgp.data.audio import SAMPLE_RATE
from localgp.longform import outputs, pipeline
from localgp.longform.vad import SileroVAD, Window, speech_windows

TINY = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_vocab=51865,
            n_text_ctx=48, n_text_state=32, n_text_head=2, n_text_layer=1)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A directory holding base.pt as prepare_whisper writes it ({"dims", "model_state_dict"},
    fp16) of a tiny multilingual Whisper with random weights (Whisper's 30 s window, its vocabulary)."""
    return save_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper"))


def save_tiny_whisper(directory):
    """directory/base.pt: tiny_whisper's model."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(**TINY)
    torch.manual_seed(0)
    model = Whisper(dims)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": {k: v.half() for k, v in model.state_dict().items()}},
               directory / "base.pt")
    return directory


@pytest.fixture(scope="module")
def clips(real_speech):
    return [item["wav"] for item in real_speech]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), np.float32)


def assemble(parts) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Concatenates clips (arrays) and pauses (seconds); returns the audio and each clip's
    (start, end) in seconds."""
    pieces, spans, at = [], [], 0
    for part in parts:
        piece = silence(part) if isinstance(part, (int, float)) else part
        if not isinstance(part, (int, float)):
            spans.append((at / SAMPLE_RATE, (at + len(piece)) / SAMPLE_RATE))
        pieces.append(piece)
        at += len(piece)
    return np.concatenate(pieces), spans


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_speech_windows_merge_regions_up_to_30_s():
    s = SAMPLE_RATE
    regions = [(0, 5 * s), (6 * s, 20 * s), (21 * s, 29 * s), (31 * s, 40 * s), (50 * s, 125 * s), (130 * s, 131 * s)]
    windows = speech_windows(regions, 30.0)
    assert all(0 < w.end - w.start <= 30 * s for w in windows)
    assert all(a.end <= b.start for a, b in zip(windows, windows[1:]))  # in order, disjoint
    for start, end in regions:  # every region's audio lies in the windows
        covered = sum(min(end, w.end) - max(start, w.start) for w in windows if w.end > start and w.start < end)
        assert covered == end - start
    assert windows[0] == Window(0, 29 * s)  # the first three regions fit in one window
    assert windows[1] == Window(31 * s, 40 * s)  # 31..50 would leave room, but 50..125 does not fit
    assert [w.end - w.start for w in windows[2:5]] == [25 * s] * 3  # the 75 s region cut in equal parts
    assert windows[-1] == Window(130 * s, 131 * s)


def test_vad_finds_the_clips_and_cuts_at_pauses(clips):
    parts = [2.0]
    for clip in clips * 3:  # ~55 s: more than one window
        parts += [clip, 1.5]
    wav, spans = assemble(parts)
    windows = speech_windows(SileroVAD()(wav))
    assert len(windows) >= 2
    assert all(w.end - w.start <= 30 * SAMPLE_RATE for w in windows)
    for start, end in spans:  # each clip lies inside one window (cut at a pause, not inside a clip)
        inside = [w for w in windows if w.start / SAMPLE_RATE <= start + 0.3 and end - 0.3 <= w.end / SAMPLE_RATE]
        assert len(inside) == 1, (start, end, windows)
    assert windows[0].start / SAMPLE_RATE > 1.0  # the leading pause is not decoded


def test_vad_batched_is_silero_own_per_chunk_call(clips, monkeypatch):
    """The batched network (blocks of chunks, one LSTM over them) against silero's own loop,
    which calls the TorchScript model chunk by chunk: same probabilities, same regions; blocks
    small enough that the LSTM's state crosses several of them and the last chunk is partial."""
    from silero_vad import get_speech_timestamps

    wav, _ = assemble([0.7, clips[0], 0.4, clips[1], 2.0, clips[2], 0.013])
    assert len(wav) % 512
    vad = SileroVAD()
    monkeypatch.setattr(SileroVAD, "BLOCK", 37)
    own, audio = vad.model, torch.from_numpy(wav)
    own.reset_states()
    with torch.inference_mode():
        expected = [own(torch.nn.functional.pad(audio[i : i + 512], (0, max(0, i + 512 - len(audio)))), SAMPLE_RATE).item()
                    for i in range(0, len(audio), 512)]
    got = vad.probabilities(wav)
    assert len(got) == len(expected) and max(abs(a - b) for a, b in zip(got, expected)) < 1e-4
    assert sum(p > 0.5 for p in got) > len(got) / 3  # real speech: a test of something
    regions = get_speech_timestamps(audio, own, threshold=0.5, sampling_rate=SAMPLE_RATE, max_speech_duration_s=30,
                                    min_silence_duration_ms=160, speech_pad_ms=200)
    assert vad(wav) == [(r["start"], r["end"]) for r in regions]


def test_vad_leaves_the_thread_count_alone():
    """silero_vad's import calls torch.set_num_threads(1) for the whole process (it halved
    transcribe's speed on 2 cores); in a fresh process, as a user's first transcribe meets it."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(3); from localgp.longform.vad import SileroVAD; SileroVAD(); "
            "print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "3"


def srt_cues(text: str, decimal: str) -> list[tuple[str, str, str]]:
    stamp = rf"(\d\d:\d\d:\d\d{re.escape(decimal)}\d\d\d)"
    return re.findall(rf"{stamp} --> {stamp}\n(.+)\n", text)


def test_long_recording_times_and_formats(tiny_whisper, clips, tmp_path, capsys):
    wav, spans = assemble([5.0, clips[0], 1.0, clips[1], 40.0, clips[2], 3.0])  # two windows, 40 s apart
    sf.write(tmp_path / "talk.ogg", wav, SAMPLE_RATE, format="OGG", subtype="VORBIS")
    code, err = run_cli(["transcribe", tmp_path / "talk.ogg", "--whisper-dir", tiny_whisper, "--out", tmp_path / "out",
                         "--beam", "2", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert "transcribed 1 files" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["talk.json", "talk.srt", "talk.txt", "talk.vtt"]
    data = json.loads((tmp_path / "out" / "talk.json").read_text())
    assert data["file"] == str((tmp_path / "talk.ogg").resolve())
    assert data["duration"] == pytest.approx(len(wav) / SAMPLE_RATE, abs=0.05)
    segments = data["segments"]
    assert len(segments) == 2
    # times of the recording: the first window spans the first two clips, the second the third
    assert segments[0]["start"] == pytest.approx(spans[0][0], abs=0.3)
    assert segments[0]["end"] == pytest.approx(spans[1][1], abs=0.3)
    assert segments[1]["start"] == pytest.approx(spans[2][0], abs=0.3)
    assert segments[1]["end"] == pytest.approx(spans[2][1], abs=0.3)
    for s in segments:
        assert s["language"] == data["language"]  # detected on the first window, kept for the file
        assert s["encoder_gflops"] > 0 and s["decoder_gflops"] > 0
        assert s["gflops"] == pytest.approx(s["encoder_gflops"] + s["decoder_gflops"])
        assert s["sparsity"] == {} and s["encoder_sparsity"] is None  # the plain model skips nothing
    cued = [s for s in segments if s["text"]]
    srt = (tmp_path / "out" / "talk.srt").read_text()
    assert srt_cues(srt, ",") == [(outputs.timestamp(s["start"], ","), outputs.timestamp(s["end"], ","), s["text"])
                                  for s in cued]
    assert re.match(r"1\n\d\d:", srt)
    vtt = (tmp_path / "out" / "talk.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n")
    assert srt_cues(vtt, ".") == [(outputs.timestamp(s["start"], "."), outputs.timestamp(s["end"], "."), s["text"])
                                  for s in cued]
    assert (tmp_path / "out" / "talk.txt").read_text() == "".join(s["text"] + "\n" for s in cued)


def test_timestamp():
    assert outputs.timestamp(3723.4567, ",") == "01:02:03,457"
    assert outputs.timestamp(59.9996, ".") == "00:01:00.000"


def test_folder_with_broken_files_and_rerun(tiny_whisper, clips, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(17):
        wav, _ = assemble([0.5, clips[i % len(clips)], 0.5])
        fmt = ("wav", "flac", "ogg")[i % 3]
        sf.write(folder / f"good{i:02d}.{fmt}", wav, SAMPLE_RATE, format=fmt.upper(),
                 subtype="VORBIS" if fmt == "ogg" else None)
    whole = (folder / "good00.wav").read_bytes()
    (folder / "cut.wav").write_bytes(whole[: len(whole) // 2])  # truncated: the header declares twice as much
    (folder / "notes.mp3").write_text("these are not audio samples\n" * 50)
    (folder / "empty.flac").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["transcribe", folder, "--whisper-dir", tiny_whisper, "--out", out, "--language", "en", "--beam", "2",
            "--batch", "6", "--device", "cpu", "--output-format", "txt,json", "--quiet"]
    code, err = run_cli(argv, capsys)
    assert code == 1, err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"good{i:02d}.{x}" for i in range(17) for x in ("txt", "json"))
    failed = dict(re.findall(r"^  (\S+): (.+)$", err, re.M))
    assert set(failed) == {str((folder / name).resolve()) for name in ("cut.wav", "notes.mp3", "empty.flac")}, err
    assert "cut short" in failed[str((folder / "cut.wav").resolve())]
    assert "cannot decode" in failed[str((folder / "notes.mp3").resolve())]
    assert "no audio samples" in failed[str((folder / "empty.flac").resolve())]
    assert "transcribed 17 files" in err and "3 failed" in err
    for i in range(17):
        data = json.loads((out / f"good{i:02d}.json").read_text())
        assert data["language"] == "en" and len(data["segments"]) == 1
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, err = run_cli(argv, capsys)  # a rerun decodes nothing done, and fails the same three
    assert code == 1 and "transcribed 0 files" in err and "17 already done" in err and "3 failed" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_no_speech_is_a_failure(tiny_whisper, clips, tmp_path, capsys):
    sf.write(tmp_path / "quiet.wav", silence(4.0), SAMPLE_RATE)
    sf.write(tmp_path / "talk.wav", assemble([0.5, clips[0], 0.5])[0], SAMPLE_RATE)
    (tmp_path / "list.txt").write_text("# two files\nquiet.wav\n\ntalk.wav\n")
    code, err = run_cli(["transcribe", f"@{tmp_path / 'list.txt'}", "--whisper-dir", tiny_whisper, "--out",
                         tmp_path / "out", "--language", "en", "--beam", "2", "--device", "cpu", "--quiet"], capsys)
    assert code == 1
    assert re.search(r"quiet\.wav: .*no speech found", err), err
    assert (tmp_path / "out" / "talk.json").is_file() and not (tmp_path / "out" / "quiet.json").exists()


def test_interrupted_run_loses_nothing_and_redoes_nothing(tiny_whisper, clips, tmp_path, monkeypatch):
    for i in range(5):
        sf.write(tmp_path / f"f{i}.flac", assemble([0.5, clips[i], 0.5])[0], SAMPLE_RATE)
    files = sorted(tmp_path.glob("*.flac"))
    out = tmp_path / "out"
    written = []
    real_render = outputs.render

    def crash_on_third(transcript, fmt):  # the third file dies half-way through its outputs
        if fmt == "srt" and len(written) == 2:
            raise KeyboardInterrupt
        if fmt == "json":
            written.append(transcript.file)
        return real_render(transcript, fmt)

    monkeypatch.setattr(outputs, "render", crash_on_third)
    kwargs = dict(whisper_dir=str(tiny_whisper), language="en", beam=2, batch=1, device="cpu", out=out, progress=False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.transcribe(files, **kwargs)
    assert written == [str(f.resolve()) for f in files[:2]]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"f{i}.{x}" for i in (0, 1) for x in outputs.FORMATS) + ["f2.txt"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "f2.txt"}
    monkeypatch.setattr(outputs, "render", real_render)
    result = pipeline.transcribe(files, **kwargs)
    assert result.skipped == [str(f.resolve()) for f in files[:2]] and result.decoded == 3 and not result.failed
    assert [t.file for t in result.transcripts] == [str(f.resolve()) for f in files]  # the done ones read back
    assert sorted(p.name for p in out.iterdir()) == sorted(f"f{i}.{x}" for i in range(5) for x in outputs.FORMATS)
    assert all((out / name).stat().st_mtime_ns == ns for name, ns in stamps.items())


def test_api_batches_windows_of_all_files(tiny_whisper, clips, tmp_path, monkeypatch):
    import localgp

    long, _ = assemble([1.0, *[x for clip in clips * 2 for x in (clip, 1.0)], 30.0, clips[0], 1.0])
    sf.write(tmp_path / "a.wav", long, SAMPLE_RATE)
    sf.write(tmp_path / "b.wav", assemble([0.5, clips[1], 0.5])[0], SAMPLE_RATE)
    from localgp.backbones.whisper.backbone import WhisperCorpusDecoder

    sizes = []
    real_batch = WhisperCorpusDecoder.batch
    monkeypatch.setattr(WhisperCorpusDecoder, "batch", lambda self, ex: sizes.append(len(ex)) or real_batch(self, ex))
    result = localgp.transcribe([tmp_path / "a.wav", tmp_path / "b.wav"], whisper_dir=str(tiny_whisper), beam=2,
                                batch=3, device="cpu", progress=False)
    assert not list(tmp_path.glob("*.json"))  # out=None: nothing written
    windows = [len(t.segments) for t in result.transcripts]
    assert windows[0] >= 3 and windows[1] == 1
    # language auto: a's first window and b's window go first, together; then a's others
    assert sizes[0] == 2 and sum(sizes) == sum(windows) and max(sizes) <= 3
    a = result.transcripts[0]
    assert all(s.language == a.language for s in a.segments)
    assert all(s.end - s.start <= 30.0 for s in a.segments)
    assert [s.start for s in a.segments] == sorted(s.start for s in a.segments)
    assert a.segments[-1].start == pytest.approx(len(long) / SAMPLE_RATE - 1.0 - len(clips[0]) / SAMPLE_RATE, abs=0.3)


def test_user_errors(tiny_whisper, tmp_path, cli_error, monkeypatch):
    snapshot = tmp_path / "owsm"
    (snapshot / "exp").mkdir(parents=True)
    (snapshot / "exp" / "config.yaml").write_text("encoder: e_branchformer\n")
    sf.write(tmp_path / "a.wav", silence(1.0), SAMPLE_RATE)
    cli_error(["transcribe", tmp_path / "a.wav", "--model", snapshot, "--out", tmp_path / "o"], "OWSM snapshots are not supported yet")
    cli_error(["transcribe", tmp_path / "a.wav", "--language", "xx", "--whisper-dir", tiny_whisper], "language 'xx'")
    cli_error(["transcribe", tmp_path / "a.wav", "--output-format", "txt,doc"], "--output-format: doc")
    (tmp_path / "nothing").mkdir()
    cli_error(["transcribe", tmp_path / "nothing"], "holds no audio file")
    sf.write(tmp_path / "a.flac", silence(1.0), SAMPLE_RATE)  # (in another folder it would be x/a.*)
    cli_error(["transcribe", tmp_path / "a.wav", tmp_path / "a.flac", "--whisper-dir", tiny_whisper],
              "would both write a")
    cli_error(["transcribe", tmp_path / "a.wav", "--dtype", "float16", "--device", "cpu", "--whisper-dir", tiny_whisper],
              "--dtype float16 is for a GPU; on the CPU use float32, bfloat16, int8")
    cli_error(["transcribe", tmp_path / "a.wav", "--dtype", "int4", "--whisper-dir", tiny_whisper], "--dtype: invalid choice")
    from localgp.model import packed

    monkeypatch.setattr(packed, "cpu_has_bf16", lambda: False)  # a CPU without them
    for command in (["transcribe", tmp_path / "a.wav", "--device", "cpu", "--whisper-dir", tiny_whisper],
                    ["decode", "--model", "whisper-base", "--data", tmp_path / "m.jsonl", "--out", tmp_path / "d.jsonl"],
                    ["bench", "--backbone", "whisper-base", "--weights", "random"]):
        cli_error([*command, "--dtype", "bfloat16"], "--dtype bfloat16 on the CPU needs the AVX512-BF16 or AMX instructions")


def test_transcribe_bench_rows(whisper_base, real_speech, tmp_path):
    """The long-form benchmark on a short recording of the real English clips, real weights:
    three of its systems (the gated one needs a trained run: refused without one)."""
    from localgp.bench import transcribe as bench
    from localgp.bench.core import BenchError
    from localgp.errors import UserError
    from tests.test_whisper_train import TEXTS

    lines = []
    for item in real_speech:
        if item["language"] == "en":
            sf.write(tmp_path / f"{item['id']}.wav", item["wav"], SAMPLE_RATE)
            lines.append({"id": item["id"], "audio": f"{item['id']}.wav", "language": "en", "speaker": item["speaker"],
                          "text": TEXTS[item["id"].split("_", 1)[1]]["en"], "split": "test", "translations": {}})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    wav, texts = bench.assemble(tmp_path / "manifest.jsonl", 60.0)
    assert texts == [line["text"] for line in lines]  # every clip fits in 60 s, in order
    assert sum(len(x["wav"]) for x in real_speech if x["language"] == "en") + 3 * 0.8 * SAMPLE_RATE <= len(wav)
    systems = ["openai-whisper", "faster-whisper-int8", "localgp-dense"]
    rows = bench.run_bench(systems, tmp_path / "manifest.jsonl", 60.0, beam=2, batch=4, weights=str(whisper_base),
                           run_dir=str(tmp_path / "no-run"), dtypes=("float32", "int8"))
    assert [(r["system"], r["dtype"]) for r in rows] == [("openai-whisper", "float32"), ("faster-whisper-int8", "int8"),
                                                          ("localgp-dense", "float32"), ("localgp-dense", "int8")]
    for r in rows:
        assert r["audio_seconds"] == pytest.approx(len(wav) / SAMPLE_RATE, abs=0.01)
        assert r["rtf"] == pytest.approx(r["seconds"] / r["audio_seconds"])
        assert 0 <= r["wer"] < 30, r  # read prompts, clean: Whisper base gets them nearly right
        assert r["peak_mb"] > 100 and r["threads"] >= 1 and r["revision"] and r["clips"] == len(texts)
    assert "localgp-dense" in bench.table(rows)
    with pytest.raises(UserError, match="--dtype must be one of"):
        bench.run_bench(["localgp-dense"], tmp_path / "manifest.jsonl", 60.0, weights=str(whisper_base), dtypes=("int4",))
    with pytest.raises(BenchError, match="no trained run"):
        bench.run_bench(["localgp-compact"], tmp_path / "manifest.jsonl", 60.0, weights=str(whisper_base),
                        run_dir=str(tmp_path / "no-run"))


def train_manifest(root, real_speech):
    """The real clips as wav files in `root` and a manifest of them, every one in the train split."""
    lines = []
    for item in real_speech:
        sf.write(root / f"{item['id']}.wav", item["wav"], SAMPLE_RATE)
        lines.append({"id": item["id"], "audio": f"{item['id']}.wav", "language": item["language"],
                      "speaker": item["speaker"], "text": "some text", "split": "train", "translations": {}})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "manifest.jsonl"


def train_tiny_run(root, whisper_dir, real_speech, gates: dict, **fields):
    """root/run: a `localgp train` run (one step) of the Whisper in whisper_dir with `gates`, on
    the real clips (a manifest of them in root)."""
    from localgp.train_config import TrainConfig
    from localgp.train import Trainer

    config = TrainConfig(out_dir=str(root / "run"), backbone="whisper-base", whisper_dir=str(whisper_dir),
                         data={"kind": "manifest", "path": str(train_manifest(root, real_speech)), "split": "train"},
                         gates=gates, tasks=("asr",), batch_size=2, max_steps=1, save_every=1, log_every=1, **fields)
    Trainer(config).train()
    return root / "run"


@pytest.fixture(scope="module")
def gated_run(tiny_whisper, real_speech, tmp_path_factory):
    """A `localgp train` run of the tiny Whisper with temporal encoder and token decoder gates (one step)."""
    return train_tiny_run(tmp_path_factory.mktemp("gated_run"), tiny_whisper, real_speech,
                          {"encoder": "temporal", "decoder": "token", "contexts": [["front", 0]]})


def test_gated_run_transcribes_with_its_gates(gated_run, tiny_whisper, clips, tmp_path, cli_error):
    sf.write(tmp_path / "talk.wav", assemble([1.0, clips[0], 1.0, clips[3], 1.0])[0], SAMPLE_RATE)
    gated = pipeline.transcribe(tmp_path / "talk.wav", str(gated_run), language="en", beam=2, device="cpu",
                                progress=False)
    segment = gated.transcripts[0].segments[0]
    assert {"encoder.attn", "encoder.mlp", "decoder.self_attn", "decoder.src_attn", "decoder.ffn"} <= set(segment.sparsity)
    assert 0 <= segment.encoder_sparsity <= 1 and 0 <= segment.encoder_speech_sparsity <= 1
    assert gated.transcripts[0].model["gates"] is True and len(gated.transcripts[0].model["checkpoint sha256"]) == 64
    plain = pipeline.transcribe(tmp_path / "talk.wav", str(gated_run), gates="none", language="en", beam=2,
                                device="cpu", progress=False)
    assert plain.transcripts[0].segments[0].sparsity == {} and plain.transcripts[0].model["gates"] is False
    # the same run's gates on --model whisper-base (its weights are the run's own)
    same = pipeline.transcribe(tmp_path / "talk.wav", "whisper-base", gates=str(gated_run), language="en", beam=2,
                               device="cpu", progress=False)
    assert same.transcripts[0].segments[0].text == segment.text
    cli_error(["transcribe", tmp_path / "talk.wav", "--gates", gated_run, "--whisper-dir", tiny_whisper],
              "--whisper-dir goes with the plain whisper-base")
    cli_error(["transcribe", tmp_path / "talk.wav", "--model", gated_run, "--gates", gated_run],
              "brings its own")


def test_killed_run_resumes(tiny_whisper, clips, tmp_path):
    """`localgp transcribe` killed (SIGKILL) once some files are done: a rerun keeps those as
    they are, finishes the rest, and leaves no temporary file."""
    import os
    import signal
    import subprocess
    import sys
    import time

    for i in range(8):
        sf.write(tmp_path / f"f{i}.wav", assemble([0.5, clips[i % len(clips)], 0.5])[0], SAMPLE_RATE)
    out = tmp_path / "out"
    argv = ["transcribe", str(tmp_path), "--whisper-dir", str(tiny_whisper), "--out", str(out), "--language", "en",
            "--beam", "2", "--batch", "1", "--device", "cpu", "--quiet"]
    child = subprocess.Popen([sys.executable, "-m", "localgp", *argv], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.json"))) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = {p.stem for p in out.glob("*.json")}
    assert 2 <= len(done) < 8  # killed part-way
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.stem in done and not p.name.startswith(".")}
    assert len(stamps) == 4 * len(done)  # a file with its .json has all four outputs
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"f{i}.{x}" for i in range(8) for x in outputs.FORMATS)
    assert all((out / name).stat().st_mtime_ns == ns for name, ns in stamps.items())


def test_torchrun_transcribes_what_one_process_does(tiny_whisper, clips, tmp_path, capsys):
    """Two processes (torchrun, Gloo, one thread each) share the files out, write what one process
    writes (every field but the timings), report one summary with the broken file, and a rerun
    finds every file done."""
    from tests.test_distributed import torchrun

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(5):
        sf.write(inputs / f"f{i}.wav", assemble([0.5, clips[i % len(clips)], 0.7, clips[(i + 2) % len(clips)]])[0],
                 SAMPLE_RATE)
    (inputs / "broken.wav").write_bytes(b"RIFF, but not audio")
    argv = [inputs, "--whisper-dir", tiny_whisper, "--language", "en", "--beam", "2", "--batch", "1", "--device",
            "cpu", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err = run_cli(["transcribe", *argv, "--out", tmp_path / "one"], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 1 and "transcribed 5 files" in err
    done = torchrun(2, "-m", "localgp", "transcribe", *argv, "--out", tmp_path / "two", check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count("transcribed 5 files") == 1 and done.stderr.count("cannot decode audio file") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())

    def timeless(path):
        data = json.loads(path.read_text())
        data.pop("seconds")
        for segment in data["segments"]:
            segment.pop("seconds")
        return data

    for path in (tmp_path / "one").glob("*.json"):
        assert timeless(tmp_path / "two" / path.name) == timeless(path)
        assert (tmp_path / "two" / path.with_suffix(".srt").name).read_text() == path.with_suffix(".srt").read_text()
    again = torchrun(2, "-m", "localgp", "transcribe", *argv, "--out", tmp_path / "two", check=False)
    assert again.returncode == 1 and "transcribed 0 files, 5 already done, 1 failed" in again.stderr
