"""`localgp decode`: a trained run's model (or a backbone's plain pretrained model) decodes a
corpus split, batch by batch, into Decoded records (JSONL, appended and flushed per batch: an
interrupted decode keeps what it finished and a new call resumes after it). The batches go
through the backbone's own corpus decoder (localgp.backbones).

Beside the records, `<out>.source.json` says what produced them (the model: the run's checkpoint
or the pretrained weights; the corpus and split; the decode options): a resume by anything else
is refused, as its records would be mixed with these.

Under torchrun, the batches (formed as one process forms them) are dealt out to the processes,
balanced by audio length; each appends its records to `<out>.rank<r>` (resumable like <out>),
and when all are done rank 0 merges them into <out>, in the order one process writes them. A
rerun after a crash decodes what no file holds yet, on any number of processes."""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import logging
import re
from pathlib import Path

from localgp import distributed
from localgp.data.examples import record_id
from localgp.errors import UserError
from localgp.files import read_json, replace_atomically, write_text_atomically
from localgp.evaluate import Decoded, append_decoded, read_decoded

log = logging.getLogger(__name__)

# The process group of a decode carries only the plan and the final wait for the slowest rank, which
# may finish long after the others on a large corpus: Gloo (on GPUs too), with a long timeout.
DECODE_TIMEOUT = datetime.timedelta(days=1)


def decode_run(run_dir: str | Path | None, out_path: str | Path, split: str = "test", options=None,
               batch_size: int = 8, tasks=("asr", "st"), device: str = "cpu", limit: int | None = None,
               model: str | None = None, data: dict | str | None = None,
               whisper_dir: str | None = None, skip_bad_audio: bool = False,
               overwrite: bool = False, gates: str | None = None, dtype: str = "float32") -> list[Decoded]:
    """Decodes `split` of a corpus into out_path, resuming after the records already there.
    Returns all records.

    run_dir: a `localgp train` run; its own corpus (its data, with the split replaced) is decoded.
    Or run_dir=None and model= a backbone name (e.g. "whisper-base"): its plain pretrained model,
    ungated (the zero-shot baseline), on `data` (TrainConfig.data, or a manifest path); with gates=
    "default" (the release gates) or a gates file (localgp.release) that model gated; with gates=
    a training-free rule (padding, silence, attention[:BLOCK:KEEP]) on it, the padding and silence
    rules' fill calibrated on the training clips of `data` (a manifest).
    options: the backbone's decode options (None: its defaults; see Backbone.decode_options).
    skip_bad_audio: leave out (and log) utterances whose audio cannot be used, instead of stopping.
    dtype: float32, bfloat16 or int8 on the CPU, float16/bfloat16 on a GPU (see
    backbones.ready_for_decoding); recorded with the source unless float32.
    overwrite: start over, discarding the records in out_path (and their source), instead of
    resuming them or refusing them as another decode's.
    """
    from tqdm import tqdm

    from localgp.context.feeder import ContextFeeder
    from localgp.data.examples import load_corpus, make_examples
    from localgp.files import file_sha256
    from localgp.model.packed import check_precision
    from localgp.release import is_gates_file, load_gates
    from localgp.runs import check_device, checkpoint_path, dense_model, load_run, rule_model

    if batch_size < 1:
        raise UserError(f"decode: batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"decode: limit must be >= 1 (or None: every example), got {limit}")
    if not tasks or not set(tasks) <= {"asr", "st"}:
        raise UserError(f"decode: tasks must be asr, st or both, got {','.join(tasks)!r}")
    check_precision(dtype, check_device(device))
    ctx = distributed.setup(check_device(device), backend="gloo", timeout=DECODE_TIMEOUT)
    if isinstance(data, (str, Path)):
        data = {"kind": "manifest", "path": str(data)}
    out_path = Path(out_path)
    if out_path.exists() and not out_path.is_file():
        raise UserError(f"--out {out_path} is a directory, not a file of records: decode into another --out")
    if run_dir is not None:
        if model is not None or data is not None or whisper_dir is not None or gates is not None:
            raise UserError("decode: a run directory brings its own model and corpus; model=, data=, whisper_dir= "
                             "and gates= are for decoding a plain pretrained model without one")
        run = load_run(run_dir)
        data, cache = dict(run.config.data), Path(run_dir) / "context"
        produced_by = {"checkpoint sha256": file_sha256(checkpoint_path(run_dir))}
    elif model is None or data is None:
        raise UserError("decode: give a run directory, or model= (a backbone name) and data= (its corpus)")
    elif is_gates_file(gates):
        run, identity = load_gates(gates, whisper_dir)
        if run.backbone.name != model:
            raise UserError(f"--gates {gates}: gates of backbone {run.backbone.name}, not of --model {model}")
        cache = out_path.parent / "context"  # the gates' contexts of this corpus
        produced_by = {"model": model, **identity}
    elif gates is not None:
        calibration = data["path"] if data.get("kind") == "manifest" else None
        run = rule_model(model, gates, data, whisper_dir, calibration)
        cache = out_path.parent / "context"  # a rule reads no context
        produced_by = {"model": model, "gates": run.model.encoder.rule.label, **run.backbone.weights_identity()}
    else:
        run = dense_model(model, data, whisper_dir)
        cache = out_path.parent / "context"  # the plain model has no gates: no context is computed
        produced_by = {"model": model, **(run.backbone.weights_identity() or {"init": run.config.init})}
    if data.get("kind") in ("manifest", "europarl"):
        data["split"] = split
    elif split != "test":
        raise UserError(f"decode: the data kind {data.get('kind')!r} has no splits; leave split at 'test'")
    options = run.backbone.decode_options(options)
    utterances = load_corpus(data, skip_bad_audio, run.backbone.max_seconds)
    examples = make_examples(utterances, tasks, run.backbone.supports)[:limit]
    corpus = {**data, "path": str(Path(data["path"]).resolve())} if "path" in data else data
    source = {"model": produced_by, "data": corpus, "options": dataclasses.asdict(options)}
    if dtype != "float32":  # float32 records' sources (from before --dtype) stay as they were
        source["dtype"] = dtype
    done = distributed.on_main(ctx, lambda: claim_records(out_path, source, overwrite))
    # ASR before ST: batches of one task where the backbone searches task by task (Whisper).
    todo = sorted((e for e in examples if record_id(e) not in done), key=lambda e: e.is_translation)
    if done:
        log.info("decode: %d records already in %s, %d to go", len(done), out_path, len(todo))
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    target = out_path
    if ctx.active:  # this rank's batches, into its own file
        shares = distributed.on_main(ctx, lambda: distributed.balance(
            [sum(audio_seconds(e.utterance) for e in batch) for batch in batches], ctx.world))
        counts = [sum(len(batches[i]) for i in share) for share in shares]
        batches, target = [batches[i] for i in shares[ctx.rank]], part_path(out_path, ctx.rank)
        log.info("decode: %d processes decode %s examples, into %s.rank<r>", ctx.world, counts, out_path.name)
    contexts = ContextFeeder(run.model, run.config.context_extractors, cache, run.backbone.prompt_context)
    decoder = run.backbone.corpus_decoder(run.model, contexts, options, str(ctx.device), dtype)
    with tqdm(total=sum(map(len, batches)), desc="decode", disable=not ctx.main) as bar:
        for batch in batches:
            append_decoded(decoder.batch(batch), target)
            bar.update(len(batch))
    distributed.barrier(ctx)  # every rank's records are written
    order = [record_id(e) for e in sorted(examples, key=lambda e: e.is_translation)]
    distributed.on_main(ctx, lambda: merge_parts(out_path, order))
    return read_decoded(out_path)


def source_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".source.json")


def part_path(out_path: Path, rank: int) -> Path:
    """The records rank `rank` of a torchrun decode writes, until they are merged into out_path."""
    return out_path.with_name(f"{out_path.name}.rank{rank}")


def part_paths(out_path: Path) -> list[Path]:
    """Every rank's records beside out_path, left by this decode or by one that crashed (on
    another number of processes, maybe)."""
    found = glob.glob(glob.escape(str(out_path)) + ".rank*")
    return sorted((Path(p) for p in found if re.fullmatch(r"\d+", p[len(str(out_path)) + 5 :])),
                  key=lambda p: int(p.name.rsplit(".rank", 1)[1]))


def claim_records(out_path: Path, source: dict, overwrite: bool) -> set[str]:
    """The ids of the records of `source` already decoded into out_path and its ranks' files
    (claim_output refuses another source's; overwrite removes them all first). A last line that a
    killed rank cut short is dropped from its file: that record is decoded again."""
    parts = part_paths(out_path)
    if overwrite:
        for path in (out_path, source_path(out_path), *parts):
            if path.is_file():
                path.unlink()
                log.info("decode: removed %s (overwrite)", path)
        parts = []
    claim_output(out_path, source)
    for path in (out_path, *parts):  # a last line that a kill cut short: that record is decoded again
        data = path.read_bytes() if path.is_file() else b""
        if data and not data.endswith(b"\n") and b"\0" not in data[data.rfind(b"\n") + 1 :]:  # (NULs: zeroed)
            read_decoded(path, last_cut=True)  # the lines before it are whole records, else DamagedFile
            replace_atomically(path, lambda tmp: tmp.write_bytes(data[: data.rfind(b"\n") + 1]))
            log.warning("decode: %s: dropped its last line, cut short (a crash while writing)", path)
    return {r.id for path in (out_path, *parts) if path.is_file() for r in read_decoded(path)}


def merge_parts(out_path: Path, order: list[str]) -> None:
    """Merges the ranks' files into out_path (its records first, then theirs, sorted by `order`:
    the record ids in the order one process writes them), atomically, then removes them. A record
    in two files (a crash between this rename and the removal) is kept once."""
    parts = part_paths(out_path)
    if not parts:
        return
    records: dict[str, Decoded] = {}
    for path in (out_path, *parts):
        if path.is_file():
            for record in read_decoded(path):
                records.setdefault(record.id, record)
    position = {uid: i for i, uid in enumerate(order)}
    merged = sorted(records.values(), key=lambda r: position.get(r.id, len(position)))  # others (a --limit) last
    replace_atomically(out_path, lambda tmp: append_decoded(merged, tmp))
    for part in parts:
        part.unlink()
    log.info("decode: merged %d files into %s", len(parts), out_path)


def audio_seconds(utterance) -> float:
    """How long an utterance lasts, to share out the work: its segment, or what its file's header
    declares, or else its decoded length."""
    from localgp.data.audio import SAMPLE_RATE, declared_seconds, load_audio

    end = utterance.end
    if end is None:
        end = declared_seconds(utterance.audio)
        if end is None:
            end = len(load_audio(utterance.audio)) / SAMPLE_RATE
    return max(end - (utterance.start or 0.0), 0.0)


def claim_output(out_path: Path, source: dict) -> None:
    """Makes out_path the records of `source` (what produces them): refuses records there (or in
    its ranks' files) that something else produced, or that nothing says who produced; else
    writes <out>.source.json."""
    recorded_at = source_path(out_path)
    has_records = any(p.is_file() and p.stat().st_size > 0 for p in (out_path, *part_paths(out_path)))
    source = json.loads(json.dumps(source))  # tuples -> lists, as read back
    if has_records:
        if not recorded_at.exists():
            raise UserError(f"{out_path} holds decoded records but not what produced them ({recorded_at.name} is "
                            f"missing): decode into another --out, or start over with --overwrite")
        recorded = read_json(recorded_at, "decode into another --out, or start over with --overwrite")
        changes = differences(recorded, source)
        if changes:
            raise UserError(f"{out_path} holds records of another decode ({'; '.join(changes)}): decode into another "
                            f"--out, or start over with --overwrite")
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(recorded_at, json.dumps(source, indent=2) + "\n")


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key.subkey: old -> new' for every value of `new` that `old` does not have."""
    changes = []
    for key, value in new.items():
        before = old.get(key) if isinstance(old, dict) else None
        if isinstance(value, dict) and isinstance(before, dict):
            changes += differences(before, value, f"{prefix}{key}.")
        elif before != value:
            changes.append(f"{prefix}{key}: {before!r} -> {value!r}")
    return changes

