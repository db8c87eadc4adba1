"""A recording's transcript and its files: .txt (the text, a line per segment), .srt and .vtt
(subtitles) and .json (everything, with the executed GFLOPs and sparsity of each segment). A
file's outputs are written when the whole recording is done, each through a temporary file
renamed over its name, .json last: a recording counts as done only when every format asked for
is there (and reads back whole: check_outputs), so an interrupted run leaves nothing half-written
and a rerun redoes only what is not. A name may hold folders (the inputs' tree, mirrored). Two
runs into one folder write a recording's outputs one at a time (a lock on the folder), and never
over another recording's .json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from localgp.errors import DamagedFile, UserError, reader_error
from localgp.files import locked, read_json, remove_leftovers, write_text_atomically

FORMATS = ("txt", "srt", "vtt", "json")  # json last: written after the others


@dataclass
class Segment:
    """One window of speech: its time in the recording (seconds), its text, and what decoding it
    cost and skipped."""

    start: float
    end: float
    text: str
    language: str
    avg_logprob: float  # Whisper's: summed log-probability / (tokens + 1)
    encoder_gflops: float  # executed GMACs (the papers' GFLOPs) of the encoder on this window
    decoder_gflops: float  # this window's share of its batch's beam search
    sparsity: dict[str, float] = field(default_factory=dict)  # gated module -> skipped share (empty: dense)
    encoder_sparsity: float | None = None  # skipped (frame, module) units over the 30 s window Whisper computes
    encoder_speech_sparsity: float | None = None  # the same over the frames that carry this window's audio
    seconds: float = 0.0  # wall-clock: this window's share of its batch
    # skipped (frame, encoder module) units by kind of frame: padding (after the window's audio),
    # silence (VAD non-speech inside it), speech (VAD speech); None: no such frame (empty: dense)
    frames_skipped: dict[str, float | None] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.encoder_gflops + self.decoder_gflops


@dataclass
class Transcript:
    file: str
    language: str  # the recording's (detected on its first window with language auto)
    duration: float  # seconds of audio in the recording
    task: str
    model: dict  # what decoded it
    segments: list[Segment]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text)

    def to_json(self) -> dict:
        segments = [{"id": i, **dataclasses.asdict(s), "gflops": s.gflops} for i, s in enumerate(self.segments)]
        return {"file": self.file, "language": self.language, "duration": self.duration, "task": self.task,
                "model": self.model, "text": self.text, "segments": segments,
                "gflops": sum(s.gflops for s in self.segments), "seconds": sum(s.seconds for s in self.segments)}

    @classmethod
    def from_json(cls, data: dict) -> "Transcript":
        names = {f.name for f in dataclasses.fields(Segment)}
        return cls(data["file"], data["language"], data["duration"], data["task"], data["model"],
                   [Segment(**{k: v for k, v in s.items() if k in names}) for s in data["segments"]])


def parse_formats(text: str) -> tuple[str, ...]:
    """'txt,srt' -> ('txt', 'srt'); 'all' -> every format; refuses an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return FORMATS
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise UserError(f"--output-format: {', '.join(unknown) or 'none given'}; choose from {','.join(FORMATS)} "
                        f"or all")
    return tuple(f for f in FORMATS if f in names)


def timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS,mmm (srt) or HH:MM:SS.mmm (vtt)."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def render(transcript: Transcript, fmt: str) -> str:
    cues = [s for s in transcript.segments if s.text]
    if fmt == "txt":
        return "".join(f"{s.text}\n" for s in cues)
    if fmt == "srt":
        return "\n".join(f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text}\n"
                         for i, s in enumerate(cues, 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "\n".join(f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text}\n"
                                        for s in cues)
    if fmt == "json":
        return json.dumps(transcript.to_json(), ensure_ascii=False, indent=2) + "\n"
    raise ValueError(f"unknown output format {fmt!r}")


def output_paths(out_dir: Path, name: str, formats) -> list[Path]:
    """`name`'s outputs: out_dir/<name>.<format>; a name may hold folders (the inputs' tree)."""
    return [out_dir / f"{name}.{fmt}" for fmt in formats]


DAMAGED_FIX = "delete it (a rerun transcribes that file again), or rerun with --overwrite (every file again)"


def read_transcript(path: Path) -> Transcript:
    """A .json output read back (DamagedFile when it is not one)."""
    data = read_json(path, DAMAGED_FIX)
    try:
        return Transcript.from_json(data)
    except (KeyError, TypeError, AttributeError, ValueError) as err:  # a field missing, or not of its type
        raise DamagedFile(path, f"not a transcript: {reader_error(err)}", DAMAGED_FIX) from err


def check_text(path: Path, rendered: str | None) -> None:
    """A .txt/.srt/.vtt output as written: UTF-8 without NUL bytes, and not a strict beginning of
    what its .json renders (`rendered`; cut short). A file edited since is taken as it is."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text", DAMAGED_FIX) from None
    if "\0" in text:
        raise DamagedFile(path, "NUL bytes in it", DAMAGED_FIX)
    if rendered is not None and text != rendered and rendered.startswith(text):
        raise DamagedFile(path, f"cut short: {len(data)} of the {len(rendered.encode())} bytes its .json renders",
                          DAMAGED_FIX)


def owner(out_dir: Path, name: str) -> str | None:
    """The recording whose transcript `name`'s .json holds (None: no whole .json there)."""
    path = output_paths(out_dir, name, ["json"])[0]
    try:
        return read_transcript(path).file if path.is_file() else None
    except DamagedFile:
        return None


def check_outputs(out_dir: Path, name: str, formats, source: str, overwrite: bool) -> bool:
    """Whether `source`'s outputs `name`.<formats> in out_dir are all there and whole (it is
    done). Refuses (before anything is written) a directory or file where they or their folder
    should be, a damaged output of a done file (DamagedFile, with the fix), and a .json of
    another recording (unless overwrite: it is replaced)."""
    paths = output_paths(out_dir, name, formats)
    for folder in reversed(paths[0].relative_to(out_dir).parents[:-1]):
        if (out_dir / folder).exists() and not (out_dir / folder).is_dir():
            raise UserError(f"{out_dir / folder} is a file where the outputs of {source} need a folder: move it away")
    for path in paths:
        if path.exists() and not path.is_file():
            raise DamagedFile(path, "a directory where a file should be", "move it away")
    if overwrite:
        return False
    json_path = output_paths(out_dir, name, ["json"])[0]
    transcript = read_transcript(json_path) if "json" in formats and json_path.is_file() else None
    other = transcript.file if transcript is not None else owner(out_dir, name)
    if other is not None and other != source:
        raise UserError(f"{json_path} holds the transcript of {other}, not of {source}: transcribe into another "
                        f"--out, or give --overwrite to replace it")
    if not all(p.is_file() for p in paths):
        return False
    for fmt, path in zip(formats, paths, strict=True):
        if fmt != "json":
            check_text(path, render(transcript, fmt) if transcript is not None else None)
    return True


class Taken(Exception):
    """Another run wrote another recording's outputs under this name meanwhile."""


def write_outputs(transcript: Transcript, out_dir: Path, name: str, formats, overwrite: bool = False) -> list[Path]:
    """Each format through a temporary file renamed over its name (json last), under a lock on
    out_dir: two runs writing there at once never mix their files of one name. Raises Taken,
    writing nothing, when another run wrote another recording's .json under `name` since this
    one planned (unless overwrite)."""
    paths = output_paths(out_dir, name, formats)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        other = owner(out_dir, name)
        if other is not None and other != transcript.file and not overwrite:
            raise Taken(f"another run wrote the transcript of {other} into {output_paths(out_dir, name, ['json'])[0]} "
                        f"meanwhile: transcribe it into another --out")
        for path in paths:
            remove_leftovers(path)
        for fmt, path in zip(formats, paths, strict=True):
            write_text_atomically(path, render(transcript, fmt))
    return paths
