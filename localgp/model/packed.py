"""Linear layers on the CPU through oneDNN with their weights packed once (inference).

PyTorch multiplies a float32 `nn.Linear` on the CPU with MKL's sgemm, which on AMD processors
takes a generic path (no AVX-512): on the project's AMD EPYC, oneDNN with the weight reordered
once into its blocked layout (what `torch.compile`'s CPU freezing does) runs Whisper base's
linears 1.2-1.8x faster, and the decoder's output layer (51,865 x 512, 30 rows) 2.8x faster
(`benchmarks/cpu_inference.py`).
`pack_linears(model)` switches every `nn.Linear` of a model to it: the module and its state-dict
keys stay as they are (the class becomes a subclass of its own), the packed copy is made on first
use and renewed whenever the weight changes. It is the same function up to float32 rounding (the
sums are added in another order: ~1e-5 relative; tests).

It applies only where it can: float32 on the CPU with no gradient to compute, weights made
outside torch.inference_mode (training, other dtypes and devices, and such weights take the
module's own forward). Model-wide, backbone-free, like
`set_execution`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight.T may take the packed path: float32 on the CPU, nothing to differentiate,
    and a weight whose changes can be seen (a weight made under torch.inference_mode has no
    version counter: a packed copy could go stale unnoticed)."""
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class PackedWeight:
    """A weight's packed copy, made again when the weight is replaced or changed in place."""

    def __init__(self):
        self.version, self.packed = None, None

    def of(self, weight: Tensor) -> Tensor:
        version = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if self.version != version:
            with torch.no_grad():  # no batch-size hint: one packing serves 1 to 9,000 rows as well as its own
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.version = version
        return self.packed


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, cache: PackedWeight) -> Tensor:
    """x @ weight.T + bias through oneDNN's packed weight (call where `applies`)."""
    return torch.ops.mkldnn._linear_pointwise(x, cache.of(weight), bias, "none", [], "")


class PackedLinearMixin:
    """Put before an nn.Linear class: its forward through the packed weight where it applies."""

    def forward(self, x: Tensor) -> Tensor:
        if applies(x, self.weight) and (self.bias is None or self.bias.dtype == torch.float32):
            if not hasattr(self, "_packed"):
                self._packed = PackedWeight()
            return linear(x, self.weight, self.bias, self._packed)
        return super().forward(x)


_classes: dict[type, type] = {}


def packed_class(cls: type) -> type:
    """The subclass of an nn.Linear class that packs (one per class: isinstance checks still hold)."""
    if issubclass(cls, PackedLinearMixin):
        return cls
    if cls not in _classes:
        _classes[cls] = type(f"Packed{cls.__name__}", (PackedLinearMixin, cls), {"__module__": __name__})
    return _classes[cls]


def pack_linears(model: nn.Module) -> int:
    """Switches every nn.Linear of `model` to the packed path (in place; idempotent). Returns how
    many there are. Raises where this PyTorch has no oneDNN."""
    if not AVAILABLE:
        raise RuntimeError("pack_linears: this PyTorch build has no oneDNN (torch.backends.mkldnn)")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.__class__ = packed_class(type(module))
            count += 1
    return count


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinearMixin) for m in model.modules())
