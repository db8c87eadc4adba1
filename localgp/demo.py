"""`localgp demo` (what `make demo` runs): the whole pipeline on the demo corpus.

Whisper base (the default, `--backbone whisper-base`): real pretrained weights on real speech.
1. prepares the weights (`localgp prepare whisper`) and the demo corpus (`localgp prepare demo`)
   unless they are there;
2. decodes the test split with the plain model (the dense, zero-shot row);
3. for each gated row (localGP + speaker, localGP on the speech alone, globalGP) and sparsity
   target: trains the gates of the frozen model for a bounded time, with distillation from the
   dense model, then decodes the test split in compact execution; and decodes it with the release
   gates shipped in the package (the "release" row, localgp.release);
4. writes one table (report.md, report.json `rows`): WER per language, BLEU per pair, executed
   encoder and decoder GFLOPs, sparsity (all frames / speech frames), seconds per utterance in
   compact execution and in dense execution on the same batches (the dense row's), and the mask
   figure of a test utterance; the word-start test on the decoder's src-attention decisions.
A rerun resumes: finished training runs and decoded records are reused.

OWSM (`--backbone owsm`): trains a tiny OWSM-architecture model from scratch (it recognises
nothing in minutes; the pipeline, not the quality).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from localgp.errors import UserError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ Whisper base
SPEAKER = {"speaker": {"kind": "resemblyzer"}}  # pretrained GE2E, offline, 256 values


@dataclass(frozen=True)
class Row:
    model: str  # report.json's row name
    label: str  # the table's
    gates: dict  # GateConfig fields
    context_extractors: dict


# The gates of the frozen pretrained model only decide (inject: false: a trained injection changes
# what the model computes, WER 100 after 10 steps, measured). A skipped encoder module adds the
# dense model's mean output at that position (skip_fill "mean"), and kept frames attend to every
# frame (attention_keys "all"): Whisper's window is mostly padding, and zeroing a module's output
# there, or hiding those frames from attention, breaks it (README "Gated Whisper"). The localGP
# predictors read the speech pooled to 64 frames (context_frames) and attend in 64 dimensions
# (predictor_width): aligned to all 1500 frames in 512 they cost as much as the layers they gate.
# The decoder is not gated: its modules run on every token.
WHISPER_GATES = {"skip_fill": "mean", "attention_keys": "all", "inject": False, "decoder": None}
ROWS = {
    "localgp+speaker": Row("localgp+speaker", "localGP + speaker",
                           {**WHISPER_GATES, "encoder": "temporal", "contexts": [["front", 0], ["speaker", 256]],
                            "context_frames": 64, "predictor_width": 64}, SPEAKER),
    "localgp": Row("localgp", "localGP (speech only)",
                   {**WHISPER_GATES, "encoder": "temporal", "contexts": [["front", 0]], "context_frames": 64,
                    "predictor_width": 64}, {}),
    "globalgp": Row("globalgp", "globalGP", {"predictor": "global", "encoder": "utterance", "decoder": "utterance",
                                             "skip_fill": "mean"}, {}),
}


# The demo's default target and training time per run. Whisper's 30 s window holds 1-6 s of speech
# on the demo's clips (about 90% of its frames are padding, which the gates learn to skip), up to
# 30 s in the joined examples (join_clips): 0.6 over the mix.
WHISPER_TARGETS = (0.6,)
WHISPER_MINUTES = 6.0


def row_folder(out: Path, model: str, target: float) -> Path:
    """Where the demo trains (its `run`) and decodes a gated row of its table: out/<model>-<target>."""
    return out / f"{model}-{target:g}"


def trained_run(report: str | Path) -> Path:
    """The run directory of the first gated row of a demo's report.json (the one its summary names)."""
    from localgp.files import read_json

    path = Path(report)
    if not path.exists():
        raise UserError(f"{path} does not exist: `make demo` (localgp demo) writes it, with the run it trains")
    rows = read_json(path, "run `make demo` again, which writes it anew").get("rows")
    # a trained row has a target (the rules' rows run compact too, with none)
    gated = [r for r in rows or [] if isinstance(r, dict) and r.get("execution") == "compact"
             and r.get("target") is not None]
    if not gated:
        raise UserError(f"{path}: no trained row in its table (a demo that trained no run)")
    return row_folder(path.parent, gated[0]["model"], gated[0]["target"]) / "run"


def whisper_config(out: Path, manifest: Path, row: Row, target: float, minutes: float, steps: int | None,
                   device: str, whisper_dir: str | None):
    from localgp.train_config import TrainConfig

    return TrainConfig(
        out_dir=str(out / "run"), backbone="whisper-base", whisper_dir=whisper_dir,
        data={"kind": "manifest", "path": str(manifest), "split": "train"}, gates=row.gates,
        context_extractors=row.context_extractors, tasks=("asr", "st"), freeze_backbone=True,
        batch_size=4, lr=3e-3, warmup_steps=2,  # configs/whisper_demo.yaml: what other settings did
        max_steps=steps if steps is not None else 1_000_000,
        max_minutes=None if steps is not None else minutes, target_sparsity=target, sparsity_weight=2.0,
        distill_weight=1.0, seed=0, device=device, log_every=1, save_every=5,
        # the demo corpus has a 30.3 s clip (en demo-congrats) that Whisper's 30 s window would cut: left out, logged
        skip_bad_audio=True,
        # half the examples are several clips joined, up to 30 s: gates trained on 1-6 s clips alone skip
        # the speech of fuller windows (long-form transcription), having never seen speech there
        join_clips=0.5)


def table_row(row: Row | None, target: float | None, report: dict, dense: dict | None, training: dict | None) -> dict:
    """One object of report.json's `rows` from a decode's score() report."""
    sparsity = dict(report.get("sparsity", {}))
    sparsity["all_frames"] = report.get("encoder_sparsity")
    sparsity["speech_frames"] = report.get("encoder_speech_sparsity")
    for kind in ("padding", "silence", "speech"):  # by kind of frame (VAD); 0 where nothing is gated
        sparsity.setdefault(kind, 0.0 if row is None else None)
    return {
        "model": "dense" if row is None else row.model,
        "label": "dense (zero-shot)" if row is None else row.label,
        "target": target,
        "execution": "dense" if row is None else "compact",
        "dtype": "float32",  # the demo decodes in float32 (`localgp decode --dtype` for the others)
        "wer": report["wer"], "bleu": report["bleu"],
        "encoder_gflops": report["encoder_gflops"], "decoder_gflops": report.get("decoder_gflops"),
        "sparsity": sparsity,
        "seconds_per_utterance": report["seconds_per_utterance"],
        "encoder_seconds_per_utterance": report.get("encoder_seconds_per_utterance"),
        # dense execution on the same batches: the plain model's decode of the same examples
        "dense_seconds_per_utterance": (dense or report)["seconds_per_utterance"],
        "dense_encoder_seconds_per_utterance": (dense or report).get("encoder_seconds_per_utterance"),
        "utterances": report["utterances"],
        "training": training,
    }


def rows_markdown(rows: list[dict]) -> str:
    """The demo's table: one line per model and target."""
    languages = sorted({k for r in rows for k in r["wer"] if k != "average"})
    pairs = sorted({k for r in rows for k in r["bleu"] if k != "average"})
    head = ["model", "target", *(f"WER {k}" for k in languages), "WER avg", *(f"BLEU {p}" for p in pairs), "BLEU avg",
            "GFLOPs enc", "GFLOPs dec", "skipped all / speech frames", "skipped padding / silence / speech",
            "s/utt compact", "s/utt dense",
            "enc s/utt compact", "enc s/utt dense", "training"]
    num = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["sparsity"]
        frames = "-" if s.get("all_frames") is None else f"{s['all_frames']:.2f} / {num(s.get('speech_frames'), '.2f')}"
        training = "-" if not r["training"] else f"{r['training']['steps']} steps, {r['training']['minutes']:.1f} min"
        compact = r["seconds_per_utterance"] if r["execution"] == "compact" else None
        compact_enc = r["encoder_seconds_per_utterance"] if r["execution"] == "compact" else None
        lines.append("| " + " | ".join([
            r["label"], num(r["target"], ".1f"), *(num(r["wer"].get(k)) for k in languages), num(r["wer"].get("average")),
            *(num(r["bleu"].get(p)) for p in pairs), num(r["bleu"].get("average")), num(r["encoder_gflops"], ".2f"),
            num(r["decoder_gflops"], ".2f"), frames,
            " / ".join(num(s.get(k), ".2f") for k in ("padding", "silence", "speech")), num(compact, ".3f"), num(r["dense_seconds_per_utterance"], ".3f"),
            num(compact_enc, ".3f"), num(r["dense_encoder_seconds_per_utterance"], ".3f"), training]) + " |")
    return "\n".join(lines) + "\n"


DEFAULT_ROWS = ("padding", "silence", "attention", "localgp+speaker", "release")
# The release gates (localgp.release, `--gates default`): trained once, apart and longer than the demo's
# own run (configs/whisper_speech.yaml), shipped in the package and decoded here beside it.
RELEASE = Row("release", "release gates", {}, {})


def run_whisper_demo(out: Path, data: Path, rows=DEFAULT_ROWS, targets=WHISPER_TARGETS,
                     minutes: float = WHISPER_MINUTES,
                     steps: int | None = None, device: str = "cpu", beam: int = 5, batch: int = 8,
                     limit: int | None = None, whisper_dir: str | None = None) -> dict:
    from localgp import analyze
    from localgp.data.demo_corpus import load_manifest, prepare_demo
    from localgp.backbones.whisper.decoding import WhisperDecodeOptions
    from localgp.evaluate import finite_report, score, write_report
    from localgp.backbones.whisper.weights import prepare_whisper
    from localgp.train import Trainer
    from localgp.decode import decode_run

    from localgp.model.config import RULES, is_rule, parse_rule

    unknown = [r for r in rows if r not in ROWS and r != RELEASE.model and not is_rule(r)]
    if unknown:
        raise UserError(f"demo: unknown rows {unknown}; choose from {', '.join((*RULES, *ROWS, RELEASE.model))}")
    for rule in (r for r in rows if is_rule(r)):
        try:
            parse_rule(rule)
        except ValueError as err:
            raise UserError(f"demo: --rows: {err}") from None
    weights = prepare_whisper(whisper_dir, log=log.info)
    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        log.info("demo: preparing the demo corpus in %s", data)
        prepare_demo(data)
    options = WhisperDecodeOptions(beam_size=beam, execution="compact")
    log.info("demo: the dense row (the plain pretrained model)")
    dense_records = decode_run(None, out / "dense" / "decoded.jsonl", model="whisper-base", data=str(manifest),
                               whisper_dir=str(weights), options=options, batch_size=batch, device=device, limit=limit,
                               skip_bad_audio=True)
    dense = score(dense_records)
    table = [table_row(None, None, dense, None, None)]
    main = None
    for name in (r for r in rows if is_rule(r)):  # training-free: the plain model under the rule
        label = parse_rule(name).label
        log.info("demo: the %s rule", label)
        records = decode_run(None, out / label / "decoded.jsonl", model="whisper-base", data=str(manifest),
                             whisper_dir=str(weights), gates=name, options=options, batch_size=batch, device=device,
                             limit=limit, skip_bad_audio=True)
        table.append(table_row(Row(label, f"{label} rule", {}, {}), None, score(records), dense, None))
    for name in (r for r in rows if r in ROWS):
        for target in targets:
            row = ROWS[name]
            folder = row_folder(out, name, target)
            config = whisper_config(folder, manifest, row, target, minutes, steps, device, str(weights))
            log.info("demo: training %s, target sparsity %g", row.label, target)
            started = time.monotonic()
            trainer = Trainer(config)
            resumed_at = trainer.step
            last = trainer.train()
            training = {"steps": last.get("step"), "minutes": (time.monotonic() - started) / 60,
                        "sparsity": last.get("sparsity"), "loss": last.get("loss")}
            # records decoded before this training (a rerun) are of another model: decoded afresh
            records = decode_run(config.out_dir, folder / "decoded.jsonl", options=options, batch_size=batch,
                                 device=device, limit=limit, skip_bad_audio=True,
                                 overwrite=trainer.step != resumed_at)
            report = score(records)
            table.append(table_row(row, target, report, dense, training))
            if main is None:
                main = (config, report, records)
    if RELEASE.model in rows:
        log.info("demo: the release gates")
        records = decode_run(None, out / RELEASE.model / "decoded.jsonl", model="whisper-base", data=str(manifest),
                             whisper_dir=str(weights), gates="default", options=options, batch_size=batch,
                             device=device, limit=limit, skip_bad_audio=True)
        table.append(table_row(RELEASE, None, score(records), dense, None))
    report = dict(main[1]) if main else dict(dense)
    report["rows"] = table
    if main:
        config, _, records = main
        test = load_manifest(manifest)["test"][0]
        try:
            report["mask_figure"] = str(analyze.masks_from_checkpoint(config.out_dir, test.audio, test.language,
                                                                      out / "masks.png"))
        except ValueError as err:  # e.g. an encoder gated per utterance has no temporal masks
            report["mask_figure"] = {"skipped": str(err)}
        try:
            report["word_start"] = analyze.word_start_from_records(records)
        except ValueError as err:  # too few tokens of a kind in a short decode
            report["word_start"] = {"skipped": str(err)}
    text = rows_markdown(table)
    write_report(finite_report(report), out, "demo")
    (out / "report.md").write_text("# localgp demo: Whisper base on the demo corpus's test split\n\n" + text)
    print(text, end="")
    print(closing_summary(out, report))
    return report


def closing_summary(out: Path, report: dict) -> str:
    """What the demo's terminal ends with: where its files are and what they show, and in two
    lines the first gated row against the dense one (speed, WER, BLEU)."""
    figure = report.get("mask_figure")
    lines = [f"wrote {out / 'report.md'} (the table above) and {out / 'report.json'} (its rows, every measurement)"
             + (f"; {figure}: the gates' decisions on a test utterance" if isinstance(figure, str) else "")]
    rows = report["rows"]
    dense = rows[0]
    trained = [r for r in rows[1:] if r.get("target") is not None]  # the learned row, else the first after dense
    for row in (trained or rows[1:])[:1]:
        speed = row["dense_seconds_per_utterance"] / row["seconds_per_utterance"]
        encoder = (row["dense_encoder_seconds_per_utterance"] or float("nan")) / (
            row["encoder_seconds_per_utterance"] or float("nan"))
        skipped, speech = row["sparsity"].get("all_frames"), row["sparsity"].get("speech_frames")
        target = "" if row["target"] is None else f" (target {row['target']:g})"  # the rules have none
        lines.append(f"{row['label']}{target}: {speed:.2f}x the dense model's speed "
                     f"({row['seconds_per_utterance']:.3f} vs {row['dense_seconds_per_utterance']:.3f} s per utterance, "
                     f"the encoder {encoder:.2f}x)"
                     + (f"; its gates skip {skipped:.0%} of the encoder's work" if skipped is not None else "")
                     + (f" ({speech:.0%} over the frames that carry speech)" if speech is not None else ""))
        wer, bleu = (row["wer"].get("average"), dense["wer"].get("average")), (row["bleu"].get("average"),
                                                                              dense["bleu"].get("average"))
        change = lambda new, old: "-" if new is None or old is None else f"{old:.1f} -> {new:.1f} ({new - old:+.1f})"  # noqa: E731
        lines.append(f"  WER {change(*wer)} against dense, averaged over "
                     f"{', '.join(k for k in dense['wer'] if k != 'average')}; BLEU {change(*bleu)}")
    return "\n".join(lines)


# ------------------------------------------------------------------ OWSM (tiny, from scratch)
OWSM_GATES = {"encoder": "temporal", "decoder": "token", "contexts": [["front", 0], ["speaker", 256]]}


def owsm_config(out: Path, manifest: Path, steps: int | None, minutes: float, device: str):
    from localgp.train_config import TrainConfig

    return TrainConfig(
        out_dir=str(out / "run"), data={"kind": "manifest", "path": str(manifest), "split": "train"},
        preset="tiny", gates=OWSM_GATES, context_extractors=SPEAKER,
        tasks=("asr", "st"), vocab_size=400, batch_size=8, lr=2e-3, warmup_steps=200,
        max_steps=steps if steps is not None else 1_000_000, max_minutes=None if steps is not None else minutes,
        target_sparsity=0.3, seed=0, device=device, log_every=20, save_every=100)


def run_owsm_demo(out: Path, data: Path, steps: int | None = None, minutes: float = 8.0, device: str = "cpu",
                  beam: int = 5, batch: int = 8, limit: int | None = None) -> dict:
    from localgp import analyze
    from localgp.data.demo_corpus import load_manifest, prepare_demo
    from localgp.decoding import DecodeOptions
    from localgp.evaluate import markdown_table, score, write_report
    from localgp.train import Trainer
    from localgp.decode import decode_run

    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        log.info("demo: preparing the demo corpus in %s", data)
        prepare_demo(data)
    config = owsm_config(out, manifest, steps, minutes, device)
    trainer = Trainer(config)
    resumed_at = trainer.step
    last = trainer.train()
    log.info("demo: training ended at step %s (loss %.3f)", last.get("step"), last.get("loss", float("nan")))
    records = decode_run(config.out_dir, out / "decoded.jsonl", split="test", options=DecodeOptions(beam_size=beam),
                         batch_size=batch, device=device, limit=limit, overwrite=trainer.step != resumed_at)
    report = score(records)
    report["training"] = {"steps": last.get("step"), "loss": last.get("loss"), "device": device}
    test = load_manifest(manifest)["test"][0]
    report["mask_figure"] = str(analyze.masks_from_checkpoint(config.out_dir, test.audio, test.language,
                                                              out / "masks.png"))
    try:
        report["word_start"] = analyze.word_start_from_records(records)
    except ValueError as err:  # too few tokens of a kind in a short decode
        report["word_start"] = {"skipped": str(err)}
    write_report(report, out, "localGP + speaker (demo)")
    print(markdown_table(report, "localGP + speaker (demo)"), end="")
    print(json.dumps({"word_start": report["word_start"], "mask_figure": report["mask_figure"]}, indent=2))
    return report


# ------------------------------------------------------------------ entry
def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"demo: --device {device}: torch {torch.__version__} sees no CUDA GPU")
    return device


def run_demo(out: str | Path = "out/demo", data: str | Path = "data/demo", backbone: str = "whisper-base",
             steps: int | None = None, minutes: float | None = None, device: str = "auto", beam: int = 5,
             batch: int = 8, limit: int | None = None, rows=DEFAULT_ROWS, targets=None,
             whisper_dir: str | None = None) -> dict:
    out, data, device = Path(out), Path(data), resolve_device(device)
    if backbone == "owsm":
        return run_owsm_demo(out, data, steps, 8.0 if minutes is None else minutes, device, beam, batch, limit)
    if backbone != "whisper-base":
        raise UserError(f"demo: --backbone must be whisper-base or owsm, got {backbone!r}")
    return run_whisper_demo(out, data, rows, targets or WHISPER_TARGETS, WHISPER_MINUTES if minutes is None else minutes,
                            steps, device, beam, batch, limit, whisper_dir)
