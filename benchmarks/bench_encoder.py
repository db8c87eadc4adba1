"""Encoder wall-clock: ESPnet's own encoder (dense) vs the gated encoder in masked and compact
execution, with forced random temporal masks, measured in one run.

    python benchmarks/bench_encoder.py --preset small --keep 1.0,0.5 --repeats 3 [--json FILE]

Reports median and min-max over repeats, the executed GMACs, and ratios against dense and
masked. (`localgp bench --part encoder` of the benchmarks issue will supersede this script.)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from localgp import flops
from localgp.model import owsm
from localgp.model.config import GateConfig
from localgp.model.convert import force_keep, gate_s2t_model, set_execution


def timed_interleaved(providers: dict, repeats: int, sync) -> dict[str, list[float]]:
    """Each repeat runs every provider once, in turn: slow drift of the machine (other load,
    clocks) then shifts all providers alike instead of biasing the ratios."""
    times = {name: [] for name in providers}
    for fn in providers.values():  # warm-up
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(owsm.PRESETS))
    parser.add_argument("--keep", default="1.0,0.5", help="comma list of keep ratios")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    model, _ = owsm.build_owsm(args.preset)
    dense = model.encoder.to(device, dtype).eval()
    gated = gate_s2t_model(copy.deepcopy(model).to(device, dtype), GateConfig(encoder="temporal")).encoder.eval()
    frames = flops.input_frames(args.seconds)
    feats = torch.randn(args.batch, frames, flops.N_MELS, device=device, dtype=dtype)
    lengths = torch.full((args.batch,), frames, device=device)
    shape = flops.EncoderShape.of_encoder(dense)

    def gated_run(execution: str, keep: float):
        def run():
            set_execution(gated, execution)
            force_keep(gated, keep, seed=0)  # the same masks in both executions, every repeat
            gated(feats, lengths)
        return run

    rows = []
    with torch.inference_mode():
        dense_macs = flops.encoder_macs(shape, frames)["total"] * args.batch
        for keep in (float(k) for k in args.keep.split(",")):
            providers = {"dense": lambda: dense(feats, lengths)}
            providers.update({ex: gated_run(ex, keep) for ex in ("masked", "compact")})
            times = timed_interleaved(providers, args.repeats, sync)
            macs = {"dense": dense_macs}
            for execution in ("masked", "compact"):
                providers[execution]()
                macs[execution] = flops.executed_encoder_macs(gated, lengths.tolist())["total"]
            for provider in providers:
                times_p, macs_p = times[provider], macs[provider]
                rows.append(dict(part="encoder", provider=provider, keep=keep, preset=args.preset,
                                 batch=args.batch, seconds=args.seconds, dtype=args.dtype,
                                 device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                 threads=torch.get_num_threads(), torch=torch.__version__,
                                 median_ms=1e3 * statistics.median(times_p), min_ms=1e3 * min(times_p),
                                 max_ms=1e3 * max(times_p), repeats=len(times_p), gmacs=macs_p / 1e9))
            by = {r["provider"]: r for r in rows if r["keep"] == keep}
            for r in by.values():
                r["speedup_vs_dense"] = by["dense"]["median_ms"] / r["median_ms"]
                r["speedup_vs_masked"] = by["masked"]["median_ms"] / r["median_ms"]
                r["mac_ratio_vs_masked"] = r["gmacs"] / by["masked"]["gmacs"]

    print(f"{args.preset} encoder, batch {args.batch}, {args.seconds:g} s, {args.dtype} on {rows[0]['device']}, "
          f"{rows[0]['threads']} threads, forced random temporal masks on FFN1/attention/FFN2")
    print(f"{'provider':9s} {'keep':>5s} {'median ms':>10s} {'min-max ms':>18s} {'GMACs':>8s} "
          f"{'/dense':>7s} {'/masked':>8s} {'MACs/masked':>12s}")
    for r in rows:
        print(f"{r['provider']:9s} {r['keep']:5.2f} {r['median_ms']:10.1f} {r['min_ms']:8.1f}-{r['max_ms']:<9.1f} "
              f"{r['gmacs']:8.2f} {1 / r['speedup_vs_dense']:7.3f} {1 / r['speedup_vs_masked']:8.3f} "
              f"{r['mac_ratio_vs_masked']:12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
