"""The fused pruning ops (namespace ``torch.ops.localgp``), with fake impls and autograd.

Every op runs on CPU and, when the extension was built with CUDA, on CUDA; a missing kernel is
an error, never a silent fallback to the reference (``localgp/reference.py``).

Shapes: B sequences of T frames of width D; N kept frames in total.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

try:
    from localgp import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "the localgp op library (localgp/_C) is not built or failed to load: run `make build` "
        f"(or `pip install --no-build-isolation -e .`) first. Cause: {err}"
    ) from err

_OPS = torch.ops.localgp

class Compacted(NamedTuple):
    """Kept frames packed sequence after sequence (the flash-attention varlen layout)."""

    packed: Tensor  # (N, D) kept frames of x, ordered by sequence then time
    index: Tensor  # (N,) int64 flat position b*T+t of each packed row in x
    cu_seqlens: Tensor  # (B+1,) int32 offsets of each sequence in packed
    max_seqlen: Tensor  # () int32 the most frames kept in one sequence (T is an upper bound)
    keep: Tensor  # (B, T) bool the keep mask; False past each sequence's length


class LayerPlan(NamedTuple):
    """All of a layer's gate decisions for M modules, from one `gate_plan` (one host read)."""

    index: Tensor  # (N,) int64: module m's kept frames b*T+t at index[offsets[m]:offsets[m+1]]
    cu_seqlens: Tensor  # (M, B+1) int32
    max_seqlen: Tensor  # (M,) int32
    keep: Tensor  # (M, B, T) bool
    offsets: list[int]  # M+1 module offsets into index, on the host

    def compact(self, m: int, x: Tensor) -> Compacted:
        """Module m's kept frames of x (B, T, D) packed: a row gather, no host read."""
        index = self.index[self.offsets[m] : self.offsets[m + 1]]
        return Compacted(gather_rows(x, index), index, self.cu_seqlens[m], self.max_seqlen[m], self.keep[m])


class Grouping(NamedTuple):
    """Rows ordered so that rows with identical masks are contiguous."""

    perm: Tensor  # (R,) int64 row order: rows of group g are perm[offsets[g]:offsets[g+1]]
    offsets: Tensor  # (G+1,) int64 start of each group in perm, offsets[G] = R
    inverse: Tensor  # (R,) int64 inverse[perm[i]] = i


# Read once: a plain bool keeps the wrappers traceable by torch.compile.
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("localgp::gate_compact", "CUDA")


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return _HAS_CUDA_KERNELS


class _HostReads:
    count = 0


def count_host_reads(n: int = 1) -> None:
    """Counts device-to-host reads (each one drains a GPU's queue): the ops that size an output
    from the data count themselves; model code counts its own `.tolist()`/`.item()`/`.cpu()`."""
    _HostReads.count += n


def host_reads() -> int:
    """Device-to-host reads counted so far in this process (`localgp profile` reports them)."""
    return _HostReads.count


def _require_kernels(op: str, tensor: Tensor) -> None:
    if tensor.is_cuda and not _HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"{op}: got CUDA tensors but localgp was built without its CUDA kernels; rebuild "
            "with a CUDA torch and nvcc (LOCALGP_CUDA=1 makes the build fail if it cannot)"
        )


def gate_compact(x: Tensor, logits: Tensor, lengths: Tensor, threshold: float = 0.5) -> Compacted:
    """Keep frame (b, t) when t < lengths[b] and softmax(logits[b, t])[1] > threshold.

    x (B, T, D) float; logits (B, T, 2) float, class 1 = keep; lengths (B,) integer.
    Differentiable in x (the backward scatters into zeros); the decision itself is not.
    """
    _require_kernels("gate_compact", x)
    count_host_reads()  # N sizes the packed output
    return Compacted(*_OPS.gate_compact.default(x, logits, lengths, float(threshold)))


def gate_compact_linear(
    x: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor, lengths: Tensor, threshold: float = 0.5
) -> Compacted:
    """gate_compact with logits = hidden @ weight.T + bias computed inside the kernel.

    hidden (B, T, H) the gate's last hidden features; weight (2, H), bias (2,) its output layer.
    """
    _require_kernels("gate_compact_linear", x)
    count_host_reads()
    return Compacted(
        *_OPS.gate_compact_linear.default(x, hidden, weight, bias, lengths, float(threshold))
    )


def gate_plan(logits: Tensor, lengths: Tensor, threshold: float = 0.5) -> LayerPlan:
    """Every module's decisions of a layer at once: logits (B, T, M, 2), lengths (B,).

    The keep rule is gate_compact's. One host read in all (the module offsets), against one per
    module with gate_compact; `LayerPlan.compact(m, x)` then packs module m's frames of x.
    """
    _require_kernels("gate_plan", logits)
    count_host_reads()
    index, cu_seqlens, max_seqlen, keep, offsets = _OPS.gate_plan.default(logits, lengths, float(threshold))
    return LayerPlan(index, cu_seqlens, max_seqlen, keep, offsets.tolist())


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """src (..., D) viewed as (M, D), rows `index` (N,) int64 -> (N, D). Indices may repeat
    (their gradients add up)."""
    _require_kernels("gather_rows", src)
    return _OPS.gather_rows.default(src, index)


def scatter_pad(values: Tensor, index: Tensor, residual: Tensor, scale: float = 1.0) -> Tensor:
    """residual + scale * y, y = values (N, D) at rows `index` of residual (..., D), 0 elsewhere.

    `index` entries must be distinct (as gate_compact produces them); repeats are an error.
    Reads the residual once and writes every output row once.
    """
    _require_kernels("scatter_pad", values)
    return _OPS.scatter_pad.default(values, index, residual, float(scale))


def scatter_add_(residual: Tensor, values: Tensor, index: Tensor, scale: float = 1.0) -> Tensor:
    """In place: residual[index[n]] += scale * values[n] (rows of residual's (M, D) view); returns
    residual. Touches only the kept rows: the least memory traffic, for inference (no autograd:
    use scatter_pad where gradients are needed). residual must be contiguous; index distinct."""
    _require_kernels("scatter_add_", values)
    if torch.is_grad_enabled() and (residual.requires_grad or values.requires_grad):
        raise RuntimeError("scatter_add_: in-place and not differentiable; use scatter_pad when gradients are needed")
    _OPS.scatter_add_.default(residual, values, index, float(scale))
    return residual


def scatter_rows(values: Tensor, index: Tensor, size) -> Tensor:
    """A new tensor of shape `size` (..., D): values (N, D) at rows `index`, zeros elsewhere, each
    row written once (no zeros tensor first). `index` entries must be distinct."""
    _require_kernels("scatter_rows", values)
    return _OPS.scatter_rows.default(values, index, list(size))


def group_rows(masks: Tensor) -> Grouping:
    """masks (R, M) bool -> a stable grouping of the rows by identical masks."""
    _require_kernels("group_rows", masks)
    count_host_reads()  # the number of groups sizes offsets
    return Grouping(*_OPS.group_rows.default(masks))


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float | None = None
) -> Tensor:
    """Softmax attention of each packed sequence over itself.

    q, k, v (N, H, Dh); cu_seqlens (B+1,) int32; max_seqlen an upper bound of the longest
    sequence (T works and needs no host sync). One path, the op: on CUDA with fp16/bf16 it runs
    PyTorch's varlen FlashAttention-2 kernel inside, on the CPU ATen's flash kernel.
    """
    _require_kernels("varlen_attention", q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _OPS.varlen_attention.default(q, k, v, cu_seqlens, int(max_seqlen), scale)[0]


# ----------------------------------------------------------------------------- fake impls
# Data-dependent sizes (kept frames, groups) are new dynamic sizes, so torch.compile traces
# these ops with fullgraph=True.


def _fake_compaction(x: Tensor) -> tuple[Tensor, ...]:
    B, T, D = x.shape
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty(n, D),
        x.new_empty(n, dtype=torch.int64),
        x.new_empty(B + 1, dtype=torch.int32),
        x.new_empty((), dtype=torch.int32),
        x.new_empty(B, T, dtype=torch.bool),
    )


@torch.library.register_fake("localgp::gate_compact")
def _(x, logits, lengths, threshold=0.5):
    return _fake_compaction(x)


@torch.library.register_fake("localgp::gate_compact_linear")
def _(x, hidden, weight, bias, lengths, threshold=0.5):
    return _fake_compaction(x)


@torch.library.register_fake("localgp::gate_plan")
def _(logits, lengths, threshold=0.5):
    B, T, M, _ = logits.shape
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        logits.new_empty(n, dtype=torch.int64),
        logits.new_empty(M, B + 1, dtype=torch.int32),
        logits.new_empty(M, dtype=torch.int32),
        logits.new_empty(M, B, T, dtype=torch.bool),
        torch.empty(M + 1, dtype=torch.int64, device="cpu"),
    )


@torch.library.register_fake("localgp::scatter_add_")
def _(residual, values, index, scale=1.0):
    return None


@torch.library.register_fake("localgp::scatter_rows")
def _(values, index, size):
    return values.new_empty(size)


@torch.library.register_fake("localgp::gather_rows")
def _(src, index):
    return src.new_empty(index.shape[0], src.shape[-1])


@torch.library.register_fake("localgp::scatter_pad")
def _(values, index, residual, scale=1.0):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


@torch.library.register_fake("localgp::group_rows")
def _(masks):
    R = masks.shape[0]
    # offsets holds G+1 >= 1 entries; the unbacked size must be an output size as it is.
    num_offsets = torch.library.get_ctx().new_dynamic_size(min=1)
    return (
        masks.new_empty(R, dtype=torch.int64),
        masks.new_empty(num_offsets, dtype=torch.int64),
        masks.new_empty(R, dtype=torch.int64),
    )


@torch.library.register_fake("localgp::varlen_attention")
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[1], q.shape[0], dtype=lse_dtype
    )


@torch.library.register_fake("localgp::varlen_attention_backward")
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# ----------------------------------------------------------------------------- autograd
# Compaction and scatter are each other's backward (as in flash-attention's bert_padding).


def _setup_compaction(ctx, inputs, output):
    ctx.x_shape = inputs[0].shape
    ctx.save_for_backward(output[1])


def _backward_compaction(ctx, grad_packed, *_):
    (index,) = ctx.saved_tensors
    return None if grad_packed is None else _OPS.scatter_rows.default(grad_packed, index, list(ctx.x_shape))


def _backward_gate_compact(ctx, grad_packed, *rest):
    return _backward_compaction(ctx, grad_packed), None, None, None


def _backward_gate_compact_linear(ctx, grad_packed, *rest):
    return _backward_compaction(ctx, grad_packed), None, None, None, None, None


torch.library.register_autograd(
    "localgp::gate_compact", _backward_gate_compact, setup_context=_setup_compaction
)
torch.library.register_autograd(
    "localgp::gate_compact_linear", _backward_gate_compact_linear, setup_context=_setup_compaction
)


def _setup_gather_rows(ctx, inputs, output):
    src, index = inputs
    ctx.src_shape = src.shape
    ctx.save_for_backward(index)


def _backward_gather_rows(ctx, grad):
    # Accumulates: a row gathered twice gets both gradients (scatter_rows requires distinct rows).
    (index,) = ctx.saved_tensors
    D = ctx.src_shape[-1]
    grad_src = grad.new_zeros(ctx.src_shape).view(-1, D)
    return grad_src.index_add_(0, index, grad).view(ctx.src_shape), None


torch.library.register_autograd(
    "localgp::gather_rows", _backward_gather_rows, setup_context=_setup_gather_rows
)


def _setup_scatter_pad(ctx, inputs, output):
    values, index, residual, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(index)


def _backward_scatter_pad(ctx, grad):
    (index,) = ctx.saved_tensors
    grad_values = _OPS.gather_rows.default(grad, index)
    if ctx.scale != 1.0:
        grad_values = grad_values * ctx.scale
    return grad_values, None, grad, None


torch.library.register_autograd(
    "localgp::scatter_pad", _backward_scatter_pad, setup_context=_setup_scatter_pad
)


def _setup_scatter_rows(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_scatter_rows(ctx, grad):
    (index,) = ctx.saved_tensors
    return _OPS.gather_rows.default(grad, index), None, None


torch.library.register_autograd(
    "localgp::scatter_rows", _backward_scatter_rows, setup_context=_setup_scatter_rows
)


def _setup_varlen_attention(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)


def _backward_varlen_attention(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    grads = _OPS.varlen_attention_backward.default(
        grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return *grads, None, None, None


torch.library.register_autograd(
    "localgp::varlen_attention", _backward_varlen_attention, setup_context=_setup_varlen_attention
)
