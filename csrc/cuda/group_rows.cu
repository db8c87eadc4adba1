// CUDA kernel of group_rows: a stable grouping of the rows of a bool mask (R, M) by identical
// masks, groups ordered by mask (lexicographic, false < true, column 0 first).
//
// R is small (beam-search hypotheses: up to a few thousand), so instead of a sort each row
// finds its rank by comparing itself with every other row, O(R^2) comparisons of packed
// 64-column words (a comparison usually stops at the first word):
//   1. pack_rows_kernel: one warp per 64-column word; column 64w+j becomes bit 63-j, so that
//      comparing words as unsigned integers orders rows lexicographically.
//   2. rank_rows_kernel: one block per row r: rank = #rows ordered before r (smaller mask, or
//      equal mask and smaller index: stability). Writes perm[rank] = r, inverse[r] = rank,
//      and whether r starts its group (no equal row before it).
//   3. group_offsets_kernel, one block: scans the group-start flags in sorted order into
//      offsets and the group count G.
//   -- G is copied to the host (the op's one sync: it sizes offsets) --
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <tuple>

#include "checks.h"

namespace localgp {
namespace {

using at::Tensor;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kPackThreads = 256;
constexpr int kRankThreads = 256;
constexpr int kOffsetThreads = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__global__ void __launch_bounds__(kPackThreads)
    pack_rows_kernel(const bool* __restrict__ masks, int64_t M, int64_t n_words_per_row,
                     int64_t n_words, uint64_t* __restrict__ words) {
  const int64_t word = (static_cast<int64_t>(blockIdx.x) * kPackThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (word >= n_words) return;  // whole warps leave together
  const int64_t r = word / n_words_per_row;
  const int64_t c0 = (word - r * n_words_per_row) * 64 + lane;
  const bool* row = masks + r * M;
  // Coalesced: a warp reads 2 x 32 consecutive bools. Ballot bit j = column c0-lane+j; the
  // bit reversal moves it to bit 31-j, i.e. the first column ends up most significant.
  const bool first = c0 < M && row[c0];
  const bool second = c0 + 32 < M && row[c0 + 32];
  const unsigned high = __brev(__ballot_sync(kFullMask, first));
  const unsigned low = __brev(__ballot_sync(kFullMask, second));
  if (lane == 0) words[word] = (static_cast<uint64_t>(high) << 32) | low;
}

// -1, 0, 1 as row a orders before, equal to, after row b.
__device__ int compare_rows(const uint64_t* a, const uint64_t* b, int64_t n_words_per_row) {
  for (int64_t w = 0; w < n_words_per_row; ++w) {
    const uint64_t x = a[w], y = b[w];
    if (x != y) return x < y ? -1 : 1;
  }
  return 0;
}

__global__ void __launch_bounds__(kRankThreads)
    rank_rows_kernel(const uint64_t* __restrict__ words, int64_t R, int64_t n_words_per_row,
                     int64_t* __restrict__ perm, int64_t* __restrict__ inverse,
                     uint8_t* __restrict__ is_group_start) {
  __shared__ int64_t warp_before[kRankThreads / 32];
  __shared__ int64_t warp_equal_before[kRankThreads / 32];
  const int64_t r = blockIdx.x;
  const uint64_t* mine = words + r * n_words_per_row;  // the same address across the block
  int64_t before = 0;        // rows ordered before r
  int64_t equal_before = 0;  // rows with r's mask and a smaller index
  for (int64_t o = threadIdx.x; o < R; o += kRankThreads) {
    const int c = compare_rows(words + o * n_words_per_row, mine, n_words_per_row);
    const bool tie_before = c == 0 && o < r;
    before += (c < 0 || tie_before) ? 1 : 0;
    equal_before += tie_before ? 1 : 0;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    before += __shfl_down_sync(kFullMask, before, offset);
    equal_before += __shfl_down_sync(kFullMask, equal_before, offset);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_before[warp] = before;
    warp_equal_before[warp] = equal_before;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t rank = 0, ties = 0;
    for (int w = 0; w < kRankThreads / 32; ++w) {
      rank += warp_before[w];
      ties += warp_equal_before[w];
    }
    perm[rank] = r;
    inverse[r] = rank;
    // A stable order puts the first row (by index) of each group first: it starts the group.
    is_group_start[rank] = ties == 0 ? 1 : 0;
  }
}

// One block. offsets[g] = sorted position where group g starts, offsets[G] = R, *n_groups = G.
__global__ void __launch_bounds__(kOffsetThreads)
    group_offsets_kernel(const uint8_t* __restrict__ is_group_start, int64_t R,
                         int64_t* __restrict__ offsets, int64_t* __restrict__ n_groups) {
  __shared__ int warp_starts[kOffsetThreads / 32];
  __shared__ int64_t carry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < R; base += kOffsetThreads) {
    const int64_t i = base + threadIdx.x;
    const bool start = i < R && is_group_start[i] != 0;
    const unsigned bits = __ballot_sync(kFullMask, start);
    if (lane == 0) warp_starts[warp] = __popc(bits);
    __syncthreads();
    int64_t g = carry + __popc(bits & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) g += warp_starts[w];
    if (start) offsets[g] = i;
    __syncthreads();  // everyone has read carry and warp_starts
    if (threadIdx.x == 0) {
      for (int w = 0; w < kOffsetThreads / 32; ++w) carry += warp_starts[w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    offsets[carry] = R;
    *n_groups = carry;
  }
}

std::tuple<Tensor, Tensor, Tensor> group_rows_cuda(const Tensor& masks_in) {
  check_group_rows(masks_in);
  const c10::cuda::CUDAGuard guard(masks_in.device());
  const int64_t R = masks_in.size(0), M = masks_in.size(1);
  const auto longs = masks_in.options().dtype(at::kLong);
  if (R == 0) return {at::empty({0}, longs), at::zeros({1}, longs), at::empty({0}, longs)};
  TORCH_CHECK(R <= INT_MAX, "group_rows: R=", R, " rows are more than supported (2^31-1)");
  const Tensor masks = masks_in.contiguous();
  const int64_t n_words_per_row = ceil_div(M, 64);
  const int64_t n_words = R * n_words_per_row;

  Tensor perm = at::empty({R}, longs);
  Tensor inverse = at::empty({R}, longs);
  // offsets gets R+1 entries at most (G <= R), plus G itself at [R+1] for the host copy.
  Tensor offsets_buffer = at::empty({R + 2}, longs);
  Tensor words = at::empty({n_words}, longs);
  Tensor is_group_start = at::empty({R}, masks.options().dtype(at::kByte));
  uint64_t* words_ptr = reinterpret_cast<uint64_t*>(words.data_ptr<int64_t>());
  int64_t* n_groups = offsets_buffer.data_ptr<int64_t>() + R + 1;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n_words > 0) {
    const int64_t blocks = ceil_div(n_words * 32, kPackThreads);
    TORCH_CHECK(blocks <= INT_MAX, "group_rows: masks of shape (", R, ", ", M,
                ") are more than supported");
    pack_rows_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0, stream>>>(
        masks.const_data_ptr<bool>(), M, n_words_per_row, n_words, words_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  rank_rows_kernel<<<static_cast<unsigned>(R), kRankThreads, 0, stream>>>(
      words_ptr, R, n_words_per_row, perm.data_ptr<int64_t>(), inverse.data_ptr<int64_t>(),
      is_group_start.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_offsets_kernel<<<1, kOffsetThreads, 0, stream>>>(
      is_group_start.const_data_ptr<uint8_t>(), R, offsets_buffer.data_ptr<int64_t>(), n_groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  int64_t G = 0;
  c10::cuda::memcpy_and_sync(&G, n_groups, sizeof(G), cudaMemcpyDeviceToHost, stream);
  // A prefix of the buffer: contiguous, (G+1,).
  return {perm, offsets_buffer.narrow(0, 0, G + 1), inverse};
}

}  // namespace

TORCH_LIBRARY_IMPL(localgp, CUDA, m) { m.impl("group_rows", &group_rows_cuda); }

}  // namespace localgp
