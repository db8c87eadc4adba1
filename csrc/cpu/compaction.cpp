// CPU kernels of the compaction ops: threshold -> prefix sum -> gather in one pass over the
// frames, the inverse scatter with the residual add, and the row gather used by backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"

namespace localgp {
namespace {

using at::Tensor;
using CompactResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using PlanResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Rows of a (..., D) tensor viewed as (M, D); counted from the sizes so that D = 0 works.
int64_t leading_rows(const Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// lengths as int64, each in [0, T].
Tensor checked_lengths(const char* op, const Tensor& lengths_in, int64_t T) {
  const Tensor lengths = lengths_in.to(at::kLong).contiguous();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths.numel(); ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= T, op, ": lengths must lie in [0, T=", T,
                "], got lengths[", b, "]=", len[b]);
  }
  return lengths;
}

// out[n] = rows of src (contiguous, viewed as (M, D)) at index[n], as raw bytes.
void copy_rows(const Tensor& src, const Tensor& index, Tensor& out) {
  const int64_t D = src.size(-1);
  const size_t row_bytes = D * src.element_size();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* o = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, index.numel(), 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) std::memcpy(o + n * row_bytes, s + idx[n] * row_bytes, row_bytes);
  });
}

// The keep rule of every gate op, one pass over S sequences of T frames: frame (s, t) is kept
// when t < len_of(s) and margin_at(s, t) = logit[1] - logit[0] (float32) > keep_margin(threshold).
// A NaN margin at a valid frame is an error (a NaN logit, or both logits the same infinity).
// Sequence s is sequence s % B of module s / B (gate_plan); S = B for the gate_compact ops.
struct Decisions {
  Tensor keep;                  // (S, T) bool
  std::vector<int64_t> counts;  // kept frames of each sequence
  Tensor cu_seqlens;            // (S+1,) int32
  int64_t total = 0, longest = 0;
};

template <typename LenOf, typename MarginAt>
Decisions decide_frames(const char* op, const char* nan_message, int64_t S, int64_t B, int64_t T,
                        const at::TensorOptions& options, double threshold, LenOf len_of,
                        MarginAt margin_at) {
  const float margin = keep_margin(threshold);
  Decisions d;
  d.keep = at::empty({S, T}, options.dtype(at::kBool));
  bool* keep_ptr = d.keep.mutable_data_ptr<bool>();
  d.counts.assign(S, 0);
  std::vector<int64_t> first_nan(S, -1);  // t of the first NaN margin of each sequence
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      int64_t count = 0;
      const int64_t len = len_of(s);
      for (int64_t t = 0; t < T; ++t) {
        bool kept = false;
        if (t < len) {
          const float m = margin_at(s, t);
          if (std::isnan(m) && first_nan[s] < 0) first_nan[s] = t;
          kept = m > margin;
        }
        keep_ptr[s * T + t] = kept;
        count += kept;
      }
      d.counts[s] = count;
    }
  });
  for (int64_t s = 0; s < S; ++s) {
    if (first_nan[s] < 0) continue;
    const std::string module = S == B ? "" : "module " + std::to_string(s / B) + ", ";
    TORCH_CHECK(false, op, ": ", nan_message, " (first at ", module, "b=", s % B, ", t=",
                first_nan[s], ")");
  }
  d.cu_seqlens = at::empty({S + 1}, options.dtype(at::kInt));
  int32_t* cu = d.cu_seqlens.mutable_data_ptr<int32_t>();
  cu[0] = 0;
  for (int64_t s = 0; s < S; ++s) {
    d.total += d.counts[s];
    d.longest = std::max(d.longest, d.counts[s]);
    TORCH_CHECK(d.total <= std::numeric_limits<int32_t>::max(), op,
                ": more than 2^31-1 kept frames do not fit int32 cu_seqlens");
    cu[s + 1] = static_cast<int32_t>(d.total);
  }
  return d;
}

// index[row] = s*T + t of each kept frame, sequence after sequence (minus frame_offset(s)).
template <typename FrameOffset>
Tensor kept_index(const Decisions& d, int64_t T, const at::TensorOptions& options,
                  FrameOffset frame_offset) {
  const int64_t S = static_cast<int64_t>(d.counts.size());
  Tensor index = at::empty({d.total}, options.dtype(at::kLong));
  int64_t* index_ptr = index.mutable_data_ptr<int64_t>();
  const bool* keep_ptr = d.keep.const_data_ptr<bool>();
  const int32_t* cu = d.cu_seqlens.const_data_ptr<int32_t>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      int64_t row = cu[s];
      for (int64_t t = 0; t < T; ++t) {
        if (keep_ptr[s * T + t]) index_ptr[row++] = s * T + t - frame_offset(s);
      }
    }
  });
  return index;
}

// Shared by both gate variants: margin_at(b, t) returns logit[1] - logit[0] as float.
template <typename MarginAt>
CompactResult compact_frames(const char* op, const char* nan_message, const Tensor& x_in,
                             const Tensor& lengths_in, double threshold, MarginAt margin_at) {
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const Tensor lengths = checked_lengths(op, lengths_in, T);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const Decisions d = decide_frames(op, nan_message, B, B, T, x.options(), threshold,
                                    [&](int64_t b) { return len[b]; }, margin_at);
  const Tensor index = kept_index(d, T, x.options(), [](int64_t) { return int64_t{0}; });
  Tensor packed = at::empty({d.total, D}, x.options());
  copy_rows(x, index, packed);
  Tensor max_seqlen = at::empty({}, x.options().dtype(at::kInt));
  max_seqlen.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(d.longest);
  return {packed, index, d.cu_seqlens, max_seqlen, d.keep};
}

CompactResult gate_compact_cpu(const Tensor& x, const Tensor& logits_in, const Tensor& lengths,
                               double threshold) {
  check_gate_compact(x, logits_in, lengths, threshold);
  const Tensor logits = logits_in.contiguous();
  CompactResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "gate_compact_cpu", [&] {
    const scalar_t* l = logits.const_data_ptr<scalar_t>();
    const int64_t T = logits.size(1);
    result = compact_frames("gate_compact", kNanLogits, x, lengths,
                            threshold, [&](int64_t b, int64_t t) {
      const scalar_t* frame = l + (b * T + t) * 2;
      return static_cast<float>(frame[1]) - static_cast<float>(frame[0]);
    });
  });
  return result;
}

CompactResult gate_compact_linear_cpu(const Tensor& x, const Tensor& hidden_in,
                                      const Tensor& weight, const Tensor& bias,
                                      const Tensor& lengths, double threshold) {
  check_gate_compact_linear(x, hidden_in, weight, bias, lengths, threshold);
  const Tensor hidden = hidden_in.contiguous();
  // Only the difference of the two classes matters: one dot product per frame.
  const Tensor w = weight.to(at::kFloat).contiguous();
  const Tensor bias_f = bias.to(at::kFloat).contiguous();
  const int64_t T = hidden.size(1), H = hidden.size(2);
  std::vector<float> w_diff(H);
  for (int64_t h = 0; h < H; ++h) w_diff[h] = w.const_data_ptr<float>()[H + h] - w.const_data_ptr<float>()[h];
  const float b_diff = bias_f.const_data_ptr<float>()[1] - bias_f.const_data_ptr<float>()[0];
  CompactResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "gate_compact_linear_cpu", [&] {
    const scalar_t* hid = hidden.const_data_ptr<scalar_t>();
    result = compact_frames("gate_compact_linear", kNanGateLogits,
                            x, lengths, threshold, [&](int64_t b, int64_t t) {
      const scalar_t* row = hid + (b * T + t) * H;
      float acc = b_diff;
      for (int64_t h = 0; h < H; ++h) acc += static_cast<float>(row[h]) * w_diff[h];
      return acc;
    });
  });
  return result;
}

void check_index_range(const char* op, const Tensor& index, int64_t rows) {
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < index.numel(); ++n) {
    TORCH_CHECK(idx[n] >= 0 && idx[n] < rows, op, ": index[", n, "]=", idx[n],
                " is outside [0, ", rows, ")");
  }
}

// position[r] = n where index[n] = r, -1 for rows not in index. Checks that every entry lies in
// [0, rows) and that none repeats: the scatters write each row at most once.
std::vector<int64_t> row_positions(const char* op, const Tensor& index, int64_t rows) {
  check_index_range(op, index, rows);
  std::vector<int64_t> position(rows, -1);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < index.numel(); ++n) {
    TORCH_CHECK(position[idx[n]] < 0, op, ": index entries must be distinct, but index[", n,
                "]=", idx[n], " repeats index[", position[idx[n]], "]");
    position[idx[n]] = n;
  }
  return position;
}

Tensor gather_rows_cpu(const Tensor& src_in, const Tensor& index_in) {
  check_gather_rows(src_in, index_in);
  const Tensor src = src_in.contiguous();
  const Tensor index = index_in.contiguous();
  const int64_t D = src.size(-1);
  check_index_range("gather_rows", index, leading_rows(src));
  Tensor out = at::empty({index.size(0), D}, src.options());
  copy_rows(src, index, out);
  return out;
}

// Writes every row of out (M, D) exactly once: row r is combine(r, n) with n its position in
// index (-1: not in index). The one pass of the out-of-place scatters.
template <typename scalar_t, typename Row>
void write_rows(scalar_t* out, int64_t rows, int64_t D, const std::vector<int64_t>& position,
                Row row) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(out + r * D, r, position[r]);
  });
}

// The scatters sum in the op-math type (float32; float64 for float64, as on CUDA) and round once,
// like a fused residual add.
Tensor scatter_pad_cpu(const Tensor& values_in, const Tensor& index_in, const Tensor& residual_in,
                       double scale) {
  check_scatter_pad("scatter_pad", values_in, index_in, residual_in, scale);
  const Tensor values = values_in.contiguous();
  const Tensor index = index_in.contiguous();
  const Tensor residual = residual_in.contiguous();
  Tensor out = at::empty_like(residual);
  const int64_t D = out.size(-1);
  const int64_t rows = leading_rows(out);
  const std::vector<int64_t> position = row_positions("scatter_pad", index, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "scatter_pad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* res = residual.const_data_ptr<scalar_t>();
    write_rows(out.mutable_data_ptr<scalar_t>(), rows, D, position,
               [&](scalar_t* dst, int64_t r, int64_t n) {
      const scalar_t* base = res + r * D;
      if (n < 0) {
        std::memcpy(dst, base, D * sizeof(scalar_t));
        return;
      }
      const scalar_t* row = v + n * D;
      for (int64_t d = 0; d < D; ++d) {
        dst[d] = static_cast<scalar_t>(static_cast<acc_t>(base[d]) + s * static_cast<acc_t>(row[d]));
      }
    });
  });
  return out;
}

Tensor scatter_rows_cpu(const Tensor& values_in, const Tensor& index_in, c10::SymIntArrayRef size) {
  const std::vector<int64_t> shape = check_scatter_rows(values_in, index_in, size);
  const Tensor values = values_in.contiguous();
  const Tensor index = index_in.contiguous();
  Tensor out = at::empty(shape, values.options());
  const int64_t D = values.size(1);
  const int64_t rows = leading_rows(out);
  const std::vector<int64_t> position = row_positions("scatter_rows", index, rows);
  const size_t row_bytes = D * values.element_size();
  const char* v = static_cast<const char*>(values.const_data_ptr());
  write_rows(static_cast<char*>(out.mutable_data_ptr()), rows, row_bytes, position,
             [&](char* dst, int64_t, int64_t n) {
    if (n < 0) {
      std::memset(dst, 0, row_bytes);
    } else {
      std::memcpy(dst, v + n * row_bytes, row_bytes);
    }
  });
  return out;
}

void scatter_add__cpu(const Tensor& residual, const Tensor& values_in, const Tensor& index_in,
                      double scale) {
  check_scatter_pad("scatter_add_", values_in, index_in, residual, scale);
  TORCH_CHECK(residual.is_contiguous(), "scatter_add_: residual must be contiguous (it is updated in place)");
  const Tensor values = values_in.contiguous();
  const Tensor index = index_in.contiguous();
  const int64_t D = residual.size(-1);
  const int64_t rows = leading_rows(residual);
  row_positions("scatter_add_", index, rows);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(),
                                  "scatter_add__cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    scalar_t* o = residual.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, index.numel(), 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* dst = o + idx[n] * D;
        const scalar_t* row = v + n * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>(static_cast<acc_t>(dst[d]) + s * static_cast<acc_t>(row[d]));
        }
      }
    });
  });
}

// All of a layer's decisions at once: logits (B, T, M, 2) -> module-major outputs. The module
// offsets are a CPU tensor, so the caller splits index without reading the device again.
PlanResult gate_plan_cpu(const Tensor& logits_in, const Tensor& lengths_in, double threshold) {
  check_gate_plan(logits_in, lengths_in, threshold);
  const Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), T = logits.size(1), M = logits.size(2);
  const Tensor lengths = checked_lengths("gate_plan", lengths_in, T);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  Decisions d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gate_plan_cpu", [&] {
    const scalar_t* l = logits.const_data_ptr<scalar_t>();
    // Sequence s = m * B + b: module m of sequence b.
    d = decide_frames("gate_plan", kNanLogits, M * B, B, T, logits.options(),
                      threshold, [&](int64_t s) { return len[s % B]; }, [&](int64_t s, int64_t t) {
      const scalar_t* frame = l + (((s % B) * T + t) * M + s / B) * 2;
      return static_cast<float>(frame[1]) - static_cast<float>(frame[0]);
    });
  });
  const Tensor index = kept_index(d, T, logits.options(), [&](int64_t s) { return (s / B) * B * T; });
  Tensor offsets = at::empty({M + 1}, at::TensorOptions().dtype(at::kLong));
  Tensor cu_seqlens = at::empty({M, B + 1}, logits.options().dtype(at::kInt));
  Tensor max_seqlen = at::zeros({M}, logits.options().dtype(at::kInt));
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  int32_t* cu_m = cu_seqlens.mutable_data_ptr<int32_t>();
  int32_t* longest = max_seqlen.mutable_data_ptr<int32_t>();
  const int32_t* cu = d.cu_seqlens.const_data_ptr<int32_t>();
  for (int64_t m = 0; m <= M; ++m) off[m] = cu[m * B];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b <= B; ++b) cu_m[m * (B + 1) + b] = cu[m * B + b] - cu[m * B];
    for (int64_t b = 0; b < B; ++b) longest[m] = std::max<int32_t>(longest[m], d.counts[m * B + b]);
  }
  return {index, cu_seqlens, max_seqlen, d.keep.view({M, B, T}), offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(localgp, CPU, m) {
  m.impl("gate_compact", &gate_compact_cpu);
  m.impl("gate_compact_linear", &gate_compact_linear_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_pad", &scatter_pad_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("scatter_add_", &scatter_add__cpu);
  m.impl("gate_plan", &gate_plan_cpu);
}

}  // namespace localgp
