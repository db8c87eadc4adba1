import json

import pytest

from localgp.evaluate import Decoded, markdown_table, normalise, score, write_report


def rec(lang, tgt, ref, hyp, gflops=10.0, seconds=0.1, sparsity=None):
    return Decoded(f"{lang}-{tgt}-{ref}", lang, tgt, ref, hyp, gflops, seconds, sparsity or {"encoder.ffn1": 0.3})


def test_scores_and_table(tmp_path):
    records = [
        rec("de", "de", "Guten Morgen, Welt!", "guten morgen welt"),  # normalised: no error
        rec("de", "de", "wie geht es dir", "wie geht es"),  # 1 deletion in 4 words
        rec("fr", "fr", "bonjour", "bonsoir"),
        rec("fr", "de", "guten tag allerseits zusammen", "guten tag allerseits zusammen", gflops=20.0),
    ]
    report = score(records)
    assert report["wer"]["de"] == pytest.approx(100 / 7)  # 1 error over 7 reference words
    assert report["wer"]["fr"] == pytest.approx(100.0)
    assert report["bleu"]["fr-de"] == pytest.approx(100.0)
    assert report["encoder_gflops"] == pytest.approx(12.5)
    assert report["sparsity"] == {"encoder.ffn1": pytest.approx(0.3)}
    table = markdown_table(report)
    assert "WER de" in table and "BLEU fr-de" in table and "| encoder.ffn1 | 0.300 |" in table
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["wer"]["fr"] == pytest.approx(100.0)


def test_errors_and_normalise():
    assert normalise("  Ça, C'EST  bien!  ") == "ça c'est bien"
    with pytest.raises(ValueError, match="no decoded utterance"):
        score([])
    with pytest.raises(ValueError, match="empty reference transcript in de"):
        score([rec("de", "de", "!!", "x")])
