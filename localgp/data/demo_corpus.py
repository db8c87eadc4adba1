"""A small multilingual ASR + speech-translation demo corpus built from Debian packages.

Sources (all Debian main, fetched with ``apt-get download`` and unpacked with ``dpkg -x``, no root):

* ``asterisk-core-sounds-{en,fr,it}-g722``: real read speech, 16 kHz G.722, one voice per language
  (en_US_f_Allison, fr_CA_f_June, it_IT_m_Carlo; CC-BY-SA-3.0 / CC-BY-SA-3.0 / CC-BY-3.0).
  ``asterisk-core-sounds-{en,fr,it}`` hold the transcripts, parallel across languages by prompt name.
* ``fillets-ng-data`` (GPL-2): game dialogues, aligned across en/de/fr/it by dialog id; the German
  lines are synthesized with ``espeak-ng`` using several voices (the "speakers").
* ``sound-theme-freedesktop`` (CC-BY-SA-3.0 / CC-BY-3.0 / GPL-2+): sound events for augmentation.
  Noise for augmentation is generated (coloured Gaussian noise), so it has no licence.

``prepare_demo(out_dir)`` writes ``out_dir/audio/<lang>/...wav`` (16 kHz mono PCM) and, last and
atomically, ``out_dir/manifest.jsonl``; ``load_manifest`` reads it back as ``{split: [Utterance]}``.
The split (train/dev/test, 80/10/10) is a seeded hash of the *sentence* id, so one prompt / dialog
line is in the same split in every language.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from localgp.data.audio import SAMPLE_RATE, load_audio
from localgp.data.corpora import Utterance
from localgp.errors import DamagedFile, UserError, reader_error

ASTERISK_LANGS = ("en", "fr", "it")
FILLETS_LANGS = ("de", "en", "fr", "it")
GERMAN_VOICES = ("de+m1", "de+m3", "de+f2", "de+f4")
AUGMENTATIONS = ("noise", "event", "silence")
SPLITS = ("train", "dev", "test")
PACKAGES = (
    *(f"asterisk-core-sounds-{lang}-g722" for lang in ASTERISK_LANGS),
    *(f"asterisk-core-sounds-{lang}" for lang in ASTERISK_LANGS),
    "fillets-ng-data",
    "sound-theme-freedesktop",
)
# spoken words ("front left") or test tones: not usable as background events
_EVENT_EXCLUDE = re.compile(r"^(audio-channel-|audio-test-signal)")


# ----------------------------------------------------------------------------------------- text

def clean_text(text: str) -> str:
    """Strip, drop a byte-order mark, collapse runs of white space into one space."""
    return " ".join(text.replace("\ufeff", " ").split())


_ANNOTATION = re.compile(r"[\[\]<>(){}]")


def has_annotation(text: str) -> bool:
    """Transcripts with editorial notes ('[ascending tones]', '(beep)', 'IAX (note: ...)',
    'dot [.]') are not verbatim; prompts with one in any language are left out."""
    return _ANNOTATION.search(text) is not None


_PROMPT_NAME = re.compile(r"^[\w.+-]+(/[\w.+-]+)*$")


def parse_asterisk_transcripts(text: str) -> dict[str, str]:
    """``core-sounds-XX.txt``: ``; comment`` lines, blank lines and ``<name>: <transcript>`` lines,
    where ``<name>`` is the sound file's path without extension (``vm-deleted``, ``digits/1``).
    Returns {name: cleaned transcript}; entries with an empty transcript are dropped."""
    prompts: dict[str, str] = {}
    for line in text.replace("\ufeff", "").splitlines():
        line = line.strip()
        if not line or line.startswith(";") or ":" not in line:
            continue
        name, _, transcript = line.partition(":")
        name, transcript = name.strip(), clean_text(transcript)
        if transcript and _PROMPT_NAME.match(name) and name not in prompts:
            prompts[name] = transcript
    return prompts


_LUA_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>--\[(?P<ceq>=*)\[.*?\](?P=ceq)\]|--[^\n]*)
  | (?P<long>\[(?P<leq>=*)\[.*?\](?P=leq)\])
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\.\.|.)
""", re.VERBOSE | re.DOTALL)
_LUA_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
                "\\": "\\", '"': '"', "'": "'", "\n": "\n"}


def _lua_unescape(body: str) -> str:
    def one(match: re.Match) -> str:
        esc = match.group(1)
        if esc[0].isdigit():
            return chr(int(esc))
        return _LUA_ESCAPES.get(esc, esc)
    return re.sub(r"\\(\d{1,3}|.)", one, body, flags=re.DOTALL)


def _lua_tokens(lua_text: str) -> list[tuple[str, str]]:
    tokens = []
    for match in _LUA_TOKEN.finditer(lua_text):
        if match.group("space") is not None or match.group("comment") is not None:
            continue
        if match.group("str") is not None:
            tokens.append(("str", _lua_unescape(match.group("str")[1:-1])))
        elif match.group("long") is not None:
            body = match.group("long")
            level = len(match.group("leq"))
            body = body[2 + level:-(2 + level)]
            tokens.append(("str", body[1:] if body.startswith("\n") else body))
        elif match.group("name") is not None:
            tokens.append(("name", match.group("name")))
        else:
            tokens.append(("op", match.group("op")))
    return tokens


def parse_fillets_dialogs(lua_text: str, original: bool = False) -> dict[str, str]:
    """A Fish Fillets NG ``dialogs_XX.lua`` file, parsed without executing Lua: a sequence of
    ``dialogId("<id>", "<font>", "<English text>")`` calls, each followed by
    ``dialogStr("<translation>")`` in translated files (absent in ``dialogs_en.lua``). Strings may
    be split over lines and concatenated with ``..``. Returns {id: cleaned text}: the translations,
    or with `original` the English texts of the dialogId calls (use it for ``dialogs_en.lua``).
    Empty or missing texts are dropped (an untranslated line is never returned as a translation);
    the first occurrence of an id wins."""
    tokens = _lua_tokens(lua_text)
    pos = 0

    def call_args(start: int) -> tuple[list[str], int] | None:
        """Arguments of a call whose '(' is at tokens[start]; None if they are not all strings."""
        if start >= len(tokens) or tokens[start] != ("op", "("):
            return None
        args, current, i = [], None, start + 1
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "str":
                current = value if current is None else current + value
            elif (kind, value) == ("op", ".."):
                pass
            elif (kind, value) in (("op", ","), ("op", ")")):
                if current is None:
                    return None
                args.append(current)
                current = None
                if value == ")":
                    return args, i + 1
            else:
                return None
            i += 1
        return None

    result: dict[str, str] = {}
    while pos < len(tokens):
        if tokens[pos] == ("name", "dialogId"):
            parsed = call_args(pos + 1)
            if parsed is None:
                pos += 1
                continue
            args, pos = parsed
            if len(args) < 3:
                continue
            dialog_id, text = args[0], (args[2] if original else "")
            if pos < len(tokens) and tokens[pos] == ("name", "dialogStr"):
                translated = call_args(pos + 1)
                if translated is not None and translated[0]:
                    pos = translated[1]
                    if not original:
                        text = translated[0][0]
            text = clean_text(text)
            if text and dialog_id not in result:
                result[dialog_id] = text
        else:
            pos += 1
    return result


# ------------------------------------------------------------------------------- split and audio

def split_of(sentence_id: str, seed: int = 0, dev: float = 0.1, test: float = 0.1) -> str:
    """'train', 'dev' or 'test' from a seeded hash of the sentence id (same in every language)."""
    digest = hashlib.sha256(f"{seed}\0{sentence_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return "test" if u < test else "dev" if u < test + dev else "train"


def _rng_for(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64))) if len(x) else 0.0


def mix(speech: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """speech + noise scaled to `snr_db` (speech power over noise power, both over the whole
    utterance). The noise is looped and started at a random offset to cover the speech. If the sum
    would clip, both are scaled down together (the SNR is kept)."""
    speech = np.asarray(speech, np.float32)
    noise = np.asarray(noise, np.float32)
    if len(speech) == 0:
        return speech.copy()
    if len(noise) == 0 or _power(noise) == 0.0:
        raise ValueError("mix: the noise is empty or silent")
    reps = -(-(len(speech) + len(noise)) // len(noise))
    looped = np.tile(noise, reps)
    offset = int(rng.integers(0, len(noise)))
    noise = looped[offset:offset + len(speech)]
    p_speech, p_noise = _power(speech), _power(noise)
    if p_speech == 0.0:
        return speech.copy()
    gain = np.sqrt(p_speech / (p_noise * 10.0 ** (snr_db / 10.0)))
    out = speech.astype(np.float64) + gain * noise.astype(np.float64)
    peak = float(np.max(np.abs(out)))
    if peak > 0.99:
        out *= 0.99 / peak
    return out.astype(np.float32)


def colored_noise(n: int, rng: np.random.Generator, exponent: float = 1.0) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 1 else 1.0
    shaped = np.fft.irfft(spectrum / freqs ** (exponent / 2.0), n)
    return (shaped / (np.sqrt(np.mean(shaped ** 2)) + 1e-12)).astype(np.float32)


def augment(speech: np.ndarray, kind: str, rng: np.random.Generator,
            events: list[np.ndarray] | None = None) -> np.ndarray:
    """'none'; 'noise': coloured noise at 5-20 dB SNR; 'event': a sound event placed at a random
    position, 0-15 dB below the speech (power over the event's own span); 'silence': 0.2-1.0 s of
    near silence before and after."""
    if kind == "none":
        return speech
    if kind == "noise":
        noise = colored_noise(len(speech), rng, exponent=float(rng.choice([0.0, 1.0, 2.0])))
        return mix(speech, noise, float(rng.uniform(5.0, 20.0)), rng)
    if kind == "event":
        if not events:
            raise ValueError("augment: 'event' needs sound events")
        event = events[int(rng.integers(len(events)))][: max(1, len(speech))]
        start = int(rng.integers(0, len(speech) - len(event) + 1))
        snr_db = float(rng.uniform(0.0, 15.0))
        span = speech[start:start + len(event)]
        gain = np.sqrt(max(_power(span), _power(speech) * 0.1) / (_power(event) * 10 ** (snr_db / 10) + 1e-20))
        out = speech.astype(np.float64).copy()
        out[start:start + len(event)] += gain * event
        peak = float(np.max(np.abs(out)))
        if peak > 0.99:
            out *= 0.99 / peak
        return out.astype(np.float32)
    if kind == "silence":
        lead, trail = (int(rng.uniform(0.2, 1.0) * SAMPLE_RATE) for _ in range(2))
        floor = 1e-4 * rng.standard_normal(lead + len(speech) + trail).astype(np.float32)
        floor[lead:lead + len(speech)] = speech
        return floor
    raise ValueError(f"augment: unknown kind {kind!r} (none, {', '.join(AUGMENTATIONS)})")


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav, written to a temporary name and renamed (never left half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    tmp = path.with_name(path.name + ".part")
    with wave.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def _wav_duration(path: Path) -> float:
    with wave.open(str(path), "rb") as f:
        return f.getnframes() / f.getframerate()


# ------------------------------------------------------------------------------ package sources

def fetch_packages(work_dir: str | Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """``apt-get download`` + ``dpkg -x`` each package into work_dir/<package>/ (no root needed).
    Already extracted packages are skipped. Returns {package: extracted root}."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for command in ("apt-get", "dpkg"):
        if shutil.which(command) is None:
            raise RuntimeError(f"demo corpus: the command {command!r} is missing (a Debian-based system is needed)")
    roots = {}
    for package in packages:
        root = work_dir / package
        marker = root / ".extracted"
        if not marker.exists():
            debs = sorted(work_dir.glob(f"{package}_*.deb"))
            if not debs:
                print(f"demo corpus: downloading {package}", flush=True)
                run = subprocess.run(["apt-get", "download", package], cwd=work_dir, capture_output=True, text=True)
                debs = sorted(work_dir.glob(f"{package}_*.deb"))
                if run.returncode != 0 or not debs:
                    raise RuntimeError(f"demo corpus: 'apt-get download {package}' failed: {run.stderr.strip()}")
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
            marker.touch()
            for deb in debs:  # the extracted tree is what is used
                deb.unlink()
        roots[package] = root
    return roots


def _package_dir(sources: dict[str, Path], package: str) -> Path:
    if package not in sources:
        raise FileNotFoundError(f"demo corpus: no directory given for package {package!r}")
    root = Path(sources[package])
    if not root.is_dir():
        raise FileNotFoundError(f"demo corpus: directory {root} of package {package!r} does not exist")
    return root


def asterisk_voice_dir(root: Path) -> Path:
    """The one voice directory of an asterisk-core-sounds-XX-g722 tree (its name is the speaker)."""
    base = root / "usr/share/asterisk/sounds"
    voices = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if len(voices) != 1:
        raise FileNotFoundError(f"demo corpus: expected one voice directory under {base}, found {len(voices)}")
    return voices[0]


def asterisk_transcript_file(root: Path, lang: str) -> Path:
    path = root / f"usr/share/doc/asterisk-core-sounds-{lang}/core-sounds-{lang}.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"demo corpus: transcript file {path} does not exist")
    return path


def load_fillets(root: Path, langs: tuple[str, ...] = FILLETS_LANGS) -> dict[str, dict[str, str]]:
    """{"<level>/<dialog id>": {lang: text}} from fillets-ng-data's script/*/dialogs_XX.lua."""
    script = root / "usr/share/games/fillets-ng/script"
    if not script.is_dir():
        raise FileNotFoundError(f"demo corpus: {script} does not exist")
    sentences: dict[str, dict[str, str]] = {}
    for level in sorted(p for p in script.iterdir() if p.is_dir()):
        for lang in langs:
            path = level / f"dialogs_{lang}.lua"
            if path.is_file():
                for dialog_id, text in parse_fillets_dialogs(path.read_text(encoding="utf-8", errors="replace"),
                                                             original=lang == "en").items():
                    sentences.setdefault(f"{level.name}/{dialog_id}", {})[lang] = text
    return sentences


def load_events(root: Path) -> list[np.ndarray]:
    """Sound events (16 kHz mono) of sound-theme-freedesktop, without spoken ones and test tones."""
    folder = root / "usr/share/sounds/freedesktop/stereo"
    if not folder.is_dir():
        raise FileNotFoundError(f"demo corpus: {folder} does not exist")
    events = []
    for path in sorted(folder.glob("*.og[ag]")):
        if not _EVENT_EXCLUDE.match(path.name):
            samples = load_audio(path)
            if len(samples) and _power(samples) > 0:
                events.append(samples)
    return events


def _synthesize(espeak: str, voice: str, text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "tts.wav"
        run = subprocess.run([espeak, "-v", voice, "-w", str(wav), "--stdin"], input=text,
                             capture_output=True, text=True)
        if run.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"demo corpus: {espeak} -v {voice} failed on {text!r}: {run.stderr.strip()}")
        return load_audio(wav)


# ------------------------------------------------------------------------------------ the build

def _plan(sources: dict[str, Path], german_sentences: int, seed: int) -> list[dict]:
    """Every utterance to build, as a manifest entry plus its source ('g722' path or 'tts' voice)."""
    items = []
    texts, voices = {}, {}
    for lang in ASTERISK_LANGS:
        with gzip.open(asterisk_transcript_file(_package_dir(sources, f"asterisk-core-sounds-{lang}"), lang), "rt",
                       encoding="utf-8", errors="replace") as f:
            texts[lang] = parse_asterisk_transcripts(f.read())
        voices[lang] = asterisk_voice_dir(_package_dir(sources, f"asterisk-core-sounds-{lang}-g722"))
    names = sorted(name for name in set.intersection(*(set(t) for t in texts.values()))
                   if all((voices[lang] / f"{name}.g722").is_file() and not has_annotation(texts[lang][name])
                          for lang in ASTERISK_LANGS))
    for name in names:
        split = split_of(f"asterisk/{name}", seed)
        for lang in ASTERISK_LANGS:
            items.append({
                "id": f"{lang}_asterisk_{name.replace('/', '_')}",
                "audio": f"audio/{lang}/asterisk/{name}.wav",
                "language": lang, "text": texts[lang][name], "speaker": voices[lang].name, "split": split,
                "translations": {other: texts[other][name] for other in ASTERISK_LANGS if other != lang},
                "_source": str(voices[lang] / f"{name}.g722"),
            })
    if german_sentences > 0:
        fillets = load_fillets(_package_dir(sources, "fillets-ng-data"))
        seen, candidates = set(), []
        for sid in sorted(fillets):
            entry = fillets[sid]
            german = entry.get("de", "")
            words = len(german.split())
            if 2 <= words <= 30 and german.lower() not in seen and any(entry.get(l) for l in ("en", "fr", "it")):
                seen.add(german.lower())
                candidates.append(sid)
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(candidates), size=min(german_sentences, len(candidates)), replace=False))
        for k, index in enumerate(chosen):
            sid = candidates[index]
            entry = fillets[sid]
            voice = GERMAN_VOICES[k % len(GERMAN_VOICES)]
            safe = re.sub(r"[^\w.-]", "_", sid.replace("/", "__"))
            items.append({
                "id": f"de_fillets_{safe}",
                "audio": f"audio/de/fillets/{safe}.wav",
                "language": "de", "text": entry["de"], "speaker": f"espeak-ng_{voice}",
                "split": split_of(f"fillets/{sid}", seed),
                "translations": {l: entry[l] for l in ("en", "fr", "it") if entry.get(l)},
                "_voice": voice,
            })
    return items


def prepare_demo(out_dir: str | Path, *, german_sentences: int = 300, augment_share: float = 0.3, seed: int = 0,
                 work_dir: str | Path | None = None, sources: dict[str, str | Path] | None = None,
                 espeak: str = "espeak-ng") -> Path:
    """Build the demo corpus into `out_dir`; returns the manifest path (out_dir/manifest.jsonl).

    Returns at once if the manifest exists (it is written last, atomically). Audio files already
    written are kept, so an interrupted build resumes where it stopped. `sources` maps Debian package
    names (see PACKAGES) to their extracted roots (as ``dpkg -x`` lays them out); by default they are
    downloaded and extracted into `work_dir` (default out_dir/.debs). Without
    'sound-theme-freedesktop' in `sources`, the 'event' augmentation is not used. German needs the
    `espeak` command (espeak-ng) unless german_sentences is 0.

    Manifest lines: id, audio (relative to out_dir), language, text, speaker, split, translations
    {lang: text}, augmentation (none/noise/event/silence), duration (s)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    if not 0.0 <= augment_share <= 1.0:
        raise UserError(f"augment_share must lie in [0, 1], got {augment_share}")
    if german_sentences > 0 and shutil.which(espeak) is None:
        raise RuntimeError(f"demo corpus: the command {espeak!r} is missing; it synthesizes the German part "
                           f"(install it, e.g. 'apt-get install espeak-ng', or pass german_sentences=0)")
    if sources is None:
        sources = fetch_packages(Path(work_dir) if work_dir is not None else out_dir / ".debs")
    sources = {k: Path(v) for k, v in sources.items()}

    items = _plan(sources, german_sentences, seed)
    kinds = ["noise", "silence"]
    events: list[np.ndarray] = []
    if augment_share > 0 and "sound-theme-freedesktop" in sources:
        events = load_events(_package_dir(sources, "sound-theme-freedesktop"))
        if events:
            kinds.insert(1, "event")

    entries = []
    for item in tqdm(items, desc="demo corpus", unit="utt"):
        rng = _rng_for(seed, item["id"])
        kind = str(rng.choice(kinds)) if rng.random() < augment_share else "none"
        target = out_dir / item["audio"]
        if not target.is_file():
            if "_source" in item:
                speech = load_audio(item["_source"], format="g722")
            else:
                speech = _synthesize(espeak, item["_voice"], item["text"])
            write_wav(target, augment(speech, kind, rng, events))
        entry = {k: v for k, v in item.items() if not k.startswith("_")}
        entry["augmentation"] = kind
        entry["duration"] = round(_wav_duration(target), 4)
        entries.append(entry)

    tmp = manifest.with_name(manifest.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, manifest)
    print(f"demo corpus: {len(entries)} utterances, {sum(e['duration'] for e in entries) / 3600:.2f} h -> {manifest}",
          flush=True)
    return manifest


def load_manifest(path: str | Path) -> dict[str, list[Utterance]]:
    """{split: [Utterance]} from a manifest.jsonl; audio paths are resolved against its folder.
    Augmentation and duration are not part of `Utterance`; read the JSON lines for them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"demo corpus manifest {path} does not exist")
    fix = (f"rebuild it (the demo corpus: delete it and run `localgp prepare demo --out {path.parent}`, which keeps "
           f"the audio already there)")
    if path.is_dir():
        raise DamagedFile(path, "a directory where a file should be", fix)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DamagedFile(path, f"not UTF-8 text: {err}", fix) from err
    splits: dict[str, list[Utterance]] = {}
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            utt = Utterance(e["id"], path.parent / e["audio"], e["language"], e["text"], e["speaker"],
                            translations=dict(e.get("translations", {})))
            split = e["split"]
        except (ValueError, KeyError, TypeError) as err:
            raise DamagedFile(path, f"line {line_no}: not a manifest entry: {reader_error(err)}", fix) from err
        if not isinstance(utt.text, str) or not utt.text.strip():  # nothing to train or score against
            raise UserError(f"{path}:{line_no}: utterance {utt.id!r} has an empty transcript")
        splits.setdefault(split, []).append(utt)
    if not splits:
        raise DamagedFile(path, "no utterance in it", fix)
    return splits
