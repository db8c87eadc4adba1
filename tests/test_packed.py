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
