"""Training and decoding examples: an utterance with the language and text the model must
produce from it (its transcript for ASR, one of its translations for ST)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from localgp.data.corpora import Utterance, europarl_st, kaldi_dir


@dataclass(frozen=True)
class Example:
    utterance: Utterance
    target_language: str  # == utterance.language for ASR
    target_text: str

    @property
    def is_translation(self) -> bool:
        return self.target_language != self.utterance.language


def load_corpus(data: dict) -> list[Utterance]:
    """The utterances `data` names (TrainConfig.data); their audio files must exist, so a missing
    one stops the run before any work, not at the step that first reads it."""
    kind = data.get("kind")
    if kind == "manifest":
        from localgp.data.demo_corpus import load_manifest

        splits = load_manifest(data["path"])
        split = data.get("split", "train")
        if split not in splits:
            raise ValueError(f"{data['path']}: no split {split!r}; it has {sorted(splits)}")
        utterances = splits[split]
    elif kind == "kaldi":
        utterances = [u for lang, d in data["dirs"].items() for u in kaldi_dir(d, lang, data.get("audio_root"))]
    elif kind == "europarl":
        utterances = europarl_st(data["root"], data["source"], data["targets"], data["split"])
    else:
        raise ValueError(f"TrainConfig.data.kind must be 'manifest', 'kaldi' or 'europarl', got {kind!r}")
    missing = sorted({str(u.audio) for u in utterances if not u.audio.is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} audio files of the corpus do not exist, e.g. {missing[:3]}")
    return utterances


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
        raise ValueError("the corpus gives no example for the tasks asked")
    return examples


def record_id(example) -> str:
    """One record per utterance and task: '<utterance id>:<target language>'."""
    return f"{example.utterance.id}:{example.target_language}"
