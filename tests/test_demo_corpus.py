"""The demo corpus builder on tiny fake Debian package trees in the real formats (no network)."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from localgp.data.demo_corpus import (ASTERISK_LANGS, augment, clean_text, load_manifest, mix,
                                      parse_asterisk_transcripts, parse_fillets_dialogs, prepare_demo, split_of)

SR = 16000
HAS_ESPEAK = shutil.which("espeak-ng") is not None

TRANSCRIPTS = {
    "en": "; Core Asterisk Sounds in English\n\nactivated: Activated.\nadded: Added.\n"
          "agent-loggedoff: Agent   Logged off.\ndigits/1: one\nvm-empty: Empty in French.\n"
          "beep: (beep)\n",
    "fr": "; Core Asterisk Sounds in French\n\nactivated: activé\nadded: ajouté\n"
          "agent-loggedoff: Vous n'êtes plus en ligne.\ndigits/1: un\nvm-empty:\nbeep: (bip)\n",
    "it": "\ufeff; Core Asterisk Sounds in Italian\n; Elenco completo\n\nactivated: Attivato.\nadded: Aggiunto.\n"
          "agent-loggedoff: operatore disconnesso.\ndigits/1: uno\nvm-empty: Vuoto.\nbeep: [bip]\n",
}
VOICES = {"en": "en_US_f_Allison", "fr": "fr_CA_f_June", "it": "it_IT_m_Carlo"}

DIALOGS_EN = '''
dialogId("vit-hs-vitejteA", "font_statue", "Welcome to the most beautiful city under the sun.")

dialogId("m-uvedomit", "font_small",
"You need to realize that the steel cylinder surrounding us")

-- dialogId("commented", "font_big", "Not a dialog.")
dialogId("v-nad", "font_big", "... rather " .. 'above me ...')
'''
DIALOGS_DE = '''
dialogId("vit-hs-vitejteA", "font_statue", "Welcome to the most beautiful city under the sun.")
dialogStr("Willkommen in der schönsten Stadt unter der Sonne.")


dialogId("m-uvedomit", "font_small",
"You need to realize that the steel cylinder surrounding us")
dialogStr("Du musst verstehen, dass der \\"Stahlzylinder\\" um uns herum")

dialogId("v-nad", "font_big", "... rather above me ...")
dialogStr("")
'''
DIALOGS_FR = '''
dialogId("vit-hs-vitejteA", "font_statue", "Welcome to the most beautiful city under the sun.")
dialogStr("Bienvenus dans la plus belle cité éclairée par le soleil.")
'''


def _tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_g722(path: Path, samples: np.ndarray) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="g722") as out:
        stream = out.add_stream("g722", rate=SR)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = SR
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _write_ogg(path: Path, samples: np.ndarray) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000)  # Ogg Opus (the real files are Ogg Vorbis)
        stream.layout = "mono"
        samples = np.repeat(samples, 3)  # 16 kHz -> 48 kHz, good enough for a test event
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = 48000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("debs")
    sources = {}
    for i, lang in enumerate(ASTERISK_LANGS):
        text_root = root / f"asterisk-core-sounds-{lang}"
        doc = text_root / f"usr/share/doc/asterisk-core-sounds-{lang}"
        doc.mkdir(parents=True)
        with gzip.open(doc / f"core-sounds-{lang}.txt.gz", "wt", encoding="utf-8") as f:
            f.write(TRANSCRIPTS[lang])
        audio_root = root / f"asterisk-core-sounds-{lang}-g722"
        voice = audio_root / "usr/share/asterisk/sounds" / VOICES[lang]
        for j, name in enumerate(["activated", "added", "agent-loggedoff", "digits/1", "vm-empty", "beep"]):
            if (lang, name) != ("it", "added"):  # a prompt without audio in one language is left out
                _write_g722(voice / f"{name}.g722", _tone(0.3 + 0.05 * j, 200 + 100 * i))
        sources[text_root.name], sources[audio_root.name] = text_root, audio_root
    fillets = root / "fillets-ng-data"
    for level, texts in {"city": {"en": DIALOGS_EN, "de": DIALOGS_DE, "fr": DIALOGS_FR}}.items():
        folder = fillets / "usr/share/games/fillets-ng/script" / level
        folder.mkdir(parents=True)
        for lang, text in texts.items():
            (folder / f"dialogs_{lang}.lua").write_text(text, encoding="utf-8")
    sources["fillets-ng-data"] = fillets
    sounds = root / "sound-theme-freedesktop"
    _write_ogg(sounds / "usr/share/sounds/freedesktop/stereo/bell.oga", _tone(0.2, 1000))
    _write_ogg(sounds / "usr/share/sounds/freedesktop/stereo/audio-channel-front-left.oga", _tone(0.2, 500))
    sources["sound-theme-freedesktop"] = sounds
    return sources


def _read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_parse_asterisk_transcripts():
    parsed = parse_asterisk_transcripts(TRANSCRIPTS["en"])
    assert parsed == {"activated": "Activated.", "added": "Added.", "agent-loggedoff": "Agent Logged off.",
                      "digits/1": "one", "vm-empty": "Empty in French.", "beep": "(beep)"}
    assert "vm-empty" not in parse_asterisk_transcripts(TRANSCRIPTS["fr"])  # empty transcript dropped
    assert parse_asterisk_transcripts(TRANSCRIPTS["it"])["activated"] == "Attivato."  # BOM, comments
    assert clean_text("  a \t b\n ") == "a b"


def test_parse_fillets_dialogs():
    assert parse_fillets_dialogs(DIALOGS_EN, original=True) == {
        "vit-hs-vitejteA": "Welcome to the most beautiful city under the sun.",
        "m-uvedomit": "You need to realize that the steel cylinder surrounding us",
        "v-nad": "... rather above me ..."}
    de = parse_fillets_dialogs(DIALOGS_DE)
    assert de["vit-hs-vitejteA"] == "Willkommen in der schönsten Stadt unter der Sonne."
    assert de["m-uvedomit"] == 'Du musst verstehen, dass der "Stahlzylinder" um uns herum'
    assert "v-nad" not in de  # empty translation: untranslated, dropped (never the English text as German)
    assert parse_fillets_dialogs(DIALOGS_DE, original=True)["v-nad"] == "... rather above me ..."
    assert parse_fillets_dialogs('dialogId("x", "f", [[long\nstring]])\ndialogStr(\'ok\')') == {"x": "ok"}


def test_split_of_is_seeded_and_balanced():
    ids = [f"s{i}" for i in range(3000)]
    splits = [split_of(i, 0) for i in ids]
    assert splits == [split_of(i, 0) for i in ids]
    shares = {s: splits.count(s) / len(ids) for s in ("train", "dev", "test")}
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["dev"] - 0.1) < 0.02
    assert splits != [split_of(i, 1) for i in ids]


@pytest.mark.parametrize("snr_db", [5.0, 12.0, 20.0])
def test_mix_reaches_requested_snr(snr_db):
    rng = np.random.default_rng(0)
    speech = _tone(1.0, 300) * 0.5
    noise = rng.standard_normal(SR // 3).astype(np.float32)
    mixed = mix(speech, noise, snr_db, np.random.default_rng(1))
    residual = mixed.astype(np.float64) - speech
    measured = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(residual ** 2))
    assert measured == pytest.approx(snr_db, abs=0.05)
    with pytest.raises(ValueError, match="empty or silent"):
        mix(speech, np.zeros(10, np.float32), 10.0, rng)


def test_augment_kinds():
    rng = np.random.default_rng(0)
    speech = _tone(0.5, 300)
    assert augment(speech, "none", rng) is speech
    padded = augment(speech, "silence", rng)
    assert len(padded) >= len(speech) + 0.4 * SR
    assert np.abs(padded[: int(0.2 * SR)]).max() < 1e-2
    event = augment(speech, "event", rng, [_tone(0.1, 2000)])
    assert event.shape == speech.shape and not np.allclose(event, speech)
    with pytest.raises(ValueError):
        augment(speech, "reverb", rng)


def test_prepare_demo_asterisk_only(fake_sources, tmp_path):
    out = tmp_path / "demo"
    manifest = prepare_demo(out, german_sentences=0, augment_share=0.5, sources=fake_sources)
    entries = _read_manifest(manifest)
    # vm-empty has no French text, added has no Italian audio, beep is an annotation: 3 prompts x 3 languages
    assert {e["id"] for e in entries if e["language"] == "en"} == {
        "en_asterisk_activated", "en_asterisk_agent-loggedoff", "en_asterisk_digits_1"}
    assert len(entries) == 9
    by_id = {e["id"]: e for e in entries}
    assert by_id["fr_asterisk_activated"]["translations"] == {"en": "Activated.", "it": "Attivato."}
    assert by_id["en_asterisk_agent-loggedoff"]["text"] == "Agent Logged off."
    assert {e["speaker"] for e in entries} == set(VOICES.values())
    for name in ("activated", "agent-loggedoff", "digits_1"):  # split by sentence in every language
        assert len({by_id[f"{lang}_asterisk_{name}"]["split"] for lang in ASTERISK_LANGS}) == 1
    for e in entries:
        assert e["augmentation"] in ("none", "noise", "event", "silence")
        with wave.open(str(out / e["audio"]), "rb") as f:
            assert (f.getframerate(), f.getnchannels()) == (SR, 1)
            assert f.getnframes() / SR == pytest.approx(e["duration"], abs=1e-3)
    assert (out / "audio/en/asterisk/digits/1.wav").is_file()

    # round trip through load_manifest
    splits = load_manifest(manifest)
    utts = [u for us in splits.values() for u in us]
    assert len(utts) == 9 and set(splits) <= {"train", "dev", "test"}
    for split, us in splits.items():
        for u in us:
            assert by_id[u.id]["split"] == split and u.text == by_id[u.id]["text"]
            assert u.audio == out / by_id[u.id]["audio"] and u.translations == by_id[u.id]["translations"]
    first = utts[0].load()
    assert first.dtype == np.float32 and len(first) / SR == pytest.approx(by_id[utts[0].id]["duration"], abs=1e-3)

    # a second call returns at once; an interrupted build keeps the audio written and redoes the rest
    stamp = manifest.stat().st_mtime_ns
    assert prepare_demo(out, german_sentences=0, sources={}) == manifest and manifest.stat().st_mtime_ns == stamp
    manifest.unlink()
    kept = out / by_id["en_asterisk_activated"]["audio"]
    kept_stamp = kept.stat().st_mtime_ns
    (out / by_id["it_asterisk_digits_1"]["audio"]).unlink()
    prepare_demo(out, german_sentences=0, augment_share=0.5, sources=fake_sources)
    assert kept.stat().st_mtime_ns == kept_stamp
    assert _read_manifest(manifest) == entries  # deterministic: the same corpus again


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng); "
                                           "the German synthesis cannot be tested")
def test_prepare_demo_with_german(fake_sources, tmp_path):
    manifest = prepare_demo(tmp_path / "demo", german_sentences=5, augment_share=0.0, sources=fake_sources)
    german = [e for e in _read_manifest(manifest) if e["language"] == "de"]
    # v-nad has an empty German translation: two dialog lines remain
    assert len(german) == 2
    by_id = {e["id"]: e for e in german}
    welcome = by_id["de_fillets_city__vit-hs-vitejteA"]
    assert welcome["text"] == "Willkommen in der schönsten Stadt unter der Sonne."
    assert welcome["translations"] == {"en": "Welcome to the most beautiful city under the sun.",
                                       "fr": "Bienvenus dans la plus belle cité éclairée par le soleil."}
    assert len({e["speaker"] for e in german}) == 2 and all(e["speaker"].startswith("espeak-ng_de") for e in german)
    assert all(e["duration"] > 0.5 and e["augmentation"] == "none" for e in german)
    assert welcome["split"] == split_of("fillets/city/vit-hs-vitejteA", 0)


def test_errors(fake_sources, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(RuntimeError, match="'espeak-ng' is missing"):
        prepare_demo(tmp_path / "a", german_sentences=3, sources=fake_sources)
    monkeypatch.undo()
    broken = dict(fake_sources, **{"asterisk-core-sounds-fr": tmp_path / "nowhere"})
    with pytest.raises(FileNotFoundError, match="asterisk-core-sounds-fr"):
        prepare_demo(tmp_path / "b", german_sentences=0, sources=broken)
    missing = {k: v for k, v in fake_sources.items() if k != "asterisk-core-sounds-it-g722"}
    with pytest.raises(FileNotFoundError, match="asterisk-core-sounds-it-g722"):
        prepare_demo(tmp_path / "c", german_sentences=0, sources=missing)
    assert not (tmp_path / "b" / "manifest.jsonl").exists()
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "nope.jsonl")


ENSURE_ESPEAK = Path(__file__).resolve().parent.parent / "tools" / "ensure_espeak.sh"


@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg") is None,
                    reason="not a Debian-based system: tools/ensure_espeak.sh has nothing to unpack")
def test_ensure_espeak_unpacks_a_copy_without_root(tmp_path, fake_sources):
    # A PATH with every command of this system but espeak-ng, and --no-install: step 3 of the script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for tool in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
            if tool.name != "espeak-ng" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    prefix = tmp_path / "espeak"
    run = subprocess.run(["bash", str(ENSURE_ESPEAK), "--no-install", "--prefix", str(prefix)], env=env,
                         capture_output=True, text=True)
    if run.returncode and ("Failed to fetch" in run.stderr or "Could not resolve" in run.stderr):
        pytest.skip(f"offline: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{prefix}/bin\n"  # stdout: the directory to put in front of PATH, nothing else
    version = subprocess.run([prefix / "bin" / "espeak-ng", "--version"], env=env, capture_output=True, text=True)
    assert f"Data at: {prefix}/root/" in version.stdout  # its own voice data, not the system's
    again = subprocess.run(["bash", str(ENSURE_ESPEAK), "--no-install", "--prefix", str(prefix)], env=env,
                           capture_output=True, text=True)
    assert again.stdout == run.stdout and "using the unpacked copy" in again.stderr
    manifest = prepare_demo(tmp_path / "demo", german_sentences=1, augment_share=0.0, sources=fake_sources,
                            espeak=str(prefix / "bin" / "espeak-ng"))
    german = [e for e in _read_manifest(manifest) if e["language"] == "de"]
    assert len(german) == 1 and german[0]["duration"] > 0.5


def test_ensure_espeak_says_what_to_run(tmp_path):
    bin_dir = tmp_path / "bin"  # bash and the few commands the script needs, no apt-get or espeak-ng
    bin_dir.mkdir()
    for tool in ("bash", "realpath", "dirname", "mktemp", "rm", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    run = subprocess.run([str(bin_dir / "bash"), str(ENSURE_ESPEAK), "--prefix", str(tmp_path / "e")],
                         env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert "not a Debian-based system" in run.stderr and "sudo apt-get install -y espeak-ng" in run.stderr
    bad = subprocess.run(["bash", str(ENSURE_ESPEAK), "--prefixx"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--prefixx'" in bad.stderr
