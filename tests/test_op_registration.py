"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) with data-dependent N."""

import pytest
import torch

from localgp import ops, reference
from tests.test_ops import make_attention, make_case

OPS = torch.ops.localgp


def opcheck_cases(device):
    x, logits, lengths = make_case("random", device, torch.float32)
    x_grad = x.clone().requires_grad_(True)
    B, T, _ = x.shape
    hidden = torch.randn(B, T, 12, device=device)
    weight, bias = torch.randn(2, 12, device=device), torch.randn(2, device=device)
    c = ops.gate_compact(x, logits, lengths)
    values = torch.randn_like(c.packed, requires_grad=True)
    q, k, v, cu, max_len = make_attention([5, 0, 7], 2, 8, torch.float32, device)
    out, lse = OPS.varlen_attention(q, k, v, cu, max_len, 0.3)
    q_grad, k_grad, v_grad = (t.clone().requires_grad_(True) for t in (q, k, v))
    masks = torch.rand(12, 5, device=device) > 0.5
    plan_logits = torch.randn(B, T, 3, 2, device=device)
    residual = x.clone().contiguous()
    return [
        ("gate_plan", OPS.gate_plan.default, (plan_logits, lengths, 0.4)),
        ("scatter_add_", OPS.scatter_add_.default, (residual, values.detach(), c.index, 0.5)),
        ("scatter_rows", OPS.scatter_rows.default, (values, c.index, list(x.shape))),
        ("gate_compact", OPS.gate_compact.default, (x_grad, logits, lengths, 0.5)),
        ("gate_compact_linear", OPS.gate_compact_linear.default, (x_grad, hidden, weight, bias, lengths, 0.4)),
        ("gather_rows", OPS.gather_rows.default, (x_grad, c.index)),
        ("scatter_pad", OPS.scatter_pad.default, (values, c.index, x_grad, 0.5)),
        ("group_rows", OPS.group_rows.default, (masks,)),
        ("varlen_attention", OPS.varlen_attention.default, (q_grad, k_grad, v_grad, cu, max_len, 0.3)),
        ("varlen_attention_backward", OPS.varlen_attention_backward.default,
         (torch.randn_like(out), q, k, v, out, lse, cu, max_len, 0.3)),
    ]


@pytest.mark.parametrize("which", range(10))
def test_opcheck(device, which):
    name, op, args = opcheck_cases(device)[which]
    torch.library.opcheck(op, args)


def ffn_block(x, logits, lengths, linear1, linear2):
    """compaction -> FFN on the kept frames -> scatter back with the residual."""
    c = ops.gate_compact(x, logits, lengths)
    y = linear2(torch.relu(linear1(c.packed)))
    return ops.scatter_pad(y, c.index, x, 0.5)


def test_compiled_block_equals_eager(device):
    torch._dynamo.reset()
    x, logits, lengths = make_case("random", device, torch.float32)
    D = x.shape[-1]
    linear1, linear2 = torch.nn.Linear(D, 4 * D).to(device), torch.nn.Linear(4 * D, D).to(device)
    compiled = torch.compile(ffn_block, fullgraph=True, dynamic=True)
    for seed in range(3):  # a different number of kept frames each time, one graph
        x, logits, lengths = make_case("random", device, torch.float32, seed=seed)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        eager = ffn_block(x1, logits, lengths, linear1, linear2)
        got = compiled(x2, logits, lengths, linear1, linear2)
        torch.testing.assert_close(got, eager)
        grad = torch.randn_like(eager)
        eager.backward(grad)
        got.backward(grad)
        torch.testing.assert_close(x2.grad, x1.grad)


def test_compiled_group_rows_and_attention(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def grouped_and_attended(masks, q, k, v, cu, max_len):
        g = ops.group_rows(masks)
        return g.perm, g.offsets, ops.varlen_attention(q, k, v, cu, max_len)

    masks = torch.rand(9, 3, device=device) > 0.5
    q, k, v, cu, max_len = make_attention([6, 3], 2, 8, torch.float32, device)
    perm, offsets, out = grouped_and_attended(masks, q, k, v, cu, max_len)
    want_perm, want_offsets, _ = reference.group_rows(masks)
    assert torch.equal(perm, want_perm) and torch.equal(offsets, want_offsets)
    torch.testing.assert_close(out, reference.varlen_attention(q, k, v, cu))


def test_compiled_fused_gate_and_gather(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def fused(x, hidden, weight, bias, lengths):
        c = ops.gate_compact_linear(x, hidden, weight, bias, lengths)
        return ops.gather_rows(x, c.index) * 2, c.keep

    x, _, lengths = make_case("random", device, torch.float32)
    B, T, _ = x.shape
    hidden, weight, bias = torch.randn(B, T, 9, device=device), torch.randn(2, 9, device=device), torch.randn(2, device=device)
    rows, keep = fused(x, hidden, weight, bias, lengths)
    want = ops.gate_compact_linear(x, hidden, weight, bias, lengths)
    assert torch.equal(keep, want.keep) and torch.equal(rows, want.packed * 2)


def test_compiled_layer_plan(device):
    """gate_plan + per-module gathers + the scatters compile into one graph."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def layer(x, logits, lengths):
        index, cu_seqlens, max_seqlen, keep, offsets = OPS.gate_plan(logits, lengths, 0.5)
        kept = index[: offsets[1]]  # module 0's rows: offsets is a host tensor, its value unbacked
        y = ops.gather_rows(x, kept) * 2
        return ops.scatter_pad(y, kept, x), ops.scatter_rows(y, kept, x.shape), keep

    for seed in range(2):
        x, _, lengths = make_case("random", device, torch.float32, seed=seed)
        logits = torch.randn(*x.shape[:2], 2, 2, device=device)
        got_pad, got_rows, keep = layer(x, logits, lengths)
        want = ops.gate_plan(logits, lengths, 0.5).compact(0, x)
        assert torch.equal(keep[0], want.keep)
        torch.testing.assert_close(got_pad, reference.scatter_pad(want.packed * 2, want.index, x))
        torch.testing.assert_close(got_rows, reference.scatter_rows(want.packed * 2, want.index, x.shape))


@pytest.mark.requires_cuda
def test_bf16_varlen_attention_on_cuda_is_the_op_opchecked_and_compiled():
    """The one varlen path: on CUDA in bf16 the op runs PyTorch's FlashAttention-2 inside (no
    shortcut around it in Python), so what opcheck and torch.compile see is what the encoder runs."""
    torch._dynamo.reset()
    q, k, v, cu, max_len = make_attention([37, 0, 64, 1], 4, 64, torch.bfloat16, torch.device("cuda"))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(OPS.varlen_attention.default, (q, k, v, cu, max_len, 0.125))
    compiled = torch.compile(ops.varlen_attention, fullgraph=True, dynamic=True)
    got = compiled(q, k, v, cu, max_len, 0.125)
    want = ops.varlen_attention(q, k, v, cu, max_len, 0.125)
    torch.testing.assert_close(got, want)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
