"""Corpus loaders on small trees written in each corpus's own layout."""

import av
import numpy as np
import pytest
import soundfile as sf

from localgp.data.audio import load_audio
from localgp.data.corpora import europarl_st, kaldi_dir


def tone(seconds, rate, pitch=220.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.2 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def write_m4a(path, wav, rate):
    """AAC in MP4, as Europarl-ST ships its audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for i in range(0, len(wav), 1024):
            frame = av.AudioFrame.from_ndarray(wav[None, i : i + 1024], format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_europarl(root, pairs):
    """pairs: {(src, tgt): [(audio id, start, end, src text, tgt text)]}"""
    for (src, tgt), rows in pairs.items():
        folder = root / src / tgt / "test"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "segments.lst").write_text("".join(f"{a} {s:.2f} {e:.2f}\n" for a, s, e, _, _ in rows))
        (folder / f"segments.{src}").write_text("".join(f"{x}\n" for *_, x, _ in rows))
        (folder / f"segments.{tgt}").write_text("".join(f"{y}\n" for *_, y in rows))
        for audio_id in {r[0] for r in rows}:
            write_m4a(root / src / "audios" / f"{audio_id}.m4a", tone(3.0, 44100), 44100)


def test_europarl_st(tmp_path):
    rows_fr = [("en.2010.1", 0.0, 1.2, "hello there", "bonjour"), ("en.2010.2", 0.5, 2.5, "good day", "bonne journée")]
    rows_it = [("en.2010.1", 0.0, 1.2, "hello there", "ciao"), ("en.2010.2", 0.5, 2.5, "good day", "buongiorno")]
    write_europarl(tmp_path, {("en", "fr"): rows_fr, ("en", "it"): rows_it})
    utts = europarl_st(tmp_path, "en", ["fr", "it"], "test")
    assert [u.text for u in utts] == ["hello there", "good day"]
    assert utts[1].translations == {"fr": "bonne journée", "it": "buongiorno"}
    assert utts[0].speaker == "en.2010.1" and utts[0].language == "en"
    wav = utts[1].load()
    assert wav.dtype == np.float32 and abs(len(wav) - 2.0 * 16000) <= 160


def test_europarl_st_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected <root>/<src>/<tgt>/<split>"):
        europarl_st(tmp_path, "en", "fr", "test")
    write_europarl(tmp_path, {("en", "fr"): [("a", 0.0, 1.0, "x", "y")]})
    (tmp_path / "en" / "fr" / "test" / "segments.fr").write_text("y\nz\n")
    with pytest.raises(ValueError, match="they must match"):
        europarl_st(tmp_path, "en", "fr", "test")
    (tmp_path / "en" / "fr" / "test" / "segments.fr").write_text("\n")
    with pytest.raises(ValueError, match="empty transcript or translation"):
        europarl_st(tmp_path, "en", "fr", "test")


def test_kaldi_dir(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "rec1.wav", tone(2.0, 16000), 16000)
    sf.write(audio / "rec2.flac", tone(1.0, 8000), 8000)
    data = tmp_path / "data" / "test"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text("u1 audio/rec1.wav\nu2 audio/rec2.flac\n")  # no segments: keyed by utterance
    (data / "text").write_text("u1 guten tag\nu2 hallo welt\n")
    (data / "utt2spk").write_text("u1 spkA\nu2 spkB\n")
    utts = kaldi_dir(data, "de", audio_root=tmp_path)
    assert [(u.id, u.speaker, u.text) for u in utts] == [("u1", "spkA", "guten tag"), ("u2", "spkB", "hallo welt")]
    assert len(utts[1].load()) == 16000  # resampled from 8 kHz
    (data / "wav.scp").write_text("rec1 audio/rec1.wav\n")
    (data / "segments").write_text("u1 rec1 0.5 1.5\nu2 rec1 1.0 2.0\n")
    utts = kaldi_dir(data, "de", audio_root=tmp_path)
    assert utts[0].start == 0.5 and len(utts[0].load()) == 16000
    (data / "segments").write_text("u1 rec1 0.5 1.5\nu2 rec1 1.2 2.005\nu3 rec1 0.25 1.3\n")  # u2 past the end
    (data / "text").write_text("u1 a\nu2 b\nu3 c\n")
    (data / "utt2spk").write_text("u1 s\nu2 s\nu3 s\n")
    from localgp.data.examples import check_audio

    for u in check_audio(kaldi_dir(data, "de", audio_root=tmp_path)):  # each as long as it decodes
        assert u.seconds == len(u.load()) / 16000


def test_kaldi_dir_errors(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    with pytest.raises(FileNotFoundError, match="wav.scp is missing"):
        kaldi_dir(data, "de")
    (data / "wav.scp").write_text("u1 sox x.wav -t wav - |\n")
    (data / "text").write_text("u1 hallo\n")
    (data / "utt2spk").write_text("u1 s\n")
    with pytest.raises(ValueError, match="command pipe"):
        kaldi_dir(data, "de")
    (data / "wav.scp").write_text("u1 x.wav\n")
    (data / "text").write_text("u1  \n")
    with pytest.raises(ValueError, match="empty transcript"):
        kaldi_dir(data, "de")


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000garbage")
    with pytest.raises(ValueError, match="cannot decode audio file"):
        load_audio(tmp_path / "bad.wav")
    sf.write(tmp_path / "a.wav", tone(1.0, 16000), 16000)
    with pytest.raises(ValueError, match="lies outside the audio"):
        load_audio(tmp_path / "a.wav", 0.5, 3.0)


def test_join_examples_fill_the_window_with_clips_of_one_language_and_task(tmp_path, monkeypatch):
    from localgp.data.corpora import Utterance
    from localgp.data.examples import JoinedUtterance, check_audio, join_examples, make_examples

    utterances = []
    for lang in ("en", "fr"):
        for i in range(12):
            path = tmp_path / f"{lang}{i}.wav"
            sf.write(path, np.full(int((1 + i % 4) * 16000), 0.01 * (i + 1), np.float32), 16000)
            utterances.append(Utterance(f"{lang}{i}", path, lang, f"{lang} text {i}", "spk",
                                        translations={"en" if lang == "fr" else "fr": f"translated {lang} {i}"}))
    examples = make_examples(utterances, ("asr", "st"))
    joined = join_examples(examples, share=1.0, max_seconds=10.0, seed=3)
    measured = make_examples(check_audio(utterances), ("asr", "st"))  # lengths from the check: no decoding
    monkeypatch.setattr(Utterance, "load", lambda self: pytest.fail("join_examples decoded a measured clip"))
    assert join_examples(measured, share=1.0, max_seconds=10.0, seed=3) == joined
    monkeypatch.undo()
    assert joined == join_examples(examples, share=1.0, max_seconds=10.0, seed=3)  # deterministic
    assert join_examples(examples, share=0.0, max_seconds=10.0, seed=3) == examples
    seen = []
    joins = [e for e in joined if isinstance(e.utterance, JoinedUtterance)]
    assert joins
    for e in joined:
        parts = e.utterance.parts if isinstance(e.utterance, JoinedUtterance) else (e.utterance,)
        seen += [(u.id, e.target_language) for u in parts]
        assert {u.language for u in parts} == {e.utterance.language}  # one language, one task
    assert sorted(seen) == sorted((e.utterance.id, e.target_language) for e in examples)  # each example once
    for e in joins:
        u = e.utterance
        wave = u.load()
        pieces = [p.load() for p in u.parts]
        assert len(wave) == sum(map(len, pieces)) + sum(round(p * 16000) for p in u.pauses) <= 10 * 16000
        assert np.array_equal(wave[: len(pieces[0])], pieces[0]) and np.array_equal(wave[-len(pieces[-1]):], pieces[-1])
        assert all(0.3 <= p <= 1.5 for p in u.pauses)
        texts = [p.text if e.target_language == u.language else p.translations[e.target_language] for p in u.parts]
        assert e.target_text == " ".join(texts) and u.id.startswith(f"{u.parts[0].id}+{len(u.parts) - 1}-")
    assert len({e.utterance.id for e in joins}) == len(joins)
