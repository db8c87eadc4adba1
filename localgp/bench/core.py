"""`localgp bench`: wall-clock of a model part under each execution ("provider"), with the
compute it executed, in one run.

Providers:
- `espnet`: ESPnet's own module (no gating code at all) on the same weights;
- `dense`: the gated module with no gate: every module on every frame, through our code;
- `masked`: the papers' execution: every module computed, output multiplied by the mask;
- `compact`: compaction -> module on the kept frames only -> scatter.

Masks are forced at random, keeping a `keep` share of the gated units (the same masks for masked
and compact, and in every repeat), or come from the trained gates of a `localgp train` run
(`checkpoint`), which then decide the share kept.

Timing: `warmup` calls of every provider, then `repeats` rounds in each of which every provider
runs once in turn, so that slow drift of the machine moves all providers alike instead of
biasing their ratios. One call is timed with CUDA events on a GPU (after a synchronisation, so
it starts on an idle device), with the host clock on the CPU. Rows give the median and the 20th
and 80th percentiles.

Baselines: the speedups need `dense` and `masked` of the same keep ratio and run, so those two
are measured (and reported) whatever `providers` asks for. speedup_vs_X = X's median / this
row's median; efficiency = speedup_vs_dense / (dense GFLOPs / this row's GFLOPs), the share of
the FLOP reduction that became time (1.0 for dense itself).

GFLOPs are GMACs as `localgp.flops` counts them (the papers' "GFLOPs"), of what the timed call
executed: masked and dense count every module on every frame, compact only the kept frames.

This module holds what every part shares (settings, cases, timing, the environment columns,
output); the parts live with their backbones (localgp/backbones/<home>/bench*.py), their names in
localgp.train_config.BACKBONES, registered in localgp.bench.PARTS.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from localgp import flops
from localgp.errors import UserError
from localgp.backbones.owsm import weights as owsm
from localgp.model.config import ENCODER_MODULES
from localgp.model.packed import DTYPES, check_precision
from localgp.train_config import BACKBONES

# What users run instead, measured beside ours: ESPnet's own module (OWSM), openai-whisper's own
# model and decode, faster-whisper (CTranslate2 on the original weights) at two compute types.
FASTER_WHISPER = ("faster-whisper-float32", "faster-whisper-int8")
# whisper-base's training-free rules (localgp.model.config.RULES, their default settings) are providers too
PROVIDERS = ("espnet", "openai-whisper", *FASTER_WHISPER, "transformers", "openai-whisper-compact", "dense", "masked",
             "compact", "padding", "silence", "attention")
PROVIDER_ALIASES = {"faster-whisper": FASTER_WHISPER}
BASELINES = ("dense", "masked")
GATED = ("masked", "compact")  # providers whose work depends on the masks
DEFAULT_KEEPS = (1.0, 0.7, 0.5, 0.3)
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GATES = "gates"  # the keep "ratio" of a run whose masks come from trained gates


class BenchError(UserError):
    """A bad setting, named by its command-line flag."""


@dataclass(frozen=True)
class Setting:
    preset: str = "medium"  # model size (owsm.PRESETS); ignored with a checkpoint, which has its own
    batch: int = 1  # utterances per call
    seconds: float = 30.0  # audio per utterance (OWSM pads to 30 s)
    dtype: str = "float32"  # float32, bfloat16, int8 (CPU: linears in int8, the rest float32), float16 (GPU)
    device: str = "cpu"  # cpu, cuda, cuda:N
    beam: int = 5  # hypotheses per utterance (decoder parts)
    tokens: int = 50  # decoder parts: decode steps (decode), prefix length (decoder-step)
    checkpoint: str | None = None  # a `localgp train` out_dir: its trained gates decide the masks
    granularity: str = "temporal"  # encoder gates: temporal (FFN1/attention/FFN2 per frame) or utterance
    seed: int = 0  # weights, inputs and forced masks
    backbone: str = "owsm"  # owsm (random weights of `preset`) or whisper-base (real weights, real clips)
    # whisper-base: the clips, a demo-corpus manifest (its test split), a directory or one audio
    # file, or "noise" (`seconds` of it per clip)
    audio: str | None = None
    # whisper-base: `localgp prepare whisper`'s directory (None: its default), or "random" (base's
    # shapes, random weights: timing where the weights cannot be had)
    weights: str | None = None

    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Case:
    """One provider at one keep ratio, ready to time."""

    run: Callable[[], object]  # the timed work, no arguments
    gflops: Callable[[], float]  # GMACs the last run() executed
    kept_share: Callable[[], float | None] = lambda: None  # share of gated units the last run() kept


class Workload(Protocol):
    """A part built for one Setting. Its attributes become columns of every row."""

    providers: tuple[str, ...]  # the providers it supports
    shapes: dict  # what ran: preset, d_model, layers, frames, ... (beam for decoder parts)
    pruned: str  # what is gated, e.g. "ffn1,attn,ffn2 (temporal)"
    masks: str  # "random" (forced, `keep` share) or "gates" (trained, from the checkpoint)

    def case(self, provider: str, keep: float | None) -> Case:
        """keep: the share forced at random, or None with trained gates."""




# ---------------------------------------------------------------------------- checks


def parse_keeps(text: str) -> list[float]:
    """'1.0,0.5' -> [1.0, 0.5]; every value in [0, 1]."""
    keeps = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise BenchError(f"--keep: {item!r} is not a number (a comma list of shares in [0, 1])") from None
        if not 0 <= value <= 1:
            raise BenchError(f"--keep: {value:g} lies outside [0, 1]")
        keeps.append(value)
    return keeps


def parse_providers(text: str) -> list[str]:
    """Comma list; 'faster-whisper' stands for both of its compute types."""
    providers = []
    for p in (p.strip() for p in text.split(",") if p.strip()):
        providers.extend(PROVIDER_ALIASES.get(p, (p,)))
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        raise BenchError(f"--providers: unknown {unknown or text!r}; choose from {','.join(PROVIDERS)}")
    return providers


def parse_dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise BenchError(f"--dtype: {text!r} is not one of {', '.join([*DTYPES, *DTYPE_ALIASES])}")
    return name


def check(setting: Setting, part: str, providers=(), repeats: int = 1, warmup: int = 0) -> None:
    """Refuses a bad setting with the flag that set it, before any model is built."""
    if setting.backbone not in BACKBONES:
        raise BenchError(f"--backbone: {setting.backbone!r} is not one of {', '.join(BACKBONES)}")
    parts = BACKBONES[setting.backbone].bench_parts
    if part not in parts:
        raise BenchError(f"--part: {setting.backbone} has no part {part!r}; choose from {', '.join(parts)}")
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise BenchError(f"--providers: unknown {unknown}; choose from {','.join(PROVIDERS)}")
    if setting.backbone == "owsm" and not setting.checkpoint and setting.preset not in owsm.PRESETS:
        raise BenchError(f"--preset: unknown preset {setting.preset!r}; choose from {', '.join(owsm.PRESETS)}")
    if setting.dtype not in DTYPES:
        raise BenchError(f"--dtype: {setting.dtype!r} is not one of {', '.join(DTYPES)}")
    if setting.granularity not in ENCODER_MODULES:
        raise BenchError(f"--granularity: {setting.granularity!r} is not one of {', '.join(ENCODER_MODULES)}")
    for flag, value, least in (("--batch", setting.batch, 1), ("--beam", setting.beam, 1),
                               ("--tokens", setting.tokens, 2 if part == "decoder-step" else 1),
                               ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if value < least:
            raise BenchError(f"{flag} must be at least {least}, got {value}")
    if setting.backbone == "owsm" and (setting.seconds <= 0 or flops.subsampled_frames(flops.input_frames(setting.seconds)) < 1):
        raise BenchError(f"--seconds: {setting.seconds:g} s is too short for the conv2d subsampling")
    try:
        device = setting.torch_device()
    except RuntimeError as err:
        raise BenchError(f"--device: {setting.device!r} is not a device ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device: {setting.device!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {setting.device}: torch {torch.__version__} sees no CUDA GPU "
                             f"(torch built with CUDA {torch.version.cuda})")
        from localgp import ops

        if not ops.has_cuda_kernels():
            raise BenchError(f"--device {setting.device}: localgp was built without its CUDA kernels; rebuild with "
                             "LOCALGP_CUDA=1 pip install --no-build-isolation --no-deps -e .")
    try:
        check_precision(setting.dtype, setting.device)
    except UserError as err:
        raise BenchError(str(err)) from None
    if setting.dtype == "int8" and setting.backbone == "owsm":
        raise BenchError("--dtype int8: the OWSM parts time ESPnet's modules as they are (unpacked); int8 is for "
                         "--backbone whisper-base")
    from localgp.release import is_gates_file

    if is_gates_file(setting.checkpoint):
        if setting.backbone != "whisper-base":
            raise BenchError(f"--checkpoint {setting.checkpoint}: a gates file goes with --backbone whisper-base")
    elif setting.checkpoint and not Path(setting.checkpoint).is_dir():
        raise BenchError(f"--checkpoint: {setting.checkpoint} is not a directory (a `localgp train` out_dir) nor a "
                         f"gates file (default, or FILE.safetensors)")



# ---------------------------------------------------------------------------- gated parts


def prepare_encoder(encoder, provider: str, keep: float | None, seed: int) -> None:
    """Puts the gated encoder in `provider`'s execution with forced masks (or its gates)."""
    from localgp.model.convert import force_keep

    encoder.execution = provider  # "dense" is an encoder execution that set_execution refuses
    force_keep(encoder, keep, seed=seed)  # reseeded: the same masks in every call and execution


def pruned_label(encoder) -> str:
    """What a gated encoder gates, e.g. 'ffn1,attn,ffn2 (temporal)'."""
    return f"{','.join(encoder.pruning.modules_per_layer)} ({encoder.pruning.config.encoder})"


def kept_share(record) -> float | None:
    return 1.0 - float(record.sparsity()) if record is not None and record.masks else None


def gated_encoder_case(encoder, provider: str, keep: float | None, seed: int, call, macs) -> Case:
    """A gated encoder under `provider`'s execution: call() runs it (masks forced with `keep`, or
    its gates), macs(record) counts what that pass executed."""
    last = {}

    def run():
        prepare_encoder(encoder, provider, keep, seed)
        out = call()
        last["record"] = encoder.last_record
        return out

    return Case(run, lambda: macs(last["record"]) / 1e9, lambda: kept_share(last["record"]))



# ---------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each call. Every repeat runs every function once, in turn: slow drift of
    the machine (other load, clocks) then shifts all of them alike instead of biasing ratios."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - begin))
    return times


def time_case(benchmark, case: Case, setting: Setting, rounds: int, warmup: int, **info) -> None:
    """pytest-benchmark rounds of one case (the suites in benchmarks/), each ended by a device
    synchronisation; extra_info holds the executed GFLOPs and what ran where."""
    device = setting.torch_device()

    def timed():
        case.run()
        synchronize(device)

    with torch.inference_mode():
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update(gflops=case.gflops(), kept_share=case.kept_share(), batch=setting.batch,
                                seconds=setting.seconds, dtype=setting.dtype, **info, **environment(setting))


# ---------------------------------------------------------------------------- environment


def git_revision() -> str:
    """LOCALGP_REVISION if set (a copy of the tree without .git, e.g. on a GPU machine), else the
    checkout's commit (+'-dirty' with uncommitted changes to tracked files), else 'unknown'."""
    if os.environ.get("LOCALGP_REVISION"):
        return os.environ["LOCALGP_REVISION"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(setting: Setting) -> dict:
    """The columns every row shares: what ran where."""
    from localgp import __version__

    device = setting.torch_device()
    return dict(device=setting.device, device_name=device_name(device), threads=torch.get_num_threads(),
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                localgp=__version__, revision=git_revision(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


# ---------------------------------------------------------------------------- the run


def with_speedups(group: list[dict]) -> list[dict]:
    """Adds speedup_vs_dense, speedup_vs_masked and efficiency to rows of one keep ratio."""
    by = {r["provider"]: r for r in group}
    dense, masked = by["dense"], by["masked"]
    for r in group:
        r["speedup_vs_dense"] = dense["median_ms"] / r["median_ms"]
        r["speedup_vs_masked"] = masked["median_ms"] / r["median_ms"]
        # None where the work is not counted (a baseline's own decoder)
        r["efficiency"] = None if r["gflops"] is None else r["speedup_vs_dense"] / (dense["gflops"] / r["gflops"])
    return group


def _num(value, spec: str) -> str:
    """value formatted, or '-' in the same width when there is none."""
    if value is None:
        width = spec.split(".")[0]
        return format("-", f">{width}") if width else "-"
    return format(value, spec)


# ---------------------------------------------------------------------------- output

COLUMNS = ("part", "provider", "keep", "median_ms", "p20_ms", "p80_ms", "gflops", "speedup_vs_dense",
           "speedup_vs_masked", "efficiency")


def _model(r: dict) -> str:
    return r["preset"] if r.get("backbone", "owsm") == "owsm" else r["backbone"]


def title(rows: list[dict]) -> str:
    r = rows[0]
    seconds = f"{r['seconds']:g} s ({r['frames']} frames)" if "frames" in r else f"{r['seconds']:g} s"
    masks = "forced random masks" if r["masks"] == "random" else "trained gates"
    return (f"{r['part']}, {_model(r)}, batch {r['batch']}, {seconds}, {r['dtype']} on {r['device_name']} "
            f"({r['device']}, {r['threads']} threads), torch {r['torch']}, revision {r['revision']}; "
            f"{masks} on {r['pruned']}; median of {r['repeats']} after {r['warmup']} warm-up")


def table(rows: list[dict]) -> str:
    w = max(9, *(len(r["provider"]) for r in rows))
    lines = [title(rows),
             f"{'provider':{w}s} {'keep':>5s} {'median ms':>10s} {'p20-p80 ms':>19s} {'GFLOPs':>9s} "
             f"{'vs dense':>9s} {'vs masked':>10s} {'efficiency':>11s}"]
    for r in rows:
        lines.append(f"{r['provider']:{w}s} {r['keep']:5.2f} {r['median_ms']:10.2f} "
                     f"{r['p20_ms']:9.2f}-{r['p80_ms']:<9.2f} {_num(r['gflops'], '9.4g')} {r['speedup_vs_dense']:9.3f} "
                     f"{r['speedup_vs_masked']:10.3f} {_num(r['efficiency'], '11.3f')}")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """A Markdown table of rows from one or several runs (RESULTS.md)."""
    out = ["| part | model | batch | s | dtype | provider | keep | median ms | p20-p80 ms | GFLOPs | vs dense "
           "| vs masked | efficiency |", "|" + " --- |" * 13]
    for r in rows:
        out.append(f"| {r['part']} | {_model(r)} | {r['batch']} | {r['seconds']:g} | {r['dtype']} | {r['provider']} "
                   f"| {r['keep']:.2f} | {r['median_ms']:.2f} | {r['p20_ms']:.2f}-{r['p80_ms']:.2f} "
                   f"| {_num(r['gflops'], '.4g')} | {r['speedup_vs_dense']:.3f} | {r['speedup_vs_masked']:.3f} "
                   f"| {_num(r['efficiency'], '.3f')} |")
    return "\n".join(out) + "\n"


def write_json(rows: list[dict], path: str | Path) -> None:
    """Strict JSON: a number that is not finite is null, its reason under the row's "notes"."""
    from localgp.evaluate import finite_report

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([finite_report(r) for r in rows], indent=2, allow_nan=False) + "\n")


def write_csv(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
