// Argument checks shared by the CPU and CUDA kernels: every message names the op, the
// argument and what was expected. Value checks that need the data (NaN logits, lengths
// outside [0, T]) are done inside each kernel, where the data is read anyway.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace localgp {

inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                              const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

// The dtypes every kernel handles (the CPU and CUDA dispatch, the op-math types). Also asked
// of tensors that are only copied as bytes (x of gate_compact, src of gather_rows), so that
// every op accepts the same dtypes.
inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

inline void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have shape ", shape, " (", dim,
              " dims), got ", t.sizes());
}

inline void check_threshold(const char* op, double threshold) {
  TORCH_CHECK(threshold > 0.0 && threshold < 1.0, op,
              ": threshold must lie strictly between 0 and 1, got ", threshold);
}

// The keep rule of every gate op (and of localgp/reference.py): frame kept iff
// float32(l[1]) - float32(l[0]) > float32(logit(threshold)), i.e. softmax(l)[1] > threshold up
// to float rounding, and defined at infinite logits (+inf keep logit: kept; +inf skip logit:
// skipped). A NaN margin (a NaN logit, or both classes the same infinity) decides nothing: an error.
inline float keep_margin(double threshold) {
  return static_cast<float>(std::log(threshold / (1.0 - threshold)));
}
constexpr const char* kNanLogits =
    "logits give no decision at valid frames: a NaN logit, or both classes the same infinity";
constexpr const char* kNanGateLogits =
    "the gate logits give no decision at valid frames: a NaN logit, or both classes the same "
    "infinity";

// lengths (B,) integer, B and device those of ref (x or logits); the values are checked in the
// kernels, which read them anyway.
inline void check_lengths(const char* op, const at::Tensor& lengths, const at::Tensor& ref,
                          const char* ref_name) {
  check_dim(op, lengths, "lengths", 1, "(B,)");
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) &&
                  lengths.scalar_type() != at::kBool,
              op, ": lengths must be an integer tensor, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.size(0) == ref.size(0), op, ": lengths has ", lengths.size(0),
              " entries but ", ref_name, " has batch size B=", ref.size(0));
  check_same_device(op, ref, ref_name, lengths, "lengths");
}

// x (B,T,D) and lengths (B,) integer, shared by both gate_compact variants.
inline void check_frames_and_lengths(const char* op, const at::Tensor& x,
                                     const at::Tensor& lengths) {
  check_dim(op, x, "x", 3, "(B, T, D)");
  check_floating(op, x, "x");
  check_lengths(op, lengths, x, "x");
}

inline void check_gate_compact(const at::Tensor& x, const at::Tensor& logits,
                               const at::Tensor& lengths, double threshold) {
  const char* op = "gate_compact";
  check_frames_and_lengths(op, x, lengths);
  check_dim(op, logits, "logits", 3, "(B, T, 2)");
  check_floating(op, logits, "logits");
  TORCH_CHECK(logits.size(0) == x.size(0) && logits.size(1) == x.size(1) &&
                  logits.size(2) == 2,
              op, ": logits must have shape (B, T, 2) = (", x.size(0), ", ", x.size(1),
              ", 2) to match x, got ", logits.sizes());
  check_same_device(op, x, "x", logits, "logits");
  check_threshold(op, threshold);
}

inline void check_gate_compact_linear(const at::Tensor& x, const at::Tensor& hidden,
                                      const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& lengths, double threshold) {
  const char* op = "gate_compact_linear";
  check_frames_and_lengths(op, x, lengths);
  check_dim(op, hidden, "hidden", 3, "(B, T, H)");
  check_floating(op, hidden, "hidden");
  TORCH_CHECK(hidden.size(0) == x.size(0) && hidden.size(1) == x.size(1), op,
              ": hidden must have shape (B, T, H) with B=", x.size(0), ", T=", x.size(1),
              " to match x, got ", hidden.sizes());
  check_dim(op, weight, "weight", 2, "(2, H)");
  check_floating(op, weight, "weight");
  TORCH_CHECK(weight.size(0) == 2 && weight.size(1) == hidden.size(2), op,
              ": weight must have shape (2, H) = (2, ", hidden.size(2), "), got ",
              weight.sizes());
  check_dim(op, bias, "bias", 1, "(2,)");
  check_floating(op, bias, "bias");
  TORCH_CHECK(bias.size(0) == 2, op, ": bias must have shape (2,), got ", bias.sizes());
  check_same_device(op, x, "x", hidden, "hidden");
  check_same_device(op, x, "x", weight, "weight");
  check_same_device(op, x, "x", bias, "bias");
  check_threshold(op, threshold);
}

inline void check_row_index(const char* op, const at::Tensor& index, const at::Tensor& ref,
                            const char* ref_name) {
  check_dim(op, index, "index", 1, "(N,)");
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
              index.scalar_type());
  check_same_device(op, ref, ref_name, index, "index");
}

inline void check_gather_rows(const at::Tensor& src, const at::Tensor& index) {
  const char* op = "gather_rows";
  TORCH_CHECK(src.dim() >= 1, op, ": src must have shape (..., D), got a 0-dim tensor");
  check_floating(op, src, "src");
  check_row_index(op, index, src, "src");
}

// scatter_pad and scatter_add_ (op names the one checked).
inline void check_scatter_pad(const char* op, const at::Tensor& values, const at::Tensor& index,
                              const at::Tensor& residual, double scale) {
  check_dim(op, values, "values", 2, "(N, D)");
  check_floating(op, values, "values");
  TORCH_CHECK(residual.dim() >= 1, op,
              ": residual must have shape (..., D), got a 0-dim tensor");
  check_floating(op, residual, "residual");
  TORCH_CHECK(residual.size(-1) == values.size(1), op, ": values has D=", values.size(1),
              " but residual has D=", residual.size(-1));
  TORCH_CHECK(values.scalar_type() == residual.scalar_type(), op, ": values is ",
              values.scalar_type(), " but residual is ", residual.scalar_type(),
              "; they must share a dtype");
  check_row_index(op, index, residual, "residual");
  TORCH_CHECK(index.size(0) == values.size(0), op, ": index has ", index.size(0),
              " entries but values has N=", values.size(0), " rows");
  check_same_device(op, residual, "residual", values, "values");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// Returns size as int64 (the output shape (..., D)).
inline std::vector<int64_t> check_scatter_rows(const at::Tensor& values, const at::Tensor& index,
                                               c10::SymIntArrayRef size) {
  const char* op = "scatter_rows";
  check_dim(op, values, "values", 2, "(N, D)");
  check_floating(op, values, "values");
  std::vector<int64_t> shape;
  for (const c10::SymInt& s : size) {
    shape.push_back(s.expect_int());
    TORCH_CHECK(shape.back() >= 0, op, ": size must not be negative, got ", size);
  }
  TORCH_CHECK(!shape.empty() && shape.back() == values.size(1), op,
              ": size must be (..., D) with D=", values.size(1), " as values, got ", size);
  check_row_index(op, index, values, "values");
  TORCH_CHECK(index.size(0) == values.size(0), op, ": index has ", index.size(0),
              " entries but values has N=", values.size(0), " rows");
  return shape;
}

inline void check_gate_plan(const at::Tensor& logits, const at::Tensor& lengths,
                            double threshold) {
  const char* op = "gate_plan";
  check_dim(op, logits, "logits", 4, "(B, T, M, 2)");
  check_floating(op, logits, "logits");
  TORCH_CHECK(logits.size(3) == 2, op, ": logits must have shape (B, T, M, 2), got ",
              logits.sizes());
  check_lengths(op, lengths, logits, "logits");
  check_threshold(op, threshold);
}

inline void check_group_rows(const at::Tensor& masks) {
  const char* op = "group_rows";
  check_dim(op, masks, "masks", 2, "(R, M)");
  TORCH_CHECK(masks.scalar_type() == at::kBool, op, ": masks must be bool, got ",
              masks.scalar_type());
}

inline void check_varlen_attention(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& cu_seqlens,
                                   int64_t max_seqlen, double scale) {
  const char* op = "varlen_attention";
  check_dim(op, q, "q", 3, "(N, H, Dh)");
  check_floating(op, q, "q");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op,
              ": q, k and v must share the shape (N, H, Dh); got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype; got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  check_dim(op, cu_seqlens, "cu_seqlens", 1, "(B+1,)");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.size(0) >= 1, op, ": cu_seqlens must hold B+1 >= 1 offsets");
  check_same_device(op, q, "q", k, "k");
  check_same_device(op, q, "q", v, "v");
  check_same_device(op, q, "q", cu_seqlens, "cu_seqlens");
  TORCH_CHECK(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be positive, got ", scale);
}

// The backward's checks beyond those of the forward (q, k, v, cu_seqlens): grad_out and out
// like q, lse (H, N) in q's op-math type (float32; float64 for float64), all on q's device.
inline void check_varlen_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                            const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "varlen_attention_backward";
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got grad_out ",
              grad_out.sizes(), " and out ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              op, ": grad_out and out must have q's dtype ", q.scalar_type(), ", got grad_out ",
              grad_out.scalar_type(), " and out ", out.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), op,
              ": lse must have shape (H, N) = (", q.size(1), ", ", q.size(0), "), got ",
              lse.sizes());
  const auto lse_dtype = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_dtype, op, ": lse must be ", lse_dtype,
              " for q of dtype ", q.scalar_type(), ", got ", lse.scalar_type());
  check_same_device(op, q, "q", grad_out, "grad_out");
  check_same_device(op, q, "q", out, "out");
  check_same_device(op, q, "q", lse, "lse");
}

}  // namespace localgp
