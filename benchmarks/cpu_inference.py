"""What localgp's CPU inference paths save, each beside what it replaced, on this machine:

1. Linears of Whisper base's shapes: PyTorch's own (`F.linear`, MKL's sgemm) against oneDNN with
   the weight packed once (`localgp.model.packed`, what `localgp decode` and `transcribe` run).
2. Silero VAD over a recording: silero's own loop (`get_speech_timestamps`: the whole network
   per 32 ms chunk) against `SileroVAD` (the per-chunk part batched, the LSTM over all chunks).

    python benchmarks/cpu_inference.py [--seconds 300] [--repeats 5] [--json F]

Median and p20-p80 over repeats after a warm-up, float32, the machine's thread count.
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
    p.add_argument("--seconds", type=float, default=300.0, help="audio for the VAD: up to this much of the demo's English test clips (170.4 s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    result = {"device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "revision": git_revision(), "linears": linears(args.repeats),
              "vad": vad(args.seconds, args.repeats)}
    print(f"{result['device']}, {result['threads']} threads, float32, torch {result['torch']}, revision {result['revision']}")
    print("| linear (rows x in -> out) | | torch ms (p20-p80) | packed ms (p20-p80) | speedup | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for r in result["linears"]:
        t, f = r["torch"], r["packed"]
        print(f"| {r['shape']} | {r['what']} | {t['median_ms']:.2f} ({t['p20_ms']:.2f}-{t['p80_ms']:.2f}) | "
              f"{f['median_ms']:.2f} ({f['p20_ms']:.2f}-{f['p80_ms']:.2f}) | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    v = result["vad"]
    print(f"VAD over {v['audio_seconds']:.1f} s: silero's loop {v['silero loop']['median_ms']:.0f} ms "
          f"({v['silero loop']['p20_ms']:.0f}-{v['silero loop']['p80_ms']:.0f}), batched {v['batched']['median_ms']:.0f} ms "
          f"({v['batched']['p20_ms']:.0f}-{v['batched']['p80_ms']:.0f}): "
          f"{v['silero loop']['median_ms'] / v['batched']['median_ms']:.1f}x, same regions: {v['same_regions']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if v["same_regions"] else 1


if __name__ == "__main__":
    sys.exit(main())
