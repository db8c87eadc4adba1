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


# ------------------------------------------------------------------ the decoded-records file

def test_decoded_json_round_trip():
    record = Decoded("u1", "de", "fr", "Guten Tag", "bonjour", 1.5, 0.2, {"encoder.ffn1": 0.25},
                     ["\u2581bon", "jour"], [1.0, 0.5])
    line = record.to_json()
    assert "\n" not in line and Decoded.from_json(line) == record
    plain = rec("de", "de", "a", "b")
    assert Decoded.from_json(plain.to_json()).tokens == []  # the optional fields default to empty
    with pytest.raises(ValueError, match="2 tokens but 1 src_attn_keep"):
        Decoded("u", "de", "de", "a", "b", 1.0, 0.1, {}, ["a", "b"], [1.0])


def test_interrupted_decode_keeps_every_record_written(tmp_path):
    from localgp.evaluate import append_decoded, read_decoded

    path = tmp_path / "decoded.jsonl"
    records = [rec("de", "de", f"satz {i}", f"satz {i}") for i in range(3)]

    def decode():  # the decoder dies after two utterances
        yield records[0]
        assert read_decoded(path) == records[:1]  # on disk before the next utterance is decoded
        yield records[1]
        assert read_decoded(path) == records[:2]
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        append_decoded(decode(), path)
    assert read_decoded(path) == records[:2]
    assert append_decoded(records[2:], path) == 1  # the resumed decode appends the rest
    assert read_decoded(path) == records


def test_read_decoded_refuses_malformed_lines(tmp_path):
    from localgp.evaluate import append_decoded, read_decoded

    with pytest.raises(FileNotFoundError, match="missing.jsonl do not exist"):
        read_decoded(tmp_path / "missing.jsonl")
    path = tmp_path / "d.jsonl"
    path.write_text("")
    assert read_decoded(path) == []
    good = rec("de", "de", "a", "b").to_json()
    raw = json.loads(good)
    cases = {
        "not json": "Expecting value",
        json.dumps({k: v for k, v in raw.items() if k != "hypothesis"}): r"missing fields \['hypothesis'\]",
        json.dumps({**raw, "beam": 5}): r"unknown fields \['beam'\]",
        json.dumps({**raw, "seconds": "0.1"}): "field 'seconds' must be <class 'float'>",
        json.dumps({**raw, "tokens": ["a"], "src_attn_keep": ["x"]}): "field 'src_attn_keep' must be",
        json.dumps([1, 2]): "expected a JSON object",
    }
    for bad, why in cases.items():
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(ValueError, match=rf"d.jsonl is damaged \(line 3: not a decoded record: .*{why}"):
            read_decoded(path)
    path.write_text(f"{good}\n{good}\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: utterance 'de-de-a' again \(first on line 1\)"):
        read_decoded(path)
    # a decode killed in the middle of a line: reading says so, appending refuses to merge
    path.write_text(f"{good}\n{good[:30]}")
    with pytest.raises(ValueError, match="d.jsonl is damaged .line 2, the last line, cut short: not a decoded record"):
        read_decoded(path)
    with pytest.raises(ValueError, match="last line is cut short"):
        append_decoded([rec("fr", "fr", "x", "y")], path)
    assert path.read_text() == f"{good}\n{good[:30]}"


def test_evaluate_cli(tmp_path, capsys, cli_error):
    from localgp.cli import main
    from localgp.evaluate import append_decoded

    path = tmp_path / "decoded.jsonl"
    append_decoded([rec("de", "de", "wie geht es dir", "wie geht es"), rec("fr", "de", "guten tag", "guten tag")],
                   path)
    assert main(["evaluate", str(path), "--out", str(tmp_path / "report"), "--label", "localGP"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | WER de | WER avg | BLEU fr-de |") and "| localGP | 25.0 |" in out
    assert (tmp_path / "report" / "report.md").read_text() == out
    assert json.loads((tmp_path / "report" / "report.json").read_text())["wer"]["de"] == pytest.approx(25.0)
    cli_error(["evaluate", tmp_path / "nothing.jsonl", "--out", tmp_path / "r"], "nothing.jsonl do not exist")
    (tmp_path / "empty.jsonl").write_text("")
    cli_error(["evaluate", tmp_path / "empty.jsonl", "--out", tmp_path / "r"], "empty.jsonl is empty: no decoded record")
    append_decoded([Decoded("utt7", "fr", "de", " ", "hallo", 1.0, 0.1)], path)
    cli_error(["evaluate", path, "--out", tmp_path / "r"], "empty reference transcript in de .utterance 'utt7'")
    assert not (tmp_path / "r").exists()
