"""Reads bench_ops.py's pytest-benchmark JSON: ratios against dense and masked, op bandwidth,
and the issue's bars. Usage: python benchmarks/report_ops.py out/bench_ops.json [--check]"""

from __future__ import annotations

import argparse
import json
import sys

# The bars of the fused-ops issue on the CPU.
COMPACT_AT_HALF_MAX = 0.55  # compact at keep 0.5 / dense
OVERHEAD_MAX = 0.10  # (gate_compact + scatter_pad) / dense FFN block


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for bench in data["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        rows[(info["provider"], info["keep"])] = dict(
            info=info, median=stats["median"] * 1e3, q1=stats["q1"] * 1e3, q3=stats["q3"] * 1e3,
            rounds=stats["rounds"],
        )
    return data, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--check", action="store_true", help="exit 1 when a bar is missed")
    args = parser.parse_args(argv)
    data, rows = load(args.json)
    any_row = next(iter(rows.values()))["info"]
    print(f"device {any_row['device']}  dtype {any_row['dtype']}  B={any_row['B']} T={any_row['T']} "
          f"D={any_row['D']} units={any_row['units']}  threads {any_row['threads']}  "
          f"torch {any_row.get('torch', '?')}  {data['machine_info'].get('cpu', {}).get('brand_raw', '')}")
    print(f"{'provider':12s} {'keep':>5s} {'kept':>6s} {'median ms':>10s} {'q1-q3 ms':>16s} "
          f"{'vs dense':>9s} {'vs masked':>10s} {'MAC ratio':>10s}")
    keeps = sorted({k for (_, k) in rows}, reverse=True)
    for keep in keeps:
        dense, masked = rows.get(("dense", keep)), rows.get(("masked", keep))
        for provider in ("dense", "masked", "compact"):
            r = rows.get((provider, keep))
            if r is None:
                continue
            mac_ratio = r["info"]["gmacs"] / dense["info"]["gmacs"]
            print(f"{provider:12s} {keep:5.2f} {r['info']['kept_frames']:6d} {r['median']:10.2f} "
                  f"{r['q1']:7.2f}-{r['q3']:<8.2f} {r['median'] / dense['median']:9.3f} "
                  f"{r['median'] / masked['median']:10.3f} {mac_ratio:10.3f}")
    copy = rows.get(("copy", 1.0))
    copy_bw = copy["info"]["bytes"] / copy["median"] / 1e6 if copy else None
    print(f"\n{'op':12s} {'keep':>5s} {'median ms':>10s} {'q1-q3 ms':>16s} {'GB/s':>8s} "
          f"{'of copy':>8s} {'of dense FFN':>13s}")
    for keep in keeps:
        for op in ("gate_compact", "scatter_pad"):
            r = rows.get((op, keep))
            if r is None:
                continue
            bw = r["info"]["bytes"] / r["median"] / 1e6
            share = r["median"] / rows[("dense", keep)]["median"]
            print(f"{op:12s} {keep:5.2f} {r['median']:10.3f} {r['q1']:7.3f}-{r['q3']:<8.3f} "
                  f"{bw:8.1f} {bw / copy_bw if copy_bw else float('nan'):8.2f} {share:13.3f}")
    if copy_bw:
        print(f"copy bandwidth (x.clone(), same run): {copy_bw:.1f} GB/s")

    failures = []
    half = rows.get(("compact", 0.5)), rows.get(("dense", 0.5))
    if all(half):
        ratio = half[0]["median"] / half[1]["median"]
        ok = ratio <= COMPACT_AT_HALF_MAX
        print(f"\nbar: compact/dense at keep 0.5 = {ratio:.3f} (<= {COMPACT_AT_HALF_MAX}) "
              f"{'PASS' if ok else 'FAIL'}")
        failures += [] if ok else ["compact at keep 0.5"]
        overhead = (rows[("gate_compact", 0.5)]["median"] + rows[("scatter_pad", 0.5)]["median"]) / half[1]["median"]
        ok = overhead <= OVERHEAD_MAX
        print(f"bar: (gate_compact + scatter_pad) / dense at keep 0.5 = {overhead:.3f} "
              f"(<= {OVERHEAD_MAX}) {'PASS' if ok else 'FAIL'}")
        failures += [] if ok else ["op overhead"]
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
