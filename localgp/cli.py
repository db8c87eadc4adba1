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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localgp", description="Context-driven dynamic pruning that saves wall-clock time."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which kernels are built")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
