"""`localgp decode` on a tiny trained run: records for every utterance and task, resumable,
scored by evaluate, and nothing written is lost when a batch fails."""

import json

import pytest

from localgp.backbones.owsm.backbone import OwsmCorpusDecoder
from localgp.cli import main
from localgp.decoding import DecodeOptions
from localgp.evaluate import read_decoded, score
from localgp.train import Trainer
from localgp.decode import decode_run
from tests.test_train import config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decode")
    Trainer(config(tmp, max_steps=8, save_every=8)).train()
    return tmp / "run"


def test_decode_writes_a_record_per_utterance_and_evaluate_scores_them(run_dir, tmp_path):
    out = tmp_path / "decoded.jsonl"
    records = decode_run(run_dir, out, options=DecodeOptions(beam_size=2, maxlenratio=-6), batch_size=3)
    assert len(records) == 8 and len({r.id for r in records}) == 8
    for r in records:
        assert r.language == r.target_language and r.reference
        assert r.encoder_gflops > 0 and r.seconds > 0
        assert {"encoder.ffn1", "decoder.src_attn"} <= set(r.sparsity)
        assert len(r.tokens) == len(r.src_attn_keep) and all(0 <= k <= 1 for k in r.src_attn_keep)
    report = score(records)
    assert set(report["wer"]) == {"de", "fr", "average"} and report["utterances"] == 8


def test_decode_resumes_and_keeps_what_was_written(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "decoded.jsonl"
    options = DecodeOptions(beam_size=2, maxlenratio=-4)
    first = decode_run(run_dir, out, options=options, batch_size=2, limit=3)
    assert len(first) == 3
    calls = {"n": 0}
    original = OwsmCorpusDecoder.batch

    def failing(self, examples):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the machine died")
        return original(self, examples)

    monkeypatch.setattr(OwsmCorpusDecoder, "batch", failing)
    with pytest.raises(RuntimeError, match="died"):
        decode_run(run_dir, out, options=options, batch_size=2)
    kept = read_decoded(out)
    assert len(kept) == 5 and [r.id for r in kept[:3]] == [r.id for r in first]  # 3 + one batch of 2
    monkeypatch.setattr(OwsmCorpusDecoder, "batch", original)
    final = decode_run(run_dir, out, options=options, batch_size=2)
    assert len(final) == 8 and len({r.id for r in final}) == 8


def test_decode_cli_then_evaluate_cli(run_dir, tmp_path, capsys, cli_error):
    out = tmp_path / "decoded.jsonl"
    assert main(["decode", str(run_dir), "--out", str(out), "--beam", "2", "--batch", "4", "--maxlenratio", "-3"]) == 0
    assert len(read_decoded(out)) == 8
    capsys.readouterr()
    cli_error(["decode", run_dir, "--out", out, "--beam", "0"], "--beam: must be at least 1")
    cli_error(["decode", tmp_path / "nowhere", "--out", out], "checkpoint")
    report_dir = tmp_path / "report"
    assert main(["evaluate", str(out), "--out", str(report_dir)]) == 0
    assert json.loads((report_dir / "report.json").read_text())["utterances"] == 8


def test_decode_a_global_gate_run(tmp_path):
    """globalGP decides from each example's prompt: the contexts feeder sets it for decoding too."""
    Trainer(config(tmp_path, "glob", max_steps=2, save_every=2,
                   gates={"predictor": "global", "encoder": "utterance", "decoder": "utterance"})).train()
    records = decode_run(tmp_path / "glob", tmp_path / "d.jsonl", options=DecodeOptions(beam_size=2, maxlenratio=-3),
                         batch_size=3, limit=4)
    assert len(records) == 4 and all({"encoder.ffn1", "decoder.ffn"} <= set(r.sparsity) for r in records)
