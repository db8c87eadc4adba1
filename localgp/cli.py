"""The `localgp` command line (also `python -m localgp`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys


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

    shape = flops.EncoderShape.of_preset(args.preset)
    frames = flops.input_frames(args.seconds)
    if flops.subsampled_frames(frames) < 1:
        raise SystemExit(f"flops: {args.seconds} s is too short for the conv2d subsampling")
    dense = flops.encoder_macs(shape, frames)
    pruned = flops.keep_ratio_macs(shape, frames, args.keep, args.granularity)
    report = {
        "preset": args.preset,
        "seconds": args.seconds,
        "input_frames": frames,
        "encoder_frames": flops.subsampled_frames(frames),
        "keep": args.keep,
        "granularity": args.granularity,
        "unit": "GMACs (the papers' GFLOPs)",
        "encoder_gflops": pruned["total"] / 1e9,
        "dense_encoder_gflops": dense["total"] / 1e9,
        "modules": {m: pruned[m] / 1e9 for m in flops.MODULES},
        "dense_modules": {m: dense[m] / 1e9 for m in flops.MODULES},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.preset} encoder, {args.seconds:g} s ({frames} frames -> {report['encoder_frames']}), "
          f"keep {args.keep:g} ({args.granularity}); GMACs (the papers' GFLOPs)")
    print(f"{'module':12s} {'dense':>10s} {'pruned':>10s}")
    for m in flops.MODULES:
        print(f"{m:12s} {dense[m] / 1e9:10.3f} {pruned[m] / 1e9:10.3f}")
    print(f"{'total':12s} {dense['total'] / 1e9:10.3f} {pruned['total'] / 1e9:10.3f}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from localgp.train import TrainConfig, Trainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig.from_yaml(args.config)
    if args.steps is not None:
        import dataclasses

        config = dataclasses.replace(config, max_steps=args.steps)
    row = Trainer(config).train()
    print(json.dumps(row))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from localgp.data.demo_corpus import prepare_demo

    manifest = prepare_demo(args.out, german_sentences=args.german_sentences, augment_share=args.augment_share,
                            seed=args.seed)
    print(manifest)
    return 0


def keep_ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localgp", description="Context-driven dynamic pruning that saves wall-clock time."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which kernels are built")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info)

    from localgp.model.owsm import PRESETS

    flops = sub.add_parser("flops", help="encoder compute (MACs, the papers' GFLOPs), dense and pruned")
    flops.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    flops.add_argument("--seconds", type=float, default=30.0, help="input length (OWSM pads to 30 s)")
    flops.add_argument("--keep", type=keep_ratio, default=1.0, help="share of frames/modules kept")
    flops.add_argument("--granularity", choices=["temporal", "utterance"], default="temporal",
                       help="temporal: FFN1/attention/FFN2 per frame; utterance: all four modules")
    flops.add_argument("--json", action="store_true", help="print JSON")
    flops.set_defaults(func=cmd_flops)

    prepare = sub.add_parser("prepare", help="build a corpus")
    prepare.add_argument("corpus", choices=["demo"], help="demo: en/fr/it Asterisk speech + German espeak-ng, from Debian")
    prepare.add_argument("--out", default="data/demo", help="output directory (git-ignored data/ by default)")
    prepare.add_argument("--german-sentences", type=int, default=300)
    prepare.add_argument("--augment-share", type=float, default=0.3, help="share with noise, events or silence")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.set_defaults(func=cmd_prepare)

    train = sub.add_parser("train", help="train a gated OWSM model from a YAML config (resumes from its out_dir)")
    train.add_argument("config", help="YAML file with the fields of localgp.train.TrainConfig")
    train.add_argument("--steps", type=int, help="override max_steps")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
