"""One decoder step and a whole beam search under each provider (espnet, dense, masked, compact),
as pytest-benchmark tests over localgp.bench's decoder workloads:

    pytest benchmarks/bench_decoder.py --benchmark-json=out/bench_decoder.json

CPU: base preset, fp32, 8 utterances x beam 5, 30 s of encoder output, 20 decode steps (a
step after a 20-token prefix), keep 1.0 and 0.5; GPU: medium, bf16, 32 utterances, 50 steps, keep
1.0/0.7/0.5/0.3 (masks forced at random per token and module). ESPnet's search decodes one
utterance after another and is timed on the step only (a whole decode takes it tens of seconds
on the CPU). For speedups and efficiency use `localgp bench --part decode`.
"""

from __future__ import annotations

import pytest
import torch

from localgp.backbones.owsm.bench import PROVIDERS as OWSM_PROVIDERS
from localgp import bench, ops

CUDA = torch.cuda.is_available() and ops.has_cuda_kernels()
SETTING = (bench.Setting(preset="medium", dtype="bfloat16", batch=32, beam=5, tokens=50, device="cuda") if CUDA
           else bench.Setting(preset="base", dtype="float32", batch=8, beam=5, tokens=20))
KEEPS = [1.0, 0.7, 0.5, 0.3] if CUDA else [1.0, 0.5]
ROUNDS, WARMUP = (10, 2) if CUDA else (3, 1)
PROVIDERS = {"decoder-step": OWSM_PROVIDERS, "decode": ("dense", "masked", "compact")}


@pytest.fixture(scope="module", params=["decoder-step", "decode"])
def workload(request):
    return request.param, bench.workload(request.param, SETTING)


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("provider", OWSM_PROVIDERS)
def test_decoder(benchmark, workload, provider, keep):
    part, w = workload
    if provider not in PROVIDERS[part]:
        pytest.skip(f"{provider} is not timed for {part} in this suite")
    benchmark.group = f"{part} keep={keep}"
    bench.time_case(benchmark, w.case(provider, keep), SETTING, ROUNDS, WARMUP, part=part, provider=provider,
                    keep=keep, **w.shapes, pruned=w.pruned)
