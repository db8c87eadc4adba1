"""What localgp's CPU inference paths save, each beside what it replaced, on this machine:

1. Linears of Whisper base's shapes: PyTorch's own (`F.linear`, MKL's sgemm) against oneDNN with
   the weight packed once (`localgp.model.packed`, what `localgp decode` and `transcribe` run).
2. The packed linears per precision at Whisper base's four shapes and the row counts compact
   execution produces (1 to 12,000; the output layer at decode rows): float32, bfloat16 and int8
   four ways: what `pack_linears(model, "int8")` runs (activations per row: the rows normalised,
   then fbgemm's dynamic quantized linear), fbgemm's dynamic quantized linear as it is (activations
   per tensor: the path before), the rows quantized in PyTorch then one int8 GEMM (`torch._int_mm`)
   rescaled, and oneDNN's (`onednn::qlinear_pointwise`, what x86 inductor quantization lowers to;
   its activations quantized per tensor by `torch.quantize_per_tensor_dynamic`, ATen's one-pass
   kernel), each with its max and mean abs error against float32 (on random rows of one scale,
   where per-row scales gain nothing: their accuracy is measured on Whisper's own activations).
3. Silero VAD over a recording: silero's own loop (`get_speech_timestamps`: the whole network
   per 32 ms chunk) against `SileroVAD` (the per-chunk part batched, the LSTM over all chunks).

    python benchmarks/cpu_inference.py [--parts linears,precisions,vad] [--seconds 300] [--repeats 5] [--json F]

Median and p20-p80 over repeats after a warm-up, the machine's thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from localgp.bench.core import device_name, git_revision  # noqa: E402
from localgp.model import packed  # noqa: E402

# (rows, in, out): the encoder's linears on a batch of 6 windows (9,000 frames), a decode step of
# 6 windows x beam 5 (30 rows), and the decoder's output layer (the 51,865-token vocabulary)
SHAPES = [(9000, 512, 2048, "encoder MLP in"), (9000, 2048, 512, "encoder MLP out"),
          (9000, 512, 512, "encoder q/k/v/out"), (30, 512, 2048, "decoder MLP in"),
          (30, 2048, 512, "decoder MLP out"), (30, 512, 512, "decoder q/k/v/out"),
          (30, 512, 51865, "decoder output layer")]


def timed(fn, repeats: int) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": times[int(0.2 * (len(times) - 1))],
            "p80_ms": times[int(0.8 * (len(times) - 1))]}


def linears(repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n, k, m, what in SHAPES:
        x, weight = torch.randn(n, k, generator=generator), torch.randn(m, k, generator=generator) / k**0.5
        bias = torch.randn(m, generator=generator)  # made outside inference mode, as a model's weights are
        with torch.inference_mode():
            cache = packed.PackedWeight()
            plain = timed(lambda: torch.nn.functional.linear(x, weight, bias), repeats)
            fast = timed(lambda: packed.linear(x, weight, bias, cache), repeats)
            error = (packed.linear(x, weight, bias, cache) - torch.nn.functional.linear(x, weight, bias)).abs().max()
            rows.append({"shape": f"{n} x {k} -> {m}", "what": what, "torch": plain, "packed": fast,
                         "speedup": plain["median_ms"] / fast["median_ms"], "max_abs_diff": float(error)})
    return rows


# (in, out, row counts, what): Whisper base's linears at the row counts compact execution makes
# (a kept share of 1 to 8 windows of 1500 frames; a decode step's rows), the output layer at decode rows
PRECISION_SHAPES = [(512, 2048, (1, 5, 30, 300, 1500, 4500, 12000), "MLP in"),
                    (2048, 512, (1, 5, 30, 300, 1500, 4500, 12000), "MLP out"),
                    (512, 512, (1, 5, 30, 300, 1500, 4500, 12000), "q/k/v/out"),
                    (512, 51865, (1, 5, 30, 80), "decoder output layer")]


class OnednnInt8:
    """oneDNN's int8 linear as x86 inductor quantization lowers to it: the weight int8 per output
    channel, prepacked; the activations quantized per tensor on the fly (uint8), float32 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        q = packed._quantize_per_channel(weight)
        self.scale = q.q_per_channel_scales().float()
        self.zero = torch.zeros(weight.shape[0], dtype=torch.long)
        self.weight = torch.ops.onednn.qlinear_prepack(q.int_repr(), None)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
        return torch.ops.onednn.qlinear_pointwise(q.int_repr(), q.q_scale(), q.q_zero_point(), self.weight, self.scale,
                                                   self.zero, self.bias, 1.0, 0, torch.float32, "none", [], "")


class FbgemmPerTensor:
    """fbgemm's dynamic quantized linear as it is: one activation scale per call (the int8 path
    before per-row scales), the bias in the packing."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        torch.backends.quantized.engine = packed.INT8_ENGINE
        self.weight = torch.ops.quantized.linear_prepack(packed._quantize_per_channel(weight), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.weight, not packed._vnni())


class IntMmRows:
    """The rows quantized in PyTorch (symmetric int8, max |x| / 127 per row), one int8 GEMM
    (`torch._int_mm`, int32 out), rescaled by the row's and the channel's scales, the bias added."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        q = packed._quantize_per_channel(weight)
        self.weight = q.int_repr().t().contiguous()
        self.scale = q.q_per_channel_scales().float()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30) / 127
        y = torch._int_mm(torch.round(x / s).to(torch.int8), self.weight).float().mul_(self.scale)
        return torch.addcmul(self.bias, y, s, out=y)


def precisions(repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    has_bf16 = packed.cpu_has_bf16()
    for k, m, counts, what in PRECISION_SHAPES:
        weight, bias = torch.randn(m, k, generator=generator) / k**0.5, torch.randn(m, generator=generator)
        caches = {p: packed.PackedWeight(p) for p in packed.PRECISIONS if p != "bfloat16" or has_bf16}
        onednn, tensor, int_mm = OnednnInt8(weight, bias), FbgemmPerTensor(weight, bias), IntMmRows(weight, bias)
        for n in counts:
            x = torch.randn(n, k, generator=generator)
            with torch.inference_mode():
                # bfloat16 as a bfloat16 model runs it: bfloat16 in and out
                inputs = {p: x.bfloat16() if p == "bfloat16" else x for p in caches}
                fns = {p: (lambda c=c, p=p: packed.linear(inputs[p], weight, bias, c)) for p, c in caches.items()}
                fns["int8 tensor"] = lambda: tensor(x)
                fns["int8 _int_mm"] = lambda: int_mm(x)
                fns["int8 onednn"] = lambda: onednn(x)
                want = fns["float32"]()
                row = {"shape": f"{k} -> {m}", "what": what, "rows": n}
                for name, fn in fns.items():
                    err = (fn().float() - want).abs()
                    row[name] = {**timed(fn, repeats), "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean())}
                rows.append(row)
    return rows


def vad(seconds: float, repeats: int) -> dict:
    from silero_vad import get_speech_timestamps

    from localgp.bench.transcribe import DEFAULT_AUDIO, assemble
    from localgp.longform.vad import SileroVAD

    wav, _ = assemble(DEFAULT_AUDIO, seconds, "en", 0)
    model = SileroVAD()
    audio = torch.from_numpy(np.ascontiguousarray(wav))
    options = dict(threshold=model.threshold, max_speech_duration_s=model.max_seconds,
                   min_silence_duration_ms=model.min_silence_ms, speech_pad_ms=model.pad_ms)

    def own():
        with torch.inference_mode():
            return get_speech_timestamps(audio, model.model, **options)

    same = [(r["start"], r["end"]) for r in own()] == model(wav)
    return {"audio_seconds": len(wav) / 16000, "silero loop": timed(own, repeats),
            "batched": timed(lambda: model(wav), repeats), "same_regions": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="linears,precisions,vad", help="comma list of linears, precisions, vad")
    p.add_argument("--seconds", type=float, default=300.0, help="audio for the VAD: up to this much of the demo's English test clips (170.4 s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"linears", "precisions", "vad"}:
        p.error(f"--parts: unknown {sorted(parts - {'linears', 'precisions', 'vad'})}")
    result = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "revision": git_revision()}
    print(f"{result['device']}, {result['threads']} threads, torch {result['torch']}, revision {result['revision']}")
    if "linears" in parts:
        result["linears"] = linears(args.repeats)
        print_linears(result["linears"])
    if "precisions" in parts:
        result["precisions"] = precisions(args.repeats)
        print_precisions(result["precisions"])
    same = True
    if "vad" in parts:
        result["vad"] = v = vad(args.seconds, args.repeats)
        same = v["same_regions"]
        print(f"VAD over {v['audio_seconds']:.1f} s: silero's loop {v['silero loop']['median_ms']:.0f} ms "
              f"({v['silero loop']['p20_ms']:.0f}-{v['silero loop']['p80_ms']:.0f}), batched {v['batched']['median_ms']:.0f} ms "
              f"({v['batched']['p20_ms']:.0f}-{v['batched']['p80_ms']:.0f}): "
              f"{v['silero loop']['median_ms'] / v['batched']['median_ms']:.1f}x, same regions: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if same else 1


def print_linears(rows: list[dict]) -> None:
    print("float32, PyTorch's linear against the packed one:")
    print("| linear (rows x in -> out) | | torch ms (p20-p80) | packed ms (p20-p80) | speedup | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        t, f = r["torch"], r["packed"]
        print(f"| {r['shape']} | {r['what']} | {t['median_ms']:.2f} ({t['p20_ms']:.2f}-{t['p80_ms']:.2f}) | "
              f"{f['median_ms']:.2f} ({f['p20_ms']:.2f}-{f['p80_ms']:.2f}) | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")


def print_precisions(rows: list[dict]) -> None:
    names = [n for n in ("float32", "bfloat16", "int8", "int8 tensor", "int8 _int_mm", "int8 onednn") if n in rows[0]]
    labels = {"float32": "fp32 packed", "bfloat16": "bf16 packed", "int8": "int8 rows fbgemm (the path)",
              "int8 tensor": "int8 tensor fbgemm", "int8 _int_mm": "int8 rows _int_mm", "int8 onednn": "int8 tensor oneDNN"}
    print("Packed linears per precision, median ms (speedup over fp32); error vs fp32 max / mean abs:")
    print("| linear | rows | " + " | ".join(labels[n] + " ms" for n in names) + " | "
          + " | ".join(labels[n] + " err" for n in names[1:]) + " |")
    print("|---|---:|" + "---:|" * (2 * len(names) - 1))
    for r in rows:
        base = r["float32"]["median_ms"]
        times = [f"{r[n]['median_ms']:.3f}" + ("" if n == "float32" else f" ({base / r[n]['median_ms']:.2f}x)") for n in names]
        errs = [f"{r[n]['max_abs_err']:.1e} / {r[n]['mean_abs_err']:.1e}" for n in names[1:]]
        print(f"| {r['shape']} ({r['what']}) | {r['rows']} | " + " | ".join(times) + " | " + " | ".join(errs) + " |")


if __name__ == "__main__":
    sys.exit(main())
