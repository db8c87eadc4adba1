"""The OWSM backbone: ESPnet's S2T model (OWSM v3.1 architecture) with OWSM prompts
(<lang><asr|st_xx><notimestamps>), a BPE tokenizer trained on the corpus (or a snapshot's),
ESPnet's own loss (attention decoder + CTC), and localgp's batched ESPnet beam search."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from localgp import flops
from localgp.backbones import Backbone, StepOutput, ready_for_decoding
from localgp.data.examples import record_id
from localgp.backbones.owsm.tokenizer import Tokenizer
from localgp.backbones.owsm.decoding import BatchBeamSearch
from localgp.decoding import DecodeOptions
from localgp.evaluate import Decoded
from localgp.decoding.beam import decoder_keep
from localgp.gates import GateRecord, utterance_record
from localgp.model.config import gate_config
from localgp.errors import UserError


class OwsmBackbone(Backbone):
    name = "owsm"
    normalizer = "localgp"

    def build(self, texts=None, gated: bool = True):
        """An OWSM snapshot's model and tokenizer (config.init), or a `preset` model with random
        weights and the BPE tokenizer in out_dir/tokenizer, trained on texts() when it is not
        there yet (None: it must be there)."""
        from localgp.backbones.owsm import weights as owsm
        from localgp.backbones.owsm.model import gate_s2t_model

        config = self.config
        if config.init:
            model, args = owsm.load_owsm(config.init)
            if not args.bpemodel:
                raise UserError(f"{config.init}: the snapshot names no BPE model")
            tokenizer = Tokenizer(args.bpemodel, args.token_list)
        else:
            if not gated:
                raise UserError("a dense OWSM model needs pretrained weights: set `init` to an OWSM snapshot "
                                 "(a preset model has random weights)")
            tokenizer_dir = Path(config.out_dir) / "tokenizer"
            if (tokenizer_dir / "tokens.txt").exists():
                tokenizer = Tokenizer.load(tokenizer_dir)
            elif texts is None:
                raise FileNotFoundError(f"{tokenizer_dir / 'tokens.txt'} does not exist (localgp train writes it)")
            else:
                tokenizer = Tokenizer.train(texts(), tokenizer_dir, config.vocab_size)
            model, _ = owsm.build_owsm(config.preset, token_list=tokenizer.token_list)
        if gated:
            gate_s2t_model(model, gate_config(config.gates))
        self.tokenizer = tokenizer
        return model, tokenizer

    def check_examples(self, examples) -> None:
        for source, target in sorted({(e.utterance.language, e.target_language) for e in examples}):
            self.tokenizer.prompt(source, target)  # a language the model has no token for fails now, not mid-run

    def prompt_context(self, example) -> list[int]:
        return self.tokenizer.prompt(example.utterance.language, example.target_language)[:2]

    def collate(self, examples) -> dict[str, torch.Tensor]:
        """The S2T model's inputs: waveforms, prompt + target ids, <na> as previous text, and the
        source transcript for CTC."""
        tokenizer = self.tokenizer
        waves = [torch.from_numpy(e.utterance.load()) for e in examples]
        texts = [torch.tensor(tokenizer.prompt(e.utterance.language, e.target_language)
                              + tokenizer.encode(e.target_text)) for e in examples]
        ctc = [torch.tensor(tokenizer.encode(e.utterance.text)) for e in examples]
        pad = torch.nn.utils.rnn.pad_sequence
        lengths = lambda xs: torch.tensor([len(x) for x in xs])  # noqa: E731
        na = tokenizer.id_of["<na>"]
        return {"speech": pad(waves, batch_first=True), "speech_lengths": lengths(waves),
                "text": pad(texts, batch_first=True, padding_value=-1), "text_lengths": lengths(texts),
                "text_prev": torch.full((len(examples), 1), na), "text_prev_lengths": torch.ones(len(examples), dtype=torch.long),
                "text_ctc": pad(ctc, batch_first=True, padding_value=-1), "text_ctc_lengths": lengths(ctc)}

    def forward(self, model, batch) -> StepOutput:
        """ESPnet's loss (its attention decoder and CTC); the decoder's logits are taken from its
        output as ESPnet computes them: input <sos> + prompt + text, targets prompt + text + <eos>."""
        captured = []
        hook = model.decoder.register_forward_hook(lambda _module, _inputs, out: captured.append(out[0]))
        try:
            loss, _, _ = model(**batch)
        finally:
            hook.remove()
        logits = captured[-1]
        positions = torch.arange(logits.shape[1], device=logits.device)
        return StepOutput(loss, logits, positions[None] < (batch["text_lengths"] + 1)[:, None])

    def encoder_masks(self, model, speech):
        return encoder_masks(model, speech)

    def decode_options(self, options=None) -> DecodeOptions:
        if options is None:
            return DecodeOptions()
        if not isinstance(options, DecodeOptions):
            raise TypeError(f"decode: the OWSM backbone decodes with DecodeOptions, got {type(options).__name__}")
        return options

    def corpus_decoder(self, model, contexts, options, device: str = "cpu", dtype: str = "float32"):
        return OwsmCorpusDecoder(model, self.tokenizer, contexts, options, device, dtype)


def encoder_gflops(encoder, record: GateRecord | None, input_frames: int) -> float:
    """GMACs the encoder executed for one utterance under its masks `record` (None: an ungated
    encoder, every module)."""
    if record is None:
        return flops.encoder_macs(flops.EncoderShape.of_encoder(encoder), input_frames)["total"] / 1e9
    return flops.executed_encoder_macs(encoder, [input_frames], record=record)["total"] / 1e9


class OwsmCorpusDecoder:
    """Decodes examples (utterance, target language) of a corpus with an OWSM model."""

    def __init__(self, model, tokenizer, contexts, options: DecodeOptions, device: str = "cpu", dtype: str = "float32"):
        self.model, self.tokenizer, self.contexts, self.options = model, tokenizer, contexts, options
        self.device = ready_for_decoding(model, options.execution, device, dtype)
        self.search = BatchBeamSearch(model, options)

    @torch.no_grad()
    def batch(self, examples) -> list[Decoded]:
        started = time.perf_counter()
        self.contexts(examples)
        tok = self.tokenizer
        prompts = [tok.prompt(e.utterance.language, e.target_language) for e in examples]
        encoder = self.model.encoder
        waves = [torch.from_numpy(e.utterance.load()) for e in examples]
        lengths = torch.tensor([len(w) for w in waves])
        speech = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(self.device)
        encoding = time.perf_counter()
        memory, memory_lens = self.model.encode(speech, lengths.to(self.device))
        encoder_seconds = (time.perf_counter() - encoding) / len(examples)
        record = encoder.last_record if getattr(encoder, "pruning", None) is not None else None
        primers = torch.tensor([[self.model.sos, *p] for p in prompts], device=self.device)
        hyps = self.search(memory, memory_lens, primers)
        # The search runs the batch's utterances together; each gets an equal share of its MACs.
        decoder_gflops = self.search.decoder.macs / len(examples) / 1e9
        seconds = (time.perf_counter() - started) / len(examples)
        records = []
        for b, (example, nbest) in enumerate(zip(examples, hyps, strict=True)):
            best = nbest[0] if nbest else None
            ids = best.token_ids if best else []
            sparsity, src_keep = decoder_keep(best, primers.shape[1]) if best else ({}, [])
            enc_record = None if record is None else utterance_record(record, b)
            if enc_record is not None and enc_record.masks:
                sparsity = {**enc_record.sparsity_per_module(), **sparsity}
            input_frames = flops.input_frames(int(lengths[b]) / flops.SAMPLE_RATE)
            records.append(Decoded(
                id=record_id(example), language=example.utterance.language, target_language=example.target_language,
                reference=example.target_text, hypothesis=tok.decode(ids),
                encoder_gflops=encoder_gflops(encoder, enc_record, input_frames), seconds=seconds, sparsity=sparsity,
                tokens=[tok.token_list[i] for i in ids] if src_keep else [], src_attn_keep=src_keep,
                decoder_gflops=decoder_gflops, encoder_seconds=encoder_seconds, normalizer=OwsmBackbone.normalizer))
        return records


def encoder_masks(model, speech) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Runs a gated S2T model's encoder on one utterance, speech (samples,) at 16 kHz, in masked
    execution with the inference decisions; its contexts must be set. Returns the log-mel
    spectrogram (T_in, mels) exactly as the model's own frontend computed it for this pass
    (ESPnet's DefaultFrontend: log mel power, 10 ms hop, before global MVN), and
    'encoder.<layer>.<module>' -> (T_enc,) keep masks (0/1) over the valid frames."""
    import torch

    from localgp.model.convert import set_execution

    pruning = getattr(model.encoder, "pruning", None)
    if pruning is None or pruning.config.encoder != "temporal":
        raise UserError("encoder_masks: the mask figure needs an encoder gated per frame (gates.encoder: temporal), "
                         f"this one is gated {pruning.config.encoder if pruning else 'not at all'}")
    if model.frontend is None:
        raise UserError("encoder_masks: the model has no frontend to compute the log-mel spectrogram")
    speech = torch.as_tensor(speech, dtype=torch.float32)
    captured = []  # the frontend's own output: the spectrogram the masks were computed on
    hook = model.frontend.register_forward_hook(lambda _module, _inputs, out: captured.append(out[0]))
    set_execution(model, "masked")
    model.eval()
    try:
        with torch.no_grad():
            _, lengths = model.encode(speech[None], torch.tensor([speech.shape[0]]))
    finally:
        hook.remove()
    frames = int(lengths[0])
    record = model.encoder.last_record
    masks = {name: mask[0, :frames].float().numpy() for name, mask in record.masks.items()}
    return captured[0][0].numpy(), masks
