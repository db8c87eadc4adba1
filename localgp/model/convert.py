"""The switches that act on the gated parts of any model (OWSM, openai-whisper, transformers),
backbone-free: execution, precision, forced keeps, the masks and the sparsity loss. Gating a whole
model is each backbone's (OWSM: localgp.backbones.owsm.model.gate_s2t_model; openai-whisper:
localgp.backbones.whisper.model.gate_whisper)."""

from __future__ import annotations

import torch
from torch import nn

from localgp.gates import GateRecord, sparsity_loss
from localgp.model.config import EXECUTIONS
from localgp.model.pruning import GatedDecoderMixin, GatedEncoderMixin

GATE_KEY = "pruning."  # every gate parameter's state-dict key contains this


def gated_parts(model: nn.Module):
    """The gated encoder and decoder of a model, wherever they sit in it (OWSM's and openai-whisper's
    `model.encoder`, transformers' `model.model.encoder`), or the model itself when it is one."""
    return [m for m in model.modules() if isinstance(m, (GatedEncoderMixin, GatedDecoderMixin))]


def set_precision(model: nn.Module, dtype: str, device: str | torch.device = "cpu") -> None:
    """Moves a model (plain or gated, any backbone) to `device` in --dtype `dtype` for inference:
    float32, bfloat16 or int8 (the model in float32, its linears in int8, the gates' predictors'
    linears left in float32: they decide what runs) on the CPU, where its linears go through packed
    weights at that precision (`localgp.model.packed`); float32, float16 or bfloat16 on a GPU. In
    bfloat16 and float16 the layer norms keep float32 parameters (openai-whisper's normalise in
    float32, PyTorch's take a half-precision input with them). Refuses what the device cannot run
    (`check_precision`)."""
    from localgp.model.packed import DTYPES, check_precision, pack_linears

    check_precision(dtype, device)
    device = torch.device(device)
    model.to(device, DTYPES[dtype])
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    if device.type == "cpu":
        pack_linears(model, dtype)
        if dtype == "int8":
            for part in gated_parts(model):
                pack_linears(part.pruning)


def set_execution(model: nn.Module, execution: str) -> None:
    """'masked' (the papers' reference) or 'compact' (skipped work is not done), at run time."""
    if execution not in EXECUTIONS:
        raise ValueError(f"set_execution: execution must be one of {EXECUTIONS}, got {execution!r}")
    for part in gated_parts(model):
        part.execution = execution


def force_keep(model: nn.Module, keep: float | None, seed: int = 0) -> None:
    """Replace the gates by random decisions keeping a `keep` share (None: the gates again)."""
    if keep is not None and not 0 <= keep <= 1:
        raise ValueError(f"force_keep: keep must lie in [0, 1], got {keep}")
    for part in gated_parts(model):
        part.forced_keep = keep
        part.forced_generator.manual_seed(seed)


def last_record(model: nn.Module) -> GateRecord:
    """The masks of the last forward pass, encoder and decoder together."""
    record = GateRecord()
    for part in gated_parts(model):
        if part.last_record is not None:
            record.masks.update(part.last_record.masks)
            record.valid.update(part.last_record.valid)
            record.decided.update(part.last_record.decided)
    return record


def pruning_loss(model: nn.Module, task_loss: torch.Tensor, target: float, alpha: float = 1.0,
                 decoder_target: float | None = None, decoder_alpha: float | None = None):
    """task loss + alpha * sparsity loss, and the achieved sparsity, of the last forward pass.
    decoder_target: the decoder's gates get a target (and decoder_alpha, if given, a weight) of
    their own and `target` holds for the encoder's alone (a joint target is met by the encoder's
    many frames while the decoder keeps every token); the sparsity returned stays the joint one."""
    record = last_record(model)
    sparsity = record.sparsity()
    if decoder_target is None:
        return task_loss + sparsity_loss(sparsity, target, alpha), sparsity
    loss = sparsity_loss(record.sparsity("encoder"), target, alpha) \
        + sparsity_loss(record.sparsity("decoder"), decoder_target, alpha if decoder_alpha is None else decoder_alpha)
    return task_loss + loss, sparsity


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if GATE_KEY in k}
