// varlen_attention and its backward of csrc/cuda/varlen_attention.cu (the math path and the
// device checks of cu_seqlens; the FlashAttention path needs a GPU) against per-sequence
// attention in float64, differentiated by autograd.
#include <torch/csrc/autograd/autograd.h>

#include "common.h"
#include "varlen_attention.cpp"  // csrc/cuda/varlen_attention.cu after rewrite.py

using at::Tensor;
using localgp::varlen_attention_backward_cuda;
using localgp::varlen_attention_cuda;

void check_case(const std::vector<int32_t>& lengths, int64_t H, int64_t Dh, at::ScalarType dtype,
                int64_t extra_max_seqlen, bool noncontiguous) {
  std::vector<int32_t> cu = {0};
  for (int32_t L : lengths) cu.push_back(cu.back() + L);
  const int64_t N = cu.back();
  const int64_t longest = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
  const int64_t max_seqlen = longest + extra_max_seqlen;  // exact, or an upper bound
  const Tensor cu_seqlens = at::tensor(cu, at::kInt);
  Tensor q = at::randn({N, H, Dh}).to(dtype), k = at::randn({N, H, Dh}).to(dtype);
  const Tensor v = at::randn({N, H, Dh}).to(dtype), grad_out = at::randn({N, H, Dh}).to(dtype);
  if (noncontiguous) q = at::randn({H, N, Dh}).to(dtype).transpose(0, 1);
  const double scale = 0.7;
  const std::string what = "varlen B=" + str(lengths.size()) + " N=" + str(N) + " H=" + str(H) +
                           " Dh=" + str(Dh) + " " + str(dtype);

  auto [out, lse] = varlen_attention_cuda(q, k, v, cu_seqlens, max_seqlen, scale);
  auto [dq, dk, dv] = varlen_attention_backward_cuda(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale);
  EXPECT(out.sizes() == q.sizes() && out.scalar_type() == dtype && out.is_contiguous(), what << ": out layout");
  EXPECT(lse.sizes() == at::IntArrayRef({H, N}) && lse.scalar_type() == at::toOpMathType(dtype), what << ": lse layout");
  EXPECT(dq.sizes() == q.sizes() && dq.scalar_type() == dtype && dk.sizes() == q.sizes() && dv.sizes() == q.sizes(),
         what << ": gradient layout");
  if (N == 0) return;

  auto leaf = [](const Tensor& t) { return t.to(at::kDouble).detach().requires_grad_(true); };
  const Tensor qd = leaf(q), kd = leaf(k), vd = leaf(v);
  std::vector<Tensor> outs, lses;
  for (size_t b = 0; b < lengths.size(); ++b) {
    if (lengths[b] == 0) continue;
    auto heads_first = [&](const Tensor& t) { return t.narrow(0, cu[b], lengths[b]).transpose(0, 1); };
    const Tensor scores = at::matmul(heads_first(qd), heads_first(kd).transpose(1, 2)) * scale;
    lses.push_back(at::logsumexp(scores, -1));
    outs.push_back(at::matmul(at::softmax(scores, -1), heads_first(vd)).transpose(0, 1));
  }
  const Tensor ref_out = at::cat(outs, 0), ref_lse = at::cat(lses, 1);
  torch::autograd::backward({ref_out}, {grad_out.to(at::kDouble)});
  const double tol = dtype == at::kDouble ? 1e-10 : dtype == at::kFloat ? 1e-5 : 2e-2;
  auto close = [&](const Tensor& got, const Tensor& want, double t) {
    return at::allclose(got.to(at::kDouble), want.detach(), t, t);
  };
  EXPECT(close(out, ref_out, tol), what << ": out");
  EXPECT(close(lse, ref_lse, tol), what << ": lse");
  const double grad_tol = dtype == at::kDouble ? 1e-9 : dtype == at::kFloat ? 1e-4 : 5e-2;
  EXPECT(close(dq, qd.grad(), grad_tol), what << ": dq, max error " << (dq.to(at::kDouble) - qd.grad()).abs().max());
  EXPECT(close(dk, kd.grad(), grad_tol), what << ": dk");
  EXPECT(close(dv, vd.grad(), grad_tol), what << ": dv");
}

void test_errors() {
  const Tensor q = at::randn({5, 2, 4});
  const Tensor cu = at::tensor({0, 5}, at::kInt);
  auto [out, lse] = varlen_attention_cuda(q, q, q, cu, 5, 1.0);
  auto run = [&](bool backward, std::vector<int32_t> offsets, int64_t max_seqlen) {
    const Tensor bad = at::tensor(offsets, at::kInt);
    if (backward) {
      varlen_attention_backward_cuda(out, q, q, q, out, lse, bad, max_seqlen, 1.0);
    } else {
      varlen_attention_cuda(q, q, q, bad, max_seqlen, 1.0);
    }
  };
  // cu_seqlens is checked on the device (no sync): a device assert, in both directions.
  for (bool backward : {false, true}) {
    EXPECT_ERROR(run(backward, {0, 3}, 5), "varlen_attention: cu_seqlens[B] must be N");
    EXPECT_ERROR(run(backward, {0, 3, 5}, 2), "varlen_attention: a sequence is longer than max_seqlen");
    EXPECT_ERROR(run(backward, {1, 3, 5}, 5), "varlen_attention: cu_seqlens[0] must be 0");
    EXPECT_ERROR(run(backward, {0, 4, 3, 5}, 5), "varlen_attention: cu_seqlens must be non-decreasing");
    EXPECT(error_of([&] { run(backward, {0, 2, 5}, 3); }) == "(no error)", "valid cu_seqlens");
  }
  EXPECT_ERROR(run(false, {0}, 5), "varlen_attention: cu_seqlens holds no sequence (B=0) but q has N=5");
  EXPECT_ERROR(run(false, {0, 5}, -1), "varlen_attention: max_seqlen must be >= 0");
  const char* op = "varlen_attention_backward: ";
  EXPECT_ERROR(varlen_attention_backward_cuda(out, q, q, q, out, lse.to(at::kDouble), cu, 5, 1.0),
               std::string(op) + "lse must be Float");
  EXPECT_ERROR(varlen_attention_backward_cuda(out, q, q, q, out, lse.t(), cu, 5, 1.0),
               std::string(op) + "lse must have shape (H, N) = (2, 5)");
  EXPECT_ERROR(varlen_attention_backward_cuda(out.to(at::kDouble), q, q, q, out, lse, cu, 5, 1.0),
               std::string(op) + "grad_out and out must have q's dtype");
  EXPECT_ERROR(varlen_attention_backward_cuda(out, q, q, q, out.narrow(0, 0, 4), lse, cu, 5, 1.0),
               std::string(op) + "grad_out and out must have q's shape");
}

void test_cases() {
  std::mt19937 rng(5);
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (int64_t Dh : {1, 8, 12}) {
      for (int trial = 0; trial < 3; ++trial) {
        std::vector<int32_t> lengths(1 + rng() % 4);
        for (auto& L : lengths) L = rng() % 7;
        lengths[0] = trial;  // lengths 0, 1 and 2 among random ones
        check_case(lengths, 1 + rng() % 3, Dh, dtype, trial == 1 ? 0 : 5, trial == 2);
      }
    }
  }
  check_case({1, 1, 1}, 2, 8, at::kFloat, 0, false);           // every sequence one frame
  check_case({0, 0}, 2, 8, at::kFloat, 3, false);              // N=0, B=2
  check_case({}, 2, 8, at::kFloat, 0, false);                  // N=0, B=0
  check_case({70}, 1, 5, at::kFloat, 0, false);                // one long sequence
  std::vector<int32_t> many(60);                               // N past one 256-thread block
  for (auto& L : many) L = rng() % 12;
  check_case(many, 2, 4, at::kFloat, 100, true);
}

int main() {
  at::manual_seed(0);
  return run_tests("varlen_attention", [] {
    test_cases();
    test_errors();
  });
}
