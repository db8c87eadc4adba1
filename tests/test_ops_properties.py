"""Property-based tests of the ops against localgp/reference.py (hypothesis): random shapes with
0 and 1, every float dtype, non-contiguous inputs, repeated and out-of-range indices, non-finite
logits. Each input either gives the reference's result or an error naming the op, never
something else. About 1,200 examples in all, each test bounded in time."""

import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localgp import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EXAMPLES = 300
PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _modules_hypothesis_can_read():
    """Hypothesis reads `__file__` of every loaded module to harvest constants; speechbrain's lazy
    modules (e.g. its k2 integration, loaded once test_context imported speechbrain) raise
    ImportError on that read instead of AttributeError. They are set aside while these tests run."""
    unreadable = {}
    for name, module in list(sys.modules.items()):
        try:
            getattr(module, "__file__", None)
        except ImportError:
            unreadable[name] = sys.modules.pop(name)
    yield
    sys.modules.update(unreadable)


def tensor(draw, shape, dtype, contiguous):
    """Random values of `shape`, possibly a strided view of a larger tensor."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if contiguous or not shape:
        return torch.randn(shape, generator=gen).to(dtype)
    wide = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen).to(dtype)
    return wide[..., 1::2]


@st.composite
def gate_inputs(draw, modules: bool):
    B, T, D = draw(st.integers(0, 4)), draw(st.integers(0, 40)), draw(st.integers(0, 9))
    M = draw(st.integers(0, 3)) if modules else None
    dtype = draw(st.sampled_from(DTYPES))
    shape = (B, T, M, 2) if modules else (B, T, 2)
    logits = tensor(draw, shape, torch.float32, draw(st.booleans())) * 3
    # A few frames get non-finite logits: NaN anywhere, or an infinity in one class or in both.
    for _ in range(draw(st.integers(0, 3))):
        if logits.numel():
            flat = draw(st.integers(0, logits.numel() - 1))
            logits.view(-1)[flat] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    logits = logits.to(draw(st.sampled_from(DTYPES)))
    threshold = draw(st.floats(0.01, 0.99))
    # A few frames exactly on the threshold (margin = logit(threshold) after rounding to the dtype).
    bound = math.log(threshold / (1 - threshold))
    for _ in range(draw(st.integers(0, 2))):
        if logits.numel():
            frame = logits.view(-1, 2)[draw(st.integers(0, logits.numel() // 2 - 1))]
            frame[0], frame[1] = 0.0, bound
    lengths = torch.tensor(draw(st.lists(st.integers(-1 if draw(st.booleans()) else 0, T + 1), min_size=B, max_size=B)),
                           dtype=torch.int64)
    x = tensor(draw, (B, T, D), dtype, draw(st.booleans()))
    return x, logits, lengths, threshold


def reference_or_error(fn, *args):
    """The reference's result, or None where its input has no answer (NaN margin, bad length)."""
    try:
        return fn(*args)
    except ValueError:
        return None


@PROFILE
@given(gate_inputs(modules=False))
def test_gate_compact_property(inputs):
    x, logits, lengths, threshold = inputs
    T = x.shape[1]
    if bool(((lengths < 0) | (lengths > T)).any()):
        with pytest.raises(RuntimeError, match=r"gate_compact: lengths must lie in \[0, T="):
            ops.gate_compact(x, logits, lengths, threshold)
        return
    want = reference_or_error(reference.gate_compact, x, logits, lengths, threshold)
    if want is None:
        with pytest.raises(RuntimeError, match="gate_compact: logits give no decision at valid frames"):
            ops.gate_compact(x, logits, lengths, threshold)
        return
    got = ops.gate_compact(x, logits, lengths, threshold)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g, w.to(g.dtype))


@PROFILE
@given(gate_inputs(modules=True))
def test_gate_plan_property(inputs):
    x, logits, lengths, threshold = inputs
    T = x.shape[1]
    if bool(((lengths < 0) | (lengths > T)).any()) and logits.shape[2] > 0:
        with pytest.raises(RuntimeError, match=r"gate_plan: lengths must lie in \[0, T="):
            ops.gate_plan(logits, lengths, threshold)
        return
    if bool(((lengths < 0) | (lengths > T)).any()):
        return  # no module: the lengths are still checked (see test_op_errors), nothing to compare
    want = reference_or_error(reference.gate_plan, logits, lengths, threshold)
    if want is None:
        with pytest.raises(RuntimeError, match="gate_plan: logits give no decision at valid frames"):
            ops.gate_plan(logits, lengths, threshold)
        return
    plan = ops.gate_plan(logits, lengths, threshold)
    for g, w in zip(plan[:4], want[:4], strict=True):
        assert g.shape == w.shape and torch.equal(g, w.to(g.dtype))
    assert plan.offsets == want[4].tolist()
    for m in range(logits.shape[2]):  # each module's rows of x, packed
        assert torch.equal(plan.compact(m, x).packed, reference.compact(x, want[3][m])[0])


@st.composite
def scatter_inputs(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    rows, D = math.prod(shape[:-1]), shape[-1]
    dtype = draw(st.sampled_from(DTYPES))
    index = draw(st.lists(st.integers(-2, rows + 1), max_size=rows + 2))
    if draw(st.booleans()):  # mostly valid: distinct rows in range
        index = draw(st.lists(st.integers(0, max(rows - 1, 0)), max_size=rows, unique=True)) if rows else []
    index = torch.tensor(index, dtype=torch.int64)
    values = tensor(draw, (len(index), D), dtype, draw(st.booleans()))
    residual = tensor(draw, shape, dtype, draw(st.booleans()))
    scale = draw(st.sampled_from([1.0, 0.5, -2.0]))
    return values, index, residual, scale


def index_problem(index: torch.Tensor, rows: int) -> str | None:
    """What the ops must say about index: out of range, repeated, or nothing (None)."""
    if bool(((index < 0) | (index >= rows)).any()):
        return "is outside"
    if index.unique().numel() != index.numel():
        return "must be distinct"
    return None


@PROFILE
@given(scatter_inputs())
def test_scatters_property(inputs):
    values, index, residual, scale = inputs
    problem = index_problem(index, math.prod(residual.shape[:-1]))
    if problem is not None:
        for name, call in (("scatter_pad", lambda: ops.scatter_pad(values, index, residual, scale)),
                           ("scatter_rows", lambda: ops.scatter_rows(values, index, residual.shape)),
                           ("scatter_add_", lambda: ops.scatter_add_(residual.contiguous().clone(), values, index, scale))):
            with pytest.raises(RuntimeError, match=f"{name}: index.* {problem}"):
                call()
        return
    want = reference.scatter_pad(values.double(), index, residual.double(), scale)
    got = ops.scatter_pad(values, index, residual, scale)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(values.dtype, 1e-2)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4)
    in_place = residual.contiguous().clone()
    assert torch.equal(ops.scatter_add_(in_place, values, index, scale), got)
    assert torch.equal(ops.scatter_rows(values, index, residual.shape), reference.scatter_rows(values, index, residual.shape))


@PROFILE
@given(scatter_inputs())
def test_gather_rows_property(inputs):
    values, index, residual, _ = inputs
    if index_problem(index, math.prod(residual.shape[:-1])) == "is outside":
        with pytest.raises(RuntimeError, match=r"gather_rows: index\[\d+\]=-?\d+ is outside"):
            ops.gather_rows(residual, index)
        return
    assert torch.equal(ops.gather_rows(residual, index), reference.gather_rows(residual, index))
