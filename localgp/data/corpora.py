"""Corpus loaders producing `Utterance`s: Europarl-ST v1.1 and ESPnet/Kaldi data directories."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from localgp.data.audio import load_audio
from localgp.errors import UserError


@dataclass(frozen=True)
class Utterance:
    id: str  # unique utterance id
    audio: Path  # the audio file holding it
    language: str  # ISO 639-1 code of the speech
    text: str  # transcript in `language`
    speaker: str  # speaker (or recording) id
    start: float | None = None  # segment start in seconds within `audio`, None: whole file
    end: float | None = None  # segment end in seconds, None: to the end
    translations: dict[str, str] = field(default_factory=dict)  # target language -> text
    # its length as decoded, when known (load_corpus measures every utterance it checks)
    seconds: float | None = field(default=None, compare=False)

    def load(self):
        return load_audio(self.audio, self.start, self.end)


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return path.read_text(encoding="utf-8").splitlines()


def _segment(text: str, where: str, layout: str) -> tuple[str, float, float]:
    """(id, start, end) of a segment line '<id> <start> <end>' (seconds, finite, start < end)."""
    parts = text.split()
    try:
        start, end = float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        start = end = None
    if len(parts) != 3 or start is None or not 0 <= start < end < float("inf"):
        raise UserError(f"{where}: expected '{layout}' with 0 <= start < end in seconds, got {text!r}")
    return parts[0], start, end


def europarl_st(root: str | Path, source: str, targets: list[str] | str, split: str) -> list[Utterance]:
    """Europarl-ST v1.1: <root>/<src>/<tgt>/<split>/segments.{lst,<src>,<tgt>}, audio in
    <root>/<src>/audios/<id>.m4a. Segments present in every target pair are returned, with their
    translations; the speaker is the speech (audio file) the segment comes from."""
    root = Path(root)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise UserError("europarl_st: name at least one target language")
    by_segment: dict[tuple, Utterance] = {}
    for i, target in enumerate(targets):
        folder = root / source / target / split
        if not folder.is_dir():
            raise FileNotFoundError(f"europarl_st: {folder} does not exist (expected <root>/<src>/<tgt>/<split>)")
        segments = _read_lines(folder / "segments.lst")
        sources = _read_lines(folder / f"segments.{source}")
        translations = _read_lines(folder / f"segments.{target}")
        if not len(segments) == len(sources) == len(translations):
            raise UserError(f"europarl_st: {folder} has {len(segments)} segments, {len(sources)} source and "
                             f"{len(translations)} target lines; they must match")
        seen = {}
        for line_no, (seg, text, translation) in enumerate(zip(segments, sources, translations, strict=True), 1):
            audio_id, start, end = _segment(seg, f"{folder / 'segments.lst'}:{line_no}", "<audio id> <start> <end>")
            if not text.strip() or not translation.strip():
                raise UserError(f"europarl_st: segment {line_no} of {folder} has an empty transcript or translation")
            key = (audio_id, start, end)
            if i == 0:
                audio = root / source / "audios" / f"{audio_id}.m4a"
                utt = Utterance(f"{source}_{audio_id}_{start:.2f}_{end:.2f}", audio, source, text.strip(),
                                audio_id, start, end, {})
                by_segment[key] = utt
            if key in by_segment:
                by_segment[key].translations[target] = translation.strip()
                seen[key] = True
        for key in [k for k in by_segment if k not in seen]:
            del by_segment[key]
    return list(by_segment.values())


def kaldi_dir(directory: str | Path, language: str, audio_root: str | Path | None = None) -> list[Utterance]:
    """An ESPnet/Kaldi data directory: wav.scp (id -> file), text, utt2spk, optional segments.

    Relative paths in wav.scp are relative to `audio_root`, by default the working directory
    (ESPnet recipes run from the recipe directory)."""
    directory = Path(directory)

    def table(name: str, required: bool = True) -> dict[str, str]:
        path = directory / name
        if not path.exists():
            if required:
                raise FileNotFoundError(f"kaldi_dir: {path} is missing")
            return {}
        rows = {}
        for line_no, line in enumerate(_read_lines(path), 1):
            if not line.strip():
                continue
            key, _, value = line.strip().partition(" ")
            if key in rows:
                raise UserError(f"{path}:{line_no}: duplicate id {key!r}")
            rows[key] = value.strip()
        return rows

    recordings, texts, speakers = table("wav.scp"), table("text"), table("utt2spk")
    segments = table("segments", required=False)
    for rec, value in recordings.items():
        if value.endswith("|"):
            raise UserError(f"kaldi_dir: wav.scp entry {rec!r} is a command pipe; only file paths are supported")
    utterances = []
    for utt, text in texts.items():
        if utt not in speakers:
            raise UserError(f"kaldi_dir: utterance {utt!r} has no utt2spk entry")
        if segments:
            if utt not in segments:
                raise UserError(f"kaldi_dir: utterance {utt!r} is not in segments")
            rec, start, end = _segment(segments[utt], f"{directory / 'segments'} ({utt})", "<recording> <start> <end>")
        else:
            rec, start, end = utt, None, None
        if rec not in recordings:
            raise UserError(f"kaldi_dir: recording {rec!r} of utterance {utt!r} is not in wav.scp")
        if not text.strip():
            raise UserError(f"kaldi_dir: utterance {utt!r} has an empty transcript in {directory / 'text'}")
        audio = Path(recordings[rec])
        audio = audio if audio.is_absolute() else Path(audio_root or Path.cwd()) / audio
        utterances.append(Utterance(utt, audio, language, text, speakers[utt], start, end))
    return utterances
