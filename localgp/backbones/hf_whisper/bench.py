"""`localgp bench --backbone hf-whisper-base`: transformers' Whisper base on real clips, in one run:

- `transformers`: the ungated WhisperForConditionalGeneration as its users run it (sdpa, its own
  linears; decode: `generate(num_beams=--beam)` on the batch, features from its processor);
- `dense`, `masked`, `compact`: the same model gated in place (localgp.backbones.hf_whisper.model;
  dense: the gated encoder's dense execution, transformers' layers), on the CPU with localgp's
  packed linears (`pack_linears`), as the whisper-base part runs localgp's own;
- `openai-whisper-compact`: localgp's openai-whisper adapter, compact, with the same gates and
  masks (encoder: its encoder; decode: its log-mel, encoder and WhisperBeamSearch), for comparison.

Masks are forced at random per frame (`--keep`) or come from a whisper-base run's trained gates
(`--checkpoint`, fed the clips' contexts, computed before the timing): the same gates on both
implementations.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from localgp import flops
from localgp.bench.core import BenchError, Case, Setting, gated_encoder_case, kept_share, prepare_encoder, pruned_label
from localgp.backbones.whisper.bench import WhisperModels, _shapes, load_clips, log_mel
from localgp.model.config import GateConfig
from localgp.model.convert import force_keep
from localgp.model.packed import pack_linears

OPENAI = "openai-whisper-compact"
PROVIDERS = ("transformers", OPENAI, "dense", "masked", "compact")


class HFModels:
    """The ungated transformers model, the same model gated with the gates of localgp's openai-whisper
    adapter (forced masks or a trained run's, via bench.whisper.WhisperModels), and that adapter."""

    def __init__(self, setting: Setting):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from localgp.backbones.hf_whisper.model import gate_hf_whisper, gates_from_openai
        from localgp.backbones.whisper.weights import default_whisper_dir

        if setting.weights == "random":
            raise BenchError("--backbone hf-whisper-base: runs the prepared weights; not with --weights random")
        directory = Path(setting.weights or default_whisper_dir()) / "transformers"
        if not (directory / "config.json").is_file():
            raise BenchError(f"--weights: no transformers model in {directory} (`localgp prepare whisper` writes it)")
        if setting.dtype != "float32":
            raise BenchError("--backbone hf-whisper-base: float32 only")
        self.openai = WhisperModels(setting)  # forced masks (encoder and decoder gated) or the run's gates
        self.masks = self.openai.masks
        device = setting.torch_device()
        self.plain = WhisperForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa").to(device)
        self.plain.eval()
        self.processor = WhisperProcessor.from_pretrained(directory)
        if setting.checkpoint:
            self.model = gates_from_openai(copy.deepcopy(self.plain), self.openai.model).eval()
        else:  # forced masks on the encoder: the decoder as transformers runs it
            self.model = gate_hf_whisper(copy.deepcopy(self.plain), GateConfig(encoder=setting.granularity)).eval()
        self.decoder_gated = hasattr(self.model.model.decoder, "pruning")
        if device.type == "cpu":
            pack_linears(self.model)

    def set_contexts(self, clips) -> None:
        self.openai.set_contexts(clips)
        for name in ("encoder", "decoder"):
            source, target = getattr(self.openai.model, name), getattr(self.model.model, name)
            if hasattr(target, "pruning"):
                target.external_context = dict(source.external_context)

    def features(self, waves) -> torch.Tensor:
        return self.processor(waves, sampling_rate=16000, return_tensors="pt").input_features


class EncoderWorkload:
    providers = PROVIDERS

    def __init__(self, setting: Setting):
        self.setting = setting
        self.models = HFModels(setting)
        clips = load_clips(setting)
        self.models.set_contexts(clips)
        device = setting.torch_device()
        self.features = self.models.features(clips.waves).to(device)
        self.mel = log_mel(clips.waves, device, setting.torch_dtype())
        self.encoder = self.models.model.model.encoder
        self.masks, self.pruned = self.models.masks, pruned_label(self.encoder)
        self.shapes = _shapes(self.models.openai, setting, clips)
        shape = flops.WhisperShape.of_encoder(self.encoder)
        self.dense_gflops = setting.batch * flops.whisper_encoder_macs(shape)["total"] / 1e9

    def case(self, provider: str, keep: float | None) -> Case:
        batch, seed = self.setting.batch, self.setting.seed
        if provider == "transformers":
            encoder = self.models.plain.model.encoder
            return Case(lambda: encoder(self.features), lambda: self.dense_gflops)
        if provider == OPENAI:
            encoder = self.models.openai.model.encoder
            return gated_encoder_case(
                encoder, "compact", keep, seed, lambda: encoder(self.mel),
                lambda record: flops.executed_whisper_encoder_macs(encoder, record, "compact", batch)["total"])
        return gated_encoder_case(
            self.encoder, provider, keep, seed, lambda: self.encoder(self.features),
            lambda record: flops.executed_whisper_encoder_macs(self.encoder, record, provider, batch)["total"])


class DecodeWorkload:
    """A whole decode of the clips (transcription in their language, beam --beam): features,
    encoder, generate() (localgp's openai-whisper adapter: log-mel, encoder, WhisperBeamSearch)."""

    providers = PROVIDERS

    def __init__(self, setting: Setting):
        self.setting = setting
        self.models = HFModels(setting)
        self.clips = load_clips(setting)
        if None in self.clips.languages:
            raise BenchError("--backbone hf-whisper-base --part decode: the clips' languages are needed "
                             "(a demo-corpus manifest as --audio)")
        self.models.set_contexts(self.clips)
        self.encoder = self.models.model.model.encoder
        self.masks, self.pruned = self.models.masks, pruned_label(self.encoder)
        self.shapes = dict(_shapes(self.models.openai, setting, self.clips), beam=setting.beam)
        self.last_tokens = {}

    def case(self, provider: str, keep: float | None) -> Case:
        setting, clips = self.setting, self.clips
        if provider == OPENAI:
            from localgp.backbones.whisper.decoding import WhisperBeamSearch, WhisperDecodeOptions

            model = self.models.openai.model
            search = WhisperBeamSearch(model, WhisperDecodeOptions(beam_size=setting.beam, execution="compact"))
            last = {}

            def run_openai():
                prepare_encoder(model.encoder, "compact", keep, setting.seed)
                if hasattr(model.decoder, "pruning"):  # as the transformers model's decoder: its gates, or all kept
                    force_keep(model.decoder, keep if self.models.decoder_gated else 1.0, seed=setting.seed)
                hyps = search(model.encoder(log_mel(clips.waves, setting.torch_device(), setting.torch_dtype())),
                              clips.languages)
                last["record"] = model.encoder.last_record
                self.last_tokens[provider] = [h.token_ids for h in hyps]
                return hyps

            return Case(run_openai, lambda: None, lambda: kept_share(last["record"]))
        gated = provider != "transformers"
        model = self.models.model if gated else self.models.plain
        last = {}

        def run():
            if gated:
                prepare_encoder(self.encoder, provider, keep, setting.seed)
                if self.models.decoder_gated:
                    decoder = self.models.model.model.decoder
                    decoder.execution = "compact" if provider == "dense" else provider
                    force_keep(decoder, 1.0 if provider == "dense" else keep, seed=setting.seed)
            features = self.models.features(clips.waves).to(setting.torch_device())
            out = model.generate(features, language=list(clips.languages), task="transcribe", num_beams=setting.beam)
            if gated:
                last["record"] = self.encoder.last_record
            self.last_tokens[provider] = [[t for t in row if t != 50257] for row in out.tolist()]
            return out

        return Case(run, lambda: None, lambda: kept_share(last["record"]) if gated else None)

