"""What compaction and scatter cost per gated encoder layer: bytes moved and time, before and after
one host read per layer and the scatters that write each row once; and the CPU kernels on 1 vs 2
threads.

    python benchmarks/compaction.py [--device cpu|cuda] [--dtype bfloat16] [--json F] [--markdown F]

1. Traffic table: the bytes each op moves for B=8, T=1500, D=1024 (OWSM medium's E-Branchformer
   layer, 30 s) at keep 0.5, counted from the kernels' loads and stores (csrc/cuda/compaction.cu:
   rows, indices, positions, flags; the few-KB scan scratch is left out), against the minimum:
   each kept row read once and written once per compaction and per scatter. "before" is the code
   of the previous revision, rebuilt here from the same ops where it moved more (a residual copy
   then an in-place add, a zeros tensor first for the attention branch).
2. Time of the same steps on this device (median and spread over repeats), with the effective
   bandwidth the byte counts imply.
3. CPU only: gate_compact + scatter_pad on (8, 1500, 1024) fp32 with 1 and 2 threads (bar: 2
   threads >= 1.6x faster), beside torch's own copy_ of the same tensor: the ops are bound by
   memory bandwidth, and copy_'s ratio is what the machine's memory allows.

On the CPU the script re-runs itself with glibc's malloc kept off mmap (MALLOC_MMAP_MAX_=0, no
trimming): otherwise every output over 32 MB is a fresh mapping whose page faults take most of
the time and scale with nothing (PyTorch's CPU tuning guide swaps in jemalloc/tcmalloc for this).

Byte counts are a model of the kernels, not hardware counters: on a GPU, Nsight Compute's
dram__bytes would be the measurement (not available on the project's GPU machines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from localgp import ops  # noqa: E402
from localgp.bench.core import device_name, git_revision  # noqa: E402

B, T, D, KEEP = 8, 1500, 1024, 0.5
MODULES = ("ffn1", "attn", "ffn2")  # E-Branchformer's gated modules: ffn1/ffn2 residual, attn a branch
INDEX, POSITION, FLAG = 8, 8, 4  # bytes of an index entry, a position, a claimed-row flag


def traffic(rows: int, kept: int, elt: int, modules: int = 3) -> list[dict]:
    """Bytes per op of one layer, before / after / minimum. rows = B*T, kept = N per module."""
    row = D * elt
    keep_bytes = rows  # the (B, T) bool mask
    logits = rows * 2 * 4  # float32 logits of one module
    out = []

    def add(step, before, after, minimum):
        out.append(dict(step=step, before=before, after=after, minimum=minimum))

    # Deciding: before, gate_compact per module (reads its logits, writes keep, index, packed rows);
    # after, one gate_plan (a module-major copy of the logits, keep, index) and a gather per module.
    for name in MODULES[:modules]:
        add(f"compaction {name}",
            before=logits + keep_bytes + kept * (2 * 4 + INDEX + 2 * row),
            after=kept * (INDEX + 2 * row),  # gather_rows: the index read, each kept row read and written
            minimum=2 * kept * row)
    # gate_plan: the logits copied module-major and read again, keep, the kept frames' tile slots
    # (written, read) and index.
    add("gate_plan (all modules)", before=0, after=modules * (3 * logits + keep_bytes + kept * (2 * 4 + INDEX)),
        minimum=0)
    # Residual adds (ffn1, ffn2): before, scatter_pad = copy of the residual + read-modify-write of
    # the kept rows; after, scatter_add_ in place: claimed flags, the kept rows read and written.
    for name in ("ffn1", "ffn2"):
        add(f"scatter {name} (residual)",
            before=2 * rows * row + kept * (INDEX + 3 * row),
            after=rows * FLAG + kept * (INDEX + FLAG + 3 * row),
            minimum=2 * kept * row)
    # The attention branch (zeros where skipped): before, a zeros tensor, scatter_pad's copy of it,
    # the kept rows; after, scatter_rows: positions, then every output row written once.
    add("scatter attn (branch)",
        before=rows * row + 2 * rows * row + kept * (INDEX + 3 * row),
        after=rows * POSITION + kept * (INDEX + POSITION) + rows * (POSITION + row) + kept * row,
        minimum=2 * kept * row)
    return out


def measure(fn, repeats: int, device: torch.device) -> dict:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return dict(median_ms=statistics.median(times), p20_ms=times[len(times) // 5],
                p80_ms=times[(4 * len(times)) // 5])


def layer_steps(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(before, after) callables of one layer's compactions and scatters, on the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen).to(device, dtype)
    logits = torch.randn(B, T, len(MODULES), 2, generator=gen).to(device)  # keep 0.5 on average
    lengths = torch.full((B,), T, device=device)
    plan = ops.gate_plan(logits, lengths)
    values = [torch.randn(plan.offsets[m + 1] - plan.offsets[m], D, generator=gen).to(device, dtype)
              for m in range(len(MODULES))]

    def before():
        for m, name in enumerate(MODULES):
            c = ops.gate_compact(x, logits[:, :, m], lengths)
            if name == "attn":  # zeros first, then scatter_pad's copy of them
                ops.scatter_add_(torch.zeros_like(x).clone(), values[m], c.index)
            else:  # scatter_pad as it was: the residual copied, then the kept rows added
                ops.scatter_add_(x.clone(), values[m], c.index, 0.5)

    residual = x.clone()

    def after():
        p = ops.gate_plan(logits, lengths)
        for m, name in enumerate(MODULES):
            c = p.compact(m, x)
            if name == "attn":
                ops.scatter_rows(values[m], c.index, x.shape)
            else:
                ops.scatter_add_(residual, values[m], c.index, 0.5)

    return before, after, plan


def thread_scaling(repeats: int) -> list[dict]:
    """gate_compact + scatter_pad, (8, 1500, 1024) fp32, on 1 and 2 threads (CPU), the two
    interleaved so that other load on the machine hits both alike."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen)
    logits = torch.randn(B, T, 2, generator=gen)
    lengths = torch.full((B,), T)

    def step():
        c = ops.gate_compact(x, logits, lengths)
        ops.scatter_pad(c.packed, c.index, x, 0.5)

    out = torch.empty_like(x)
    steps = {"gate_compact + scatter_pad": step, "torch copy_ (the memory's ratio)": lambda: out.copy_(x)}
    threads = torch.get_num_threads()
    times = {(name, n): [] for name in steps for n in (1, 2)}
    try:
        for _ in range(repeats):
            for name, n in times:
                torch.set_num_threads(n)
                times[name, n].append(measure(steps[name], 1, torch.device("cpu"))["median_ms"])
    finally:
        torch.set_num_threads(threads)
    rows = []
    for (name, n), t in times.items():
        t.sort()
        rows.append(dict(step=name, threads=n, median_ms=statistics.median(t), p20_ms=t[len(t) // 5],
                         p80_ms=t[(4 * len(t)) // 5]))
    for one, two in zip(rows[::2], rows[1::2], strict=True):
        two["speedup_vs_1_thread"] = one["median_ms"] / two["median_ms"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on cuda, 15 on cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_MAX_") != "0" and argv is None:
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**40))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (50 if device.type == "cuda" else 15)
    elt = torch.empty((), dtype=dtype).element_size()

    before, after, plan = layer_steps(device, dtype)
    kept = round(sum(plan.offsets[m + 1] - plan.offsets[m] for m in range(len(MODULES))) / len(MODULES))
    table = traffic(B * T, kept, elt)
    totals = {k: sum(r[k] for r in table) for k in ("before", "after", "minimum")}
    timing = {"before": measure(before, repeats, device), "after": measure(after, repeats, device)}
    result = dict(device=str(device), device_name=device_name(device), dtype=str(dtype).removeprefix("torch."),
                  threads=torch.get_num_threads(), torch=torch.__version__, revision=git_revision(),
                  shape=[B, T, D], keep=KEEP, kept_rows_per_module=kept, traffic=table,
                  traffic_totals=totals, ratio_to_minimum={k: totals[k] / totals["minimum"] for k in ("before", "after")},
                  timing=timing, speedup=timing["before"]["median_ms"] / timing["after"]["median_ms"],
                  malloc_mmap_max=os.environ.get("MALLOC_MMAP_MAX_"))
    for k in ("before", "after"):
        result["timing"][k]["effective_GBps"] = totals[k] / result["timing"][k]["median_ms"] / 1e6
    if device.type == "cpu":
        result["threads_scaling"] = thread_scaling(repeats)

    lines = [f"{result['device_name']}, {result['dtype']}, B={B} T={T} D={D}, keep {KEEP} "
             f"({kept} kept rows per module), revision {result['revision']}", "",
             "| step | before (MB) | after (MB) | minimum (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['before'] / 1e6:.1f} | {r['after'] / 1e6:.1f} | {r['minimum'] / 1e6:.1f} |"
              for r in table]
    lines.append(f"| **layer** | **{totals['before'] / 1e6:.1f}** ({result['ratio_to_minimum']['before']:.2f}x) | "
                 f"**{totals['after'] / 1e6:.1f}** ({result['ratio_to_minimum']['after']:.2f}x) | "
                 f"**{totals['minimum'] / 1e6:.1f}** |")
    lines += ["", f"time per layer (median [p20, p80] of {repeats}): before "
              f"{timing['before']['median_ms']:.2f} [{timing['before']['p20_ms']:.2f}, {timing['before']['p80_ms']:.2f}] ms, "
              f"after {timing['after']['median_ms']:.2f} [{timing['after']['p20_ms']:.2f}, {timing['after']['p80_ms']:.2f}] ms: "
              f"{result['speedup']:.2f}x"]
    scaling = result.get("threads_scaling", [])
    for one, two in zip(scaling[::2], scaling[1::2], strict=True):
        lines.append(f"{one['step']}, fp32 (8, 1500, 1024): 1 thread {one['median_ms']:.2f} ms "
                     f"[{one['p20_ms']:.2f}, {one['p80_ms']:.2f}], 2 threads {two['median_ms']:.2f} ms "
                     f"[{two['p20_ms']:.2f}, {two['p80_ms']:.2f}]: {two['speedup_vs_1_thread']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
