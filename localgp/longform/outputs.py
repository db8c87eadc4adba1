"""A recording's transcript and its files: .txt (the text, a line per segment), .srt and .vtt
(subtitles) and .json (everything, with the executed GFLOPs and sparsity of each segment). A
file's outputs are written when the whole recording is done, each through a temporary file
renamed over its name, .json last: a recording counts as done only when every format asked for
is there, so an interrupted run leaves nothing half-written and a rerun redoes only what is not."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from localgp.errors import UserError
from localgp.files import write_text_atomically

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
    return [out_dir / f"{name}.{fmt}" for fmt in formats]


def is_done(out_dir: Path, name: str, formats) -> bool:
    return all(p.is_file() for p in output_paths(out_dir, name, formats))


def remove_leftovers(out_dir: Path, name: str) -> None:
    """The temporary files of `name`'s outputs that a killed run left behind (replace_atomically
    names them `.<file name>.tmp<pid>`)."""
    for leftover in out_dir.glob(f".{name}.*.tmp*"):
        leftover.unlink(missing_ok=True)


def write_outputs(transcript: Transcript, out_dir: Path, name: str, formats) -> list[Path]:
    """Each format through a temporary file renamed over its name (json last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, name, formats)
    for fmt, path in zip(formats, paths, strict=True):
        write_text_atomically(path, render(transcript, fmt))
    return paths
