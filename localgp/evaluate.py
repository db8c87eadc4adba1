"""Scores decoded hypotheses the way the localGP paper's Table 1 does: WER per language (ASR),
BLEU per pair (ST), encoder GFLOPs actually executed, sparsity per module, wall-clock."""

from __future__ import annotations

import json
import re
import statistics
import unicodedata
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decoded:
    id: str
    language: str  # of the speech
    target_language: str  # == language for ASR
    reference: str
    hypothesis: str
    encoder_gflops: float  # executed, for this utterance
    seconds: float  # wall-clock of this utterance's share of its batch
    sparsity: dict[str, float] = field(default_factory=dict)  # module kind -> skipped share


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: WER on words, not on formatting."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']|_", " ", text)
    return " ".join(text.split())


def score(records: list[Decoded]) -> dict:
    import jiwer
    import sacrebleu

    if not records:
        raise ValueError("evaluate: no decoded utterance to score")
    report: dict = {"wer": {}, "bleu": {}, "utterances": len(records)}
    asr = [r for r in records if r.language == r.target_language]
    for lang in sorted({r.language for r in asr}):
        rows = [r for r in asr if r.language == lang]
        refs = [normalise(r.reference) for r in rows]
        if not all(refs):
            raise ValueError(f"evaluate: an empty reference transcript in {lang}")
        report["wer"][lang] = 100 * jiwer.wer(refs, [normalise(r.hypothesis) for r in rows])
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
    return report


def markdown_table(report: dict, label: str = "this run") -> str:
    """One row shaped like the paper's Table 1: WER per language, BLEU per pair, GFLOPs (Enc)."""
    wer = [k for k in report["wer"] if k != "average"]
    bleu = [k for k in report["bleu"] if k != "average"]
    head = ["model", *(f"WER {k}" for k in wer), "WER avg", *(f"BLEU {k}" for k in bleu), "BLEU avg",
            "GFLOPs (Enc)", "s/utt"]
    fmt = lambda d, k: f"{d[k]:.1f}" if k in d else "-"  # noqa: E731
    row = [label, *(fmt(report["wer"], k) for k in wer), fmt(report["wer"], "average"),
           *(fmt(report["bleu"], k) for k in bleu), fmt(report["bleu"], "average"),
           f"{report['encoder_gflops']:.1f}", f"{report['seconds_per_utterance']:.3f}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]
    if report["sparsity"]:
        lines += ["", "| module | skipped |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in report["sparsity"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory, label: str = "this run") -> None:
    from pathlib import Path

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "report.md").write_text(markdown_table(report, label))
