"""`localgp decode`: a trained run's model (or a backbone's plain pretrained model) decodes a
corpus split, batch by batch, into Decoded records (JSONL, appended and flushed per batch: an
interrupted decode keeps what it finished and a new call resumes after it). The batches go
through the backbone's own corpus decoder (localgp.backbones)."""

from __future__ import annotations

import logging
from pathlib import Path

from localgp.data.examples import record_id
from localgp.evaluate import Decoded, append_decoded, read_decoded

log = logging.getLogger(__name__)


def decode_run(run_dir: str | Path | None, out_path: str | Path, split: str = "test", options=None,
               batch_size: int = 8, tasks=("asr", "st"), device: str = "cpu", limit: int | None = None,
               model: str | None = None, data: dict | str | None = None,
               whisper_dir: str | None = None) -> list[Decoded]:
    """Decodes `split` of a corpus into out_path, resuming after the records already there.
    Returns all records.

    run_dir: a `localgp train` run; its own corpus (its data, with the split replaced) is decoded.
    Or run_dir=None and model= a backbone name (e.g. "whisper-base"): its plain pretrained model,
    ungated (the zero-shot baseline), on `data` (TrainConfig.data, or a manifest path).
    options: the backbone's decode options (None: its defaults; see Backbone.decode_options).
    """
    from tqdm import tqdm

    from localgp.context.feeder import ContextFeeder
    from localgp.data.examples import load_corpus, make_examples
    from localgp.runs import dense_model, load_run

    if batch_size < 1:
        raise ValueError(f"decode: batch_size must be >= 1, got {batch_size}")
    if isinstance(data, (str, Path)):
        data = {"kind": "manifest", "path": str(data)}
    out_path = Path(out_path)
    if run_dir is not None:
        if model is not None or data is not None or whisper_dir is not None:
            raise ValueError("decode: a run directory brings its own model and corpus; model=, data= and whisper_dir= "
                             "are for decoding a plain pretrained model without one")
        run = load_run(run_dir)
        data, cache = dict(run.config.data), Path(run_dir) / "context"
    elif model is None or data is None:
        raise ValueError("decode: give a run directory, or model= (a backbone name) and data= (its corpus)")
    else:
        run = dense_model(model, data, whisper_dir)
        cache = out_path.parent / "context"  # the plain model has no gates: no context is computed
    if data.get("kind") in ("manifest", "europarl"):
        data["split"] = split
    elif split != "test":
        raise ValueError(f"decode: the data kind {data.get('kind')!r} has no splits; leave split at 'test'")
    examples = make_examples(load_corpus(data), tasks, run.backbone.supports)[:limit]
    done = {r.id for r in read_decoded(out_path)} if out_path.exists() else set()
    # ASR before ST: batches of one task where the backbone searches task by task (Whisper).
    todo = sorted((e for e in examples if record_id(e) not in done), key=lambda e: e.is_translation)
    if done:
        log.info("decode: %d records already in %s, %d to go", len(done), out_path, len(todo))
    contexts = ContextFeeder(run.model, run.config.context_extractors, cache, run.backbone.prompt_context)
    decoder = run.backbone.corpus_decoder(run.model, contexts, run.backbone.decode_options(options), device)
    with tqdm(total=len(todo), desc="decode") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            append_decoded(decoder.batch(batch), out_path)
            bar.update(len(batch))
    return read_decoded(out_path)
