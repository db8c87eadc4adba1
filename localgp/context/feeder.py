"""Feeding a gated model its contexts, the same way for training, decoding and analysis, and
for every backbone: the external streams its gates read (speaker, events, language), computed
by their extractors through the on-disk cache, and globalGP's discrete context (the prompt's
language and task token ids, which the backbone knows how to spell)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from localgp.data.examples import Example
from localgp.errors import UserError

EXTRACTOR_KINDS = ("beats", "ecapa", "lang2vec", "resemblyzer")


def build_extractor(spec: dict):
    """A context extractor from its spec: {"kind": one of EXTRACTOR_KINDS, **its options}."""
    from localgp.context.events import BeatsEvents
    from localgp.context.language import Lang2Vec
    from localgp.context.speaker import EcapaSpeaker, ResemblyzerSpeaker

    kinds = {"resemblyzer": ResemblyzerSpeaker, "ecapa": EcapaSpeaker, "beats": BeatsEvents, "lang2vec": Lang2Vec}
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in kinds:
        raise UserError(f"context extractor kind must be one of {sorted(kinds)}, got {kind!r}")
    import inspect

    try:  # an option the extractor does not take is the config's error, named here
        inspect.signature(kinds[kind]).bind(**options)
    except TypeError as err:
        raise UserError(f"context extractor {kind!r}: {err} (options given: {sorted(options)})") from err
    return kinds[kind](**options)


def context_source(utterance) -> tuple[str, Callable]:
    """(cache key, audio loader) of an utterance's external contexts: its own id and audio, or,
    for a part of a recording that shares them (transcribe's windows: `context_id` and
    `context_audio`), the recording's: a speaker belongs to the recording, not to a window."""
    key = getattr(utterance, "context_id", None)
    if key is None:
        return utterance.id, utterance.load
    return key, utterance.context_audio


class ContextFeeder:
    """Computes (with the on-disk cache) and sets the external contexts of a batch, and globalGP's
    discrete context: `prompt_context(example)`, the [<lang>, <task>] token ids of its prompt."""

    def __init__(self, model, extractors: dict, cache_dir: Path, prompt_context: Callable[[Example], list[int]]):
        from localgp.context.cache import FeatureCache

        self.model, self.cache, self.prompt_context = model, FeatureCache(cache_dir), prompt_context
        self.seconds = 0.0  # wall-clock of the external contexts computed so far (cache hits cost ~nothing)
        encoder_pruning = getattr(model.encoder, "pruning", None)
        self.global_prompt = encoder_pruning is not None and encoder_pruning.config.predictor == "global"
        decoder_pruning = getattr(model.decoder, "pruning", None)
        encoder_streams = dict(encoder_pruning.config.contexts) if encoder_pruning else {}
        decoder_streams = dict(decoder_pruning.config.decoder_contexts) if decoder_pruning else {}
        encoder_streams.pop("front", None)  # the speech itself, taken inside the encoder
        self.encoder_names, self.decoder_names = list(encoder_streams), list(decoder_streams)
        sizes = {**encoder_streams, **decoder_streams}
        missing = [n for n in self.encoder_names + self.decoder_names if n not in extractors]
        if missing:
            raise UserError(f"training: the gates use contexts {missing} but context_extractors names no extractor for them")
        self.extractors = {n: build_extractor(extractors[n]) for n in self.encoder_names + self.decoder_names}
        for name, extractor in self.extractors.items():
            if extractor.size != sizes[name]:
                raise UserError(f"training: context {name!r} is configured with size {sizes[name]} but its "
                                 f"extractor gives {extractor.size}")

    def set_waves(self, waves, prompts: list[list[int]] | None = None) -> None:
        """The contexts of clips that are no corpus examples (16 kHz arrays, not cached): the
        encoder's streams, and globalGP's prompt token ids when the gates read them."""
        if self.decoder_names:
            raise UserError(f"contexts of bare clips: the decoder's gates read {self.decoder_names}, which need each "
                            "clip's target language")
        if self.global_prompt:
            if prompts is None:
                raise UserError("contexts of bare clips: globalGP reads the prompt's language and task; give them")
            device = next(self.model.parameters()).device
            self.model.encoder.set_context(prompt=torch.tensor(prompts, device=device))
        if self.encoder_names:
            self._set_encoder_streams({name: [self.extractors[name](w) for w in waves] for name in self.encoder_names})

    def _set_encoder_streams(self, features: dict[str, list[torch.Tensor]]) -> None:
        """name -> one (frames, size) feature per clip, set on the encoder as (B, frames, size)."""
        device = next(self.model.parameters()).device
        streams = {}
        for name, feats in features.items():
            longest = max(f.shape[0] for f in feats)  # pad by repeating each one's last frame
            streams[name] = torch.stack([torch.cat([f, f[-1:].expand(longest - f.shape[0], -1)]) for f in feats])
        self.model.encoder.set_context(**{name: seq.to(device) for name, seq in streams.items()})

    def __call__(self, examples: list[Example]) -> None:
        device = next(self.model.parameters()).device
        if self.global_prompt:
            self.model.encoder.set_context(prompt=torch.tensor([self.prompt_context(e) for e in examples], device=device))
        if self.encoder_names:
            started = time.perf_counter()
            streams = {}
            for name in self.encoder_names:
                feats = []
                for e in examples:
                    key, audio = context_source(e.utterance)
                    feats.append(self.cache.get(name, key, lambda n=name, audio=audio: self.extractors[n](audio())))
                streams[name] = feats
            self.seconds += time.perf_counter() - started
            self._set_encoder_streams(streams)
        if self.decoder_names:
            self.model.decoder.set_context(**{
                name: torch.cat([self.extractors[name](e.target_language) for e in examples]).to(device)
                for name in self.decoder_names})
