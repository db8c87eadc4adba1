"""`localgp decode`: a trained run's model decodes a corpus split, batch by batch, into Decoded
records (JSONL, appended and flushed per batch: an interrupted decode keeps what it finished
and a new call resumes after it)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from localgp import flops
from localgp.decoding import MODULES, BatchBeamSearch, DecodeOptions
from localgp.evaluate import Decoded, append_decoded, read_decoded
from localgp.gates import GateRecord

log = logging.getLogger(__name__)


def record_id(example) -> str:
    """One record per utterance and task: '<utterance id>:<target language>'."""
    return f"{example.utterance.id}:{example.target_language}"


def utterance_record(record: GateRecord, b: int) -> GateRecord:
    """The masks of utterance b of a batch's record."""
    return GateRecord({k: m[b : b + 1] for k, m in record.masks.items()},
                      {k: v[b : b + 1] for k, v in record.valid.items()})


def encoder_gflops(encoder, record: GateRecord | None, input_frames: int) -> float:
    """GMACs the encoder executed for one utterance under its masks `record` (None: an ungated
    encoder, every module)."""
    if record is None:
        return flops.encoder_macs(flops.EncoderShape.of_encoder(encoder), input_frames)["total"] / 1e9
    return flops.executed_encoder_macs(encoder, [input_frames], record=record)["total"] / 1e9


def decoder_keep(hypothesis, primer_length: int) -> tuple[dict[str, float], list[float]]:
    """Skipped share per decoder module over the hypothesis' fed positions, and for each output
    token the share of layers that kept src-attention while predicting it (the position before)."""
    keep = hypothesis.keep
    if keep is None:
        return {}, []
    skipped = {f"decoder.{m}": 1 - float(keep[:, :, i].float().mean()) for i, m in enumerate(MODULES)}
    src = keep[:, :, MODULES.index("src_attn")].float().mean(1)  # (positions,)
    per_token = [float(src[primer_length - 1 + j]) for j in range(len(hypothesis.token_ids))]
    return skipped, per_token


class CorpusDecoder:
    """Decodes examples (utterance, target language) of a corpus with a trained model."""

    def __init__(self, model, tokenizer, contexts, options: DecodeOptions, device: str = "cpu"):
        from localgp.model.convert import gated_parts, set_execution

        self.model, self.tokenizer, self.contexts, self.options = model, tokenizer, contexts, options
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        if gated_parts(model):
            set_execution(model, options.execution)
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
        memory, memory_lens = self.model.encode(speech, lengths.to(self.device))
        record = encoder.last_record if getattr(encoder, "pruning", None) is not None else None
        primers = torch.tensor([[self.model.sos, *p] for p in prompts], device=self.device)
        hyps = self.search(memory, memory_lens, primers)
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
                tokens=[tok.token_list[i] for i in ids] if src_keep else [], src_attn_keep=src_keep))
        return records


def decode_run(run_dir: str | Path, out_path: str | Path, split: str = "test", options: DecodeOptions = DecodeOptions(),
               batch_size: int = 8, tasks=("asr", "st"), device: str = "cpu", limit: int | None = None) -> list[Decoded]:
    """Decodes `split` of the corpus a `localgp train` run was trained on (its data, with the
    split replaced) into out_path, resuming after the records already there. Returns all records."""
    from tqdm import tqdm

    from localgp.train import ContextFeeder, load_corpus, load_trained, make_examples

    if batch_size < 1:
        raise ValueError(f"decode: batch_size must be >= 1, got {batch_size}")
    model, tokenizer, config = load_trained(run_dir)
    data = dict(config.data)
    if data.get("kind") in ("manifest", "europarl"):
        data["split"] = split
    elif split != "test":
        raise ValueError(f"decode: the run's data kind {data.get('kind')!r} has no splits; leave split at 'test'")
    examples = make_examples(load_corpus(data), tasks)[:limit]
    out_path = Path(out_path)
    done = {r.id for r in read_decoded(out_path)} if out_path.exists() else set()
    todo = [e for e in examples if record_id(e) not in done]
    if done:
        log.info("decode: %d records already in %s, %d to go", len(done), out_path, len(todo))
    contexts = ContextFeeder(model, config.context_extractors, Path(run_dir) / "context", tokenizer)
    decoder = CorpusDecoder(model, tokenizer, contexts, options, device)
    with tqdm(total=len(todo), desc="decode") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            append_decoded(decoder.batch(batch), out_path)
            bar.update(len(batch))
    return read_decoded(out_path)

