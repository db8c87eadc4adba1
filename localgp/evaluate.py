"""Scores decoded hypotheses the way the localGP paper's Table 1 does: WER per language (ASR),
BLEU per pair (ST), encoder GFLOPs actually executed, sparsity per module, wall-clock."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import statistics
import types
import typing
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from localgp.errors import DamagedFile, UserError


@dataclass(frozen=True)
class Decoded:
    """One decoded utterance: a line of the decoder's JSONL output (to_json / from_json)."""

    id: str
    language: str  # of the speech
    target_language: str  # == language for ASR
    reference: str
    hypothesis: str
    encoder_gflops: float  # executed, for this utterance
    seconds: float  # wall-clock of this utterance's share of its batch
    sparsity: dict[str, float] = field(default_factory=dict)  # module kind -> skipped share
    # Token-gated decoders only (else empty): the output pieces and, per piece, the share of
    # decoder layers that kept src-attention (the mean of the layers' 0/1 decisions).
    tokens: list[str] = field(default_factory=list)
    src_attn_keep: list[float] = field(default_factory=list)
    # Added with the Whisper backbone; None in records written before (or where not measured).
    decoder_gflops: float | None = None  # decoder GMACs executed: this utterance's share of its beam search
    encoder_seconds: float | None = None  # wall-clock of the encoder call alone, this utterance's share
    encoder_sparsity: float | None = None  # skipped (frame, encoder module) units over every encoder frame
    encoder_speech_sparsity: float | None = None  # the same over the frames that carry the audio (Whisper pads to 30 s)
    normalizer: str = "localgp"  # text normalisation for WER: NORMALIZERS (whisper: Whisper's own normalizers)
    # Skipped (frame, encoder module) units by kind of frame: "padding" (after the audio), "silence"
    # (inside it, VAD non-speech), "speech" (VAD speech); None: no such frame. Empty: not measured.
    frames_skipped: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.tokens) != len(self.src_attn_keep):
            raise ValueError(f"Decoded {self.id!r}: {len(self.tokens)} tokens but {len(self.src_attn_keep)} "
                             f"src_attn_keep values; they must match")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"Decoded {self.id!r}: normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")

    def to_json(self) -> str:
        """One line of JSON (no newline inside)."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Decoded":
        """The record of one JSON line; ValueError naming what is missing, unknown or mistyped."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in raw]
        unknown = sorted(set(raw) - set(fields))
        if missing or unknown:
            raise ValueError(f"missing fields {missing}, unknown fields {unknown}; a record has {list(fields)}")
        for name, hint in typing.get_type_hints(cls).items():
            if name in raw and not has_type(raw[name], hint):
                raise ValueError(f"field {name!r} must be {hint}, got {raw[name]!r}")
        return cls(**raw)


def has_type(value, hint) -> bool:
    """isinstance for dataclass field types as JSON or YAML give them (str, float taking ints,
    X | None, list[...], dict[str, float]; a tuple's items are not checked)."""
    if hint is float:  # JSON writes 3.0 as 3.0 but a hand-made file may say 3
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    base, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if base in (types.UnionType, typing.Union):
        return any(has_type(value, a) for a in args)
    if not isinstance(value, base):
        return False
    if base is list:
        return all(has_type(v, args[0]) for v in value)
    if base is dict:
        return all(has_type(k, args[0]) and has_type(v, args[1]) for k, v in value.items())
    return True


def append_decoded(records: Iterable[Decoded], path: str | Path) -> int:
    """Appends the records to a JSONL file as they come (pass a generator to stream a decode),
    one line each, flushed at once: an interrupted decode keeps every record it had finished.
    Refuses to append after a last line cut short, which would merge two records. Returns the
    number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                raise UserError(f"{path}: its last line is cut short (an interrupted write?); delete that line "
                                 f"before appending")
    written = 0
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")
            f.flush()
            written += 1
    return written


def read_decoded(path: str | Path, last_cut: bool = False) -> list[Decoded]:
    """The records of a JSONL file written by append_decoded (an empty file gives []). A
    malformed line (DamagedFile) or a repeated utterance id raises a UserError with its line
    number; last_cut: a last line without its newline (cut short by a kill) is left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decoded records {path} do not exist")
    fix = "decode into it again (`localgp decode ... --overwrite`)"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DamagedFile(path, f"not UTF-8 text: {err}", fix) from err
    records, first_line = [], {}
    parts = text.split("\n")  # not splitlines: a record may hold U+2028 and its kin
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if last_cut and not line.endswith("\n"):
            break
        try:
            record = Decoded.from_json(line)
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            cut = "" if line.endswith("\n") else ", the last line, cut short"
            raise DamagedFile(path, f"line {line_no}{cut}: not a decoded record: {err}", fix) from err
        if record.id in first_line:
            raise UserError(f"{path}:{line_no}: utterance {record.id!r} again (first on line "
                             f"{first_line[record.id]})")
        first_line[record.id] = line_no
        records.append(record)
    return records


NORMALIZERS = ("localgp", "whisper")


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: WER on words, not on formatting."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']|_", " ", text)
    return " ".join(text.split())


@functools.cache
def _whisper_normalizer(english: bool):
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    return EnglishTextNormalizer() if english else BasicTextNormalizer()


def normalise_for(text: str, language: str, normalizer: str = "localgp") -> str:
    """The text as WER compares it: `normalise` (localgp's, OWSM runs), or Whisper's own
    normalizers as Whisper's papers score it (EnglishTextNormalizer for English, with its
    spelling and number standardisation; BasicTextNormalizer otherwise)."""
    if normalizer == "localgp":
        return normalise(text)
    if normalizer == "whisper":
        return " ".join(_whisper_normalizer(language == "en")(text).split())
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")


def _normalised(record: Decoded, text: str) -> str:
    return normalise_for(text, record.target_language, record.normalizer)


def score(records: list[Decoded]) -> dict:
    import jiwer
    import sacrebleu

    if not records:
        raise UserError("evaluate: no decoded utterance to score")
    for r in records:  # WER and BLEU are undefined against nothing
        if not _normalised(r, r.reference):
            raise UserError(f"evaluate: an empty reference transcript in {r.target_language} (utterance {r.id!r}: "
                             f"{r.reference!r}, after the {r.normalizer} normalizer)")
    report: dict = {"wer": {}, "bleu": {}, "utterances": len(records),
                    "normalizers": sorted({r.normalizer for r in records})}
    asr = [r for r in records if r.language == r.target_language]
    for lang in sorted({r.language for r in asr}):
        rows = [r for r in asr if r.language == lang]
        refs = [_normalised(r, r.reference) for r in rows]
        report["wer"][lang] = 100 * jiwer.wer(refs, [_normalised(r, r.hypothesis) for r in rows])
    st = [r for r in records if r.language != r.target_language]
    for pair in sorted({(r.language, r.target_language) for r in st}):
        rows = [r for r in st if (r.language, r.target_language) == pair]
        bleu = sacrebleu.corpus_bleu([r.hypothesis for r in rows], [[r.reference for r in rows]])
        report["bleu"][f"{pair[0]}-{pair[1]}"] = bleu.score
    if report["wer"]:
        report["wer"]["average"] = statistics.mean(report["wer"].values())
    if report["bleu"]:
        report["bleu"]["average"] = statistics.mean(report["bleu"].values())
    report["encoder_gflops"] = statistics.mean(r.encoder_gflops for r in records)
    report["seconds_per_utterance"] = statistics.mean(r.seconds for r in records)
    kinds = sorted({k for r in records for k in r.sparsity})
    report["sparsity"] = {k: statistics.mean(r.sparsity.get(k, 0.0) for r in records) for k in kinds}
    for kind in ("padding", "silence", "speech"):  # over the records that have frames of that kind
        values = [r.frames_skipped[kind] for r in records if r.frames_skipped.get(kind) is not None]
        if values:
            report["sparsity"][kind] = statistics.mean(values)
    reasons = {}
    for key, name in (("decoder_gflops", "decoder_gflops"), ("encoder_seconds_per_utterance", "encoder_seconds"),
                      ("encoder_sparsity", "encoder_sparsity"), ("encoder_speech_sparsity", "encoder_speech_sparsity")):
        values = [getattr(r, name) for r in records if getattr(r, name) is not None]
        report[key] = statistics.mean(values) if values else None
        if not values:
            reasons[key] = (f"no record has {name} (decoded before it was recorded, by a decoder that does not "
                            f"measure it, or not applicable: encoder sparsity over frames needs per-frame gates)")
        elif len(values) < len(records):
            reasons[key] = f"mean over the {len(values)} of {len(records)} records that have {name}"
    return finite_report(report, reasons)


def finite_report(report: dict, reasons: dict | None = None) -> dict:
    """The report with every NaN or infinite number replaced by null and a reason under
    report["notes"] (JSON has no NaN or Infinity)."""
    notes = dict(reasons or {})

    def clean(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            notes[path] = f"{value} is not a number JSON can hold"
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(report, "")
    if notes:
        cleaned["notes"] = {**cleaned.get("notes", {}), **notes}
    return cleaned


def markdown_table(report: dict, label: str = "this run") -> str:
    """One row shaped like the paper's Table 1: WER per language, BLEU per pair, GFLOPs (Enc)."""
    wer = [k for k in report["wer"] if k != "average"]
    bleu = [k for k in report["bleu"] if k != "average"]
    head = ["model", *(f"WER {k}" for k in wer), "WER avg", *(f"BLEU {k}" for k in bleu), "BLEU avg",
            "GFLOPs (Enc)", "s/utt"]
    # "-": not measured, or undefined (null in report.json, with its reason under "notes")
    fmt = lambda d, k, spec=".1f": "-" if d.get(k) is None else format(d[k], spec)  # noqa: E731
    row = [label, *(fmt(report["wer"], k) for k in wer), fmt(report["wer"], "average"),
           *(fmt(report["bleu"], k) for k in bleu), fmt(report["bleu"], "average"),
           fmt(report, "encoder_gflops", ".3g"), fmt(report, "seconds_per_utterance", ".3f")]
    # Columns of the newer measurements, where the records carry them.
    for key, title, spec in (("decoder_gflops", "GFLOPs (Dec)", ".3g"), ("encoder_seconds_per_utterance", "enc s/utt", ".3f"),
                             ("encoder_sparsity", "enc skipped (all frames)", ".3f"),
                             ("encoder_speech_sparsity", "enc skipped (speech frames)", ".3f")):
        if report.get(key) is not None:
            head.append(title)
            row.append(format(report[key], spec))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]
    if report["sparsity"]:
        lines += ["", "| module | skipped |", "|---|---|"]
        lines += [f"| {k} | {fmt(report['sparsity'], k, '.3f')} |" for k in report["sparsity"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory, label: str = "this run") -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite_report(report), indent=2, ensure_ascii=False, allow_nan=False)
    (out / "report.json").write_text(text)
    (out / "report.md").write_text(markdown_table(report, label))
