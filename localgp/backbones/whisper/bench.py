"""The Whisper base parts of `localgp bench`: the real weights on real clips, beside what users
run instead, in the same run on the same clips:

- `openai-whisper`: its own model (encoder: `model.encoder`; decode: `whisper.decode`, beam
  search, clip by clip: its beam search fails on a batch of several clips, version 20250625);
- `faster-whisper-float32`, `faster-whisper-int8`: CTranslate2 on the original model.bin
  (encoder: `encode`; decode: `WhisperModel.transcribe`, clip by clip, temperature 0, no
  timestamps, no previous text, no VAD: what `whisper.decode` does);
- `dense`, `masked`, `compact`: localgp (encoder: the gated encoder in that execution; decode:
  the log-mel, the encoder and `WhisperBeamSearch` over the whole batch at once; dense decodes
  with the ungated decoder through the same search; in --dtype, on the CPU their linears through
  packed weights at that precision, `set_precision`, as `localgp decode` and `transcribe` run them).
  openai-whisper runs in float32 whatever --dtype; faster-whisper in its providers' compute types.
- `padding`, `silence`, `attention`: the training-free rules (their default settings) on the real
  weights, compact, as `localgp decode --gates RULE` runs them (the padding and silence rules'
  fill calibrated on --audio's training clips when it is a manifest, else data/demo's; their
  frames from Silero VAD on the clips, found once before the timing); they ignore --keep.

Masks are forced at random on the encoder's attention and MLP per frame (`--granularity`
temporal, with token-level decoder gates) or per utterance, or come from a trained run's gates
(`--checkpoint`, fed the clips' contexts, computed before the timing). Whisper computes its whole 30 s window, so every clip costs the same encoder
work; a decode's length is the model's own (with random masks the gated model decodes other
text: compare decodes with trained gates). GFLOPs: the encoder's as localgp.flops counts them,
plus localgp's decoder MACs for a decode; a baseline's own decoder work is not counted (-).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from localgp import flops
from localgp.bench.core import (
    FASTER_WHISPER, GATES, BenchError, Case, Setting, gated_encoder_case, kept_share, pruned_label, prepare_encoder,
)
from localgp.model.config import GateConfig
from localgp.model.convert import set_precision

RULE_PROVIDERS = ("padding", "silence", "attention")
PROVIDERS = ("openai-whisper", *FASTER_WHISPER, "dense", "masked", "compact", *RULE_PROVIDERS)
# what runs without --providers: the rules need a corpus to calibrate their fill on, so they are asked for by name
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS if p not in RULE_PROVIDERS)
BASE_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6, n_vocab=51865,
                 n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)
DEFAULT_AUDIO = "data/demo/manifest.jsonl"
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".g722")


@dataclass
class Clips:
    waves: list[np.ndarray]  # 16 kHz float32
    languages: list[str | None]  # None: detected
    source: str


def load_clips(setting: Setting) -> Clips:
    """`batch` clips of --audio: a demo-corpus manifest's test split (its languages known), a
    directory of audio files or one file (languages detected), or "noise": `seconds` of quiet
    noise per clip, English (machines without the corpus: a GPU run's encoder timing)."""
    from localgp.data.audio import load_audio

    if setting.audio == "noise":
        gen = np.random.default_rng(setting.seed)
        samples = int(min(setting.seconds, 30) * 16000)
        return Clips([0.01 * gen.standard_normal(samples).astype(np.float32) for _ in range(setting.batch)],
                     ["en"] * setting.batch, "noise")
    path = Path(setting.audio or DEFAULT_AUDIO)
    if not path.exists():
        hint = " (localgp prepare demo builds data/demo)" if setting.audio is None else ""
        raise BenchError(f"--audio: {path} does not exist{hint}")
    if path.suffix == ".jsonl":
        from localgp.data.demo_corpus import load_manifest

        utterances = load_manifest(path).get("test", [])[: setting.batch]
        waves, languages = [u.load() for u in utterances], [u.language for u in utterances]
    else:
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES) if path.is_dir() else [path]
        files = files[: setting.batch]
        waves = [load_audio(f, format="g722" if f.suffix == ".g722" else None) for f in files]
        languages = [None] * len(waves)
    if len(waves) < setting.batch:
        raise BenchError(f"--batch {setting.batch}: --audio {path} has only {len(waves)} clips")
    return Clips([np.asarray(w, dtype=np.float32) for w in waves], languages, str(path))


def log_mel(waves: list[np.ndarray], device, dtype) -> torch.Tensor:
    """(B, 80, 3000): Whisper's log-mel of each clip padded or trimmed to 30 s."""
    import whisper

    mels = [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(w))) for w in waves]
    return torch.stack(mels).to(device, dtype)


class WhisperModels:
    """The gated model (forced masks, or a trained run's gates), the plain openai-whisper model
    with the same weights, and CTranslate2's models of the original weights, on demand."""

    def __init__(self, setting: Setting):
        from localgp.model.pruning import ungated_copy

        self.run = None
        if setting.checkpoint:  # a trained run: its gates decide, fed the clips' own contexts (set_contexts)
            from localgp.release import is_gates_file, load_gates
            from localgp.runs import load_run

            self.run = (load_gates(setting.checkpoint, setting.weights)[0] if is_gates_file(setting.checkpoint)
                        else load_run(setting.checkpoint))
            if self.run.config.backbone != "whisper-base":
                raise BenchError(f"--checkpoint {setting.checkpoint}: a {self.run.config.backbone} run, not whisper-base")
            if not hasattr(self.run.model.encoder, "pruning"):
                raise BenchError(f"--checkpoint {setting.checkpoint}: its encoder is not gated")
            model, self.masks = self.run.model, GATES
            self.weights = self.run.backbone.directory()
        else:
            model = self._random_masks_model(setting)
            self.masks = "random"
        self.model = model.to(setting.torch_device(), torch.float32).eval()
        # openai-whisper's own classes with the same weights: the Whisper shell, ungated parts
        self.plain = copy.copy(self.model)
        self.plain._modules = {"encoder": ungated_copy(self.model.encoder), "decoder": ungated_copy(self.model.decoder)}
        # localgp dense decodes with the ungated decoder; localgp's parts in --dtype, on the CPU their
        # linears through packed weights at that precision as `localgp decode/transcribe` run them
        # (`set_precision`); openai-whisper's stay its own, in float32
        self.dense = copy.copy(self.plain)
        self.dense._modules = {"encoder": self.plain.encoder, "decoder": ungated_copy(self.model.decoder)}
        set_precision(self.model, setting.dtype, setting.torch_device())
        set_precision(self.dense.decoder, setting.dtype, setting.torch_device())
        self._ct2 = {}
        self._rules = {}
        self.setting = setting

    def rule_model(self, name: str, clips: "Clips"):
        """The plain weights under the rule `name`, compact, its frames those of `clips` (built once)."""
        if name not in self._rules:
            from localgp.model.convert import set_execution
            from localgp.runs import rule_model

            if self.weights is None:
                raise BenchError(f"--providers {name}: the rules run the real weights; not with --weights random")
            audio = self.setting.audio
            run = rule_model("whisper-base", name, {}, str(self.weights),
                             audio if audio and audio.endswith(".jsonl") else None)
            model = run.model.eval()
            set_precision(model, self.setting.dtype, self.setting.torch_device())  # as the other localgp rows
            set_execution(model, "compact")
            if name != "attention":
                set_rule_frames(model.encoder, run.backbone, clips, self.setting.torch_device())
            self._rules[name] = model
        return self._rules[name]

    def _random_masks_model(self, setting: Setting):
        """Whisper base (or its shapes with random weights) gated for forced masks."""
        from localgp.backbones.whisper.model import gate_whisper
        from localgp.backbones.whisper.weights import default_whisper_dir, load_whisper

        self.weights = None if setting.weights == "random" else Path(setting.weights or default_whisper_dir())
        if self.weights is None:  # base's shapes, random weights (machines without them: timing only)
            from whisper.model import ModelDimensions, Whisper

            torch.manual_seed(setting.seed)
            model = Whisper(ModelDimensions(**BASE_DIMS))
        else:
            try:
                model = load_whisper(self.weights)
            except FileNotFoundError as err:
                raise BenchError(f"--backbone whisper-base: {err}") from None
        decoder = "token" if setting.granularity == "temporal" else "utterance"
        return gate_whisper(model, GateConfig(encoder=setting.granularity, decoder=decoder))

    def set_contexts(self, clips: "Clips") -> None:
        """A trained run's gates: the contexts of these clips (its extractors, e.g. the speaker
        embedding) and its prior rule's frames (GateConfig.prior), computed once, before any timing."""
        if self.run is None:
            return
        if self.model.encoder.rule is not None:
            set_rule_frames(self.model.encoder, self.run.backbone, clips, self.setting.torch_device())
        from localgp.context.feeder import ContextFeeder

        config, tokenizer = self.run.config, self.run.tokenizer
        feeder = ContextFeeder(self.model, config.context_extractors, Path(config.out_dir) / "context",
                               self.run.backbone.prompt_context)
        prompts = None
        if feeder.global_prompt:
            if None in clips.languages:
                raise BenchError(f"--checkpoint {self.setting.checkpoint}: globalGP reads each clip's language; "
                                 f"--audio {clips.source} does not give them (use a demo-corpus manifest)")
            prompts = [[tokenizer.to_language_token(lang), tokenizer.transcribe] for lang in clips.languages]
        feeder.set_waves(clips.waves, prompts)

    def faster_whisper(self, provider: str):
        """faster-whisper's WhisperModel of the original model.bin at the provider's compute type."""
        if self.setting.torch_device().type != "cpu":
            raise BenchError(f"--providers {provider}: compared on the CPU only here")
        if self.weights is None:
            raise BenchError(f"--providers {provider}: runs the original weights; not with --weights random")
        if provider not in self._ct2:
            from faster_whisper import WhisperModel

            from localgp.backbones.whisper.weights import check_prepared

            check_prepared(self.weights)  # ct2/ as `localgp prepare whisper` wrote it

            compute_type = provider.rsplit("-", 1)[1]
            self._ct2[provider] = WhisperModel(str(self.weights / "ct2"), device="cpu", compute_type=compute_type,
                                               cpu_threads=torch.get_num_threads())
        return self._ct2[provider]


def set_rule_frames(encoder, backbone, clips: Clips, device) -> None:
    """The frames of `clips` that the encoder's rule (a rule's, or a GateConfig.prior's) keeps, set
    on it (the backbone's rule_frames: Silero VAD's speech regions of each clip for the silence
    rule; the padding rule reads only the lengths)."""
    encoder.set_rule_keep(backbone.rule_frames(encoder.rule, clips.waves, [None] * len(clips.waves)).to(device))


def _shapes(models: WhisperModels, setting: Setting, clips: Clips) -> dict:
    shape = flops.WhisperShape.of_encoder(models.model.encoder)
    return dict(preset="whisper-base", d_model=shape.d_model, layers=shape.layers, frames=shape.frames,
                audio=clips.source, audio_seconds=sum(len(w) for w in clips.waves) / 16000)


class EncoderWorkload:
    """The encoder (convolutions + every block) on the clips' log-mel."""

    providers = PROVIDERS
    default_providers = DEFAULT_PROVIDERS

    def __init__(self, setting: Setting):
        self.setting = setting
        self.models = WhisperModels(setting)
        self.clips = clips = load_clips(setting)
        self.models.set_contexts(clips)
        self.mel = log_mel(clips.waves, setting.torch_device(), setting.torch_dtype())
        self.encoder = self.models.model.encoder
        self.shape = flops.WhisperShape.of_encoder(self.encoder)
        self.masks, self.pruned = self.models.masks, pruned_label(self.encoder)
        self.shapes = _shapes(self.models, setting, clips)
        self.dense_gflops = setting.batch * flops.whisper_encoder_macs(self.shape)["total"] / 1e9

    def case(self, provider: str, keep: float | None) -> Case:
        if provider == "openai-whisper":
            mel = self.mel.float()  # openai-whisper runs in float32
            return Case(lambda: self.models.plain.encoder(mel), lambda: self.dense_gflops)
        if provider in FASTER_WHISPER:
            import ctranslate2

            ct2 = self.models.faster_whisper(provider).model
            features = ctranslate2.StorageView.from_array(np.ascontiguousarray(self.mel.float().cpu().numpy()))
            return Case(lambda: ct2.encode(features, to_cpu=True), lambda: self.dense_gflops)
        batch = self.setting.batch
        if provider in RULE_PROVIDERS:
            encoder = self.models.rule_model(provider, self.clips).encoder
            return Case(lambda: encoder(self.mel),
                        lambda: flops.executed_whisper_encoder_macs(encoder, None, "compact", batch)["total"] / 1e9,
                        lambda: kept_share(encoder.last_record))
        return gated_encoder_case(
            self.encoder, provider, keep, self.setting.seed, lambda: self.encoder(self.mel),
            lambda record: flops.executed_whisper_encoder_macs(self.encoder, record, provider, batch)["total"])


class DecodeWorkload:
    """A whole decode of the clips (transcription in their language, beam --beam): log-mel,
    encoder, beam search."""

    providers = PROVIDERS
    default_providers = DEFAULT_PROVIDERS

    def __init__(self, setting: Setting):
        self.setting = setting
        self.models = WhisperModels(setting)
        self.clips = load_clips(setting)
        self.models.set_contexts(self.clips)
        self.encoder = self.models.model.encoder
        decoder = getattr(self.models.model.decoder, "pruning", None)
        self.masks, self.pruned = self.models.masks, pruned_label(self.encoder) + (
            f", {','.join(decoder.modules_per_layer)} (decoder)" if decoder else "")
        self.shapes = dict(_shapes(self.models, setting, self.clips), beam=setting.beam)
        self.dense_encoder_gflops = setting.batch * flops.whisper_encoder_macs(
            flops.WhisperShape.of_encoder(self.encoder))["total"] / 1e9

    def case(self, provider: str, keep: float | None) -> Case:
        waves, languages, beam = self.clips.waves, self.clips.languages, self.setting.beam
        if provider == "openai-whisper":
            import whisper

            plain = self.models.plain

            def run():
                mel = log_mel(waves, self.setting.torch_device(), torch.float32)
                return [whisper.decode(plain, m, whisper.DecodingOptions(
                    beam_size=beam, language=lang, without_timestamps=True, fp16=False)) for m, lang in zip(mel, languages)]

            return Case(run, lambda: None)
        if provider in FASTER_WHISPER:
            model = self.models.faster_whisper(provider)

            def run():
                return [list(model.transcribe(w, language=lang, beam_size=beam, temperature=0.0, without_timestamps=True,
                                              condition_on_previous_text=False, vad_filter=False)[0])
                        for w, lang in zip(waves, languages)]

            return Case(run, lambda: None)
        return self._localgp(provider, keep)

    def _localgp(self, provider: str, keep: float | None) -> Case:
        from localgp.backbones.whisper.decoding import WhisperBeamSearch, WhisperDecodeOptions
        from localgp.model.convert import force_keep

        model, setting = self.models.model, self.setting
        if provider in RULE_PROVIDERS:
            return self._rule(provider)
        gated = provider != "dense"
        decoder_model = model if gated else self.models.dense
        options = WhisperDecodeOptions(beam_size=setting.beam, execution=provider if gated else "compact")
        search = WhisperBeamSearch(decoder_model, options)  # the ungated decoder ignores the execution
        last = {}

        def run():
            prepare_encoder(self.encoder, provider, keep, setting.seed)
            if gated:  # an ungated decoder (a run's gates on the encoder only) has nothing to force
                force_keep(model.decoder, keep, seed=setting.seed)
            mel = log_mel(self.clips.waves, setting.torch_device(), setting.torch_dtype())
            hyps = search(self.encoder(mel), self.clips.languages)
            last["record"] = self.encoder.last_record
            return hyps

        def gflops():
            encoder = flops.executed_whisper_encoder_macs(self.encoder, last["record"], provider, setting.batch)["total"]
            return (encoder + search.decoder.macs) / 1e9

        return Case(run, gflops, lambda: kept_share(last["record"]) if gated else None)


    def _rule(self, provider: str) -> Case:
        from localgp.backbones.whisper.decoding import WhisperBeamSearch, WhisperDecodeOptions

        model, setting = self.models.rule_model(provider, self.clips), self.setting
        search = WhisperBeamSearch(model, WhisperDecodeOptions(beam_size=setting.beam, execution="compact"))

        def run():
            mel = log_mel(self.clips.waves, setting.torch_device(), setting.torch_dtype())
            return search(model.encoder(mel), self.clips.languages)

        def gflops():
            encoder = flops.executed_whisper_encoder_macs(model.encoder, None, "compact", setting.batch)["total"]
            return (encoder + search.decoder.macs) / 1e9

        return Case(run, gflops, lambda: kept_share(model.encoder.last_record))
