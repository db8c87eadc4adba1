"""The fused ops on an FFN block: dense vs masked vs compact, and the ops alone.

    pytest benchmarks/bench_ops.py --benchmark-json=out/bench_ops.json
    python benchmarks/report_ops.py out/bench_ops.json     # ratios, bandwidth and the bars

The block is the macaron FFN of an E-Branchformer layer, x + 0.5 * FFN(LayerNorm(x)):
- dense: every frame;
- masked: every frame, output multiplied by the keep mask (the papers' implementation);
- compact: gate_compact -> FFN on the kept frames -> scatter_pad (residual add fused).
Shapes follow the issue: CPU fp32 D=768, units 3072, B=4, T=749 (OWSM small, 30 s);
GPU bf16 D=1024, units 4096, B=8, T=749 (OWSM medium).
"""

from __future__ import annotations

import pytest
import torch

from localgp import ops
from localgp.gates import random_keep_logits

KEEP_RATIOS = [1.0, 0.7, 0.5, 0.3]
ROUNDS = {"cpu": 7, "cuda": 50}


def setting():
    if torch.cuda.is_available() and ops.has_cuda_kernels():
        return dict(device="cuda", dtype=torch.bfloat16, B=8, T=749, D=1024, units=4096)
    return dict(device="cpu", dtype=torch.float32, B=4, T=749, D=768, units=3072)


SETTING = setting()


class FFN(torch.nn.Module):
    def __init__(self, d_model: int, units: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d_model)
        self.w_1 = torch.nn.Linear(d_model, units)
        self.w_2 = torch.nn.Linear(units, d_model)

    def forward(self, x):
        return self.w_2(torch.nn.functional.silu(self.w_1(self.norm(x))))


def logits_for(keep: float, B: int, T: int, device, seed: int = 0) -> torch.Tensor:
    """Random per-frame decisions keeping a `keep` share of the frames."""
    return random_keep_logits((B, T), keep, torch.Generator().manual_seed(seed), device)


@pytest.fixture(scope="module")
def block():
    s = SETTING
    torch.manual_seed(0)
    ffn = FFN(s["D"], s["units"]).to(s["device"], s["dtype"]).eval()
    x = torch.randn(s["B"], s["T"], s["D"], device=s["device"], dtype=s["dtype"])
    lengths = torch.full((s["B"],), s["T"], device=s["device"])
    return ffn, x, lengths


def dense(ffn, x, logits, lengths):
    return x + 0.5 * ffn(x)


def masked(ffn, x, logits, lengths):
    keep = torch.softmax(logits.float(), -1)[..., 1] > 0.5
    return x + 0.5 * ffn(x) * keep[..., None].to(x.dtype)


def compact(ffn, x, logits, lengths):
    c = ops.gate_compact(x, logits, lengths)
    return ops.scatter_pad(ffn(c.packed), c.index, x, 0.5)


PROVIDERS = {"dense": dense, "masked": masked, "compact": compact}


def run(benchmark, fn, **info):
    s = SETTING
    sync = torch.cuda.synchronize if s["device"] == "cuda" else (lambda: None)

    def timed():
        out = fn()
        sync()
        return out

    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if s["device"] == "cuda" else "cpu",
        dtype=str(s["dtype"]).replace("torch.", ""),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        **{k: s[k] for k in ("B", "T", "D", "units")},
        **info,
    )
    with torch.inference_mode():
        benchmark.pedantic(timed, rounds=ROUNDS[s["device"]], warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("keep", KEEP_RATIOS)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_ffn_block(benchmark, block, provider, keep):
    ffn, x, lengths = block
    logits = logits_for(keep, x.shape[0], x.shape[1], x.device)
    kept = ops.gate_compact(x, logits, lengths).packed.shape[0]
    benchmark.group = f"ffn keep={keep}"
    rows = x.shape[0] * x.shape[1] if provider != "compact" else kept
    macs = 2 * rows * x.shape[2] * SETTING["units"]
    run(benchmark, lambda: PROVIDERS[provider](ffn, x, logits, lengths), part="ffn",
        provider=provider, keep=keep, kept_frames=kept, gmacs=macs / 1e9)


@pytest.mark.parametrize("keep", KEEP_RATIOS)
def test_gate_compact(benchmark, block, keep):
    _, x, lengths = block
    logits = logits_for(keep, x.shape[0], x.shape[1], x.device)
    kept = ops.gate_compact(x, logits, lengths).packed.shape[0]
    # Read logits and x's kept rows, write packed, index and the mask.
    moved = logits.numel() * logits.element_size() + 2 * kept * x.shape[2] * x.element_size()
    moved += kept * 8 + x.shape[0] * x.shape[1]
    benchmark.group = f"ops keep={keep}"
    run(benchmark, lambda: ops.gate_compact(x, logits, lengths), part="op",
        provider="gate_compact", keep=keep, kept_frames=kept, bytes=moved)


@pytest.mark.parametrize("keep", KEEP_RATIOS)
def test_scatter_pad(benchmark, block, keep):
    _, x, lengths = block
    c = ops.gate_compact(x, logits_for(keep, x.shape[0], x.shape[1], x.device), lengths)
    values = torch.randn_like(c.packed)
    kept = c.packed.shape[0]
    # Copy the residual (read + write), then read the kept values and read-modify-write their rows.
    moved = 2 * x.numel() * x.element_size() + 3 * kept * x.shape[2] * x.element_size() + kept * 8
    benchmark.group = f"ops keep={keep}"
    run(benchmark, lambda: ops.scatter_pad(values, c.index, x, 0.5), part="op",
        provider="scatter_pad", keep=keep, kept_frames=kept, bytes=moved)


def test_copy_bandwidth(benchmark, block):
    """The device's copy bandwidth, measured in the same run, for the ops' efficiency."""
    _, x, _ = block
    benchmark.group = "ops copy"
    run(benchmark, lambda: x.clone(), part="op", provider="copy", keep=1.0,
        bytes=2 * x.numel() * x.element_size())
