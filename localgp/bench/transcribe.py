"""`localgp bench --part transcribe` and `benchmarks/transcribe.py`: long-form transcription of one
recording, side by side, in one run, by what users run and by localgp:

- `openai-whisper`: `whisper.transcribe` (its defaults: timestamps, previous text as prompt,
  temperature fallback; beam 5, the language given);
- `faster-whisper-float32`, `faster-whisper-int8`: faster-whisper's `BatchedInferencePipeline`
  (its Silero VAD, windows of <= 30 s decoded in batches; beam 5, the language given) on the
  original model.bin;
- `localgp-dense`: `localgp transcribe` with the plain Whisper base;
- `localgp-padding`, `localgp-silence`, `localgp-attention[:BLOCK:KEEP]`: `localgp transcribe
  --gates RULE`, the training-free rules on the plain Whisper base (the padding and silence
  rules' fill calibrated on the manifest's training clips, cached beside the weights);
- `localgp-compact`: `localgp transcribe` with a trained gated Whisper run, compact execution
  (`localgp-compact:RUN_DIR`: another run beside it, in the same benchmark);
- `localgp-release`: `localgp transcribe --gates default`, the release gates shipped in the package.

`--dtypes float32,bfloat16,int8` runs every localgp system in each (`localgp transcribe --dtype`);
openai-whisper runs in float32 and faster-whisper's rows keep their compute types (each row's
`dtype` says which).
localgp rows add `encoder_seconds`, `decoder_seconds` (the encoder calls and the beam searches of
the timed transcription), `context_seconds` (the gates' contexts, e.g. the speaker embedding, once
per file) and `skipped`: the shares of the encoder's (frame, module) units skipped on padding,
silence (VAD non-speech inside a window) and speech frames (means over the windows that have such
frames; null: none had) and of the decoder's token-module units (0 for an ungated decoder).

The recording is assembled from the demo corpus' held-out test clips of one language (read
prompts, 8 kHz telephone speech), in order, with pauses of 0.8-2.5 s between them (seeded), up
to --seconds; its reference is their prompt texts. WER: over the whole text, after Whisper's
normalizers. Each system runs in a fresh process (its peak resident memory is its own): the
model loads, a warm-up transcribes the first 20 s, then the whole recording is timed. rtf =
seconds / audio seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from localgp.bench.core import BenchError, device_name, git_revision
from localgp.errors import UserError
from localgp.model.packed import check_precision

SYSTEMS = ("openai-whisper", "faster-whisper-float32", "faster-whisper-int8", "localgp-dense", "localgp-padding",
           "localgp-silence", "localgp-attention", "localgp-compact", "localgp-release")
RULE_PREFIX = "localgp-"  # localgp-<rule>: `--gates <rule>` (attention takes :BLOCK:KEEP)
DEFAULT_REPORT = "out/demo/report.json"  # `make demo`'s: localgp-compact runs the run it trained
DEFAULT_AUDIO = "data/demo/manifest.jsonl"
WARMUP_SECONDS = 20.0


def assemble(manifest: str | Path, seconds: float, language: str = "en", seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(16 kHz audio, the clips' texts): the test split's clips in `language`, in order, each after
    a pause of 0.8-2.5 s, until the recording lasts `seconds` (at least one clip)."""
    from localgp.data.demo_corpus import load_manifest

    path = Path(manifest)
    if not path.is_file():
        raise BenchError(f"--audio: {path} does not exist (localgp prepare demo builds data/demo)")
    clips = [u for u in load_manifest(path).get("test", []) if u.language == language]
    if not clips:
        raise BenchError(f"--audio: {path} has no {language} clip in its test split")
    gen = np.random.default_rng(seed)
    parts, texts, samples = [], [], 0
    for u in clips:
        wav = u.load()
        pause = np.zeros(round(gen.uniform(0.8, 2.5) * 16000), np.float32)
        if texts and samples + len(pause) + len(wav) > seconds * 16000:
            break
        parts += [pause, wav]
        texts.append(u.text)
        samples += len(pause) + len(wav)
    return np.concatenate(parts), texts


def wer(reference: str, hypothesis: str, language: str) -> float:
    import jiwer

    from localgp.evaluate import normalise_for

    ref, hyp = normalise_for(reference, language, "whisper"), normalise_for(hypothesis, language, "whisper")
    return 100.0 * jiwer.wer(ref, hyp)


def rule_of(system: str) -> str | None:
    """The rule a localgp-<rule> system runs (`--gates` text), else None."""
    from localgp.model.config import is_rule

    rule = system[len(RULE_PREFIX):] if system.startswith(RULE_PREFIX) else None
    return rule if is_rule(rule) else None


def run_of(system: str, run_dir: str | None) -> str | None:
    """The run directory a localgp-compact[:RUN_DIR] system runs, else None."""
    if system == "localgp-compact":
        return run_dir
    return system.split(":", 1)[1] if system.startswith("localgp-compact:") else None


def known_system(system: str) -> bool:
    return system in SYSTEMS or rule_of(system) is not None or system.startswith("localgp-compact:")


def skipped_shares(result) -> dict:
    """A localgp transcription's skipped shares (see the module's docstring)."""
    segments = [s for t in result.transcripts for s in t.segments]
    shares = {}
    for kind in ("padding", "silence", "speech"):
        values = [s.frames_skipped[kind] for s in segments if s.frames_skipped.get(kind) is not None]
        gated = any(s.frames_skipped for s in segments)
        shares[kind] = float(np.mean(values)) if values else (None if gated else 0.0)
    decoder = [v for s in segments for k, v in s.sparsity.items() if k.startswith("decoder.")]
    shares["decoder_tokens"] = float(np.mean(decoder)) if decoder else 0.0
    return shares


def run_system(system: str, audio: Path, language: str, beam: int, batch: int, weights: Path, run_dir: str,
               manifest: str = DEFAULT_AUDIO, dtype: str = "float32") -> dict:
    """Transcribes `audio` with one system in this process: {text, seconds, audio_seconds} (and
    for localgp the parts of the time and the skipped shares)."""
    from localgp.data.audio import load_audio

    wav = load_audio(audio)
    warm = wav[: int(WARMUP_SECONDS * 16000)]
    if system == "openai-whisper":
        import whisper

        from localgp.backbones.whisper.weights import load_whisper

        model = load_whisper(weights).float().eval()

        def call(samples):
            return whisper.transcribe(model, samples, language=language, beam_size=beam, fp16=False)["text"]
    elif system.startswith("faster-whisper"):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        model = WhisperModel(str(weights / "ct2"), device="cpu", compute_type=system.rsplit("-", 1)[1],
                             cpu_threads=torch.get_num_threads())
        pipeline = BatchedInferencePipeline(model)

        def call(samples):
            segments, _ = pipeline.transcribe(samples, language=language, beam_size=beam, batch_size=batch)
            return " ".join(s.text.strip() for s in segments)
    elif system.startswith("localgp"):
        from localgp.longform import Transcriber

        rule = rule_of(system)
        if system == "localgp-dense":
            transcriber = Transcriber("whisper-base", whisper_dir=str(weights), device="cpu", dtype=dtype)
        elif system == "localgp-release":
            transcriber = Transcriber("whisper-base", gates="default", whisper_dir=str(weights), device="cpu",
                                      dtype=dtype)
        elif rule is not None:
            transcriber = Transcriber("whisper-base", gates=rule, whisper_dir=str(weights), device="cpu",
                                      calibration=manifest, dtype=dtype)
        else:
            transcriber = Transcriber(run_of(system, run_dir), device="cpu", dtype=dtype)
        parts = {}
        warm_file = audio.with_name("warmup.wav")
        import soundfile as sf

        sf.write(warm_file, warm, 16000)

        def call(samples):
            path = warm_file if samples is warm else audio
            result = transcriber(path, language=language, beam=beam, batch=batch, progress=False)
            if result.failed:
                raise BenchError(f"{system}: {result.failed[0].reason}")
            parts.update(encoder_seconds=result.encoder_seconds, decoder_seconds=result.decoder_seconds,
                         context_seconds=result.context_seconds, skipped=skipped_shares(result))
            return result.transcripts[0].text
    else:
        raise BenchError(f"unknown system {system!r}; one of {', '.join(SYSTEMS)} (localgp-attention:BLOCK:KEEP)")
    call(warm)
    started = time.perf_counter()
    text = call(wav)
    return {"text": text, "seconds": time.perf_counter() - started, "audio_seconds": len(wav) / 16000,
            **(parts if system.startswith("localgp") else {})}


def run_bench(systems=SYSTEMS, manifest: str = DEFAULT_AUDIO, seconds: float = 300.0,
              languages=("en",), beam: int = 5, batch: int = 8, weights: str | None = None,
              run_dir: str | None = None, threads: int | None = None, seed: int = 0,
              dtypes=("float32",)) -> list[dict]:
    """One row per language and system, each measured in its own process on the same recording
    of that language (and per dtype for localgp's). run_dir: the gated run of localgp-compact
    (None: the one `make demo` trained, named by DEFAULT_REPORT)."""
    if isinstance(languages, str):
        languages = (languages,)
    return [row for language in languages
            for row in _run_language(systems, manifest, seconds, language, beam, batch, weights, run_dir, threads, seed,
                                         dtypes)]


def _run_language(systems, manifest: str, seconds: float, language: str, beam: int, batch: int, weights: str | None,
                  run_dir: str | None, threads: int | None, seed: int, dtypes) -> list[dict]:
    import soundfile as sf

    from localgp.backbones.whisper.weights import check_prepared, default_whisper_dir

    unknown = [s for s in systems if not known_system(s)]
    if unknown:
        raise BenchError(f"--systems: unknown {unknown}; choose from {','.join(SYSTEMS)}")
    weights_dir = Path(weights) if weights else default_whisper_dir()
    if not (weights_dir / "base.pt").is_file():
        raise BenchError(f"--weights: no base.pt in {weights_dir} (localgp prepare whisper)")
    check_prepared(weights_dir)  # base.pt, and ct2/ that faster-whisper reads
    if "localgp-compact" in systems and run_dir is None:
        from localgp.demo import trained_run

        try:
            run_dir = str(trained_run(DEFAULT_REPORT))
        except UserError as err:
            raise BenchError(f"--run not given, and {err}") from None
    for dtype in dtypes:
        check_precision(dtype, "cpu")
    for system in systems:
        run = run_of(system, run_dir)
        if run is not None and not (Path(run) / "checkpoint.pth").is_file():
            raise BenchError(f"{'--run' if system == 'localgp-compact' else system}: {run} holds no trained run "
                             f"(checkpoint.pth); `make demo` trains one")
    threads = threads or torch.get_num_threads()
    wav, texts = assemble(manifest, seconds, language, seed)
    reference = " ".join(texts)
    rows = []
    with tempfile.TemporaryDirectory(prefix="localgp-bench-transcribe-") as tmp:
        audio = Path(tmp) / "longform.wav"
        sf.write(audio, wav, 16000)
        runs = [(system, dtype) for system in systems
                for dtype in (dtypes if system.startswith("localgp") else [system_dtype(system)])]
        for system, dtype in runs:
            command = [sys.executable, "-m", "localgp.bench.transcribe", "--one", system, "--audio", str(audio),
                       "--language", language, "--beam", str(beam), "--batch", str(batch), "--weights", str(weights_dir),
                       "--run", str(run_dir), "--threads", str(threads), "--dtypes", dtype,
                       "--audio-manifest", str(manifest)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"{system} ({dtype}) failed: "
                                 f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"system": system, "dtype": dtype, "seconds": measured["seconds"],
                         "rtf": measured["seconds"] / measured["audio_seconds"],
                         "wer": wer(reference, measured["text"], language), "peak_mb": measured["peak_mb"],
                         "audio_seconds": measured["audio_seconds"], "clips": len(texts),
                         "language": language, "beam": beam, "batch": batch, "device": "cpu",
                         "device_name": device_name(torch.device("cpu")), "threads": threads, "torch": torch.__version__,
                         "revision": git_revision(), "text": measured["text"],
                         **{k: measured[k] for k in ("encoder_seconds", "decoder_seconds", "context_seconds", "skipped")
                            if k in measured}})
    return rows


def system_dtype(system: str) -> str:
    """The dtype a baseline runs in: openai-whisper float32, faster-whisper its compute type."""
    return system.rsplit("-", 1)[1] if system.startswith("faster-whisper") else "float32"


def table(rows: list[dict]) -> str:
    head = f"{'system':24s} {'dtype':>8s} {'seconds':>9s} {'rtf':>7s} {'wer %':>7s} {'peak MB':>8s} {'vs openai':>10s}"
    head += f" {'enc s':>6s} {'dec s':>6s} {'ctx s':>6s}  skipped pad/sil/speech"
    lines = []
    for language in dict.fromkeys(r["language"] for r in rows):
        part = [r for r in rows if r["language"] == language]
        base = next((r["seconds"] for r in part if r["system"] == "openai-whisper"), None)
        lines += [f"{part[0]['audio_seconds']:.1f} s of {language} audio, beam {part[0]['beam']}, batch "
                  f"{part[0]['batch']}, {part[0]['threads']} threads, {part[0]['device_name']}, {part[0]['revision']}",
                  head]
        for r in part:
            ratio = f"{base / r['seconds']:.2f}x" if base else "-"
            num = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            extra = ""
            if "encoder_seconds" in r:
                k = r["skipped"]
                extra = (f" {r['encoder_seconds']:6.2f} {r['decoder_seconds']:6.2f} {r['context_seconds']:6.2f}  "
                         f"{num(k['padding'])}/{num(k['silence'])}/{num(k['speech'])}")
            lines.append(f"{r['system']:24s} {r['dtype']:>8s} {r['seconds']:9.2f} {r['rtf']:7.3f} {r['wer']:7.1f} {r['peak_mb']:8.0f} "
                         f"{ratio:>10s}{extra}")
    return "\n".join(lines)


def _one(args: argparse.Namespace) -> None:
    """The child process: one system, its result as a JSON line on stdout."""
    torch.set_num_threads(args.threads)
    measured = run_system(args.one, Path(args.audio), args.languages, args.beam, args.batch, Path(args.weights),
                          args.run, args.audio_manifest, args.dtypes)
    measured["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(measured))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="long-form transcription: openai-whisper, faster-whisper, localgp")
    p.add_argument("--audio", default=DEFAULT_AUDIO, help="the demo corpus' manifest (its test split)")
    p.add_argument("--seconds", type=float, default=300.0, help="length of the assembled recording")
    p.add_argument("--languages", "--language", default="en", help="comma list: a recording and rows per language")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS) +
                   " (localgp-attention:BLOCK:KEEP: other settings of the attention rule; localgp-compact:RUN_DIR: "
                   "another trained run)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="windows per batch (localgp, faster-whisper)")
    p.add_argument("--weights", help="`localgp prepare whisper`'s directory (default: its own)")
    p.add_argument("--run", help=f"the trained gated Whisper run of localgp-compact (default: the one {DEFAULT_REPORT} "
                                 f"names, `make demo`'s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="the pauses between clips")
    p.add_argument("--dtypes", default="float32", help="comma list of float32,bfloat16,int8: each localgp system in each")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--audio-manifest", default=DEFAULT_AUDIO, help=argparse.SUPPRESS)  # the child's calibration corpus
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.one:
        _one(args)
        return 0
    try:
        rows = run_bench([s for s in args.systems.split(",") if s], args.audio, args.seconds,
                         tuple(x for x in args.languages.split(",") if x), args.beam,
                         args.batch, args.weights, args.run, args.threads, args.seed,
                         [d for d in args.dtypes.split(",") if d])
    except UserError as err:  # a BenchError, check_precision's, or a damaged file
        print(f"transcribe benchmark: error: {err}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
