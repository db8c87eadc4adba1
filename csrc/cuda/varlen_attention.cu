// CUDA kernels of varlen attention: each packed sequence of q, k, v (N, H, Dh) attends to
// itself only (no causal mask). Returns out (N, H, Dh) and lse (H, N), the natural-log
// log-sum-exp over keys of the scaled scores of each query row: float32, float64 for float64.
//
// Two paths, chosen from the dtype, head size and GPU only (never from the data):
//  * flash: fp16/bf16, Dh a multiple of 8 and <= 256, sm80 or newer: PyTorch's own varlen
//    FlashAttention-2 (at::_flash_attention_forward / _backward). Its varlen logsumexp is
//    (H, total_q) float32, unpadded (see meta__flash_attention_forward and mha_varlen_fwd),
//    which is exactly our lse layout, so the two paths' lse are interchangeable.
//  * math: everything else (fp32, fp64, other head sizes, older GPUs). Rows are scattered
//    into a padded (B, L, H, Dh) layout (L = min(max_seqlen, N)), attention runs as batched
//    matmuls with a key-padding mask, and the rows are gathered back. Built from ATen ops
//    only (see padded_attention_forward / _backward): device-agnostic.
//
// Neither path syncs with the host. cu_seqlens is validated on the device
// (CUDA_KERNEL_ASSERT, like index_select's bounds check) by varlen_rows_kernel, which also
// computes each row's padded slot for the math path.
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/offsets.cuh"

namespace localgp {
namespace {

using at::Tensor;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------
// Padded math path, device-agnostic (ATen ops only). The layout: packed row i lives at slot
// pad_index[i] = b * L + (i - cu_seqlens[b]) of a (B * L) padded row space; key_padding
// (B, 1, 1, L) is true at the slots past each sequence's length. Computes in the op-math type
// (float32 for half/bf16/float, float64 for double).

struct PaddedLayout {
  Tensor pad_index;    // (N,) int64
  Tensor key_padding;  // (B, 1, 1, L) bool
  int64_t B;
  int64_t L;
};

PaddedLayout make_padded_layout(const Tensor& pad_index, const Tensor& cu_seqlens, int64_t L) {
  const int64_t B = cu_seqlens.size(0) - 1;
  const Tensor lengths = cu_seqlens.narrow(0, 1, B) - cu_seqlens.narrow(0, 0, B);
  const Tensor positions = at::arange(L, cu_seqlens.options().dtype(at::kLong));
  const Tensor key_padding = positions.unsqueeze(0) >= lengths.unsqueeze(1);
  return {pad_index, key_padding.view({B, 1, 1, L}), B, L};
}

// (N, H, X) packed rows -> (B, H, L, X) in dtype, padded slots set to `fill`.
Tensor to_padded(const Tensor& rows, const PaddedLayout& p, at::ScalarType dtype, double fill) {
  const int64_t H = rows.size(1), X = rows.size(2);
  Tensor padded = at::full({p.B * p.L, H, X}, fill, rows.options().dtype(dtype));
  padded.index_copy_(0, p.pad_index, rows.to(dtype));
  return padded.view({p.B, p.L, H, X}).permute({0, 2, 1, 3});
}

// (B, H, L, X) -> (N, H, X) packed rows (contiguous).
Tensor from_padded(const Tensor& padded, const PaddedLayout& p) {
  const int64_t H = padded.size(1), X = padded.size(3);
  return padded.permute({0, 2, 1, 3}).reshape({p.B * p.L, H, X}).index_select(0, p.pad_index);
}

// Scaled scores (B, H, L, L) with padded keys at -inf.
Tensor masked_scores(const Tensor& qp, const Tensor& kp, const PaddedLayout& p, double scale) {
  Tensor scores = at::matmul(qp, kp.transpose(-2, -1)).mul_(scale);
  return scores.masked_fill_(p.key_padding, -std::numeric_limits<double>::infinity());
}

std::tuple<Tensor, Tensor> padded_attention_forward(const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const PaddedLayout& p,
                                                    double scale) {
  const auto acc = at::toOpMathType(q.scalar_type());
  const Tensor qp = to_padded(q, p, acc, 0.0), kp = to_padded(k, p, acc, 0.0);
  const Tensor vp = to_padded(v, p, acc, 0.0);
  const Tensor scores = masked_scores(qp, kp, p, scale);
  // Padded query rows of an empty sequence see no key (lse -inf, NaN probabilities); they are
  // never gathered back.
  const Tensor lse = at::logsumexp(scores, -1, /*keepdim=*/true);  // (B, H, L, 1)
  const Tensor out = from_padded(at::matmul((scores - lse).exp_(), vp), p).to(q.scalar_type());
  const int64_t H = q.size(1);
  // (B, H, L) -> (H, B * L) -> the rows' columns: (H, N).
  const Tensor lse_rows =
      lse.squeeze(-1).permute({1, 0, 2}).reshape({H, p.B * p.L}).index_select(1, p.pad_index);
  return {out, lse_rows};
}

std::tuple<Tensor, Tensor, Tensor> padded_attention_backward(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const PaddedLayout& p, double scale) {
  const auto acc = at::toOpMathType(q.scalar_type());
  const Tensor qp = to_padded(q, p, acc, 0.0), kp = to_padded(k, p, acc, 0.0);
  const Tensor vp = to_padded(v, p, acc, 0.0), dop = to_padded(grad_out, p, acc, 0.0);
  // lse (H, N) -> (B, H, L, 1); +inf at padded query rows makes their probabilities exactly 0
  // (so that they add nothing, not even NaN, to dK and dV).
  const Tensor lse_p =
      to_padded(lse.t().unsqueeze(-1), p, acc, std::numeric_limits<double>::infinity());
  // P = softmax(scale QK^T) recomputed from the saved log-sum-exp; padded keys get 0.
  const Tensor probs = (masked_scores(qp, kp, p, scale) - lse_p).exp_();
  // dS = P * (dP - rowsum(dO * O)), dP = dO V^T.
  const Tensor row_dot = (grad_out.to(acc) * out.to(acc)).sum(-1, /*keepdim=*/true);  // (N, H, 1)
  const Tensor row_dot_p = to_padded(row_dot, p, acc, 0.0);                        // (B, H, L, 1)
  const Tensor grad_scores = probs * (at::matmul(dop, vp.transpose(-2, -1)) - row_dot_p);
  const auto dtype = q.scalar_type();
  const Tensor grad_q = from_padded(at::matmul(grad_scores, kp).mul_(scale), p).to(dtype);
  const Tensor grad_k =
      from_padded(at::matmul(grad_scores.transpose(-2, -1), qp).mul_(scale), p).to(dtype);
  const Tensor grad_v = from_padded(at::matmul(probs.transpose(-2, -1), dop), p).to(dtype);
  return {grad_q, grad_k, grad_v};
}

// ------------------------------------------------------------------------------------------
// cu_seqlens on the device

constexpr int kRowThreads = 256;

// Thread b < B checks sequence b; with pad_index, thread i < N also writes row i's padded
// slot. Invalid cu_seqlens trip a device-side assert (reported at the next CUDA call, as for
// index_select) instead of costing every call a host sync.
__global__ void __launch_bounds__(kRowThreads)
    varlen_rows_kernel(const int32_t* __restrict__ cu_seqlens, int64_t B, int64_t N,
                       int64_t max_seqlen, int64_t L, int64_t* __restrict__ pad_index) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (i < B) {
    const int64_t begin = cu_seqlens[i], end = cu_seqlens[i + 1];
    CUDA_KERNEL_ASSERT_MSG(i > 0 || begin == 0, "varlen_attention: cu_seqlens[0] must be 0");
    CUDA_KERNEL_ASSERT_MSG(i + 1 < B || end == N,
                           "varlen_attention: cu_seqlens[B] must be N, the rows of q");
    CUDA_KERNEL_ASSERT_MSG(begin <= end, "varlen_attention: cu_seqlens must be non-decreasing");
    CUDA_KERNEL_ASSERT_MSG(end - begin <= max_seqlen,
                           "varlen_attention: a sequence is longer than max_seqlen");
  }
  if (pad_index != nullptr && i < N) {
    const int64_t lo = segment_of(cu_seqlens, B, i);  // the sequence holding row i
    const int64_t position = i - cu_seqlens[lo];
    // Redundant for valid offsets; keeps the padded scatter in bounds for invalid ones.
    CUDA_KERNEL_ASSERT_MSG(position >= 0 && position < L, "varlen_attention: invalid cu_seqlens");
    pad_index[i] = lo * L + position;
  }
}

// Launches varlen_rows_kernel; returns pad_index (N,) when with_pad_index.
Tensor check_rows_on_device(const Tensor& cu_seqlens, int64_t N, int64_t max_seqlen, int64_t L,
                            bool with_pad_index) {
  const int64_t B = cu_seqlens.size(0) - 1;
  Tensor pad_index;
  if (with_pad_index) pad_index = at::empty({N}, cu_seqlens.options().dtype(at::kLong));
  const int64_t threads = std::max(B, with_pad_index ? N : int64_t{0});
  if (threads == 0) return pad_index;
  const int64_t blocks = ceil_div(threads, kRowThreads);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "varlen_attention: N=", N, " rows are more than supported");
  varlen_rows_kernel<<<static_cast<unsigned>(blocks), kRowThreads, 0,
                       c10::cuda::getCurrentCUDAStream()>>>(
      cu_seqlens.const_data_ptr<int32_t>(), B, N, max_seqlen, L,
      with_pad_index ? pad_index.data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pad_index;
}

// ------------------------------------------------------------------------------------------
// Path choice and the ops

bool use_flash(const Tensor& q) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t head_dim = q.size(2);
  if (head_dim == 0 || head_dim % 8 != 0 || head_dim > 256) return false;
  // FlashAttention-2 needs sm80+; cudaDeviceGetAttribute is a cached query, no sync.
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  return major >= 8;
}

// No sequence can be longer than N: a smaller padded length for the math path and flash.
int64_t effective_max_seqlen(int64_t max_seqlen, int64_t N) { return std::min(max_seqlen, N); }

std::tuple<Tensor, Tensor> varlen_attention_cuda(const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& cu_seqlens_in,
                                                 int64_t max_seqlen, double scale) {
  check_varlen_attention(q_in, k_in, v_in, cu_seqlens_in, max_seqlen, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t N = q_in.size(0), H = q_in.size(1);
  const int64_t B = cu_seqlens_in.size(0) - 1;
  TORCH_CHECK(B > 0 || N == 0, "varlen_attention: cu_seqlens holds no sequence (B=0) but q has N=",
              N, " rows");
  const Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const auto lse_dtype = at::toOpMathType(q_in.scalar_type());
  const int64_t L = effective_max_seqlen(max_seqlen, N);
  const bool flash = use_flash(q_in);
  const Tensor pad_index = check_rows_on_device(cu_seqlens, N, max_seqlen, L, !flash);
  if (N == 0) {
    return {at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous)),
            at::empty({H, 0}, q_in.options().dtype(lse_dtype))};
  }
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  if (flash) {
    auto [out, lse, rng_state, unused, debug_mask] = at::_flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, L, L, /*dropout_p=*/0.0, /*is_causal=*/false,
        /*return_debug_mask=*/false, std::optional<double>(scale));
    return {out, lse};
  }
  return padded_attention_forward(q, k, v, make_padded_layout(pad_index, cu_seqlens, L), scale);
}

std::tuple<Tensor, Tensor, Tensor> varlen_attention_backward_cuda(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& lse_in, const Tensor& cu_seqlens_in, int64_t max_seqlen,
    double scale) {
  check_varlen_attention(q_in, k_in, v_in, cu_seqlens_in, max_seqlen, scale);
  check_varlen_attention_backward(grad_out_in, q_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t N = q_in.size(0);
  const int64_t B = cu_seqlens_in.size(0) - 1;
  TORCH_CHECK(B > 0 || N == 0, "varlen_attention_backward: cu_seqlens holds no sequence (B=0) "
              "but q has N=", N, " rows");
  const Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t L = effective_max_seqlen(max_seqlen, N);
  const bool flash = use_flash(q_in);
  const Tensor pad_index = check_rows_on_device(cu_seqlens, N, max_seqlen, L, !flash);
  const auto contiguous = at::MemoryFormat::Contiguous;
  if (N == 0) {
    return {at::empty(q_in.sizes(), q_in.options().memory_format(contiguous)),
            at::empty(k_in.sizes(), k_in.options().memory_format(contiguous)),
            at::empty(v_in.sizes(), v_in.options().memory_format(contiguous))};
  }
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const Tensor lse = lse_in.contiguous();
  if (flash) {
    // Without dropout the RNG state is never read; PyTorch's own varlen attention
    // (torch/nn/attention/varlen.py) passes zeros((2,), uint64) and an empty tensor too.
    const Tensor rng_state = at::zeros({2}, q.options().dtype(at::kUInt64));
    const Tensor unused = at::empty({0}, q.options());
    auto [grad_q, grad_k, grad_v] = at::_flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, L, L, /*dropout_p=*/0.0,
        /*is_causal=*/false, rng_state, unused, std::optional<double>(scale));
    return {grad_q, grad_k, grad_v};
  }
  return padded_attention_backward(grad_out, q, k, v, out, lse,
                                   make_padded_layout(pad_index, cu_seqlens, L), scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(localgp, CUDA, m) {
  m.impl("varlen_attention", &varlen_attention_cuda);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cuda);
}

}  // namespace localgp
