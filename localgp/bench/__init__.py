"""`localgp bench`: wall-clock of a model part under each execution ("provider"), with the
compute it executed, in one run. See core.py for the providers, the timing and the columns.

The parts live with their backbones (PARTS below): OWSM's in localgp/backbones/owsm/bench.py and
bench_decoder.py (random weights of a preset or a trained run), Whisper base's in
localgp/backbones/whisper/bench.py (the real weights on real clips, beside openai-whisper and
faster-whisper), transformers' Whisper base's in localgp/backbones/hf_whisper/bench.py.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from localgp.bench.core import (  # noqa: F401 (the package's interface)
    BASELINES, DEFAULT_KEEPS, DTYPES, GATED, GATES, PROVIDERS, BenchError, Case, Setting, Workload,
    check, device_name, environment, markdown, parse_dtype, parse_keeps, parse_providers, synchronize, table,
    time_case, timed_interleaved, with_speedups, write_csv, write_json,
)


def _owsm_parts() -> dict[str, Callable[[Setting], Workload]]:
    from localgp.backbones.owsm import bench_decoder as owsm_decoder
    from localgp.backbones.owsm.bench import EncoderWorkload, LayerWorkload

    return {"layer": LayerWorkload, "encoder": EncoderWorkload,
            "decoder-step": owsm_decoder.DecoderStepWorkload,  # one decoding step of batch x beam hypotheses
            "decode": owsm_decoder.DecodeWorkload}  # a full beam search


def _whisper_parts() -> dict[str, Callable[[Setting], Workload]]:
    from localgp.backbones.whisper import bench as whisper

    return {"encoder": whisper.EncoderWorkload, "decode": whisper.DecodeWorkload}


def _hf_whisper_parts() -> dict[str, Callable[[Setting], Workload]]:
    from localgp.backbones.hf_whisper import bench  # imports transformers: only for this backbone

    return {"encoder": bench.EncoderWorkload, "decode": bench.DecodeWorkload}


# Each backbone's parts (their names in localgp.train_config.BACKBONES, without importing them), from its home.
PARTS = {"owsm": _owsm_parts, "whisper-base": _whisper_parts, "hf-whisper-base": _hf_whisper_parts}


def workload(part: str, setting: Setting) -> Workload:
    """The part `part` of the setting's backbone, built."""
    return PARTS[setting.backbone]()[part](setting)


def run_bench(part: str, setting: Setting, providers=None, keeps=DEFAULT_KEEPS, repeats: int = 5,
              warmup: int = 1) -> list[dict]:
    """Rows of one part: for each keep ratio, every provider asked for (None: all the part has)
    plus the baselines."""
    check(setting, part, providers or (), repeats, warmup)
    if setting.checkpoint and keeps:
        raise BenchError("--keep and --checkpoint exclude each other: the trained gates decide what is kept")
    if not setting.checkpoint and not keeps:
        raise BenchError("--keep: give at least one keep ratio")
    built = workload(part, setting)
    if providers is None:  # a part's defaults, where it names them (else all it has)
        providers = getattr(built, "default_providers", built.providers)
    missing = [p for p in providers if p not in built.providers]
    if missing:
        raise BenchError(f"--providers: part {part} has no provider {missing}; it has {','.join(built.providers)}")
    measured = [p for p in PROVIDERS if p in providers or p in BASELINES]
    device = setting.torch_device()
    common = dict(backbone=setting.backbone, preset=setting.preset, batch=setting.batch, seconds=setting.seconds, dtype=setting.dtype,
                  device=setting.device)
    common.update(built.shapes)
    common.update(pruned=built.pruned, masks=built.masks, repeats=repeats, warmup=warmup)
    env = environment(setting)
    rows = []
    with torch.inference_mode():
        for keep in keeps or [None]:
            cases = {p: built.case(p, keep) for p in measured}
            times = timed_interleaved({p: c.run for p, c in cases.items()}, repeats, warmup, device)
            group = []
            for provider, case in cases.items():
                p20, median, p80 = np.percentile(times[provider], [20, 50, 80])
                group.append(dict(part=part, provider=provider, keep=keep, **common, median_ms=float(median),
                                  p20_ms=float(p20), p80_ms=float(p80), gflops=case.gflops(),
                                  kept_share=case.kept_share()))
            if keep is None:  # trained gates: the share they kept is the row's keep ratio
                share = next(r["kept_share"] for r in group if r["provider"] == "masked")
                for r in group:
                    r["keep"] = share
            rows += [dict(r, **env) for r in with_speedups(group)]
    return rows


