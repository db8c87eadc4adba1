"""Linear layers on the CPU with their weights packed once (inference), in float32, bfloat16 or int8.

PyTorch multiplies a float32 `nn.Linear` on the CPU with MKL's sgemm, which on AMD processors
takes a generic path (no AVX-512): on the project's AMD EPYC, oneDNN with the weight reordered
once into its blocked layout (what `torch.compile`'s CPU freezing does) runs Whisper base's
linears 1.2-1.8x faster, and the decoder's output layer (51,865 x 512, 30 rows) 2.8x faster
(`benchmarks/cpu_inference.py`).
`pack_linears(model, precision)` switches every `nn.Linear` of a model to it: the module and its
state-dict keys stay as they are (the class becomes a subclass of its own), the packed copy is made
on first use and renewed whenever the weight (or, for int8, the bias) changes. The precision is a
setting of that packing, one code path for all three:

- `float32`: oneDNN's packed float32 weight; the same function up to float32 rounding (the sums
  are added in another order: ~1e-5 relative; tests).
- `bfloat16`: oneDNN's packed bfloat16 weight, products accumulated in float32 (AVX512-BF16 or
  AMX); inputs that are not bfloat16 are rounded to it and the output returned in the input's
  dtype. A model run in bfloat16 (`model.to(torch.bfloat16)`) passes bfloat16 through unchanged.
  Needs AVX512-BF16 or AMX on the CPU (`check_precision` refuses it otherwise, naming them).
- `int8`: the weight quantized symmetrically per output channel (scale max|w|/127), the
  activations quantized on the fly per row (each row of the input divided by its own max |x|,
  then quantized as one tensor by fbgemm's dynamic quantized linear, asymmetric uint8 from the
  rows' min and max: a step of at most 2/255 of the row's max |x|), int32 accumulation, each
  output row multiplied back by its max |x| and the bias added in float32
  (`quantized::linear_dynamic`, VNNI where the CPU has it). Per row, not per tensor: in Whisper
  base's encoder a few padding frames near the window's end carry ~100x the typical activation,
  and one scale for all rows leaves the others a few levels (encoder output error 20% of the mean
  |output| per tensor, 6% per row, on real clips; benchmarks/RESULTS.md). fbgemm takes one
  activation scale per call; normalising the rows first gives it per-row scales at the cost of
  two elementwise passes, where quantizing the rows in PyTorch and `torch._int_mm` was slower.
  oneDNN's int8 linear (`onednn::qlinear_pointwise`, what PyTorch's x86 inductor quantization
  lowers to) was measured beside fbgemm at Whisper base's shapes and row counts and is no faster
  anywhere that matters (its activations must be quantized in a separate pass), and it refuses
  per-row activation scales. Inputs float32.

It applies only where it can: on the CPU with no gradient to compute, weights made outside
torch.inference_mode (a weight made there has no version counter: a packed copy could go stale
unnoticed); float32 packing also needs float32 inputs and weights. Elsewhere (training, other
devices, such weights) the module's own forward runs, so gradients and training stay float32 and
untouched. Model-wide, backbone-free, like `set_execution`."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from localgp.errors import UserError

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PRECISIONS = ("float32", "bfloat16", "int8")  # of the packing (the CPU)
# --dtype (decode, transcribe, bench, profile) -> the dtype the model runs in: int8 quantizes its
# linears only (the rest runs in float32); float16 is for a GPU
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32, "float16": torch.float16}
INT8_ENGINE = "fbgemm"


def cpu_has_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _vnni() -> bool:
    return torch.cpu._is_vnni_supported()


def check_precision(precision: str, device: str | torch.device = "cpu") -> None:
    """Refuses a --dtype this device cannot run, naming what is missing (UserError)."""
    if precision not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {precision!r}")
    if torch.device(device).type != "cpu":
        if precision == "int8":
            raise UserError("--dtype int8 runs on the CPU only (fbgemm's int8 linears); on a GPU use float16 or bfloat16")
        return
    if precision not in PRECISIONS:
        raise UserError(f"--dtype {precision} is for a GPU; on the CPU use {', '.join(PRECISIONS)}")
    if precision != "float32" and not AVAILABLE:
        raise UserError(f"--dtype {precision}: this PyTorch build has no oneDNN (torch.backends.mkldnn)")
    if precision == "bfloat16" and not cpu_has_bf16():
        raise UserError("--dtype bfloat16 on the CPU needs the AVX512-BF16 or AMX instructions, which this CPU "
                        "lacks; use float32 or int8")
    if precision == "int8" and INT8_ENGINE not in torch.backends.quantized.supported_engines:
        raise UserError(f"--dtype int8 needs PyTorch's {INT8_ENGINE} quantized engine, which this build lacks "
                        f"(it has {torch.backends.quantized.supported_engines})")


def applies(x: Tensor, weight: Tensor, precision: str = "float32") -> bool:
    """Whether x @ weight.T may take the packed path at `precision`: on the CPU, nothing to
    differentiate, a weight whose changes can be seen, and for float32 float32 inputs and weights."""
    if not (AVAILABLE and x.device.type == "cpu" and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return False
    if precision == "float32":
        return x.dtype == torch.float32 and weight.dtype == torch.float32
    return True  # bfloat16 and int8 take any floating input (checked in `linear`)


def _quantize_per_channel(weight: Tensor) -> Tensor:
    """int8 weight, symmetric per output channel: scale max|w|/127 (1 for an all-zero row)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    with warnings.catch_warnings():  # quantized tensors are what fbgemm's prepack takes (deprecated, not gone)
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)


def dequantized_weight(weight: Tensor) -> Tensor:
    """The float32 weight int8 packing multiplies by (tests, accuracy figures)."""
    return _quantize_per_channel(weight).dequantize()


class PackedWeight:
    """A weight's packed copy at one precision, made again when the weight is replaced or changed
    in place (for bfloat16, which keeps a bfloat16 copy of the bias, when the bias is)."""

    def __init__(self, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"PackedWeight: precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.version, self.packed, self.bias = None, None, None

    def __deepcopy__(self, memo) -> "PackedWeight":  # a cache: a copy starts empty (oneDNN's packed tensors have no storage)
        return PackedWeight(self.precision)

    def of(self, weight: Tensor, bias: Tensor | None = None):
        version = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
        if bias is not None and self.precision == "bfloat16":  # bfloat16 keeps a rounded copy of the bias
            version += (bias.data_ptr(), bias._version, bias.dtype)
        if self.version != version:
            with torch.no_grad():
                self.packed, self.bias = self._pack(weight.detach(), None if bias is None else bias.detach())
            self.version = version
        return self.packed

    def _pack(self, weight: Tensor, bias: Tensor | None):
        if self.precision == "int8":
            previous = torch.backends.quantized.engine
            torch.backends.quantized.engine = INT8_ENGINE
            try:  # no bias in the packing: it is added after the rows are scaled back (`linear`)
                return torch.ops.quantized.linear_prepack(_quantize_per_channel(weight), None), None
            finally:
                torch.backends.quantized.engine = previous
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
        # no batch-size hint: one packing serves 1 to 9,000 rows as well as its own
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), None)
        return packed, None if bias is None else bias.to(dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, cache: PackedWeight) -> Tensor:
    """x @ weight.T + bias through the packed weight at the cache's precision (call where `applies`)."""
    if cache.precision == "float32":
        return torch.ops.mkldnn._linear_pointwise(x, cache.of(weight), bias, "none", [], "")
    packed = cache.of(weight, bias)
    if cache.precision == "bfloat16":
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, cache.bias, "none", [], "")
        return y.to(x.dtype)
    if x.dtype != torch.float32:
        raise ValueError(f"int8 linear: the input must be float32 (an int8 model runs in float32), got {x.dtype}")
    return int8_rows(x, packed, bias)


def int8_rows(x: Tensor, packed, bias: Tensor | None) -> Tensor:
    """x @ w.T + bias with the activations quantized per row: each row divided by its max |x| (an
    all-zero row by the smallest normal float: it stays zero), fbgemm's per-tensor dynamic
    quantization of the normalised rows, each output row multiplied back."""
    rows = x.reshape(-1, x.shape[-1])
    scale = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    # VNNI accumulates u8 x s8 products in int32; without it fbgemm's pairwise int16 sums could
    # saturate, which 7-bit activations (reduce_range) avoid
    y = torch.ops.quantized.linear_dynamic(rows / scale, packed, not _vnni())
    y = y.mul_(scale) if bias is None else torch.addcmul(bias.float(), y, scale, out=y)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class PackedLinearMixin:
    """Put before an nn.Linear class: its forward through the packed weight where it applies."""

    def forward(self, x: Tensor) -> Tensor:
        cache = getattr(self, "_packed", None)
        precision = "float32" if cache is None else cache.precision
        if applies(x, self.weight, precision) and (precision != "float32" or self.bias is None
                                                   or self.bias.dtype == torch.float32):
            if cache is None:
                cache = self._packed = PackedWeight()
            return linear(x, self.weight, self.bias, cache)
        return super().forward(x)


_classes: dict[type, type] = {}


def packed_class(cls: type) -> type:
    """The subclass of an nn.Linear class that packs (one per class: isinstance checks still hold)."""
    if issubclass(cls, PackedLinearMixin):
        return cls
    if cls not in _classes:
        _classes[cls] = type(f"Packed{cls.__name__}", (PackedLinearMixin, cls), {"__module__": __name__})
    return _classes[cls]


def pack_linears(model: nn.Module, precision: str = "float32") -> int:
    """Switches every nn.Linear of `model` to the packed path at `precision` (in place; idempotent;
    a second call with another precision switches them to it). Returns how many there are. Raises
    where this PyTorch has no oneDNN or this CPU cannot run the precision (`check_precision`)."""
    if not AVAILABLE:
        raise RuntimeError("pack_linears: this PyTorch build has no oneDNN (torch.backends.mkldnn)")
    if precision not in PRECISIONS:
        raise UserError(f"pack_linears: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_precision(precision, "cpu")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.__class__ = packed_class(type(module))
            if getattr(module, "_packed", None) is None or module._packed.precision != precision:
                module._packed = PackedWeight(precision)
            count += 1
    return count


def precision_of(model: nn.Module) -> str | None:
    """The precision `model`'s linears are packed at (None: not packed)."""
    for m in model.modules():
        if isinstance(m, PackedLinearMixin):
            return getattr(m, "_packed", None) and m._packed.precision or "float32"
    return None


def is_packed(model: nn.Module) -> bool:
    return precision_of(model) is not None
