// CPU kernels of the compaction ops: threshold -> prefix sum -> gather in one pass over the
// frames, the inverse scatter with the residual add, and the row gather used by backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "checks.h"

namespace localgp {
namespace {

using at::Tensor;
using CompactResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Shared by both gate variants: margin_at(b, t) returns logit[1] - logit[0] as float.
// nan_message is the CUDA kernels' wording for a NaN margin.
template <typename MarginAt>
CompactResult compact_frames(const char* op, const char* nan_message, const Tensor& x_in,
                             const Tensor& lengths_in, double threshold, MarginAt margin_at) {
  const Tensor x = x_in.contiguous();
  const Tensor lengths = lengths_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= T, op, ": lengths must lie in [0, T=", T,
                "], got lengths[", b, "]=", len[b]);
  }
  const float margin = keep_margin(threshold);

  Tensor keep = at::empty({B, T}, x.options().dtype(at::kBool));
  bool* keep_ptr = keep.mutable_data_ptr<bool>();
  std::vector<int64_t> counts(B, 0);
  std::vector<int64_t> first_nan(B, -1);  // t of the first NaN margin of each sequence
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) {
        bool kept = false;
        if (t < len[b]) {
          const float m = margin_at(b, t);
          if (std::isnan(m) && first_nan[b] < 0) first_nan[b] = t;
          kept = m > margin;
        }
        keep_ptr[b * T + t] = kept;
        count += kept;
      }
      counts[b] = count;
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(first_nan[b] < 0, op, ": ", nan_message, " (first at b=", b, ", t=",
                first_nan[b], ")");
  }

  Tensor cu_seqlens = at::empty({B + 1}, x.options().dtype(at::kInt));
  int32_t* cu = cu_seqlens.mutable_data_ptr<int32_t>();
  int64_t total = 0, longest = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += counts[b];
    longest = std::max(longest, counts[b]);
    cu[b + 1] = static_cast<int32_t>(total);
  }
  TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(), op,
              ": more than 2^31-1 kept frames do not fit int32 cu_seqlens");

  Tensor packed = at::empty({total, D}, x.options());
  Tensor index = at::empty({total}, x.options().dtype(at::kLong));
  int64_t* index_ptr = index.mutable_data_ptr<int64_t>();
  const size_t row_bytes = D * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(packed.mutable_data_ptr());
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t row = cu[b];
      for (int64_t t = 0; t < len[b]; ++t) {
        if (!keep_ptr[b * T + t]) continue;
        index_ptr[row] = b * T + t;
        std::memcpy(dst + row * row_bytes, src + (b * T + t) * row_bytes, row_bytes);
        ++row;
      }
    }
  });
  Tensor max_seqlen = at::empty({}, x.options().dtype(at::kInt));
  max_seqlen.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(longest);
  return {packed, index, cu_seqlens, max_seqlen, keep};
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
    result = compact_frames("gate_compact", "logits contain NaN at valid frames", x, lengths,
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
    result = compact_frames("gate_compact_linear", "the gate logits contain NaN at valid frames",
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

Tensor gather_rows_cpu(const Tensor& src_in, const Tensor& index_in) {
  check_gather_rows(src_in, index_in);
  const Tensor src = src_in.contiguous();
  const Tensor index = index_in.contiguous();
  const int64_t D = src.size(-1);
  const int64_t rows = D == 0 ? 0 : src.numel() / D;
  if (D != 0) check_index_range("gather_rows", index, rows);
  const int64_t N = index.size(0);
  Tensor out = at::empty({N, D}, src.options());
  const size_t row_bytes = D * src.element_size();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* o = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) std::memcpy(o + n * row_bytes, s + idx[n] * row_bytes, row_bytes);
  });
  return out;
}

Tensor scatter_pad_cpu(const Tensor& values_in, const Tensor& index_in, const Tensor& residual,
                       double scale) {
  check_scatter_pad(values_in, index_in, residual, scale);
  const Tensor values = values_in.contiguous();
  const Tensor index = index_in.contiguous();
  Tensor out = residual.contiguous().clone();
  const int64_t D = out.size(-1);
  const int64_t rows = D == 0 ? 0 : out.numel() / D;
  if (D != 0) check_index_range("scatter_pad", index, rows);
  const int64_t N = index.size(0);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "scatter_pad_cpu", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);  // float32; float64 for float64, as on CUDA
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* dst = o + idx[n] * D;
        const scalar_t* row = v + n * D;
        // Sum in the op-math type and round once, like a fused residual add.
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<scalar_t>(static_cast<acc_t>(dst[d]) + s * static_cast<acc_t>(row[d]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(localgp, CPU, m) {
  m.impl("gate_compact", &gate_compact_cpu);
  m.impl("gate_compact_linear", &gate_compact_linear_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_pad", &scatter_pad_cpu);
}

}  // namespace localgp
