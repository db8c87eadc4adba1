"""Training and decoding examples: an utterance with the language and text the model must
produce from it (its transcript for ASR, one of its translations for ST)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from localgp.data.audio import MIN_SAMPLES, SAMPLE_RATE, load_checked
from localgp.data.corpora import Utterance, europarl_st, kaldi_dir
from localgp.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    utterance: Utterance
    target_language: str  # == utterance.language for ASR
    target_text: str

    @property
    def is_translation(self) -> bool:
        return self.target_language != self.utterance.language


def load_corpus(data: dict, skip_bad_audio: bool = False, max_seconds: float | None = None) -> list[Utterance]:
    """The utterances `data` names (TrainConfig.data), their audio checked (check_audio) so that
    a file that cannot be used stops the run before any work, not at the step that first reads
    it; or, with skip_bad_audio, is left out and listed in the log."""
    kind = data.get("kind")
    if kind == "manifest":
        from localgp.data.demo_corpus import load_manifest

        splits = load_manifest(data["path"])
        split = data.get("split", "train")
        if split not in splits:
            raise UserError(f"{data['path']}: no split {split!r}; it has {sorted(splits)}")
        utterances = splits[split]
    elif kind == "kaldi":
        utterances = [u for lang, d in data["dirs"].items() for u in kaldi_dir(d, lang, data.get("audio_root"))]
    elif kind == "europarl":
        utterances = europarl_st(data["root"], data["source"], data["targets"], data["split"])
    else:
        raise UserError(f"TrainConfig.data.kind must be 'manifest', 'kaldi' or 'europarl', got {kind!r}")
    return check_audio(utterances, skip_bad_audio, max_seconds)


def audio_problems(utterances: list[Utterance], max_seconds: float | None = None,
                   lengths: dict[str, float] | None = None) -> dict[str, str]:
    """{utterance id: why its audio cannot be used}: a missing or undecodable file, no samples,
    NaN or infinite samples, shorter than MIN_SAMPLES (0.1 s), shorter than its header declares (cut short), a segment
    outside its file, longer than `max_seconds` (what the model reads of it: Whisper's window).
    Each file is decoded once, however many segments it holds. `lengths`, when given, receives
    the seconds of every utterance that can be used."""
    files: dict = {}  # path -> its number of samples, or what is wrong with it
    problems = {}
    lengths = {} if lengths is None else lengths
    for u in utterances:
        if u.audio not in files:
            try:
                files[u.audio] = len(load_checked(u.audio))
            except UserError as err:
                files[u.audio] = str(err)
        samples = files[u.audio]
        if isinstance(samples, str):
            problems[u.id] = samples
            continue
        first = 0 if u.start is None else round(u.start * SAMPLE_RATE)
        last = samples if u.end is None else round(u.end * SAMPLE_RATE)
        where = u.audio if u.start is None and u.end is None else f"{u.audio} [{u.start}, {u.end}) s"
        if not 0 <= first <= last <= samples + SAMPLE_RATE // 100:  # load_audio's tolerance
            problems[u.id] = f"{where}: the segment lies outside the file's {samples / SAMPLE_RATE:.2f} s"
        elif last - first < MIN_SAMPLES:
            problems[u.id] = f"{where}: {(last - first) / SAMPLE_RATE:.3f} s, shorter than {MIN_SAMPLES / SAMPLE_RATE} s"
        elif max_seconds is not None and (last - first) / SAMPLE_RATE > max_seconds:
            problems[u.id] = f"{where}: {(last - first) / SAMPLE_RATE:.2f} s, longer than the model's {max_seconds:g} s"
        else:
            lengths[u.id] = (min(last, samples) - first) / SAMPLE_RATE
    return problems


def check_audio(utterances: list[Utterance], skip: bool = False, max_seconds: float | None = None) -> list[Utterance]:
    """The utterances whose audio can be used (audio_problems). Any other stops with a UserError
    listing them all, or with `skip` is left out, each one logged."""
    lengths: dict[str, float] = {}
    problems = audio_problems(utterances, max_seconds, lengths)
    utterances = [dataclasses.replace(u, seconds=lengths[u.id]) if u.id in lengths else u for u in utterances]
    if not problems:
        return utterances
    listing = "; ".join(f"{uid}: {why}" for uid, why in problems.items())
    if not skip:
        raise UserError(f"{len(problems)} of {len(utterances)} utterances have audio that cannot be used (leave them "
                        f"out with skip_bad_audio: true in a training config, --skip-bad-audio when decoding): {listing}")
    log.warning("left out %d of %d utterances whose audio cannot be used: %s", len(problems), len(utterances), listing)
    kept = [u for u in utterances if u.id not in problems]
    if not kept:
        raise UserError(f"no utterance of the corpus has audio that can be used: {listing}")
    return kept


def make_examples(utterances: list[Utterance], tasks,
                  supports: Callable[[str, str], bool] | None = None) -> list[Example]:
    """ASR and/or ST examples of the utterances; `supports(source, target)` (a backbone's)
    drops the translation directions the model cannot produce (Whisper: into English only)."""
    examples = []
    for u in utterances:
        if "asr" in tasks:
            examples.append(Example(u, u.language, u.text))
        if "st" in tasks:
            examples.extend(Example(u, lang, text) for lang, text in sorted(u.translations.items())
                            if supports is None or supports(u.language, lang))
    if not examples:
        raise UserError("the corpus gives no example for the tasks asked")
    return examples


@dataclass(frozen=True)
class JoinedUtterance:
    """Clips of one language heard one after another, each after a pause: a training window that
    speech fills as far as long-form transcription fills it (Whisper's gates trained on short
    clips alone see speech only at the window's start, and learn to skip later frames)."""

    parts: tuple[Utterance, ...]
    pauses: tuple[float, ...]  # seconds of silence before each part but the first

    @property
    def id(self) -> str:
        """'<first id>+<n more>-<digest of all ids>': unique, and short enough for a file name (the
        context cache's)."""
        digest = hashlib.sha1("\n".join(u.id for u in self.parts).encode()).hexdigest()[:12]
        return f"{self.parts[0].id}+{len(self.parts) - 1}-{digest}"

    @property
    def language(self) -> str:
        return self.parts[0].language

    @property
    def speaker(self) -> str:
        return self.parts[0].speaker

    @property
    def text(self) -> str:
        return " ".join(u.text.strip() for u in self.parts)

    @property
    def translations(self) -> dict[str, str]:
        common = set.intersection(*(set(u.translations) for u in self.parts))
        return {lang: " ".join(u.translations[lang].strip() for u in self.parts) for lang in sorted(common)}

    def load(self):
        pieces = [self.parts[0].load()]
        for pause, u in zip(self.pauses, self.parts[1:], strict=True):
            pieces += [np.zeros(round(pause * SAMPLE_RATE), np.float32), u.load()]
        return np.concatenate(pieces)


def join_examples(examples: list[Example], share: float, max_seconds: float, seed: int) -> list[Example]:
    """The examples with `share` of them replaced by joined ones: each a run of examples of the
    same source language and task (after a shuffle), 0.3-1.5 s pauses between them, as long as
    a length drawn uniformly up to max_seconds allows (at least two clips). Deterministic in
    `seed`; every example appears once, alone or in a join."""
    if share == 0:
        return examples
    rng = np.random.default_rng(seed)
    seconds = {}
    groups: dict[tuple[str, str], list[Example]] = {}
    for e in examples:
        groups.setdefault((e.utterance.language, e.target_language), []).append(e)
    joined = []
    for key in sorted(groups):
        group = [groups[key][i] for i in rng.permutation(len(groups[key]))]
        i = 0
        while i < len(group):
            if rng.random() >= share:
                joined.append(group[i])
                i += 1
                continue
            budget = rng.uniform(0, max_seconds)
            parts, pauses, total = [group[i]], [], _seconds(group[i].utterance, seconds)
            i += 1
            while i < len(group):
                pause = float(rng.uniform(0.3, 1.5))
                length = _seconds(group[i].utterance, seconds)
                if total + pause + length > max_seconds or (len(parts) > 1 and total + pause + length > budget):
                    break
                parts.append(group[i])
                pauses.append(pause)
                total += pause + length
                i += 1
            if len(parts) == 1:
                joined.append(parts[0])
                continue
            utterance = JoinedUtterance(tuple(e.utterance for e in parts), tuple(pauses))
            target = " ".join(e.target_text.strip() for e in parts)
            joined.append(Example(utterance, key[1], target))
    return joined


def _seconds(utterance, cache: dict) -> float:
    """Its length: as load_corpus measured it, else decoded here (once)."""
    if utterance.seconds is not None:
        return utterance.seconds
    if utterance.id not in cache:
        cache[utterance.id] = len(utterance.load()) / SAMPLE_RATE
    return cache[utterance.id]


def record_id(example) -> str:
    """One record per utterance and task: '<utterance id>:<target language>'."""
    return f"{example.utterance.id}:{example.target_language}"
