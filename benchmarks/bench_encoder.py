"""One encoder layer and the whole encoder under each provider (espnet, dense, masked, compact),
as pytest-benchmark tests over localgp.bench's workloads:

    pytest benchmarks/bench_encoder.py --benchmark-json=out/bench_encoder.json

CPU: base preset, fp32, batch 1, 30 s, keep 1.0 and 0.5; GPU: medium, bf16, batch 8, 30 s, keep
1.0/0.7/0.5/0.3 (forced random temporal masks on FFN1/attention/FFN2). Each test's extra_info
holds the executed GFLOPs and what ran where. For speedups and efficiency from interleaved timing,
use `localgp bench`; this suite keeps pytest-benchmark's history (--benchmark-compare).
"""

from __future__ import annotations

import pytest
import torch

from localgp.backbones.owsm.bench import PROVIDERS as OWSM_PROVIDERS
from localgp import bench, ops

CUDA = torch.cuda.is_available() and ops.has_cuda_kernels()
SETTING = (bench.Setting(preset="medium", dtype="bfloat16", batch=8, seconds=30.0, device="cuda") if CUDA
           else bench.Setting(preset="base", dtype="float32", batch=1, seconds=30.0))
KEEPS = [1.0, 0.7, 0.5, 0.3] if CUDA else [1.0, 0.5]
ROUNDS, WARMUP = (30, 3) if CUDA else (3, 1)


@pytest.fixture(scope="module", params=["layer", "encoder"])
def workload(request):
    return request.param, bench.workload(request.param, SETTING)


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("provider", OWSM_PROVIDERS)
def test_encoder(benchmark, workload, provider, keep):
    part, w = workload
    benchmark.group = f"{part} keep={keep}"
    bench.time_case(benchmark, w.case(provider, keep), SETTING, ROUNDS, WARMUP, part=part, provider=provider, keep=keep, **w.shapes,
              pruned=w.pruned)
