"""`localgp transcribe` / `localgp.transcribe(paths, ...)`: recordings of any length and any
format PyAV reads, cut at pauses into windows of at most 30 s (localgp.longform.vad), the windows
of all files decoded together in batches by the backbone's own corpus decoder (Whisper's beam
search, plain or gated, contexts fed as in training), each window a segment whose times are those
of the recording.

Scheduling: files are read (and cut) only as the batches need more windows, and a file's windows
go in order. With --language auto, a file's first window detects its language (Whisper's rule:
the most probable language token) and its other windows wait for it, then decode in that
language ahead of later files' windows, as openai-whisper and faster-whisper decide one
language per file. A file whose audio cannot be used (not audio, cut short, no samples, no
speech found) is reported with the reason and the others go on.

Under torchrun each process transcribes a share of the files (rank 0 plans the shares, balanced by
the seconds their headers declare, after leaving out the files already done) on its own device
(cuda:LOCAL_RANK on a GPU node), writing their outputs as one process does; every process then
returns the merged result, and the command line's summary is rank 0's."""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from localgp import distributed
from localgp.data.audio import SAMPLE_RATE, declared_seconds, load_checked
from localgp.errors import UserError
from localgp.longform.outputs import (
    FORMATS, Segment, Taken, Transcript, check_outputs, output_paths, read_transcript, write_outputs,
)
from localgp.longform.vad import WINDOW_SECONDS, SileroVAD, Window, speech_windows
from localgp.model.packed import DTYPES, check_precision

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".g722", ".webm",
                  ".mp4", ".mkv", ".mov", ".avi", ".aiff", ".aif", ".amr", ".ac3", ".caf", ".au"}
# Under torchrun the process group carries the plan and the final merge, which waits for the
# slowest process: Gloo (on GPUs too: a few objects), with a long timeout.
TRANSCRIBE_TIMEOUT = datetime.timedelta(days=1)
CONTEXT_SECONDS = 30.0  # of a recording's speech, which its contexts (the speaker embedding) are computed from


# ------------------------------------------------------------------ inputs

def expand_inputs(items) -> tuple[list[Path], Path]:
    """(files, their common folder): files, directories (their audio files, recursively, by
    suffix) and @list.txt (a path per line, relative to the list; blank lines and # comments
    skipped), in order, each once (two paths of one file: the first), absolute as given (symbolic
    links not followed: a link's outputs go where the link is); the common folder of the
    directories given and of the files' folders, which the outputs' tree mirrors."""
    paths: list[Path] = []
    folders: list[Path] = []
    for item in [items] if isinstance(items, (str, Path)) else items:
        text = str(item)
        if text.startswith("@"):
            listing = Path(text[1:])
            if not listing.is_file():
                raise UserError(f"file list {listing} does not exist")
            try:
                lines = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
            except UnicodeDecodeError as err:
                raise UserError(f"file list {listing} is not UTF-8 text ({err}): give a path per line") from None
            listed = [p if p.is_absolute() else listing.parent / p
                      for p in (Path(line) for line in lines if line and not line.startswith("#"))]
            paths += listed
            folders += [absolute(p).parent for p in listed]
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise UserError(f"directory {text} holds no audio file (suffixes {', '.join(sorted(AUDIO_SUFFIXES))})")
            paths += found
            folders.append(absolute(Path(text)))
        else:
            paths.append(Path(text))  # a missing file is reported with the failed ones
            folders.append(absolute(Path(text)).parent)
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), absolute(path))
    if not unique:
        raise UserError("no audio file given")
    return list(unique.values()), Path(os.path.commonpath(folders))


def absolute(path: Path) -> Path:
    """The absolute path, `..` folded, symbolic links not followed."""
    return Path(os.path.abspath(path))


def output_names(paths: list[Path], root: Path) -> list[str]:
    """Each file's outputs are <its path under root, without its suffix>.<format>: the inputs'
    folder tree, mirrored (2024/01/call.wav -> 2024/01/call.txt). Two inputs of one name (call.wav
    and call.mp3 in one folder) are refused: one would overwrite the other's."""
    names = [p.relative_to(root).with_suffix("").as_posix() for p in paths]
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths, strict=True):
        if name in seen:
            raise UserError(f"{seen[name]} and {path} would both write {name}.*: transcribe them into separate --out "
                            f"directories")
        seen[name] = path
    return names


# ------------------------------------------------------------------ the model

@dataclass
class Loaded:
    run: object  # localgp.runs.Run: model, tokenizer, config, backbone
    identity: dict  # what the transcripts say decoded them


def load_model(model: str = "whisper-base", gates: str | None = None, whisper_dir: str | None = None,
               calibration: str | None = None) -> Loaded:
    """model: "whisper-base" (the plain pretrained model; gates=RUN_DIR puts a trained run's model
    in its place, gates="default" the release gates, gates=FILE.safetensors a gates file
    (localgp.release), gates="padding", "silence", "attention[:BLOCK:KEEP]" a training-free rule, its
    fill calibrated on `calibration`'s training clips), or a `localgp train` run directory (its
    gated model; gates="none": its weights without the gates). An OWSM snapshot directory is
    refused: not supported here yet."""
    from localgp.files import file_sha256
    from localgp.model.config import is_rule
    from localgp.release import is_gates_file, load_gates
    from localgp.runs import checkpoint_path, dense_model, load_run, rule_model

    if is_rule(gates):
        if model != "whisper-base":
            raise UserError(f"--gates {gates}: a rule goes on --model whisper-base, not on --model {model}")
        run = rule_model("whisper-base", gates, {}, whisper_dir, calibration)
        return Loaded(run, {"name": "whisper-base", "gates": run.model.encoder.rule.label,
                            **run.backbone.weights_identity()})
    if calibration is not None:
        raise UserError("--calibration goes with --gates padding or silence (the rules' fill)")
    if is_gates_file(gates):
        if model != "whisper-base":
            raise UserError(f"--gates {gates}: a gates file goes on --model whisper-base, not on --model {model}")
        run, identity = load_gates(gates, whisper_dir)
        if run.backbone.name != "whisper-base":
            raise UserError(f"--gates {gates}: gates of backbone {run.backbone.name}: `localgp transcribe` decodes "
                            f"Whisper models only so far")
        return Loaded(run, {"name": "whisper-base", **identity, "gates": True})
    if gates is not None and gates != "none" and model != "whisper-base":
        raise UserError(f"--gates {gates}: a run's gates go on --model whisper-base; --model {model} brings its own "
                        f"(--gates none decodes it without them)")
    if model == "whisper-base" and gates in (None, "none"):
        run = dense_model("whisper-base", {}, whisper_dir)
        return Loaded(run, {"name": "whisper-base", "gates": None, **run.backbone.weights_identity()})
    run_dir = Path(gates if model == "whisper-base" else model)
    if not run_dir.is_dir():
        raise UserError(f"--model {model}: not whisper-base and no such directory" if run_dir == Path(model)
                        else f"--gates {gates}: no such run directory")
    if not checkpoint_path(run_dir).exists():
        if (run_dir / "config.yaml").is_file() or any(run_dir.rglob("config.yaml")):
            raise UserError(f"{run_dir} looks like an OWSM snapshot: `localgp transcribe` decodes Whisper models only "
                            f"so far (whisper-base, or a run trained on it); OWSM snapshots are not supported yet")
        raise UserError(f"{run_dir} is neither a `localgp train` run (no {checkpoint_path(run_dir).name}) nor an OWSM "
                        f"snapshot")
    if whisper_dir is not None:
        raise UserError("--whisper-dir goes with the plain whisper-base; a run reads the weights it was trained on")
    run = load_run(run_dir)
    if run.backbone.name != "whisper-base":
        raise UserError(f"{run_dir} is a run of backbone {run.backbone.name}: `localgp transcribe` decodes Whisper "
                        f"models only so far")
    identity = {"name": "whisper-base", "run": str(run_dir.resolve()),
                "checkpoint sha256": file_sha256(checkpoint_path(run_dir)), "gates": gates != "none"}
    if gates == "none":
        from localgp.model.pruning import ungated_copy

        run.model.encoder = ungated_copy(run.model.encoder)
        run.model.decoder = ungated_copy(run.model.decoder)
    return Loaded(run, identity)


def pick_device(device: str) -> torch.device:
    from localgp.runs import check_device

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


# ------------------------------------------------------------------ decoding

@dataclass
class WindowUtterance:
    """A window's audio as the corpus decoder and the context feeder take an utterance."""

    id: str
    language: str | None  # None: detect
    samples: np.ndarray
    speaker: str = ""
    translations: dict = field(default_factory=dict)
    speech: list[tuple[int, int]] | None = None  # the VAD's speech regions inside the window (sample ranges)
    # The recording's contexts (localgp.context.feeder.context_source): computed once per file, from its speech
    context_id: str | None = None
    context_audio: object = None  # () -> the recording's speech samples

    def load(self) -> np.ndarray:
        return self.samples


@dataclass
class Recording:
    index: int
    path: Path
    name: str
    wav: np.ndarray | None = None
    speech: list[tuple[int, int]] = field(default_factory=list)  # the VAD's speech regions
    windows: list[Window] = field(default_factory=list)
    segments: dict[int, Segment] = field(default_factory=dict)
    language: str | None = None
    counted: float = 0.0  # seconds of it the progress bar has counted


@dataclass
class Failure:
    file: str
    reason: str


@dataclass
class Result:
    transcripts: list[Transcript]  # the files decoded now, and (from their .json) the ones done before
    failed: list[Failure]
    skipped: list[str]  # done before (outputs there), not decoded again
    decoded: int = 0  # files decoded now
    audio_seconds: float = 0.0  # of the files decoded now
    seconds: float = 0.0  # wall-clock of the decoding now
    # Parts of `seconds` (this process's): the encoder calls, the beam searches, the gates' contexts
    # (e.g. a speaker embedding: once per file, from its speech)
    encoder_seconds: float = 0.0
    decoder_seconds: float = 0.0
    context_seconds: float = 0.0

    @property
    def rtf(self) -> float:
        return self.seconds / self.audio_seconds if self.audio_seconds else float("nan")


class Transcriber:
    """A model ready to transcribe (loaded on first use: a rerun with every file done loads
    nothing). model, gates, whisper_dir: see load_model; device auto|cpu|cuda; dtype float32,
    bfloat16 or int8 on the CPU, float16/bfloat16 on a GPU (backbones.ready_for_decoding)."""

    def __init__(self, model: str = "whisper-base", gates: str | None = None, whisper_dir: str | None = None,
                 device: str = "auto", dtype: str = "float32", calibration: str | None = None):
        check_precision(dtype, pick_device(device))
        self.ctx = distributed.setup(pick_device(device), backend="gloo", timeout=TRANSCRIBE_TIMEOUT)
        self.device = self.ctx.device
        self.model, self.gates, self.whisper_dir, self.dtype = model, gates, whisper_dir, dtype
        self.calibration = calibration
        self.loaded = None
        self.calls = 0  # window ids differ from call to call: the context cache keys them

    def load(self) -> None:
        from localgp.context.feeder import ContextFeeder

        if self.loaded is not None:
            return
        loaded = load_model(self.model, self.gates, self.whisper_dir, self.calibration)
        run = loaded.run
        run.model.to(self.device, DTYPES[self.dtype])
        self._cache = tempfile.TemporaryDirectory(prefix="localgp-context-")  # windows' contexts: this process only
        self.contexts = ContextFeeder(run.model, run.config.context_extractors, Path(self._cache.name),
                                      run.backbone.prompt_context)
        self.vad = SileroVAD()
        self.loaded = loaded

    def __call__(self, paths, *, language: str | None = None, task: str = "transcribe", batch: int = 8,
                 beam: int = 5, formats=FORMATS, out: str | Path | None = None, overwrite: bool = False,
                 execution: str = "compact", progress: bool = True) -> Result:
        """Transcribes (or translates into English) audio files of any length.

        paths: files, directories, "@list.txt", or one of them. language: a Whisper language code,
        or None / "auto" to detect it per file. out: write each file's `formats` there when it is
        done, skipping files whose outputs are all there already (overwrite: decode them again);
        None: write nothing. Returns the transcripts with their segments, the files that failed
        and why, and the files skipped."""
        from localgp.data.examples import Example
        from localgp.backbones.whisper.decoding import TASKS, WhisperDecodeOptions

        if batch < 1 or beam < 1:
            raise UserError(f"batch and beam must be >= 1, got {batch} and {beam}")
        if task not in TASKS:
            raise UserError(f"task must be one of {TASKS}, got {task!r}")
        language = None if language in (None, "auto") else language
        from whisper.tokenizer import LANGUAGES

        if language is not None and language not in LANGUAGES:
            raise UserError(f"language {language!r}: Whisper knows {', '.join(sorted(LANGUAGES))} (or auto)")
        formats = tuple(formats)
        inputs, root = expand_inputs(paths)
        names = output_names(inputs, root)
        out_dir = Path(out) if out is not None else None
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file, not a folder")

        recordings = [Recording(i, p.resolve(), n) for i, (p, n) in enumerate(zip(inputs, names, strict=True))]
        # rank 0 decides what is done and who does the rest before any process writes an output
        done, shares = distributed.on_main(self.ctx, lambda: plan(recordings, out_dir, formats, overwrite,
                                                                  self.ctx.world))
        skipped, transcripts = [str(recordings[i].path) for i in done], {}
        if "json" in formats and out_dir is not None:
            for i in done:
                transcripts[i] = read_transcript(output_paths(out_dir, recordings[i].name, ["json"])[0])
        if skipped:
            log.info("transcribe: %d of %d files already done in %s", len(skipped), len(inputs), out_dir)
        recordings = [recordings[i] for i in shares[self.ctx.rank]]
        result = Result([], [], skipped)
        if not any(shares):
            result.transcripts = [transcripts[i] for i in sorted(transcripts)]
            return result

        self.load()
        self.calls += 1
        run, contexts = self.loaded.run, self.contexts
        if language is None and (contexts.global_prompt or contexts.decoder_names):
            raise UserError("these gates read the prompt's language before decoding: give --language")
        options = WhisperDecodeOptions(beam_size=beam, execution=execution)
        decoder = run.backbone.corpus_decoder(run.model, contexts, options, str(self.device), self.dtype)
        target = "en" if task == "translate" else language
        bar = tqdm(total=sum(declared(r.path) for r in recordings), unit="s", disable=not progress or not self.ctx.main,
                   desc="transcribe" if not self.ctx.active else f"transcribe (rank 0 of {self.ctx.world})",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]")
        started = time.perf_counter()
        context_before = contexts.seconds

        def advance(recording: Recording, upto: float) -> None:
            bar.update(max(upto - recording.counted, 0.0))
            recording.counted = max(upto, recording.counted)
            bar.set_postfix_str(f"RTF {(time.perf_counter() - started) / max(bar.n, 1e-9):.3f}", refresh=False)

        def fail(recording: Recording, reason: str) -> None:
            result.failed.append(Failure(str(recording.path), " ".join(reason.split())))
            bar.total = max(bar.total - declared(recording.path), bar.n)
            recording.wav = None

        def finish(recording: Recording) -> None:
            segments = [recording.segments[i] for i in range(len(recording.windows))]
            transcript = Transcript(str(recording.path), recording.language or segments[0].language,
                                    len(recording.wav) / SAMPLE_RATE, task, self.loaded.identity, segments)
            if out_dir is not None:
                try:
                    write_outputs(transcript, out_dir, recording.name, formats, overwrite)
                except Taken as taken:
                    fail(recording, str(taken))
                    return
            transcripts[recording.index] = transcript
            result.decoded += 1
            result.audio_seconds += transcript.duration
            advance(recording, transcript.duration)
            recording.wav = None

        def window_job(recording: Recording, w: int):
            window = recording.windows[w]
            lang = recording.language if recording.language is not None else language
            inside = [(max(a, window.start) - window.start, min(b, window.end) - window.start)
                      for a, b in recording.speech if a < window.end and b > window.start]
            wav, regions = recording.wav, recording.speech
            utterance = WindowUtterance(f"{self.calls}-{recording.index}-{w}", lang,
                                        recording.wav[window.start:window.end], speech=inside,
                                        context_id=f"{self.calls}-{recording.index}",
                                        context_audio=lambda: context_speech(wav, regions))
            return recording, w, Example(utterance, target if target is not None else lang, "")

        pending = deque(recordings)
        ready: deque = deque()  # (recording, window index, example)
        waiting: dict[int, list[int]] = {}  # recording index -> windows waiting for its detected language
        try:
            while True:
                while len(ready) < batch and pending:
                    recording = pending.popleft()
                    try:
                        recording.wav = load_checked(recording.path)
                    except UserError as err:
                        fail(recording, str(err))
                        continue
                    if len(recording.wav) == 0:
                        fail(recording, f"{recording.path} holds no audio samples")
                        continue
                    # the bar counts what the file holds (its header may declare nothing, or something else)
                    bar.total = bar.total - declared(recording.path) + len(recording.wav) / SAMPLE_RATE
                    recording.speech = self.vad(recording.wav)
                    recording.windows = speech_windows(recording.speech, WINDOW_SECONDS)
                    if not recording.windows:
                        fail(recording, f"{recording.path}: no speech found (voice activity detection) in its "
                                        f"{len(recording.wav) / SAMPLE_RATE:.2f} s")
                        continue
                    recording.language = language
                    first = 1 if language is None else len(recording.windows)
                    ready.extend(window_job(recording, w) for w in range(first))
                    if first < len(recording.windows):
                        waiting[recording.index] = list(range(first, len(recording.windows)))
                if not ready:
                    break
                jobs = [ready.popleft() for _ in range(min(batch, len(ready)))]
                records = decoder.batch([example for _, _, example in jobs])
                resumed = []
                for (recording, w, _), record, hyp in zip(jobs, records, decoder.last_hypotheses, strict=True):
                    window = recording.windows[w]
                    recording.segments[w] = Segment(
                        start=window.start / SAMPLE_RATE, end=window.end / SAMPLE_RATE, text=record.hypothesis,
                        language=hyp.language, avg_logprob=hyp.avg_logprob, encoder_gflops=record.encoder_gflops,
                        decoder_gflops=record.decoder_gflops or 0.0, sparsity=record.sparsity,
                        encoder_sparsity=record.encoder_sparsity,
                        encoder_speech_sparsity=record.encoder_speech_sparsity, seconds=record.seconds,
                        frames_skipped=record.frames_skipped)
                    if recording.language is None:  # its first window: the file's language
                        recording.language = hyp.language
                        resumed += [window_job(recording, v) for v in waiting.pop(recording.index, [])]
                    if len(recording.segments) == len(recording.windows):
                        finish(recording)
                    else:
                        advance(recording, window.end / SAMPLE_RATE)
                ready.extendleft(reversed(resumed))  # started files first: they finish, and free their audio, sooner
        finally:
            bar.close()
        result.seconds = time.perf_counter() - started
        result.encoder_seconds, result.decoder_seconds = decoder.encoder_seconds, decoder.decoder_seconds
        result.context_seconds = contexts.seconds - context_before
        if self.ctx.active:  # every rank's files, in every rank's result, in the order of the inputs
            # this rank's own files (every rank read the ones done before from their .json already)
            decoded = {i: transcripts[i] for i in shares[self.ctx.rank] if i in transcripts}
            parts = distributed.gather_objects(self.ctx, (decoded, result.failed, result.decoded,
                                                          result.audio_seconds, result.seconds))
            order = {str(path.resolve()): i for i, path in enumerate(inputs)}
            for theirs, *_ in parts:
                transcripts.update(theirs)
            result.failed = sorted((f for part in parts for f in part[1]), key=lambda f: order[f.file])
            result.decoded = sum(part[2] for part in parts)
            result.audio_seconds = sum(part[3] for part in parts)
            result.seconds = max(part[4] for part in parts)  # the slowest process: the command's wall-clock
        result.transcripts = [transcripts[i] for i in sorted(transcripts)]
        return result


def context_speech(wav: np.ndarray, regions: list[tuple[int, int]], seconds: float = CONTEXT_SECONDS) -> np.ndarray:
    """What a recording's contexts are computed from: its speech regions joined, the first
    `seconds` of them (a speaker embedding settles within seconds; its cost should not grow with
    the recording)."""
    limit, parts, total = int(seconds * SAMPLE_RATE), [], 0
    for a, b in regions:
        parts.append(wav[a : min(b, a + limit - total)])
        total += len(parts[-1])
        if total >= limit:
            break
    return np.concatenate(parts)


def plan(recordings: list[Recording], out_dir: Path | None, formats, overwrite: bool,
         world: int) -> tuple[list[int], list[list[int]]]:
    """(indices of the recordings already done: all their outputs in out_dir, whole, unless
    overwrite; for each of `world` processes, the indices of the others it transcribes, balanced
    by the seconds their headers declare). Refuses damaged outputs and another recording's
    (check_outputs) before anything is written."""
    done = [] if out_dir is None else [r.index for r in recordings
                                       if check_outputs(out_dir, r.name, formats, str(r.path), overwrite)]
    todo = [r for r in recordings if r.index not in set(done)]
    shares = distributed.balance([declared(r.path) for r in todo], world)
    return done, [[todo[i].index for i in share] for share in shares]


def declared(path: Path) -> float:
    """The seconds a file's header declares, 0 when it declares none (the progress bar's first guess)."""
    try:
        return declared_seconds(path) or 0.0
    except OSError:
        return 0.0


def transcribe(paths, model: str = "whisper-base", *, gates: str | None = None, whisper_dir: str | None = None,
               device: str = "auto", dtype: str = "float32", calibration: str | None = None, **options) -> Result:
    """Transcriber(model, gates, whisper_dir, device, dtype, calibration)(paths, **options): see there."""
    return Transcriber(model, gates, whisper_dir, device, dtype, calibration)(paths, **options)


def summary(result: Result) -> str:
    """What a run did, for the terminal: counts, the real-time factor and each failed file's reason."""
    timing = f" ({result.audio_seconds:.1f} s of audio in {result.seconds:.1f} s, RTF {result.rtf:.3f})" if result.decoded else ""
    lines = [f"transcribed {result.decoded} files{timing}"
             + (f", {len(result.skipped)} already done" if result.skipped else "")
             + (f", {len(result.failed)} failed:" if result.failed else "")]
    lines += [f"  {f.file}: {f.reason}" for f in result.failed]
    return "\n".join(lines)
