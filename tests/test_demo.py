"""`localgp demo` end to end on a small corpus in the demo corpus's manifest format: it trains,
decodes the test split, and writes the report, the decoded records and the mask figure."""

import json

import numpy as np
import pytest
import soundfile as sf

from localgp.cli import main

SENTENCES = {"en": ["good morning", "see you soon", "thank you"], "fr": ["bonjour", "à bientôt", "merci"]}


def write_corpus(root):
    lines = []
    for lang, sentences in SENTENCES.items():
        other = "fr" if lang == "en" else "en"
        for i, text in enumerate(sentences):
            t = np.arange(int(1.2 * 16000)) / 16000
            wav = 0.2 * np.sin(2 * np.pi * (140 + 50 * i) * t) * (1 + np.sin(2 * np.pi * 4 * t))
            path = root / "audio" / f"{lang}{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, wav.astype(np.float32), 16000)
            lines.append(dict(id=f"{lang}{i}", audio=f"audio/{lang}{i}.wav", language=lang, text=text,
                              speaker=f"spk_{lang}", split="test" if i == 2 else "train",
                              translations={other: SENTENCES[other][i]}, augmentation="none", duration=1.2))
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_demo_runs_end_to_end(tmp_path, capsys):
    write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["demo", "--backbone", "owsm", "--data", str(tmp_path / "data"), "--out", str(out), "--steps", "2",
                 "--beam", "2", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["wer"]) == {"en", "fr", "average"} and set(report["bleu"]) == {"en-fr", "fr-en", "average"}
    assert report["encoder_gflops"] > 0 and report["seconds_per_utterance"] > 0
    assert {"encoder.ffn1", "encoder.attn", "encoder.ffn2", "decoder.src_attn"} <= set(report["sparsity"])
    assert report["training"]["steps"] == 2 and report["utterances"] == 4
    assert (out / "masks.png").read_bytes()[:4] == b"\x89PNG"
    assert "WER en" in (out / "report.md").read_text()
    assert "WER" in capsys.readouterr().out


def test_whisper_demo_table(tmp_path, whisper_base, capsys):
    """The default demo on Whisper base: the dense row and one gated row (1 training step), the
    table's rows in report.json, the mask figure over Whisper's window; a rerun reuses it all."""
    write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    args = ["demo", "--data", str(tmp_path / "data"), "--out", str(out), "--steps", "1", "--beam", "2", "--device",
            "cpu", "--weights", str(whisper_base), "--rows", "localgp+speaker", "--targets", "0.5"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    dense, gated = report["rows"]
    assert (dense["model"], dense["execution"], dense["target"]) == ("dense", "dense", None)
    assert (gated["model"], gated["execution"], gated["target"]) == ("localgp+speaker", "compact", 0.5)
    assert dense["dtype"] == gated["dtype"] == "float32"
    for row in (dense, gated):
        assert set(row["wer"]) == {"en", "fr", "average"} and set(row["bleu"]) == {"fr-en", "average"}
        assert row["encoder_gflops"] > 0 and row["decoder_gflops"] > 0 and row["seconds_per_utterance"] > 0
        assert row["dense_seconds_per_utterance"] == dense["seconds_per_utterance"]
    assert dense["encoder_gflops"] == pytest.approx(43.73376)
    assert gated["training"]["steps"] == 1 and 0 <= gated["sparsity"]["all_frames"] <= 1
    assert {"encoder.attn", "encoder.mlp", "speech_frames"} <= set(gated["sparsity"])
    assert not any(k.startswith("decoder.") for k in gated["sparsity"])  # the demo's Whisper rows gate the encoder
    assert (out / "masks.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "report.md").read_text()
    assert "dense (zero-shot)" in table and "localGP + speaker" in table
    first = capsys.readouterr().out
    # the terminal ends with where the files are and what they show, and the gated row against dense
    *_, files, speed, quality = first.rstrip("\n").splitlines()
    assert files.startswith(f"wrote {out / 'report.md'} (the table above) and {out / 'report.json'}")
    assert "masks.png: the gates' decisions on a test utterance" in files
    assert speed.startswith("localGP + speaker (target 0.5): ") and "x the dense model's speed" in speed
    assert f"{gated['seconds_per_utterance']:.3f} vs {dense['seconds_per_utterance']:.3f} s per utterance" in speed
    change = gated["wer"]["average"] - dense["wer"]["average"]
    assert quality.startswith(f"  WER {dense['wer']['average']:.1f} -> {gated['wer']['average']:.1f} ({change:+.1f})")
    assert main(args) == 0  # resumes: nothing to train or decode again
    assert json.loads((out / "report.json").read_text())["rows"][1]["wer"] == gated["wer"]
    assert "dense (zero-shot)" in first


def test_the_transcribe_benchmark_runs_by_default_on_the_demos_output(tmp_path, whisper_base, real_speech, monkeypatch):
    """`make demo`, then `python benchmarks/transcribe.py` with no argument but a short --seconds,
    where make demo leaves its output (out/demo, data/demo, the prepared weights' default
    directory): the gated system runs the run that the demo's report.json names."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_whisper_train import TEXTS

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "whisper-base").symlink_to(whisper_base)  # default_whisper_dir() under LOCALGP_CACHE
    monkeypatch.setenv("LOCALGP_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "demo"
    (data / "audio").mkdir(parents=True)
    lines = []
    for item in real_speech:
        language, prompt = item["language"], item["id"].split("_", 1)[1]
        other = "it" if language == "en" else "en"
        sf.write(data / "audio" / f"{item['id']}.wav", item["wav"], 16000)
        lines.append({"id": item["id"], "audio": f"audio/{item['id']}.wav", "language": language,
                      "text": TEXTS[prompt][language], "speaker": item["speaker"],
                      "split": "test" if prompt == "pbx-invalid" else "train",
                      "translations": {other: TEXTS[prompt][other]}})
    (data / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["demo", "--steps", "1", "--beam", "2", "--device", "cpu"]) == 0
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "transcribe.py"
    done = subprocess.run([sys.executable, str(script), "--seconds", "5", "--json", "rows.json"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["system"] for r in rows] == ["openai-whisper", "faster-whisper-float32", "faster-whisper-int8",
                                           "localgp-dense", "localgp-padding", "localgp-silence", "localgp-attention",
                                           "localgp-compact", "localgp-release"]
    assert all(r["audio_seconds"] > 2 and r["seconds"] > 0 for r in rows)
    assert "localgp-compact" in done.stdout
    # without the demo's report, the default names what is missing and what writes it
    (tmp_path / "out" / "demo" / "report.json").unlink()
    done = subprocess.run([sys.executable, str(script), "--seconds", "5", "--systems", "localgp-compact"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--run not given, and out/demo/report.json does not exist: `make demo`" in done.stderr
