"""pack_linears: linears on the CPU through oneDNN's packed weights, against the modules' own
forward (PyTorch's): the same function within float32 rounding, and only where it may apply."""

import copy

import pytest
import torch
import whisper.model
from torch import nn

from localgp.model import packed
from localgp.model.packed import is_packed, pack_linears

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # sums in another order; outputs here are O(1)-O(10)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(33, 70), nn.GELU(), whisper.model.Linear(70, 17, bias=False),
                         whisper.model.Linear(17, 5))


def test_same_function_every_shape():
    net = small_net()
    plain = copy.deepcopy(net)
    assert pack_linears(net) == 3 and pack_linears(net) == 3  # idempotent
    assert is_packed(net) and not is_packed(plain)
    assert all(isinstance(a, type(b)) for a, b in zip(net, plain))  # still the classes they were
    assert list(net.state_dict()) == list(plain.state_dict())
    inputs = [torch.randn(1, 33), torch.randn(7, 33), torch.randn(3, 11, 33), torch.randn(0, 33),
              torch.randn(33, 9).t(), torch.randn(4, 20, 33)[:, ::3]]  # odd sizes, empty, non-contiguous
    with torch.no_grad():
        for x in inputs:
            got, want = net(x), plain(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **TOLERANCE)


def test_takes_the_packed_path_only_where_it_applies(monkeypatch):
    net, plain = small_net(), small_net()
    pack_linears(net)
    calls = []
    real = packed.linear
    monkeypatch.setattr(packed, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(5, 33)
    with torch.no_grad():
        net(x)
    assert len(calls) == 3
    calls.clear()
    out = net(x)  # gradients wanted: the module's own forward, bit for bit, and they flow
    assert not calls and torch.equal(out, plain(x))
    out.sum().backward()
    torch.testing.assert_close(net[0].weight.grad, torch.autograd.grad(plain(x).sum(), plain[0].weight)[0])
    with torch.no_grad():
        assert torch.equal(net.bfloat16()(x.bfloat16()), plain.bfloat16()(x.bfloat16())) and not calls
    with torch.inference_mode():  # weights made here have no version counter: never packed
        made = small_net()
        pack_linears(made)
        assert torch.equal(made(x), small_net()(x)) and not calls


def test_follows_the_weight_when_it_changes():
    net = small_net()
    pack_linears(net)
    x = torch.randn(6, 33)
    with torch.no_grad():
        before = net(x)
        net[0].weight.mul_(2)  # in place: a new version
        torch.testing.assert_close(net(x), _doubled(x), **TOLERANCE)
        net.load_state_dict(small_net().state_dict())  # copied in: back to the start
        torch.testing.assert_close(net(x), before, **TOLERANCE)


def _doubled(x):
    plain = small_net()
    with torch.no_grad():
        plain[0].weight.mul_(2)
        return plain(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_take_the_module_forward():
    net = small_net().cuda()
    plain = copy.deepcopy(net)
    pack_linears(net)
    x = torch.randn(5, 33, device="cuda")
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


# ---------------------------------------------------------------- bfloat16 and int8: one path, a precision of the packing
LOW = [p for p in ("bfloat16", "int8") if p != "bfloat16" or packed.cpu_has_bf16()]
needs_bf16 = pytest.mark.skipif(not packed.cpu_has_bf16(), reason="this CPU has neither AVX512-BF16 nor AMX")


def fresh_inputs(width: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(0, width, generator=gen), torch.randn(1, width, generator=gen),
            torch.randn(7, width, generator=gen), 3 * torch.randn(3, 11, width, generator=gen),
            torch.randn(width, 9, generator=gen).t(), torch.randn(4, 20, width, generator=gen)[:, ::3],
            torch.zeros(2, width)]  # empty, one row, batches, non-contiguous, all zero


def dequantized_reference(weight):
    """int8 per output channel in plain PyTorch: scale max|w|/127 (1 for an all-zero row)."""
    scale = weight.abs().amax(1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(weight / scale).clamp(-128, 127) * scale


def row_quantized(x):
    """int8's activations in plain PyTorch: each row divided by its max |x| (1 for an all-zero row),
    the normalised rows quantized as one tensor, asymmetric uint8: step (max(xn,0) - min(xn,0)) /
    255, zero point round(-min / step). Returns the dequantized x and each row's step in x's units."""
    rows = x.reshape(-1, x.shape[-1])
    r = rows.abs().amax(1, keepdim=True) if rows.numel() else torch.ones(rows.shape[0], 1)
    r = torch.where(r > 0, r, torch.ones_like(r))
    xn = rows / r
    lo, hi = (xn.min().clamp(max=0), xn.max().clamp(min=0)) if xn.numel() else (torch.tensor(0.0), torch.tensor(0.0))
    step = torch.where(hi > lo, (hi - lo) / 255, torch.ones(()))
    zero = torch.round(-lo / step).clamp(0, 255)
    q = (torch.round(xn / step) + zero).clamp(0, 255)
    return ((q - zero) * step * r).reshape(x.shape), (step * r).reshape(*x.shape[:-1], 1)


def int8_reference(x, weight, bias):
    """The plain reference for int8: the dequantized weight times the row-quantized input, and one
    quantization step of every input of the row times |w| (what an input rounded the other way at
    a tie, or any per-tensor scale, would add)."""
    w = packed.dequantized_weight(weight)  # itself checked against dequantized_reference
    xq, step = row_quantized(x)
    return torch.nn.functional.linear(xq, w, bias), step * w.abs().sum(1)


def rows_apart(width: int, seed: int):
    """Rows whose scales lie 4 orders of magnitude apart, zero rows among them: one activation
    scale per tensor would leave the small rows a level or two (the test fails there)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(9, width, generator=gen) * torch.logspace(-2, 2, 9)[:, None]
    x[4] = 0
    return [x, torch.nn.functional.gelu(torch.randn(2, 5, width, generator=gen)) * 30]


@pytest.mark.parametrize("width,out", [(33, 70), (64, 17), (1, 5), (129, 300)])
def test_int8_against_the_dequantized_reference(width, out):
    """Per output channel int8 weights times per-row int8 activations (fbgemm), against the plain
    reference: equal up to float32 rounding (1e-3 of one step per input, 1e-5 absolute) except at
    rounding ties (under 0.1% of the outputs), and every output within one step per input of the
    reference, and of the dequantized weight times the float32 input."""
    torch.manual_seed(width)
    layer = nn.Linear(width, out)
    with torch.no_grad():
        layer.weight[0] = 0  # an all-zero channel
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    pack_linears(layer, "int8")
    # the same levels as plain PyTorch's, but at a rounding tie (w/scale within float rounding of k + 1/2)
    diff, step = (packed.dequantized_weight(weight) - dequantized_reference(weight)).abs(), weight.abs().amax(1, keepdim=True) / 127
    assert (diff <= step * 1.001 + 1e-12).all() and (diff > 1e-7).float().mean() < 1e-3
    with torch.no_grad():
        for x in fresh_inputs(width, seed=out) + rows_apart(width, seed=out):
            got = layer(x)
            want, bound = int8_reference(x, weight, bias)
            assert got.shape == want.shape and got.dtype == torch.float32
            error = (got - want).abs()
            assert (error <= bound + 1e-5).all(), float((error - bound).max())
            if x.numel():
                assert ((error > 1e-3 * bound + 1e-5).float().mean() < 1e-3), float((error / (bound + 1e-12)).max())
            plain = torch.nn.functional.linear(x, packed.dequantized_weight(weight), bias)
            assert ((got - plain).abs() <= bound + 1e-5).all()
            zero = x.reshape(-1, width).abs().amax(1) == 0 if x.numel() else torch.zeros(0, dtype=torch.bool)
            if zero.any():  # an all-zero row maps exactly to the bias
                torch.testing.assert_close(got.reshape(-1, out)[zero], bias.expand(int(zero.sum()), out), rtol=0, atol=1e-6)


@needs_bf16
@pytest.mark.parametrize("width,out", [(33, 70), (64, 17), (1, 5), (129, 300)])
def test_bfloat16_against_the_rounded_reference(width, out):
    """bf16 weights and inputs, float32 sums: the float32 product of the bf16-rounded operands,
    within 2^-7 relative (the output's own bf16 rounding is 2^-8) plus 1e-3 absolute."""
    torch.manual_seed(out)
    layer = nn.Linear(width, out)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    pack_linears(layer, "bfloat16")

    def rounded(t):
        return t.bfloat16().float()

    with torch.no_grad():
        for x in fresh_inputs(width, seed=width):
            want = torch.nn.functional.linear(rounded(x), rounded(weight), rounded(bias))
            got = layer(x)  # a float32 input: float32 out
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)
        layer.bfloat16()  # a bfloat16 model: bfloat16 through
        for x in fresh_inputs(width, seed=width + 1):
            got = layer(x.bfloat16())
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), torch.nn.functional.linear(rounded(x), rounded(weight), rounded(bias)),
                                       rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("precision", LOW)
def test_low_precision_follows_weight_and_bias_changes(precision):
    net = small_net()
    plain = copy.deepcopy(net)
    pack_linears(net, precision)
    x = torch.randn(6, 33)
    with torch.no_grad():
        before = net(x)
        torch.testing.assert_close(before, plain(x), rtol=0.05, atol=0.05)
        for layer in (net[0], plain[0]):
            layer.weight.mul_(2)
            layer.bias.add_(1)  # bfloat16 keeps a rounded copy of the bias
        torch.testing.assert_close(net(x), plain(x), rtol=0.05, atol=0.05)
        assert not torch.allclose(net(x), before, atol=0.5)
        net.load_state_dict(small_net().state_dict())
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)  # back to the same packing's output


@pytest.mark.parametrize("precision", LOW)
def test_low_precision_leaves_gradients_and_training_in_float32(precision, monkeypatch):
    net, plain = small_net(), small_net()
    pack_linears(net, precision)
    calls = []
    real = packed.linear
    monkeypatch.setattr(packed, "linear", lambda *a: calls.append(a[3].precision) or real(*a))
    x = torch.randn(5, 33)
    out = net(x)  # gradients wanted: the module's own float32 forward, bit for bit
    assert not calls and torch.equal(out, plain(x))
    out.sum().backward()
    torch.testing.assert_close(net[0].weight.grad, torch.autograd.grad(plain(x).sum(), plain[0].weight)[0])
    with torch.no_grad():
        net(x)
    assert calls == [precision] * 3
    assert packed.precision_of(net) == precision and packed.precision_of(plain) is None


def test_precision_is_switched_by_packing_again():
    net = small_net()
    x = torch.randn(4, 33)
    with torch.no_grad():
        pack_linears(net, "int8")
        low = net(x)
        pack_linears(net)
        assert packed.precision_of(net) == "float32"
        torch.testing.assert_close(net(x), small_net()(x), **TOLERANCE)
        pack_linears(net, "int8")
        assert torch.equal(net(x), low)
        with pytest.raises(ValueError, match="int8 linear: the input must be float32"):
            net(x.bfloat16())


def test_unrunnable_precisions_are_refused_by_name(monkeypatch):
    from localgp.errors import UserError

    with pytest.raises(UserError, match="must be one of float32, bfloat16, int8, got 'int4'"):
        pack_linears(small_net(), "int4")
    with pytest.raises(UserError, match="int8 runs on the CPU only"):
        packed.check_precision("int8", "cuda")
    packed.check_precision("bfloat16", "cuda")  # the GPU's own matter
    monkeypatch.setattr(packed, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="bfloat16 on the CPU needs the AVX512-BF16 or AMX instructions"):
        pack_linears(small_net(), "bfloat16")


@pytest.mark.parametrize("precision", ["float32", *LOW])
def test_a_used_packed_model_deep_copies(precision):
    net = small_net()
    pack_linears(net, precision)
    x = torch.randn(3, 33)
    with torch.no_grad():
        want = net(x)  # packed copies made (oneDNN's opaque tensors cannot be copied themselves)
        other = copy.deepcopy(net)
        assert packed.precision_of(other) == precision
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
