"""Bad input gets a clear error that names the argument and what was expected."""

import pytest
import torch

from localgp import ops
from tests.conftest import requires_cuda
from tests.test_ops import make_case


def good(device="cpu"):
    return make_case("random", device, torch.float32)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, l, n: (x[0], l, n), r"x must have shape \(B, T, D\)"),
        (lambda x, l, n: (x, l[..., 0], n), r"logits must have shape \(B, T, 2\)"),
        (lambda x, l, n: (x, l[:, :-1], n), r"logits must have shape \(B, T, 2\) = \(3, 17, 2\)"),
        (lambda x, l, n: (x, l[:2], n), "logits must have shape"),
        (lambda x, l, n: (x, torch.cat([l, l], -1), n), r"logits must have shape \(B, T, 2\)"),
        (lambda x, l, n: (x, l, n[:2]), "lengths has 2 entries but x has batch size B=3"),
        (lambda x, l, n: (x, l, n[:, None]), r"lengths must have shape \(B,\)"),
        (lambda x, l, n: (x, l, n + 100), r"lengths must lie in \[0, T=17\]"),
        (lambda x, l, n: (x, l, -n - 1), r"lengths must lie in \[0, T=17\]"),
        (lambda x, l, n: (x, l, n.float()), "lengths must be an integer tensor"),
        (lambda x, l, n: (x, l.long(), n), "logits must be float16, bfloat16, float32 or float64, got Long"),
        (lambda x, l, n: (x.int(), l, n), "x must be float16, bfloat16, float32 or float64, got Int"),
        (lambda x, l, n: (x, l.index_fill(1, torch.tensor([0]), float("nan")), n), "logits give no decision at valid frames: a NaN logit"),
    ],
)
def test_gate_compact_errors(mutate, match):
    with pytest.raises(RuntimeError, match=match):
        ops.gate_compact(*mutate(*good()))


def test_nan_past_the_length_is_ignored():
    x, logits, lengths = good()
    logits[1, int(lengths[1]):] = float("nan")
    ops.gate_compact(x, logits, lengths)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_threshold_outside_0_1(threshold):
    with pytest.raises(RuntimeError, match="threshold must lie strictly between 0 and 1"):
        ops.gate_compact(*good(), threshold)


def test_gate_compact_linear_errors():
    x, _, lengths = good()
    B, T, _ = x.shape
    hidden, weight, bias = torch.randn(B, T, 6), torch.randn(2, 6), torch.randn(2)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(2, H\) = \(2, 6\)"):
        ops.gate_compact_linear(x, hidden, weight[:, :5], bias, lengths)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(2,\)"):
        ops.gate_compact_linear(x, hidden, weight, bias[:1], lengths)
    with pytest.raises(RuntimeError, match="hidden must have shape"):
        ops.gate_compact_linear(x, hidden[:, :3], weight, bias, lengths)
    with pytest.raises(RuntimeError, match="logits give no decision at valid frames"):
        ops.gate_compact_linear(x, hidden, weight * float("nan"), bias, lengths)


def test_scatter_and_gather_errors():
    x = torch.randn(2, 5, 4)
    values, index = torch.randn(3, 4), torch.tensor([0, 4, 9])
    with pytest.raises(RuntimeError, match="index has 2 entries but values has N=3"):
        ops.scatter_pad(values, index[:2], x)
    with pytest.raises(RuntimeError, match="values has D=3 but residual has D=4"):
        ops.scatter_pad(values[:, :3], index, x)
    with pytest.raises(RuntimeError, match="index must be int64"):
        ops.scatter_pad(values, index.int(), x)
    with pytest.raises(RuntimeError, match=r"index\[2\]=10 is outside \[0, 10\)"):
        ops.scatter_pad(values, torch.tensor([0, 1, 10]), x)
    with pytest.raises(RuntimeError, match="values is BFloat16 but residual is Float"):
        ops.scatter_pad(values.bfloat16(), index, x)
    with pytest.raises(RuntimeError, match=r"index\[0\]=-1 is outside"):
        ops.gather_rows(x, torch.tensor([-1]))


def test_group_rows_errors():
    with pytest.raises(RuntimeError, match="masks must be bool"):
        ops.group_rows(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match=r"masks must have shape \(R, M\)"):
        ops.group_rows(torch.zeros(3, dtype=torch.bool))


@requires_cuda
def test_tensors_on_different_devices():
    x, logits, lengths = good("cuda")
    with pytest.raises(RuntimeError, match="logits is on cpu but x is on cuda"):
        ops.gate_compact(x, logits.cpu(), lengths)
    with pytest.raises(RuntimeError, match="lengths is on cpu but x is on cuda"):
        ops.gate_compact(x, logits, lengths.cpu())


@requires_cuda
def test_cuda_value_errors_are_raised_not_asserted():
    x, logits, lengths = good("cuda")
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, T=17\]"):
        ops.gate_compact(x, logits, lengths + 100)
    with pytest.raises(RuntimeError, match="logits give no decision"):
        ops.gate_compact(x, logits * float("nan"), lengths)
