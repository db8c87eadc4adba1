"""The Whisper base backbone: OpenAI's pretrained Whisper base (`localgp prepare whisper`), in
fp32, gated in place (localgp.backbones.whisper.model), with Whisper's own prompts and tokenizer.

Training: the log-mel spectrogram of the clip padded or trimmed to 30 s (B, 80, 3000); decoder
input <|startoftranscript|> <|lang|> <|transcribe|> or <|translate|> <|notimestamps|> followed by
the text's tokens (" " + text, as Whisper's own transcripts begin), targets the text's tokens
and <|endoftext|>: cross-entropy over those positions only. Tasks: ASR in the clip's language,
and Whisper's X -> English translation (it translates into English only).

Decoding: Whisper's beam search (localgp.backbones.whisper.decoding) over batches of clips, one search
per task, with what the Whisper report needs per utterance: executed encoder and decoder
GFLOPs, sparsity per module, encoder sparsity over all frames and over the speech frames,
seconds, encoder seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from localgp import flops
from localgp.backbones import Backbone, StepOutput, ready_for_decoding
from localgp.data.examples import record_id
from localgp.files import file_sha256, replace_atomically
from localgp.decoding import DecodeOptions
from localgp.decoding.beam import decoder_keep
from localgp.backbones.whisper.decoding import (
    WhisperBeamSearch,
    WhisperDecodeOptions,
    whisper_tokenizer,
)
from localgp.errors import UserError
from localgp.evaluate import Decoded
from localgp.gates import utterance_record
from localgp.model.config import gate_config

log = logging.getLogger(__name__)

IGNORE = -100  # label of the positions the loss does not count
# skip_fill "mean": its table from this many training clips (32 gave the dense WER with every padding frame skipped)
CALIBRATION_CLIPS = 32
# The corpus whose training clips calibrate the padding and silence rules' fill (localgp prepare demo's)
CALIBRATION_DATA = "data/demo/manifest.jsonl"
WORD_START = "\u2581"  # analyze's word-start mark; Whisper's BPE marks a word start by a leading space


class WhisperBaseBackbone(Backbone):
    name = "whisper-base"
    normalizer = "whisper"
    max_seconds = 30.0  # its one window (localgp.backbones.whisper.model.WINDOW_SECONDS): the rest would be cut off unread
    _vad = None  # speech_regions' Silero VAD, loaded on first use

    def directory(self) -> Path:
        from localgp.backbones.whisper.weights import default_whisper_dir

        return Path(self.config.whisper_dir) if self.config.whisper_dir else default_whisper_dir()

    def build(self, texts=None, gated: bool = True):
        """Whisper base from base.pt in fp32, gated by config.gates unless gated=False, and
        Whisper's multilingual tokenizer. `texts` is unused: the tokenizer is Whisper's own."""
        from localgp.backbones.whisper.model import gate_whisper
        from localgp.backbones.whisper.weights import load_whisper

        model = load_whisper(self.directory()).float()
        if gated:
            gate_whisper(model, gate_config(self.config.gates))
        self.tokenizer = whisper_tokenizer(model)
        self.n_mels, self.n_text_ctx = model.dims.n_mels, model.dims.n_text_ctx
        return model, self.tokenizer

    def prepare_gates(self, model, examples) -> None:
        """skip_fill "mean": calibrates the skip values on up to CALIBRATION_CLIPS distinct training
        clips (spread over the corpus in its order), in batches of 8: the mean module outputs at the
        padding after each clip's speech."""
        pruning = getattr(model.encoder, "pruning", None)
        if pruning is None or pruning.config.skip_fill != "mean":
            return
        clips = list({e.utterance.id: e.utterance for e in examples}.values())
        clips = clips[:: max(len(clips) // CALIBRATION_CLIPS, 1)][:CALIBRATION_CLIPS]
        from localgp.backbones.whisper.model import speech_frames

        device = next(model.parameters()).device
        groups = [[u.load() for u in clips[i : i + 8]] for i in range(0, len(clips), 8)]
        log.info("calibrating the skip values on %d training clips", len(clips))
        model.encoder.calibrate_skip_values((self.mel(waves).to(device) for waves in groups),
                                            [torch.tensor([speech_frames(len(w)) for w in waves]) for waves in groups])

    def apply_rule(self, model, rule, calibration: str | Path | None = None) -> None:
        """The plain model under a training-free rule (localgp.backbones.whisper.model.gate_whisper_rule). The
        padding and silence rules' fill: the skip values calibrated as prepare_gates does on the
        training clips of `calibration` (a `localgp prepare demo` manifest; None: CALIBRATION_DATA),
        cached in <whisper dir>/skip-values/ by the weights' and the manifest's sha256."""
        from localgp.backbones.whisper.model import gate_whisper_rule

        try:
            gate_whisper_rule(model, rule)
        except ValueError as err:
            raise UserError(str(err)) from None
        if rule.name == "attention":
            return
        manifest = Path(calibration or CALIBRATION_DATA)
        if not manifest.is_file():
            raise UserError(f"the {rule.name} rule's fill is calibrated on {CALIBRATION_CLIPS} training clips of a "
                            f"corpus: {manifest} does not exist (`localgp prepare demo` builds data/demo; or give "
                            f"--calibration MANIFEST)")
        key = json.dumps({"weights": self.weights_identity(), "manifest": file_sha256(manifest),
                          "clips": CALIBRATION_CLIPS}, sort_keys=True)
        cache = self.directory() / "skip-values" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        table = model.encoder.pruning.skip_values
        if cache.is_file():
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            table.set(saved["values"].to(table.values), int(saved["clips"]))
            log.info("%s rule: skip values of %d clips of %s read from %s", rule.name, table.clips, manifest, cache)
            return
        from localgp.data.demo_corpus import load_manifest

        splits = load_manifest(manifest)
        if not splits.get("train"):
            raise UserError(f"--calibration {manifest}: no train split to calibrate the {rule.name} rule's fill on")
        from localgp.data.examples import make_examples

        self.prepare_gates(model, make_examples(splits["train"], ("asr",)))
        log.info("%s rule: skip values calibrated on %d training clips of %s", rule.name, table.clips, manifest)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(cache, lambda tmp: torch.save({"values": table.values.cpu(), "clips": table.clips}, tmp))
            log.info("%s rule: skip values cached in %s", rule.name, cache)
        except OSError as err:
            log.warning("%s rule: could not cache the skip values in %s (%s): every command calibrates them again",
                        rule.name, cache, err)

    def weights_identity(self) -> dict:
        """base.pt's sha256 (from prepare_whisper's manifest.json when it has it)."""
        directory = self.directory()
        try:
            sha = json.loads((directory / "manifest.json").read_text())["files"]["base.pt"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            sha = file_sha256(directory / "base.pt")
        return {"model": self.name, "base.pt sha256": sha}

    # ---------------------------------------------------------------- data
    def supports(self, source: str, target: str) -> bool:
        return target == source or target == "en"  # Whisper's only translation direction: into English

    def task(self, example) -> str:
        return "translate" if example.is_translation else "transcribe"

    def prompt(self, example) -> list[int]:
        tok = self.tokenizer
        return [tok.sot, tok.to_language_token(example.utterance.language),
                tok.translate if example.is_translation else tok.transcribe, tok.no_timestamps]

    def text_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(" " + text.strip())

    def check_examples(self, examples) -> None:
        from whisper.tokenizer import LANGUAGES

        for e in examples:
            if e.utterance.language not in LANGUAGES:
                raise UserError(f"utterance {e.utterance.id!r}: Whisper knows no language {e.utterance.language!r}")
            if not self.supports(e.utterance.language, e.target_language):
                raise UserError(f"utterance {e.utterance.id!r}: Whisper cannot translate {e.utterance.language} into "
                                 f"{e.target_language} (into English only)")
        longest = self.n_text_ctx - 5  # the 4 prompt tokens and <|endoftext|>
        for e in examples:
            if len(self.text_tokens(e.target_text)) > longest:
                raise UserError(f"utterance {e.utterance.id!r}: its {e.target_language} text has more than {longest} "
                                 f"tokens, beyond Whisper's {self.n_text_ctx}-token context")

    def prompt_context(self, example) -> list[int]:
        return self.prompt(example)[1:3]

    def mel(self, waves) -> torch.Tensor:
        """(B, n_mels, 3000): Whisper's log-mel spectrogram of each clip (16 kHz float32 arrays)
        padded or trimmed to 30 s."""
        import whisper

        return torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(w)), n_mels=self.n_mels)
                            for w in waves])

    def collate(self, examples) -> dict[str, torch.Tensor]:
        """The batch; with a GateConfig.prior also `rule_keep` (B, 1500) bool, its rule's frames."""
        eot = self.tokenizer.eot
        inputs, labels = [], []
        for e in examples:
            prompt, text = self.prompt(e), self.text_tokens(e.target_text)
            inputs.append(torch.tensor(prompt + text))
            labels.append(torch.tensor([IGNORE] * (len(prompt) - 1) + text + [eot]))
        pad = torch.nn.utils.rnn.pad_sequence
        waves = [e.utterance.load() for e in examples]
        batch = {"mel": self.mel(waves), "tokens": pad(inputs, batch_first=True, padding_value=eot),
                 "lengths": torch.tensor([len(x) for x in inputs]),
                 "labels": pad(labels, batch_first=True, padding_value=IGNORE)}
        prior = gate_config(self.config.gates).prior if self.config.gates else None
        if prior:
            from localgp.model.config import parse_rule

            batch["rule_keep"] = self.rule_frames(parse_rule(prior), waves, [e.utterance for e in examples])
        return batch

    def rule_frames(self, rule, waves, utterances) -> torch.Tensor:
        """(B, 1500) bool: the frames the padding or silence rule keeps of each clip's window (the
        silence rule from speech_regions; to the padding rule every frame of the audio is one)."""
        from localgp.backbones.whisper.model import SAMPLE_RATE, WINDOW_SECONDS, frame_kinds, rule_keep

        regions = [self.speech_regions(u, w) if rule.name == "silence" else [] for u, w in zip(utterances, waves)]
        return rule_keep(rule, frame_kinds([min(len(w), SAMPLE_RATE * WINDOW_SECONDS) for w in waves], regions))

    def speech_regions(self, utterance, wave) -> list[tuple[int, int]]:
        """The VAD's speech regions (sample ranges) of a clip: the utterance's own (`speech`, as
        transcribe's windows carry them), else Silero VAD's on the clip (localgp.longform.vad)."""
        regions = getattr(utterance, "speech", None)
        if regions is not None:
            return regions
        if self._vad is None:
            from localgp.longform.vad import SileroVAD

            self._vad = SileroVAD()
        return self._vad(wave)

    def forward(self, model, batch) -> StepOutput:
        """Encoder on the mel, decoder on the prompt + text: the mean cross-entropy of the text's
        tokens and <|endoftext|>. A prior's frames (`rule_keep`) go to the encoder first."""
        if "rule_keep" in batch:
            model.encoder.set_rule_keep(batch["rule_keep"])
        features = model.encoder(batch["mel"])
        if hasattr(model.decoder, "pruning"):
            logits = model.decoder(batch["tokens"], features, lengths=batch["lengths"])
        else:  # plain Whisper decoder: causal, so the padding after a sequence changes nothing before it
            logits = model.decoder(batch["tokens"], features).float()
        targets = batch["labels"] != IGNORE
        loss = F.cross_entropy(logits[targets], batch["labels"][targets])
        return StepOutput(loss, logits, targets)

    # ---------------------------------------------------------------- decoding
    def encoder_masks(self, model, speech):
        """Over the whole 30 s window Whisper computes (the masks of its padding included)."""
        from localgp.model.convert import set_execution

        pruning = getattr(model.encoder, "pruning", None)
        if pruning is None or pruning.config.encoder != "temporal":
            raise UserError("encoder_masks: the mask figure needs an encoder gated per frame (gates.encoder: "
                             f"temporal), this one is gated {pruning.config.encoder if pruning else 'not at all'}")
        wave = np.asarray(speech, dtype=np.float32)
        mel = self.mel([wave])
        rule = getattr(model.encoder, "rule", None)
        if rule is not None and rule.name != "attention":  # a prior's frames (GateConfig.prior)
            model.encoder.set_rule_keep(self.rule_frames(rule, [wave], [None]).to(next(model.parameters()).device))
        set_execution(model, "masked")
        model.eval()
        with torch.no_grad():
            model.encoder(mel.to(next(model.parameters()).device))
        masks = {name: mask[0].float().cpu().numpy() for name, mask in model.encoder.last_record.masks.items()}
        return mel[0].T.numpy(), masks

    def decode_options(self, options=None) -> WhisperDecodeOptions:
        if options is None:
            return WhisperDecodeOptions()
        if isinstance(options, WhisperDecodeOptions):
            return options
        if not isinstance(options, DecodeOptions):
            raise TypeError(f"decode: Whisper decodes with WhisperDecodeOptions or DecodeOptions, got "
                            f"{type(options).__name__}")
        default = DecodeOptions()
        unused = [name for name in ("nbest", "ctc_weight", "pre_beam_ratio", "penalty", "maxlenratio", "minlenratio",
                                    "fixed_length") if getattr(options, name) != getattr(default, name)]
        if unused:
            raise UserError(f"decode: {', '.join(unused)} do not apply to Whisper's beam search (it has no CTC, and "
                             f"its own length rules); leave them at their defaults")
        return WhisperDecodeOptions(beam_size=options.beam_size, execution=options.execution)

    def corpus_decoder(self, model, contexts, options, device: str = "cpu", dtype: str = "float32"):
        return WhisperCorpusDecoder(self, model, contexts, self.decode_options(options), device, dtype)


def token_piece(tokenizer, token_id: int) -> str:
    """A token as text, its leading space (a word start in Whisper's BPE) written as analyze's ▁."""
    text = tokenizer.encoding.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
    return WORD_START + text[1:] if text.startswith(" ") else text


class WhisperCorpusDecoder:
    """Decodes examples of a corpus with a Whisper model (plain or gated): the batch's clips go
    through the encoder together, then one beam search per task (transcribe, translate)."""

    def __init__(self, backbone: WhisperBaseBackbone, model, contexts, options: WhisperDecodeOptions,
                 device: str = "cpu", dtype: str = "float32"):
        self.backbone, self.model, self.contexts, self.options = backbone, model, contexts, options
        self.device = ready_for_decoding(model, options.execution, device, dtype)
        self.search = WhisperBeamSearch(model, options)
        self.dtype = next(model.parameters()).dtype
        self.last_hypotheses: list = []  # the last batch's best hypotheses (detected language, avg_logprob)
        self.gated_encoder = getattr(model.encoder, "pruning", None) is not None
        self.rule = getattr(model.encoder, "rule", None)
        self.encoder_seconds = self.decoder_seconds = 0.0  # totals over the batches decoded (the beam searches)
        self.dense_encoder_gflops = flops.whisper_encoder_macs(flops.WhisperShape.of_encoder(model.encoder))["total"] / 1e9

    @torch.no_grad()
    def batch(self, examples) -> list[Decoded]:
        from localgp.backbones.whisper.model import (
            SAMPLE_RATE,
            WINDOW_SECONDS,
            frame_kinds,
            frames_sparsity,
            rule_keep,
            sparsity_by_kind,
            speech_frames,
        )

        waves = [e.utterance.load() for e in examples]
        samples = [min(len(w), SAMPLE_RATE * WINDOW_SECONDS) for w in waves]  # what the 30 s window holds
        kinds = None
        vad_started = time.perf_counter()
        if self.gated_encoder:  # which frames are padding, silence, speech: the sparsity by kind (and the rules)
            kinds = frame_kinds(samples, [self.backbone.speech_regions(e.utterance, w) for e, w in zip(examples, waves)],
                                self.model.encoder.positional_embedding.shape[0])
            if self.rule is not None and self.rule.name != "attention":
                self.model.encoder.set_rule_keep(rule_keep(self.rule, kinds).to(self.device))
        # The VAD is the silence rule's cost; for the others it only measures (their time starts after it).
        started = vad_started if self.rule is not None and self.rule.name == "silence" else time.perf_counter()
        self.contexts(examples)
        mel = self.backbone.mel(waves).to(self.device, self.dtype)
        encoding = time.perf_counter()
        features = self.model.encoder(mel)
        searching = time.perf_counter()
        self.encoder_seconds += searching - encoding
        encoder_seconds = (searching - encoding) / len(examples)
        record = self.model.encoder.last_record if self.gated_encoder else None
        best, decoder_gflops = [None] * len(examples), [0.0] * len(examples)
        for task in ("transcribe", "translate"):
            rows = [b for b, e in enumerate(examples) if self.backbone.task(e) == task]
            if not rows:
                continue
            index = torch.tensor(rows, device=self.device)
            hyps = self.search(features.index_select(0, index), [examples[b].utterance.language for b in rows], task)
            # One search runs these clips together: each gets an equal share of its decoder MACs.
            share = self.search.decoder.macs / len(rows) / 1e9
            for b, hyp in zip(rows, hyps, strict=True):
                best[b], decoder_gflops[b] = hyp, share
        self.decoder_seconds += time.perf_counter() - searching
        seconds = (time.perf_counter() - started) / len(examples)
        self.last_hypotheses = best
        tok, primer_length = self.backbone.tokenizer, 4
        records = []
        for b, (example, hyp) in enumerate(zip(examples, best, strict=True)):
            sparsity, src_keep = decoder_keep(hyp, primer_length)
            encoder_gflops, all_frames, speech, by_kind = self.dense_encoder_gflops, None, None, {}
            if record is not None:
                by_kind = sparsity_by_kind(enc_record := utterance_record(record, b), kinds[b : b + 1])
                sparsity = {**enc_record.sparsity_per_module(), **sparsity}
                encoder_gflops = flops.executed_whisper_encoder_macs(self.model.encoder, record=enc_record)["total"] / 1e9
                all_frames = _finite(frames_sparsity(enc_record))
                speech = _finite(frames_sparsity(enc_record, torch.tensor([speech_frames(samples[b])])))
            records.append(Decoded(
                id=record_id(example), language=example.utterance.language, target_language=example.target_language,
                reference=example.target_text, hypothesis=hyp.text, encoder_gflops=encoder_gflops, seconds=seconds,
                sparsity=sparsity, tokens=[token_piece(tok, i) for i in hyp.token_ids] if src_keep else [],
                src_attn_keep=src_keep, decoder_gflops=decoder_gflops[b], encoder_seconds=encoder_seconds,
                encoder_sparsity=all_frames, encoder_speech_sparsity=speech, normalizer=WhisperBaseBackbone.normalizer,
                frames_skipped=by_kind))
        return records


def _finite(value: float) -> float | None:
    """None for frames_sparsity's NaN (no temporal mask: an encoder gated per utterance)."""
    return None if math.isnan(value) else value
