// CPU kernel of group_rows: a stable sort of the hypotheses by their mask, so that rows
// sharing every module decision sit next to each other.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "checks.h"

namespace localgp {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> group_rows_cpu(const Tensor& masks_in) {
  check_group_rows(masks_in);
  const Tensor masks = masks_in.contiguous();
  const int64_t R = masks.size(0), M = masks.size(1);
  // bool is stored as one byte 0/1: memcmp orders rows lexicographically, false < true.
  const auto* bytes = reinterpret_cast<const unsigned char*>(masks.const_data_ptr<bool>());
  auto row_less = [&](int64_t a, int64_t b) { return std::memcmp(bytes + a * M, bytes + b * M, M) < 0; };

  std::vector<int64_t> order(R);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), row_less);

  const auto long_opts = masks.options().dtype(at::kLong);
  Tensor perm = at::empty({R}, long_opts);
  Tensor inverse = at::empty({R}, long_opts);
  std::vector<int64_t> starts;
  int64_t* p = perm.mutable_data_ptr<int64_t>();
  int64_t* inv = inverse.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) {
    p[i] = order[i];
    inv[order[i]] = i;
    if (i == 0 || row_less(order[i - 1], order[i])) starts.push_back(i);
  }
  starts.push_back(R);
  Tensor offsets = at::empty({static_cast<int64_t>(starts.size())}, long_opts);
  std::copy(starts.begin(), starts.end(), offsets.mutable_data_ptr<int64_t>());
  return {perm, offsets, inverse};
}

}  // namespace

TORCH_LIBRARY_IMPL(localgp, CPU, m) { m.impl("group_rows", &group_rows_cpu); }

}  // namespace localgp
