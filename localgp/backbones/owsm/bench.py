"""The OWSM parts of `localgp bench`: one E-Branchformer layer and the whole encoder, on random
weights of a preset (or a trained run's model), providers espnet, dense, masked, compact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from localgp import flops
from localgp.bench.core import GATES, BenchError, Case, Setting, gated_encoder_case, kept_share, pruned_label
from localgp.gates import GateRecord, random_keep_logits
from localgp.backbones.owsm import weights as owsm
from localgp.model.config import DENSE, ENCODER_MODULES, GateConfig
from localgp.model.pruning import ungated_copy

PROVIDERS = ("espnet", "dense", "masked", "compact")


@dataclass
class Models:
    model: torch.nn.Module  # the gated ESPnet S2T model
    espnet_encoder: torch.nn.Module  # ESPnet's own encoder class, same weights
    masks: str
    preset: str  # the preset, or what a checkpoint was trained from
    prompt: list[int] | None = None  # globalGP's prompt token ids of a trained model


def load_models(setting: Setting) -> Models:
    from localgp.backbones.owsm.model import gate_s2t_model

    torch.manual_seed(setting.seed)
    prompt = None
    if setting.checkpoint:
        from localgp.runs import load_trained

        model, tokenizer, config = load_trained(setting.checkpoint)
        preset = f"init:{Path(config.init).name}" if config.init else config.preset
        cfg = model.encoder.pruning.config if hasattr(model.encoder, "pruning") else None
        if cfg is None:
            raise BenchError(f"--checkpoint {setting.checkpoint}: its encoder is not gated")
        external = [name for name, _ in cfg.contexts if name != "front"] if cfg.predictor == "local" else []
        if external:
            # The bench feeds random speech features; it has no speaker/event/language input to
            # compute these contexts from, and random ones would not be the gates' real decisions.
            raise BenchError(f"--checkpoint {setting.checkpoint}: its gates read the contexts {external}, which "
                             "the benchmark cannot provide (it supports gates on the speech alone, or globalGP)")
        if cfg.predictor == "global":
            prompt = tokenizer.prompt("en")[:2]  # <en><asr>: globalGP's context for an English ASR call
        masks = GATES
    else:
        model, _ = owsm.build_owsm(setting.preset)
        gate_s2t_model(model, GateConfig(encoder=setting.granularity))
        masks, preset = "random", setting.preset
    model = model.to(setting.torch_device(), setting.torch_dtype()).eval()
    return Models(model, ungated_copy(model.encoder).eval(), masks, preset, prompt)


def speech_features(setting: Setting):
    """Random fbank features (B, frames, 80) of `seconds` of audio, and their lengths."""
    frames = flops.input_frames(setting.seconds)
    gen = torch.Generator().manual_seed(setting.seed)
    feats = torch.randn(setting.batch, frames, flops.N_MELS, generator=gen)
    lengths = torch.full((setting.batch,), frames)
    return feats.to(setting.torch_device(), setting.torch_dtype()), lengths.to(setting.torch_device())


class EncoderWorkload:
    """The whole encoder (conv2d subsampling + every layer) on fbank features."""

    providers = PROVIDERS

    def __init__(self, setting: Setting):
        self.setting = setting
        self.models = load_models(setting)
        self.encoder = self.models.model.encoder
        self.feats, self.lengths = speech_features(setting)
        if self.models.prompt is not None:
            self.encoder.set_context(prompt=torch.tensor([self.models.prompt] * setting.batch,
                                                         device=setting.torch_device()))
        self.shape = flops.EncoderShape.of_encoder(self.encoder)
        self.masks = self.models.masks
        self.pruned = pruned_label(self.encoder)
        frames = flops.input_frames(setting.seconds)
        self.shapes = dict(preset=self.models.preset, d_model=self.shape.d_model, layers=self.shape.layers,
                           heads=self.encoder.encoders[0].attn.h, input_frames=frames,
                           frames=flops.subsampled_frames(frames))
        self.dense_gflops = setting.batch * flops.encoder_macs(self.shape, frames)["total"] / 1e9

    def case(self, provider: str, keep: float | None) -> Case:
        if provider == "espnet":
            return Case(lambda: self.models.espnet_encoder(self.feats, self.lengths), lambda: self.dense_gflops)
        lengths = self.lengths.tolist()
        return gated_encoder_case(
            self.encoder, provider, keep, self.setting.seed, lambda: self.encoder(self.feats, self.lengths),
            lambda record: flops.executed_encoder_macs(self.encoder, lengths, provider, record)["total"])


class LayerWorkload:
    """One E-Branchformer layer (the first) on subsampled features, given its gate logits: the
    gate predictor's own cost is in the `encoder` part."""

    providers = PROVIDERS

    def __init__(self, setting: Setting):
        from espnet.nets.pytorch_backend.nets_utils import make_pad_mask

        self.setting = setting
        self.models = load_models(setting)
        encoder = self.models.model.encoder
        self.cfg = encoder.pruning.config
        self.layer, self.espnet_layer = encoder.encoders[0], self.models.espnet_encoder.encoders[0]
        feats, lengths = speech_features(setting)
        with torch.inference_mode():
            pad_mask = (~make_pad_mask(lengths)[:, None, :]).to(feats.device)
            self.x, self.pad_mask = encoder.embed(feats, pad_mask)
            self.valid = self.pad_mask.squeeze(1)
            self.lengths = self.valid.sum(-1)
            self.gate_logits = None
            if self.models.masks == GATES:  # the trained predictor of layer 0, run once
                if self.models.prompt is not None:
                    encoder.set_context(prompt=torch.tensor([self.models.prompt] * setting.batch, device=feats.device))
                encoder.forced_keep = None
                context = encoder.start_gates(self.x, self.valid)
                self.gate_logits, self.x, _ = encoder.layer_logits(0, self.x, context, self.valid)
        shape = flops.EncoderShape.of_encoder(encoder)
        self.shape = dataclasses.replace(shape, layers=1)
        self.masks = self.models.masks
        self.pruned = pruned_label(encoder)
        t = self.x.shape[1]
        self.shapes = dict(preset=self.models.preset, d_model=shape.d_model, layers=1, heads=self.layer.attn.h,
                           input_frames=flops.input_frames(setting.seconds), frames=t)

    def _logits(self, keep: float | None):
        if keep is None:
            return self.gate_logits
        B, T = self.x.shape[:2]
        units = len(ENCODER_MODULES[self.cfg.encoder])
        shape = (B, T, units) if self.cfg.encoder == "temporal" else (B, units)
        gen = torch.Generator().manual_seed(self.setting.seed)
        return random_keep_logits(shape, keep, gen, self.x.device).to(self.x.dtype)

    def case(self, provider: str, keep: float | None) -> Case:
        from localgp.backbones.owsm.encoder import run_layer

        frames = [self.x.shape[1]] * self.x.shape[0]
        if provider == "espnet":
            dense = flops.executed_layer_macs(self.shape, GateRecord(), frames, DENSE)["total"] / 1e9
            return Case(lambda: self.espnet_layer(self.x, self.pad_mask), lambda: dense)
        logits = None if provider == DENSE else self._logits(keep)
        last = {}

        def run():
            last["record"] = record = GateRecord()
            return run_layer(self.layer, self.x, self.pad_mask, self.lengths, logits, self.cfg, provider, record,
                             "encoder.0")

        def gflops():
            return flops.executed_layer_macs(self.shape, last["record"], frames, provider)["total"] / 1e9

        return Case(run, gflops, lambda: kept_share(last["record"]))


