"""Every fused op against its plain-PyTorch reference (localgp/reference.py)."""

import math

import pytest
import torch

from localgp import ops, reference

# (B, T, D, lengths, keep pattern): odd sizes, lengths 0 and 1, T=1, nothing / everything kept.
CASES = {
    "random": (3, 17, 33, [17, 5, 11], "random"),
    "nothing_kept": (2, 9, 8, [9, 4], "none"),
    "everything_kept": (2, 9, 8, [9, 9], "all"),
    "lengths_0_and_1": (3, 6, 5, [0, 1, 6], "random"),
    "all_lengths_0": (2, 4, 3, [0, 0], "all"),
    "T_is_1": (4, 1, 7, [1, 0, 1, 1], "random"),
    "batch_of_1": (1, 31, 64, [31], "random"),
    "empty_batch": (0, 5, 4, [], "random"),
}
DTYPES = [torch.float32, torch.bfloat16]


def make_logits(B, T, pattern, threshold, gen, device):
    """Two-class logits whose keep margins stay clear of the threshold (no ties to argue about)."""
    logits = torch.randn(B, T, 2, generator=gen) * 2
    if pattern == "none":
        logits[..., 0] += 50
    elif pattern == "all":
        logits[..., 1] += 50
    boundary = math.log(threshold / (1 - threshold))
    margin = logits[..., 1] - logits[..., 0]
    logits[..., 1] += torch.where((margin - boundary).abs() < 1e-2, 0.05, 0.0)
    return logits.to(device)


def make_case(name, device, dtype, threshold=0.5, seed=0, noncontiguous=False):
    B, T, D, lengths, pattern = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    if noncontiguous:  # every other channel of a wider tensor, time-major underneath
        x = torch.randn(T, B, 2 * D, generator=gen).to(device, dtype).transpose(0, 1)[..., ::2]
        assert x.numel() == 0 or not x.is_contiguous()
    else:
        x = torch.randn(B, T, D, generator=gen).to(device, dtype)
    logits = make_logits(B, T, pattern, threshold, gen, device)
    return x, logits, torch.tensor(lengths, dtype=torch.int64, device=device)


def assert_compaction_equal(got, want):
    for name, g, w in zip(ops.Compacted._fields, got, want, strict=True):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w.cpu()), name


# ----------------------------------------------------------------------------- gate_compact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_gate_compact_matches_reference(device, case, dtype, noncontiguous):
    for seed in range(3):  # fresh random inputs each time
        x, logits, lengths = make_case(case, device, dtype, seed=seed, noncontiguous=noncontiguous)
        got = ops.gate_compact(x, logits, lengths)
        assert_compaction_equal(got, reference.gate_compact(x, logits, lengths))


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.7, 0.9])
def test_gate_compact_threshold(device, threshold):
    x, logits, lengths = make_case("random", device, torch.float32, threshold=threshold)
    got = ops.gate_compact(x, logits, lengths, threshold)
    assert_compaction_equal(got, reference.gate_compact(x, logits, lengths, threshold))


def test_gate_compact_accepts_int32_lengths_and_bf16_logits(device):
    x, logits, lengths = make_case("random", device, torch.float32)
    got = ops.gate_compact(x, logits.bfloat16(), lengths.int())
    assert_compaction_equal(got, reference.gate_compact(x, logits.bfloat16(), lengths))


def test_gate_compact_never_keeps_padding(device):
    x, logits, lengths = make_case("random", device, torch.float32)
    logits[..., 1] += 100  # every frame wants to be kept
    got = ops.gate_compact(x, logits, lengths)
    assert got.keep.sum(1).tolist() == lengths.tolist()
    assert int(got.max_seqlen) == int(lengths.max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["random", "lengths_0_and_1", "T_is_1", "everything_kept"])
def test_gate_compact_linear_matches_reference(device, case, dtype):
    B, T, D, _, _ = CASES[case]
    for seed, H in [(0, 16), (1, 37), (2, 256)]:
        x, _, lengths = make_case(case, device, dtype, seed=seed)
        gen = torch.Generator().manual_seed(100 + seed)
        hidden = torch.randn(B, T, H, generator=gen).to(device, dtype)
        weight = (torch.randn(2, H, generator=gen) / math.sqrt(H)).to(device, dtype)
        bias = torch.randn(2, generator=gen).to(device, dtype)
        got = ops.gate_compact_linear(x, hidden, weight, bias, lengths)
        # The kernel sums in another order than the reference's matmul: frames whose margin
        # is within rounding of the threshold may go either way; all others must agree.
        margin = (hidden.double() @ (weight[1] - weight[0]).double()) + (bias[1] - bias[0]).double()
        clear = margin.abs() > 1e-3 * (1 + hidden.double().abs().sum(-1))
        want_keep = reference.gate_compact_linear(x, hidden, weight, bias, lengths)[-1]
        assert torch.equal(got.keep[clear], want_keep[clear])
        want = (*reference.compact(x, got.keep), got.keep)
        assert_compaction_equal(got, want)


def test_gate_compact_linear_equals_gate_compact_on_its_logits(device):
    x, _, lengths = make_case("random", device, torch.float32)
    B, T, _ = x.shape
    hidden = torch.randn(B, T, 8, device=device)
    weight, bias = torch.randn(2, 8, device=device), torch.randn(2, device=device)
    fused = ops.gate_compact_linear(x, hidden, weight, bias, lengths)
    logits = hidden @ weight.T + bias
    assert torch.equal(fused.keep, reference.keep_mask(logits, lengths, 0.5))


# ----------------------------------------------------------------------------- gate_plan


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("modules", [1, 3])
def test_gate_plan_matches_reference_and_gate_compact(device, case, dtype, modules):
    for seed in range(2):
        x, _, lengths = make_case(case, device, dtype, seed=seed)
        B, T, _ = x.shape
        gen = torch.Generator().manual_seed(seed)
        logits = torch.stack([make_logits(B, T, CASES[case][4], 0.4, gen, device) for _ in range(modules)], dim=2)
        if seed:  # a non-contiguous view
            logits = torch.cat([logits, logits], dim=-1)[..., 1:3].flip(-1)
        logits = logits.to(dtype)
        plan = ops.gate_plan(logits, lengths, 0.4)
        want = reference.gate_plan(logits, lengths, 0.4)
        for name, got, w in zip(("index", "cu_seqlens", "max_seqlen", "keep"), plan, want, strict=False):
            assert torch.equal(got.cpu(), w.cpu()), name
        assert plan.offsets == want[4].tolist()
        for m in range(modules):
            assert_compaction_equal(plan.compact(m, x), ops.gate_compact(x, logits[:, :, m], lengths, 0.4))


def test_gate_plan_reads_the_host_once(device):
    logits = torch.randn(2, 40, 3, 2, device=device)
    x = torch.randn(2, 40, 8, device=device)
    before = ops.host_reads()
    plan = ops.gate_plan(logits, torch.tensor([40, 17], device=device))
    for m in range(3):
        plan.compact(m, x)
    assert ops.host_reads() - before == 1
    assert plan.offsets[-1] == plan.index.numel()


def test_infinite_logits_follow_the_margin_rule(device):
    """+inf keep logit: kept; +inf skip logit: skipped; the same infinity twice: an error. The
    reference states the same rule (it used softmax, which gives NaN at any infinity)."""
    inf = float("inf")
    logits = torch.tensor([[[0.0, inf], [inf, 0.0], [-inf, 0.0], [0.0, -inf], [1.0, 2.0]]], device=device)
    lengths = torch.tensor([5], device=device)
    x = torch.randn(1, 5, 3, device=device)
    got = ops.gate_compact(x, logits, lengths)
    assert got.keep.tolist() == [[True, False, True, False, True]]
    assert_compaction_equal(got, reference.gate_compact(x, logits, lengths))
    for same in (inf, -inf):
        bad = logits.clone()
        bad[0, 2] = same
        with pytest.raises(RuntimeError, match=r"both classes the same infinity \(first at b=0, t=2\)"):
            ops.gate_compact(x, bad, lengths)
        with pytest.raises(ValueError, match="no decision"):
            reference.gate_compact(x, bad, lengths)


def test_threshold_at_float_rounding_is_decided_alike():
    """Margins that straddle logit(threshold) by one float32 ulp: the reference and the kernel
    compare the same float32 numbers, so they agree frame for frame."""
    threshold = 0.3
    bound = torch.tensor(math.log(threshold / (1 - threshold)), dtype=torch.float32)
    near = torch.stack([torch.nextafter(bound, torch.tensor(-10.0)), bound, torch.nextafter(bound, torch.tensor(10.0))])
    logits = torch.stack([torch.zeros(3), near], dim=-1)[None]
    lengths = torch.tensor([3])
    got = ops.gate_compact(torch.randn(1, 3, 2), logits, lengths, threshold).keep
    assert got.tolist() == [[False, False, True]]
    assert torch.equal(got, reference.keep_mask(logits, lengths, threshold))


# ----------------------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 7, 64])
def test_gather_rows_matches_reference(device, dtype, D):
    gen = torch.Generator().manual_seed(D)
    src = torch.randn(3, 11, D, generator=gen).to(device, dtype)
    for n in (0, 1, 17):
        index = torch.randperm(33, generator=gen)[:n].to(device)
        assert torch.equal(ops.gather_rows(src, index), reference.gather_rows(src, index))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scatter_pad_matches_reference(device, case, dtype, scale):
    x, logits, lengths = make_case(case, device, dtype)
    c = ops.gate_compact(x, logits, lengths)
    values = torch.randn_like(c.packed)
    got = ops.scatter_pad(values, c.index, x, scale)
    want = reference.scatter_pad(values.float(), c.index, x.float(), scale)
    # One rounding of residual + scale*y in the output dtype.
    tol = 0 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * 4)
    assert got.dtype == dtype
    skipped = ~c.keep
    assert torch.equal(got[skipped], x[skipped])  # skipped frames pass through unchanged


def test_scatter_pad_noncontiguous_residual(device):
    x, logits, lengths = make_case("random", device, torch.float32, noncontiguous=True)
    c = ops.gate_compact(x, logits, lengths)
    values = torch.randn_like(c.packed)
    torch.testing.assert_close(
        ops.scatter_pad(values, c.index, x), reference.scatter_pad(values, c.index, x)
    )


def test_compact_then_scatter_roundtrip(device):
    x, logits, lengths = make_case("random", device, torch.float32)
    c = ops.gate_compact(x, logits, lengths)
    out = ops.scatter_pad(c.packed, c.index, torch.zeros_like(x))
    assert torch.equal(out, x * c.keep[..., None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_scatter_add_and_scatter_rows_match_reference(device, case, dtype):
    x, logits, lengths = make_case(case, device, dtype)
    c = ops.gate_compact(x, logits, lengths)
    values = torch.randn_like(c.packed)
    residual = x.clone()
    assert ops.scatter_add_(residual, values, c.index, 0.5) is residual
    assert torch.equal(residual, ops.scatter_pad(values, c.index, x, 0.5))  # the same rounding
    rows = ops.scatter_rows(values, c.index, x.shape)
    assert rows.dtype == dtype and torch.equal(rows, reference.scatter_rows(values, c.index, x.shape))


def test_scatters_reject_repeated_and_out_of_range_indices(device):
    """Distinct indices are the scatters' contract: a repeat is an error, not a silent sum
    (scatter_pad used to add repeated rows together)."""
    residual = torch.randn(4, 5, 3, device=device)
    values = torch.randn(3, 3, device=device)
    repeated = torch.tensor([7, 2, 7], device=device)
    with pytest.raises(RuntimeError, match=r"scatter_pad: index entries must be distinct, but index\[2\]=7 repeats index\[0\]"):
        ops.scatter_pad(values, repeated, residual)
    with pytest.raises(RuntimeError, match="scatter_rows: index entries must be distinct"):
        ops.scatter_rows(values, repeated, residual.shape)
    before = residual.clone()
    with pytest.raises(RuntimeError, match="scatter_add_: index entries must be distinct"):
        ops.scatter_add_(residual, values, repeated)
    assert torch.equal(residual, before)  # checked before anything is written
    with pytest.raises(RuntimeError, match=r"scatter_rows: index\[1\]=20 is outside \[0, 20\)"):
        ops.scatter_rows(values, torch.tensor([0, 20, 1], device=device), residual.shape)


def test_scatter_add_refuses_autograd_and_noncontiguous(device):
    residual = torch.randn(2, 4, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable; use scatter_pad"):
        ops.scatter_add_(residual, torch.randn(1, 3, device=device), torch.tensor([0], device=device))
    strided = torch.randn(4, 2, 3, device=device).transpose(0, 1)
    with pytest.raises(RuntimeError, match="residual must be contiguous"):
        ops.scatter_add_(strided, torch.randn(1, 3, device=device), torch.tensor([0], device=device))


def test_gather_rows_gradient_accumulates_repeated_rows(device):
    """Rows gathered twice get both gradients. The old backward scattered with scatter_pad, whose
    contract is distinct rows: on a GPU its read-modify-write per row lost one of the updates."""
    src = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.tensor([3, 1, 3, 3, 0], device=device)
    grad = torch.randn(5, 4, dtype=torch.float64, device=device)
    ops.gather_rows(src, index).backward(grad)
    want = torch.zeros(5, 4, dtype=torch.float64, device=device).index_add_(0, index, grad)
    assert torch.equal(src.grad, want)
    torch.autograd.gradcheck(lambda s: ops.gather_rows(s, index), (src.detach().requires_grad_(True),))


def test_cpu_kernels_use_threads_and_agree_with_one_thread():
    """OpenMP: 2 threads give the results of 1 thread, bit for bit (the speedup is measured in
    benchmarks/threads.py, not here)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 300, 64, generator=gen)
    logits = torch.randn(8, 300, 3, 2, generator=gen)
    lengths = torch.randint(0, 301, (8,), generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            plan = ops.gate_plan(logits, lengths)
            c = plan.compact(1, x)
            y = torch.randn(c.packed.shape, generator=torch.Generator().manual_seed(1))
            results.append((*plan[:4], c.packed, ops.scatter_pad(y, c.index, x, 0.5),
                            ops.scatter_rows(y, c.index, x.shape), ops.gate_compact(x, logits[:, :, 0], lengths).packed))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", ["random", "lengths_0_and_1", "nothing_kept", "everything_kept"])
def test_gradients(device, case):
    x, logits, lengths = make_case(case, device, torch.float64)
    x.requires_grad_(True)

    def compact_fn(x):
        return ops.gate_compact(x, logits, lengths).packed

    torch.autograd.gradcheck(compact_fn, (x,))
    B, T, H = x.shape[0], x.shape[1], 5
    hidden = torch.randn(B, T, H, dtype=torch.float64, device=device)
    weight, bias = torch.randn(2, H, dtype=torch.float64, device=device), torch.zeros(2, dtype=torch.float64, device=device)
    torch.autograd.gradcheck(lambda x: ops.gate_compact_linear(x, hidden, weight, bias, lengths).packed, (x,))

    index = ops.gate_compact(x, logits, lengths).index
    values = torch.randn(index.numel(), x.shape[-1], dtype=torch.float64, device=device, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    torch.autograd.gradcheck(lambda v, r: ops.scatter_pad(v, index, r, 0.5), (values, residual))
    torch.autograd.gradcheck(lambda s: ops.gather_rows(s, index), (x,))
    torch.autograd.gradcheck(lambda v: ops.scatter_rows(v, index, x.shape), (values,))


def test_gradient_of_compact_block_equals_masked_block(device):
    """d/dx of x + 0.5*f(compact(x)) equals that of the masked block x + 0.5*f(x)*mask."""
    x, logits, lengths = make_case("random", device, torch.float32)
    lin = torch.nn.Linear(x.shape[-1], x.shape[-1]).to(device)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    c = ops.gate_compact(x1, logits, lengths)
    out_compact = ops.scatter_pad(torch.tanh(lin(c.packed)), c.index, x1, 0.5)
    out_masked = x2 + 0.5 * torch.tanh(lin(x2)) * c.keep[..., None]
    torch.testing.assert_close(out_compact, out_masked)
    grad = torch.randn_like(x)
    out_compact.backward(grad)
    out_masked.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad)


# ----------------------------------------------------------------------------- group_rows


def random_masks(R, M, patterns, gen):
    """R rows drawn from a few distinct masks, so that groups have several rows."""
    pool = torch.rand(patterns, M, generator=gen) > 0.5
    return pool[torch.randint(patterns, (R,), generator=gen)]


@pytest.mark.parametrize(("R", "M", "patterns"), [(40, 3, 4), (25, 18, 3), (64, 70, 5), (33, 130, 33), (1, 5, 1), (7, 1, 2)])
def test_group_rows_matches_reference(device, R, M, patterns):
    for seed in range(3):
        masks = random_masks(R, M, patterns, torch.Generator().manual_seed(seed)).to(device)
        got = ops.group_rows(masks)
        for name, g, w in zip(ops.Grouping._fields, got, reference.group_rows(masks), strict=True):
            assert torch.equal(g.cpu(), w.cpu()), name
        # Rows of a group share one mask; the groups' masks are distinct.
        perm, offsets = got.perm, got.offsets.tolist()
        for g in range(len(offsets) - 1):
            rows = masks[perm[offsets[g] : offsets[g + 1]]]
            assert (rows == rows[0]).all()
        assert torch.equal(perm[got.inverse], torch.arange(R, device=device))


def test_group_rows_edge_cases(device):
    none = ops.group_rows(torch.zeros(0, 4, dtype=torch.bool, device=device))
    assert none.perm.numel() == 0 and none.offsets.tolist() == [0]
    same = ops.group_rows(torch.ones(5, 3, dtype=torch.bool, device=device))
    assert same.offsets.tolist() == [0, 5] and same.perm.tolist() == list(range(5))
    no_columns = ops.group_rows(torch.zeros(3, 0, dtype=torch.bool, device=device))
    assert no_columns.offsets.tolist() == [0, 3]
    strided = torch.rand(6, 8, device=device) > 0.5
    got = ops.group_rows(strided[:, ::2])
    assert torch.equal(got.perm.cpu(), reference.group_rows(strided[:, ::2])[0].cpu())


# ----------------------------------------------------------------------------- varlen attention


def max_abs(t):
    return t.abs().max() if t.numel() else t.new_zeros(())


def make_attention(lengths, H, Dh, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    q, k, v = (torch.randn(N, H, Dh, generator=gen).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths, default=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lengths", "H", "Dh"), [([5, 0, 12, 1], 3, 8), ([1], 1, 7), ([40, 33], 6, 64), ([0, 0], 2, 16)]
)
def test_varlen_attention_matches_reference(device, dtype, lengths, H, Dh):
    q, k, v, cu, max_len = make_attention(lengths, H, Dh, dtype, device)
    got = ops.varlen_attention(q, k, v, cu, max_len)
    want = reference.varlen_attention(q.double(), k.double(), v.double(), cu).float()
    baseline = reference.varlen_attention(q, k, v, cu).float()  # same dtype, PyTorch's kernel
    # flash-attention's rule: at most twice the error of a same-dtype PyTorch baseline.
    err, base_err = max_abs(got.float() - want), max_abs(baseline - want)
    assert err <= 2 * base_err + 1e-5, (float(err), float(base_err))
    # max_seqlen is an upper bound: T works too.
    torch.testing.assert_close(ops.varlen_attention(q, k, v, cu, max_len + 9), got)


def test_varlen_attention_equals_masked_padded_attention(device):
    """Attention over the packed kept frames = padded attention restricted to the kept frames."""
    B, T, H, Dh = 3, 21, 4, 16
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, T, H, Dh, generator=gen).to(device) for _ in range(3)]
    logits = make_logits(B, T, "random", 0.5, gen, device)
    lengths = torch.tensor([21, 9, 0], device=device)
    keep = reference.keep_mask(logits, lengths, 0.5)
    packed = [ops.gate_compact(t.reshape(B, T, H * Dh), logits, lengths) for t in qkv]
    c = packed[0]
    q, k, v = (p.packed.reshape(-1, H, Dh) for p in packed)
    out = ops.varlen_attention(q, k, v, c.cu_seqlens, T)
    got = ops.scatter_pad(out.reshape(-1, H * Dh), c.index, torch.zeros(B, T, H * Dh, device=device))
    want = reference.masked_attention(qkv, keep).reshape(B, T, H * Dh)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[5, 0, 9, 1], [1]])
def test_varlen_attention_gradients(device, lengths):
    q, k, v, cu, max_len = make_attention(lengths, 2, 4, torch.float64, device)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.autograd.gradcheck(lambda q, k, v: ops.varlen_attention(q, k, v, cu, max_len), (q, k, v))


def test_varlen_attention_rejects_bad_offsets():
    q, k, v, cu, _ = make_attention([4, 3], 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="more than max_seqlen"):
        ops.varlen_attention(q, k, v, cu, 3)
    with pytest.raises(RuntimeError, match="end at N=7"):
        ops.varlen_attention(q, k, v, torch.tensor([0, 4, 6], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32"):
        ops.varlen_attention(q, k, v, cu.long(), 4)
