"""What token-level skipping can save at most in one decoder step, on this machine.

Each gated decoder module (self-attention, src-attention, FFN) of every layer is timed on all
batch x beam rows and on a random `keep` share of them, by the compact path (gather, module,
scatter-add), beside whole dense and compact steps (masks forced at random per token and module).
The best compact step is the dense step less every module's saving:

    python benchmarks/decode_modules.py --preset base --batch 8 --beam 5 --tokens 30 --keep 0.5

prints per module the milliseconds on all rows and on the kept rows (summed over the layers),
then the dense, measured compact and best compact steps and their speedups; --json keeps them.
"""

from __future__ import annotations

import argparse
import json

from localgp.bench import Setting, device_name, parse_dtype
from localgp.backbones.owsm.bench_decoder import module_costs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=30, help="prefix length of the step")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--dtype", type=parse_dtype, default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    setting = Setting(preset=args.preset, batch=args.batch, beam=args.beam, tokens=args.tokens, seconds=args.seconds,
                      dtype=args.dtype, device=args.device)
    result = module_costs(setting, args.keep, args.repeats)
    result["setting"]["device_name"] = device_name(setting.torch_device())
    s = result["setting"]
    print(f"decoder step, {s['preset']}, batch {s['batch']} x beam {s['beam']}, prefix {s['tokens']}, {s['dtype']} "
          f"on {s['device_name']}, keep {s['keep']}; medians of {s['repeats']}")
    print(f"{'module':<10} {'rows':>5} {'kept':>6} {'all ms':>8} {'kept ms':>8} {'time share':>10}")
    for row in result["modules"]:
        print(f"{row['module']:<10} {row['rows']:>5} {row['kept_share']:>6.2f} {row['all_ms']:>8.2f} "
              f"{row['kept_ms']:>8.2f} {row['time_share']:>10.2f}")
    print(f"dense step {result['dense_step_ms']:.2f} ms; compact {result['compact_step_ms']:.2f} ms "
          f"({result['measured_speedup']:.3f}x); best compact {result['best_step_ms']:.2f} ms "
          f"({result['best_speedup']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
