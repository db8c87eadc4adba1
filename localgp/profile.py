"""`localgp profile`: where the time of one call of a part goes, module by module.

The model code labels its steps with `torch.profiler.record_function("localgp.<name>")`
(gating.profiled(); encoder: subsampling, gate, compaction, ffn1, attention, cgmlp, merge, ffn2,
scatter). Any `localgp.*` label counts, so parts that add their own (the decoder's self_attn,
src_attn, ffn, output, beam) need nothing here. Each moment of a call is given to the innermost
label around it; what no label covers is `other` (norms, residual adds of dense execution,
Python), so a call's labels add up to its time.

On the CPU the labels' host time is the time. On a GPU it is the device time of the kernels
launched inside each label (the profiler's GPU-side spans of the labels), and host-device
synchronisations are counted with torch.cuda.set_sync_debug_mode in a separate, unprofiled call;
on the CPU there are none to count ("n/a"). On every device, `host_reads` counts the device-to-host
reads of one call as the op wrappers and model code report them (localgp.ops.count_host_reads:
the ops that size an output from the data, the decoder's per-step decisions), and
`host_reads_per_layer` divides them by the part's layers (a decode call: over all its steps).

Outputs under `out`: profile.json and profile.txt (the table), a stacked-bar PNG per mode
(profile_<mode>.png, one bar per keep ratio) and a Chrome trace per mode and keep ratio
(trace_<mode>_keep<k>.json, for chrome://tracing or ui.perfetto.dev). Times are taken under the profiler, whose per-op overhead
they include: `localgp bench` gives the undisturbed totals.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from localgp import bench, ops
from localgp.evaluate import finite_report
from localgp.model.gating import LABEL_PREFIX

STEP = "localgp_profile_step"  # wraps one call; not a `localgp.` label itself
OTHER = "other"
ORDER = ("subsampling", "gate", "compaction", "ffn1", "attention", "cgmlp", "merge", "ffn2", "self_attn",
         "src_attn", "ffn", "output", "beam", "scatter")
MODES = ("dense", "masked", "compact")


def attribute(spans: list[tuple[float, float, str]], start: float, end: float) -> dict[str, float]:
    """Time of [start, end) per label, each moment given to the innermost span covering it (the
    latest started); time no span covers goes to OTHER. spans: (start, end, label)."""
    spans = sorted((max(a, start), min(b, end), label) for a, b, label in spans if b > start and a < end)
    points = sorted({start, end, *(a for a, _, _ in spans), *(b for _, b, _ in spans)})
    out: dict[str, float] = {}
    active: list[tuple[float, float, str]] = []
    i = 0
    for a, b in zip(points, points[1:]):
        while i < len(spans) and spans[i][0] <= a:
            active.append(spans[i])
            i += 1
        active = [s for s in active if s[1] > a]
        label = max(active, key=lambda s: (s[0], -s[1]))[2] if active else OTHER
        out[label] = out.get(label, 0.0) + (b - a)
    return out


def breakdown(events, device: torch.device) -> list[dict[str, float]]:
    """Per profiled call: microseconds per label (OTHER included), from the profiler's events."""
    from torch.autograd import DeviceType

    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    mine = [e for e in events if e.device_type == kind]
    steps = sorted((e.time_range.start, e.time_range.end) for e in mine if e.name == STEP)
    if not steps:
        where = "GPU-side spans of its labels" if device.type == "cuda" else "spans of its labels"
        raise RuntimeError(f"profile: the profiler recorded no {where} (no {STEP!r} event on {kind})")
    spans = [(e.time_range.start, e.time_range.end, e.name[len(LABEL_PREFIX):]) for e in mine
             if e.name.startswith(LABEL_PREFIX)]
    return [attribute(spans, a, b) for a, b in steps]


def count_syncs(fn, device: torch.device) -> int | None:
    """Host-device synchronisations torch reports in one call of fn (None on the CPU)."""
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def count_host_reads(fn) -> int:
    """Device-to-host reads in one call of fn, as the op wrappers and model code count them
    (localgp.ops.count_host_reads): the same number on every device."""
    before = ops.host_reads()
    fn()
    return ops.host_reads() - before


def profile_case(case: bench.Case, device: torch.device, repeats: int, warmup: int, trace: Path,
                 layers: int) -> dict:
    for _ in range(warmup):
        case.run()
    bench.synchronize(device)
    syncs = count_syncs(case.run, device)
    host_reads = count_host_reads(case.run)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(repeats):
            with torch.profiler.record_function(STEP):
                case.run()
            bench.synchronize(device)  # calls apart on the device timeline too
    prof.export_chrome_trace(str(trace))
    calls = breakdown(prof.events(), device)
    labels = list(dict.fromkeys(label for call in calls for label in call))
    modules = {label: sum(call.get(label, 0.0) for call in calls) / len(calls) / 1e3 for label in labels}
    return dict(total_ms=sum(modules.values()), modules_ms=ordered(modules), syncs=syncs, host_reads=host_reads,
                host_reads_per_layer=host_reads / layers, calls=len(calls),
                gflops=case.gflops(), kept_share=case.kept_share(), trace=trace.name)


def ordered(modules: dict[str, float]) -> dict[str, float]:
    known = [m for m in ORDER if m in modules]
    rest = sorted(m for m in modules if m not in ORDER and m != OTHER)
    return {m: modules[m] for m in [*known, *rest, *([OTHER] if OTHER in modules else [])]}


def run_profile(part: str, setting: bench.Setting, modes=MODES, keeps=(0.5,), repeats: int = 3, warmup: int = 1,
                out: str | Path = "out/profile") -> dict:
    """Profiles each mode (provider) at each keep ratio (dense and espnet once: they ignore it)."""
    bench.check(setting, part, modes, repeats, warmup)
    if setting.checkpoint and keeps:
        raise bench.BenchError("--keep and --checkpoint exclude each other: the trained gates decide what is kept")
    if not setting.checkpoint and not keeps:
        raise bench.BenchError("--keep: give at least one keep ratio")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workload = bench.workload(part, setting)
    missing = [m for m in modes if m not in workload.providers]
    if missing:
        raise bench.BenchError(f"--providers: part {part} has no provider {missing}")
    device = setting.torch_device()
    results = []
    with torch.inference_mode():
        for mode in modes:
            for keep in (keeps or [None]) if mode in bench.GATED else [1.0]:
                name = f"{mode}_keep{'gates' if keep is None else f'{keep:g}'}"
                result = profile_case(workload.case(mode, keep), device, repeats, warmup, out / f"trace_{name}.json",
                                      workload.shapes["layers"])
                results.append(dict(mode=mode, keep=keep if keep is not None else result["kept_share"], **result))
    report = dict(part=part, batch=setting.batch, seconds=setting.seconds, dtype=setting.dtype, **workload.shapes,
                  pruned=workload.pruned, masks=workload.masks, repeats=repeats, warmup=warmup,
                  **bench.environment(setting), unit="ms per call", results=results)
    (out / "profile.json").write_text(json.dumps(finite_report(report), indent=2, allow_nan=False) + "\n")
    (out / "profile.txt").write_text(table(report) + "\n")
    for mode in modes:
        plot(report, mode, out / f"profile_{mode}.png")
    return report


def table(report: dict) -> str:
    results = report["results"]
    labels = list(ordered({m: 0 for r in results for m in r["modules_ms"]}))
    heads = [f"{r['mode']} {r['keep']:.2f}" if r["mode"] in bench.GATED else r["mode"] for r in results]
    rows = {}
    for label in labels:
        rows[label] = []
        for r in results:
            ms = r["modules_ms"].get(label)
            rows[label].append("-" if ms is None else f"{ms:.3f} ({100 * ms / r['total_ms']:.1f}%)")
    width = 2 + max(len(c) for c in [*heads, *(c for cells in rows.values() for c in cells)])
    lines = [f"{report['part']}, {report['preset']}, batch {report['batch']}, {report['seconds']:g} s, "
             f"{report['dtype']} on {report['device_name']} ({report['device']}), revision {report['revision']}; "
             f"ms per call (share), mean of {report['repeats']} profiled calls",
             f"{'module':12s}" + "".join(f"{h:>{width}s}" for h in heads)]
    lines += [f"{label:12s}" + "".join(f"{c:>{width}s}" for c in cells) for label, cells in rows.items()]
    lines.append(f"{'total':12s}" + "".join(f"{r['total_ms']:>{width}.3f}" for r in results))
    overhead = [sum(r["modules_ms"].get(m, 0.0) for m in ("gate", "compaction", "scatter")) / r["total_ms"]
                for r in results]
    lines.append(f"{'gate+c+s %':12s}" + "".join(f"{100 * o:>{width}.1f}" for o in overhead))
    lines.append(f"{'syncs':12s}" + "".join(f"{'n/a' if r['syncs'] is None else r['syncs']:>{width}}"
                                             for r in results))
    lines.append(f"{'host reads/l':12s}" + "".join(f"{r['host_reads_per_layer']:>{width}.2f}" for r in results))
    return "\n".join(lines)


def plot(report: dict, mode: str, path: Path) -> None:
    """Stacked bars of the mode's calls, one per keep ratio, one segment per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r["mode"] == mode]
    labels = list(ordered({m: 0 for r in report["results"] for m in r["modules_ms"]}))
    palette = plt.get_cmap("tab20").colors
    colours = dict(zip(labels, palette[0::2] + palette[1::2]))  # the same colour per label in every file
    fig, ax = plt.subplots(figsize=(max(5.0, 2.6 + 1.1 * len(results)), 4.5))
    names = [f"keep {r['keep']:.2f}" if mode in bench.GATED else mode for r in results]
    bottom = [0.0] * len(results)
    for label in labels:
        heights = [r["modules_ms"].get(label, 0.0) for r in results]
        ax.bar(names, heights, bottom=bottom, label=label, color=colours[label])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("ms per call")
    ax.set_title(f"{report['part']} {report['preset']} {mode}, batch {report['batch']}, {report['seconds']:g} s, "
                 f"{report['dtype']}\n{report['device_name']}", fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
