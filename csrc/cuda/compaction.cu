// CUDA kernels of the compaction ops: gate_compact, gate_compact_linear, gate_plan,
// gather_rows and the scatters (scatter_pad, scatter_add_, scatter_rows).
//
// gate_plan is gate_compact over M*B sequences (module m of sequence b is sequence m*B+b) and
// no row data: its one host read returns every module's kept count at once.
//
// gate_compact(_linear) runs three kernels and makes exactly one device->host transfer:
//   1. gate_keep_kernel, one block per tile of frames of one sequence: margin, threshold,
//      keep mask, and a block-wide scan that lists the tile's kept frames in order.
//      Frames past lengths[b] are never read (for the linear gate: no dot product either).
//   2. gate_finalize_kernel, one block: scans the per-tile counts into each tile's offset in
//      the packed output, writes cu_seqlens / max_seqlen, checks lengths, and gathers
//      everything the host must know (N, max, error flags) into a small status buffer.
//   -- the status buffer is copied to the host (the one sync: N sizes the packed output) --
//   3. copy_rows_kernel over the N packed rows: finds each row's tile by binary search over
//      the tile offsets, writes index, and copies the row of x with 16-byte accesses where
//      the row size and alignment allow.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "cuda/offsets.cuh"

namespace localgp {
namespace {

using at::Tensor;

constexpr int kThreads = 256;  // block size of the keep, copy and scatter kernels
constexpr int kThreadsLog2 = 8;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of a (..., D) tensor viewed as (M, D); counted from the sizes so that D = 0 works.
int64_t leading_rows(const Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// N elements moved by one load / store instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// Widest vector (elements, power of two, at most 16 bytes) that divides the row length and
// keeps every row of every pointer aligned.
template <typename scalar_t>
int vec_width(int64_t row_len, std::initializer_list<const void*> ptrs) {
  int vec = sizeof(scalar_t) >= 16 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
  auto fits = [&](int v) {
    if (row_len % v != 0) return false;
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % (v * sizeof(scalar_t)) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

// Calls f(std::integral_constant<int, vec>{}) for vec in {1, 2, 4, 8}, instantiating only the
// widths that fit 16 bytes of scalar_t.
template <typename scalar_t, typename F>
void with_vec_width(int vec, F&& f) {
  constexpr int kMax = sizeof(scalar_t) >= 16 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
  if constexpr (kMax >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 2) {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
  }
  return f(std::integral_constant<int, 1>{});
}

// Each row gets a power-of-two group of threads, at most the whole block, so that short rows
// do not leave most of a warp idle and long rows are split across many threads.
struct RowGrid {
  unsigned blocks;
  int group_log2;
};

RowGrid row_grid(const char* op, int64_t n_rows, int64_t units_per_row) {
  int group_log2 = 0;
  while ((int64_t{1} << group_log2) < units_per_row && group_log2 < kThreadsLog2) ++group_log2;
  const int64_t blocks = ceil_div(n_rows, kThreads >> group_log2);
  TORCH_CHECK(blocks <= INT_MAX, op, ": ", n_rows, " rows are more than one launch can cover");
  return {static_cast<unsigned>(blocks), group_log2};
}

// ------------------------------------------------------------------------------------------
// Row copies (gather_rows and the last step of gate_compact). Rows are copied as raw bytes in
// the widest unit that the row size and both base pointers allow, so one kernel serves every
// dtype. row_map(row, leader) gives the source row of output row `row`; leader is true for
// one thread of the row's group (the one that may write side outputs such as index).

template <typename Unit, typename RowMap>
__global__ void __launch_bounds__(kThreads)
    copy_rows_kernel(const Unit* __restrict__ src, Unit* __restrict__ dst, int64_t n_rows,
                     int64_t row_units, int group_log2, RowMap row_map) {
  const int group = 1 << group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads >> group_log2) +
                      (threadIdx.x >> group_log2);
  if (row >= n_rows) return;
  const int64_t src_row = row_map(row, lane == 0);
  const Unit* s = src + src_row * row_units;
  Unit* d = dst + row * row_units;
  int64_t u = lane;
  // Four independent loads in flight per thread before their stores.
  for (; u + 3 * group < row_units; u += 4 * group) {
    const Unit a = s[u], b = s[u + group], c = s[u + 2 * group], e = s[u + 3 * group];
    d[u] = a;
    d[u + group] = b;
    d[u + 2 * group] = c;
    d[u + 3 * group] = e;
  }
  for (; u < row_units; u += group) d[u] = s[u];
}

template <typename RowMap>
void launch_copy_rows(const char* op, const void* src, void* dst, int64_t n_rows,
                      int64_t row_bytes, const RowMap& row_map, cudaStream_t stream) {
  int unit = 16;
  while (unit > 1 && (row_bytes % unit != 0 || reinterpret_cast<uintptr_t>(src) % unit != 0 ||
                      reinterpret_cast<uintptr_t>(dst) % unit != 0)) {
    unit /= 2;
  }
  const int64_t row_units = row_bytes / unit;
  const RowGrid grid = row_grid(op, n_rows, row_units);
  auto launch = [&](auto unit_tag) {
    using Unit = decltype(unit_tag);
    copy_rows_kernel<Unit><<<grid.blocks, kThreads, 0, stream>>>(
        static_cast<const Unit*>(src), static_cast<Unit*>(dst), n_rows, row_units,
        grid.group_log2, row_map);
  };
  switch (unit) {
    case 16: launch(uint4{}); break;
    case 8: launch(uint2{}); break;
    case 4: launch(uint32_t{}); break;
    case 2: launch(uint16_t{}); break;
    default: launch(uint8_t{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gather_rows: the source row is index[row], bounds-checked on the device like index_select.
struct IndexRowMap {
  const int64_t* index;
  int64_t n_src_rows;
  __device__ int64_t operator()(int64_t row, bool /*leader*/) const {
    const int64_t r = index[row];
    CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < n_src_rows, "gather_rows: index out of range [0, M)");
    return r;
  }
};

// ------------------------------------------------------------------------------------------
// gate_compact / gate_compact_linear

// tile_info[tile] = kept count | (first NaN slot + 1) << kNanShift (0 there: no NaN).
constexpr int kNanShift = 16;
constexpr uint32_t kCountMask = (1u << kNanShift) - 1;
constexpr int kLogitsTile = 256;  // frames per block: one per thread
constexpr int kLinearTile = 64;   // fewer frames per block (a dot product each): more blocks
// Weight difference w1 - w0 is staged in shared memory up to this H (32 KiB), read from
// global memory (through L1) beyond.
constexpr int64_t kMaxSmemWeights = 8192;

// lengths is int32 or int64 (others are converted on the host); the branch is uniform.
struct Lengths {
  const void* data;
  bool is_int64;
  __device__ int64_t operator()(int64_t b) const {
    return is_int64 ? static_cast<const int64_t*>(data)[b]
                    : static_cast<int64_t>(static_cast<const int32_t*>(data)[b]);
  }
};

// margin = logits[..., 1] - logits[..., 0] in float32.
template <typename scalar_t>
struct LogitsMargin {
  const scalar_t* logits;  // (B*T, 2)

  // Fills out[0, n) with the margins of frames frame0 .. frame0+n-1. Called by the whole block.
  __device__ void compute(int64_t frame0, int n, float* out) const {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const scalar_t* l = logits + 2 * (frame0 + i);
      out[i] = static_cast<float>(l[1]) - static_cast<float>(l[0]);
    }
    __syncthreads();
  }
};

// margin = hidden . (w1 - w0) + (b1 - b0), accumulated in float32; the two-class logits never
// exist. A group of 2^group_log2 lanes reads one frame's hidden row with kVec-wide loads and
// reduces with shuffles; small H uses small groups so a warp works on several frames.
template <typename scalar_t, int kVec, bool kWeightsInSmem>
struct LinearMargin {
  const scalar_t* hidden;  // (B*T, H)
  const float* weight;     // (2, H) float32
  const float* bias;       // (2,) float32
  int64_t H;
  int group_log2;

  __device__ void compute(int64_t frame0, int n, float* out) const {
    extern __shared__ float w_diff_smem[];  // H floats when kWeightsInSmem
    const float* w0 = weight;
    const float* w1 = weight + H;
    if constexpr (kWeightsInSmem) {
      for (int64_t h = threadIdx.x; h < H; h += kThreads) w_diff_smem[h] = w1[h] - w0[h];
      __syncthreads();
    }
    auto w_diff = [&](int64_t h) -> float {
      if constexpr (kWeightsInSmem) {
        return w_diff_smem[h];
      } else {
        return __ldg(w1 + h) - __ldg(w0 + h);
      }
    };
    const float bias_diff = bias[1] - bias[0];
    const int group = 1 << group_log2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane >> group_log2, group_lane = lane & (group - 1);
    const int frames_per_warp = 32 >> group_log2;
    const int64_t n_vec = H / kVec;
    using V = Vec<scalar_t, kVec>;
    // The loop bound depends on the warp only, so every lane reaches the shuffles.
    for (int base = warp * frames_per_warp; base < n; base += kWarps * frames_per_warp) {
      const int f = base + sub;
      float acc = 0.f;
      if (f < n) {
        const V* row = reinterpret_cast<const V*>(hidden + (frame0 + f) * H);
#pragma unroll 4  // several row loads in flight before their FMAs
        for (int64_t v = group_lane; v < n_vec; v += group) {
          const V x = row[v];
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc += static_cast<float>(x.val[j]) * w_diff(v * kVec + j);
        }
      }
      for (int offset = group >> 1; offset > 0; offset >>= 1) {
        acc += __shfl_xor_sync(kFullMask, acc, offset);
      }
      if (f < n && group_lane == 0) out[f] = acc + bias_diff;
    }
    __syncthreads();
  }
};

// Block `tile` handles frames t0 .. t0+kTile-1 of sequence b = tile / n_tiles (flattened so
// that B is not limited by gridDim.y). Writes keep for those frames, the tile's kept frames
// (their t, in order) to tile_frames[b*T + t0 + slot], and tile_info[tile].
template <int kTile, typename Margin>
__global__ void __launch_bounds__(kThreads)
    gate_keep_kernel(Margin margin, Lengths lengths, int64_t T, int64_t n_tiles, float threshold,
                     bool* __restrict__ keep, int32_t* __restrict__ tile_frames,
                     uint32_t* __restrict__ tile_info) {
  static_assert(kTile <= kThreads && kTile % 32 == 0 && kTile < (1 << kNanShift), "bad tile");
  __shared__ float margins[kTile];
  __shared__ int warp_kept[kWarps];
  __shared__ int warp_first_nan[kWarps];

  const int64_t tile = blockIdx.x;
  const int64_t b = tile / n_tiles;
  const int64_t t0 = (tile - b * n_tiles) * kTile;
  // Out-of-range lengths are reported by gate_finalize_kernel; clamping keeps reads in bounds.
  const int64_t len = ::min(::max(lengths(b), int64_t{0}), T);
  const int n_valid = static_cast<int>(::min(::max(len - t0, int64_t{0}), int64_t{kTile}));
  const int n_frames = static_cast<int>(::min(T - t0, int64_t{kTile}));
  // Padding frames are skipped entirely (block-uniform branch: compute() syncs the block).
  if (n_valid > 0) margin.compute(b * T + t0, n_valid, margins);

  const int i = threadIdx.x, lane = i & 31, warp = i >> 5;
  const bool valid = i < n_valid;
  const float m = valid ? margins[i] : 0.f;
  const bool is_nan = valid && isnan(m);
  const bool kept = valid && m > threshold;
  if (i < n_frames) keep[b * T + t0 + i] = kept;

  // Block-wide exclusive scan of the kept flags: ballot within the warp, warp totals across.
  const unsigned kept_bits = __ballot_sync(kFullMask, kept);
  const unsigned nan_bits = __ballot_sync(kFullMask, is_nan);
  if (lane == 0) {
    warp_kept[warp] = __popc(kept_bits);
    warp_first_nan[warp] = nan_bits != 0 ? warp * 32 + __ffs(nan_bits) - 1 : kTile;
  }
  __syncthreads();
  if (kept) {
    int slot = __popc(kept_bits & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) slot += warp_kept[w];
    tile_frames[b * T + t0 + slot] = static_cast<int32_t>(t0 + i);
  }
  if (i == 0) {
    int total = 0, first_nan = kTile;
    for (int w = 0; w < kWarps; ++w) {
      total += warp_kept[w];
      first_nan = ::min(first_nan, warp_first_nan[w]);
    }
    tile_info[tile] = static_cast<uint32_t>(total) |
                      (first_nan < kTile ? static_cast<uint32_t>(first_nan + 1) << kNanShift : 0u);
  }
}

// The status buffer copied to the host, int64 entries.
enum StatusEntry : int {
  kKeptTotal = 0,    // N
  kMaxKept,          // the largest kept count of one sequence
  kBadLengthIndex,   // smallest b with lengths[b] outside [0, T], or -1
  kBadLengthValue,   // lengths[b] for that b
  kNanFrame,         // b*T+t of the first valid frame with a NaN margin, or -1
  kOverflow,         // 1 when N does not fit the int32 cu_seqlens
  kStatusSize        // then groups+1 entries: packed offset of each group's first sequence
};

constexpr int kFinalizeThreads = 1024;
constexpr int kFinalizeItems = 4;  // consecutive tiles per thread in each scan step

// Exclusive prefix sum of one value per thread over the block (blockDim.x a multiple of 32);
// *total gets the block's sum. Every thread of the block must call it.
__device__ int64_t block_exclusive_sum(int64_t value, int64_t* total) {
  __shared__ int64_t warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  int64_t inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int64_t other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < n_warps ? warp_sums[lane] : 0;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int64_t other = __shfl_up_sync(kFullMask, s, offset);
      if (lane >= offset) s += other;
    }
    if (lane < n_warps) warp_sums[lane] = s;  // each lane rewrites only its own entry
  }
  __syncthreads();
  const int64_t result = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - value;
  *total = warp_sums[n_warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return result;
}

// One block. tile_offset[e] = packed position of tile e's first kept frame (exclusive scan of
// the tile counts, tiles ordered b then t); tile_offset[E] = N.
__global__ void __launch_bounds__(kFinalizeThreads)
    gate_finalize_kernel(const uint32_t* __restrict__ tile_info, Lengths lengths, int64_t B,
                         int64_t T, int64_t n_tiles, int tile_size, int64_t groups,
                         int64_t* __restrict__ tile_offset, int32_t* __restrict__ cu_seqlens,
                         int32_t* __restrict__ max_seqlen, int64_t* __restrict__ status) {
  __shared__ unsigned long long bad_length_b;
  __shared__ unsigned long long first_nan_tile;
  __shared__ long long max_kept;
  __shared__ int64_t carry;
  const int tid = threadIdx.x;
  if (tid == 0) {
    bad_length_b = ULLONG_MAX;
    first_nan_tile = ULLONG_MAX;
    max_kept = 0;
    carry = 0;
  }
  __syncthreads();

  for (int64_t b = tid; b < B; b += kFinalizeThreads) {
    const int64_t len = lengths(b);
    if (len < 0 || len > T) atomicMin(&bad_length_b, static_cast<unsigned long long>(b));
  }

  const int64_t n_entries = B * n_tiles;
  for (int64_t start = 0; start < n_entries; start += kFinalizeThreads * kFinalizeItems) {
    const int64_t first = start + static_cast<int64_t>(tid) * kFinalizeItems;
    int64_t counts[kFinalizeItems];
    int64_t sum = 0;
#pragma unroll
    for (int j = 0; j < kFinalizeItems; ++j) {
      const uint32_t info = first + j < n_entries ? tile_info[first + j] : 0u;
      counts[j] = info & kCountMask;
      sum += counts[j];
      if ((info >> kNanShift) != 0) {
        atomicMin(&first_nan_tile, static_cast<unsigned long long>(first + j));
      }
    }
    const int64_t base = carry;  // read before the scan's barriers, updated after them
    int64_t chunk_total;
    int64_t offset = base + block_exclusive_sum(sum, &chunk_total);
#pragma unroll
    for (int j = 0; j < kFinalizeItems; ++j) {
      if (first + j < n_entries) tile_offset[first + j] = offset;
      offset += counts[j];
    }
    if (tid == 0) carry = base + chunk_total;
    __syncthreads();
  }
  const int64_t total = carry;
  if (tid == 0) tile_offset[n_entries] = total;
  __syncthreads();  // makes this block's tile_offset writes visible to all its threads

  long long local_max = 0;
  for (int64_t b = tid; b < B; b += kFinalizeThreads) {
    const int64_t begin = tile_offset[b * n_tiles];
    const int64_t end = tile_offset[(b + 1) * n_tiles];
    cu_seqlens[b] = static_cast<int32_t>(begin);
    local_max = ::max(local_max, static_cast<long long>(end - begin));
  }
  atomicMax(&max_kept, local_max);
  const int64_t seqs_per_group = B / groups;
  for (int64_t g = tid; g <= groups; g += kFinalizeThreads) {
    status[kStatusSize + g] = tile_offset[g * seqs_per_group * n_tiles];
  }
  __syncthreads();

  if (tid == 0) {
    cu_seqlens[B] = static_cast<int32_t>(total);
    *max_seqlen = static_cast<int32_t>(max_kept);
    status[kKeptTotal] = total;
    status[kMaxKept] = max_kept;
    const bool bad = bad_length_b != ULLONG_MAX;
    status[kBadLengthIndex] = bad ? static_cast<int64_t>(bad_length_b) : -1;
    status[kBadLengthValue] = bad ? lengths(static_cast<int64_t>(bad_length_b)) : 0;
    if (first_nan_tile == ULLONG_MAX) {
      status[kNanFrame] = -1;
    } else {
      const int64_t e = static_cast<int64_t>(first_nan_tile);
      const int64_t slot = static_cast<int64_t>(tile_info[e] >> kNanShift) - 1;
      const int64_t b = e / n_tiles;
      status[kNanFrame] = b * T + (e - b * n_tiles) * tile_size + slot;
    }
    status[kOverflow] = total > INT_MAX ? 1 : 0;
  }
}

// Packed row -> frame of x: finds the tile by binary search over the tile offsets, and writes
// index[row] on the way.
struct TileRowMap {
  const int64_t* tile_offset;  // (E+1,), tile_offset[E] = N
  int64_t n_entries;           // E
  const int32_t* tile_frames;
  int64_t n_tiles;
  int tile_size;
  int64_t T;
  int64_t group_frames;  // frames of one group (B*T): index counts from its group's start
  int64_t* index;

  __device__ int64_t operator()(int64_t row, bool leader) const {
    const int64_t lo = segment_of(tile_offset, n_entries, row);  // the tile holding the row
    const int64_t b = lo / n_tiles;
    const int64_t tile_frame0 = b * T + (lo - b * n_tiles) * tile_size;
    const int64_t frame = b * T + tile_frames[tile_frame0 + (row - tile_offset[lo])];
    if (leader) index[row] = frame % group_frames;
    return frame;
  }
};

using CompactOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// What all gate ops share. x (B, T, D) is contiguous; its B sequences form `groups` equal
// groups (gate_plan: the modules; else 1), whose packed offsets group_starts (groups+1) gets
// from the one host read. launch_keep(lengths, keep, tile_frames, tile_info, n_tiles,
// n_entries, stream) launches gate_keep_kernel<kTile> with the op's margin.
template <int kTile, typename LaunchKeep>
CompactOutputs compact_frames(const char* op, const char* nan_message, const Tensor& x,
                              const Tensor& lengths_in, const LaunchKeep& launch_keep,
                              int64_t groups = 1, std::vector<int64_t>* group_starts = nullptr) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const auto on_device = at::TensorOptions().device(x.device());
  Tensor keep = at::empty({B, T}, on_device.dtype(at::kBool));
  Tensor cu_seqlens = at::empty({B + 1}, on_device.dtype(at::kInt));
  Tensor max_seqlen = at::empty({}, on_device.dtype(at::kInt));
  if (B == 0) {  // no data to check: no sync
    cu_seqlens.zero_();
    max_seqlen.zero_();
    if (group_starts != nullptr) group_starts->assign(groups + 1, 0);
    return {at::empty({0, D}, x.options()), at::empty({0}, on_device.dtype(at::kLong)),
            cu_seqlens, max_seqlen, keep};
  }
  TORCH_CHECK(T <= INT_MAX, op, ": T=", T, " frames per sequence is more than supported (2^31-1)");
  const int64_t n_tiles = ceil_div(T, kTile);
  const int64_t n_entries = B * n_tiles;
  TORCH_CHECK(n_entries <= INT_MAX, op, ": B*T=", B * T, " frames are more than supported");

  Tensor lengths = lengths_in;
  if (lengths.scalar_type() != at::kInt && lengths.scalar_type() != at::kLong) {
    lengths = lengths.to(at::kLong);
  }
  lengths = lengths.contiguous();
  const Lengths lengths_ref{lengths.const_data_ptr(), lengths.scalar_type() == at::kLong};

  // One scratch allocation: tile_offset (E+1), status, tile_info (E x u32), tile_frames
  // (B*T x i32: a tile's kept frames are listed from its own first frame on).
  const int64_t status_size = kStatusSize + groups + 1;
  const int64_t n_words =
      (n_entries + 1) + status_size + ceil_div(n_entries, 2) + ceil_div(B * T, 2);
  Tensor scratch = at::empty({n_words}, on_device.dtype(at::kLong));
  int64_t* tile_offset = scratch.data_ptr<int64_t>();
  int64_t* status = tile_offset + n_entries + 1;
  uint32_t* tile_info = reinterpret_cast<uint32_t*>(status + status_size);
  int32_t* tile_frames = reinterpret_cast<int32_t*>(status + status_size + ceil_div(n_entries, 2));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n_entries > 0) {
    launch_keep(lengths_ref, keep.data_ptr<bool>(), tile_frames, tile_info, n_tiles, n_entries,
                stream);
  }
  gate_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(
      tile_info, lengths_ref, B, T, n_tiles, kTile, groups, tile_offset, cu_seqlens.data_ptr<int32_t>(),
      max_seqlen.data_ptr<int32_t>(), status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The one device->host transfer of the op (and its only sync).
  std::vector<int64_t> host_status(status_size);
  c10::cuda::memcpy_and_sync(host_status.data(), status, status_size * sizeof(int64_t),
                             cudaMemcpyDeviceToHost, stream);
  TORCH_CHECK(host_status[kBadLengthIndex] < 0, op, ": lengths must lie in [0, T=", T,
              "], got lengths[", host_status[kBadLengthIndex], "]=",
              host_status[kBadLengthValue]);
  if (host_status[kNanFrame] >= 0) {
    const int64_t s = host_status[kNanFrame] / T, per_group = B / groups;
    const std::string module = groups == 1 ? "" : "module " + std::to_string(s / per_group) + ", ";
    TORCH_CHECK(false, op, ": ", nan_message, " (first at ", module, "b=", s % per_group,
                ", t=", host_status[kNanFrame] % T, ")");
  }
  if (group_starts != nullptr) {
    group_starts->assign(host_status.begin() + kStatusSize, host_status.end());
  }
  TORCH_CHECK(host_status[kOverflow] == 0, op, ": ", host_status[kKeptTotal],
              " kept frames are more than the int32 cu_seqlens can index");

  const int64_t N = host_status[kKeptTotal];
  Tensor packed = at::empty({N, D}, x.options());
  Tensor index = at::empty({N}, on_device.dtype(at::kLong));
  if (N > 0) {
    const TileRowMap row_map{tile_offset, n_entries, tile_frames, n_tiles, kTile, T,
                             (B / groups) * T, index.data_ptr<int64_t>()};
    launch_copy_rows(op, x.const_data_ptr(), packed.data_ptr(), N, D * x.element_size(), row_map,
                     stream);
  }
  return {packed, index, cu_seqlens, max_seqlen, keep};
}

CompactOutputs gate_compact_cuda(const Tensor& x_in, const Tensor& logits_in,
                                 const Tensor& lengths, double threshold) {
  check_gate_compact(x_in, logits_in, lengths, threshold);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor logits = logits_in.contiguous();
  const float margin = keep_margin(threshold);
  const int64_t T = x.size(1);
  auto launch_keep = [&](const Lengths& len, bool* keep, int32_t* tile_frames, uint32_t* tile_info,
                         int64_t n_tiles, int64_t n_entries, cudaStream_t stream) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, logits.scalar_type(), "gate_compact (logits)", [&] {
          const LogitsMargin<scalar_t> m{logits.const_data_ptr<scalar_t>()};
          gate_keep_kernel<kLogitsTile><<<static_cast<unsigned>(n_entries), kThreads, 0, stream>>>(
              m, len, T, n_tiles, margin, keep, tile_frames, tile_info);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  };
  return compact_frames<kLogitsTile>("gate_compact", kNanLogits, x, lengths, launch_keep);
}

template <typename scalar_t, int kVec>
void launch_linear_keep(const scalar_t* hidden, const float* weight, const float* bias, int64_t H,
                        const Lengths& len, int64_t T, float margin, bool* keep,
                        int32_t* tile_frames, uint32_t* tile_info, int64_t n_tiles,
                        int64_t n_entries, cudaStream_t stream) {
  int group_log2 = 0;  // lanes per frame: enough for one vector each, at most a warp
  while ((int64_t{1} << group_log2) < H / kVec && group_log2 < 5) ++group_log2;
  const unsigned blocks = static_cast<unsigned>(n_entries);
  if (H <= kMaxSmemWeights) {
    const LinearMargin<scalar_t, kVec, true> m{hidden, weight, bias, H, group_log2};
    gate_keep_kernel<kLinearTile><<<blocks, kThreads, H * sizeof(float), stream>>>(
        m, len, T, n_tiles, margin, keep, tile_frames, tile_info);
  } else {
    const LinearMargin<scalar_t, kVec, false> m{hidden, weight, bias, H, group_log2};
    gate_keep_kernel<kLinearTile><<<blocks, kThreads, 0, stream>>>(
        m, len, T, n_tiles, margin, keep, tile_frames, tile_info);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

CompactOutputs gate_compact_linear_cuda(const Tensor& x_in, const Tensor& hidden_in,
                                        const Tensor& weight_in, const Tensor& bias_in,
                                        const Tensor& lengths, double threshold) {
  check_gate_compact_linear(x_in, hidden_in, weight_in, bias_in, lengths, threshold);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor hidden = hidden_in.contiguous();
  // The gate's output layer in float32 (no copy when it already is): 2H + 2 numbers.
  const Tensor weight = weight_in.to(at::kFloat).contiguous();
  const Tensor bias = bias_in.to(at::kFloat).contiguous();
  const float margin = keep_margin(threshold);
  const int64_t T = x.size(1), H = hidden.size(2);
  auto launch_keep = [&](const Lengths& len, bool* keep, int32_t* tile_frames, uint32_t* tile_info,
                         int64_t n_tiles, int64_t n_entries, cudaStream_t stream) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, hidden.scalar_type(), "gate_compact_linear (hidden)", [&] {
          const scalar_t* h = hidden.const_data_ptr<scalar_t>();
          with_vec_width<scalar_t>(vec_width<scalar_t>(H, {h}), [&](auto vec) {
            launch_linear_keep<scalar_t, decltype(vec)::value>(
                h, weight.const_data_ptr<float>(), bias.const_data_ptr<float>(), H, len, T,
                margin, keep, tile_frames, tile_info, n_tiles, n_entries, stream);
          });
        });
  };
  return compact_frames<kLinearTile>("gate_compact_linear", kNanGateLogits, x, lengths,
                                     launch_keep);
}

// ------------------------------------------------------------------------------------------
// gate_plan: gate_compact's kernels over the M*B sequences (m, b) of logits (B, T, M, 2),
// arranged module-major (a copy of the logits: 8*M*B*T bytes, small next to any row data), and
// no rows to copy (D = 0).

using PlanOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

PlanOutputs gate_plan_cuda(const Tensor& logits_in, const Tensor& lengths_in, double threshold) {
  check_gate_plan(logits_in, lengths_in, threshold);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t B = logits_in.size(0), T = logits_in.size(1), M = logits_in.size(2);
  const Tensor logits = logits_in.permute({2, 0, 1, 3}).contiguous();  // (M, B, T, 2)
  const Tensor lengths = lengths_in.repeat({M});
  const Tensor x = at::empty({M * B, T, 0}, logits.options());
  const float margin = keep_margin(threshold);
  auto launch_keep = [&](const Lengths& len, bool* keep, int32_t* tile_frames, uint32_t* tile_info,
                         int64_t n_tiles, int64_t n_entries, cudaStream_t stream) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, logits.scalar_type(), "gate_plan (logits)", [&] {
          const LogitsMargin<scalar_t> m{logits.const_data_ptr<scalar_t>()};
          gate_keep_kernel<kLogitsTile><<<static_cast<unsigned>(n_entries), kThreads, 0, stream>>>(
              m, len, T, n_tiles, margin, keep, tile_frames, tile_info);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  };
  std::vector<int64_t> starts;
  auto [packed, index, cu_all, max_all, keep] = compact_frames<kLogitsTile>(
      "gate_plan", kNanLogits, x, lengths, launch_keep, std::max<int64_t>(M, 1), &starts);
  starts.resize(M + 1, starts.empty() ? 0 : starts.back());
  Tensor offsets = at::empty({M + 1}, at::TensorOptions().dtype(at::kLong));
  std::copy(starts.begin(), starts.end(), offsets.mutable_data_ptr<int64_t>());
  // Per module: cu_seqlens from 0, and the longest kept sequence (device ops, no host read).
  const auto long_opts = logits.options().dtype(at::kLong);
  const Tensor rows = at::arange(M, long_opts).unsqueeze(1) * B + at::arange(B + 1, long_opts);
  const Tensor cu_rows = cu_all.to(at::kLong).index_select(0, rows.reshape(-1)).view({M, B + 1});
  const Tensor cu_seqlens = (cu_rows - cu_rows.narrow(1, 0, 1)).to(at::kInt);
  const Tensor max_seqlen =
      B == 0 ? at::zeros({M}, logits.options().dtype(at::kInt))
             : (cu_seqlens.narrow(1, 1, B) - cu_seqlens.narrow(1, 0, B)).amax(1).to(at::kInt);
  return {index, cu_seqlens, max_seqlen, keep.view({M, B, T}), offsets};
}

// ------------------------------------------------------------------------------------------
// gather_rows

Tensor gather_rows_cuda(const Tensor& src_in, const Tensor& index_in) {
  check_gather_rows(src_in, index_in);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const int64_t D = src_in.size(-1), M = leading_rows(src_in), N = index_in.size(0);
  Tensor out = at::empty({N, D}, src_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  const Tensor src = src_in.contiguous();
  const Tensor index = index_in.contiguous();
  // Launched even for D = 0, so that bad indices are still reported.
  launch_copy_rows("gather_rows", src.const_data_ptr(), out.data_ptr(), N, D * src.element_size(),
                   IndexRowMap{index.const_data_ptr<int64_t>(), M},
                   c10::cuda::getCurrentCUDAStream());
  return out;
}

// ------------------------------------------------------------------------------------------
// The scatters. Index entries must be distinct and in range; both are checked on the device
// (CUDA_KERNEL_ASSERT, like index_select's bounds check): a repeat is caught by the first of its
// rows to claim an output row. Each output row is then written exactly once, so no atomics on
// the data.
//  * scatter_add_ (in place): one kernel over the N kept rows, reading each value row and
//    residual row once and writing the residual row once. The claim is a 4-byte flag per row.
//  * scatter_pad / scatter_rows (new tensor): positions_kernel records each output row's value
//    row (-1: none), then write_rows_kernel writes every output row once: residual (+ scale *
//    value), or the value / zeros. The residual is read once; no copy of it first.

// position[index[n]] = n; asserts range and distinctness.
__global__ void __launch_bounds__(kThreads)
    positions_kernel(const int64_t* __restrict__ index, int64_t n_rows, int64_t n_out_rows,
                     unsigned long long* __restrict__ position) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= n_rows) return;
  const int64_t r = index[n];
  CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < n_out_rows, "scatter: index out of range [0, M)");
  const unsigned long long previous =
      atomicCAS(position + r, ~0ull, static_cast<unsigned long long>(n));
  CUDA_KERNEL_ASSERT_MSG(previous == ~0ull, "scatter: index entries must be distinct");
}

// o += scale * v element-wise in the op-math type (float32; float64 for double), one rounding:
// a fused residual add.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void add_scaled(Vec<scalar_t, kVec>& o, const Vec<scalar_t, kVec>& v,
                                           at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    o.val[j] = static_cast<scalar_t>(static_cast<acc_t>(o.val[j]) + scale * static_cast<acc_t>(v.val[j]));
  }
}

// out[r] = base(r) + scale * values[position[r]] where position[r] >= 0, else base(r); base is
// the residual row, or zeros when residual is null (then values are copied as they are).
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    write_rows_kernel(const scalar_t* __restrict__ values, const scalar_t* __restrict__ residual,
                      const long long* __restrict__ position, scalar_t* __restrict__ out,
                      int64_t n_out_rows, int64_t vecs_per_row, int group_log2,
                      at::opmath_type<scalar_t> scale) {
  using V = Vec<scalar_t, kVec>;
  const int group = 1 << group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads >> group_log2) +
                    (threadIdx.x >> group_log2);
  if (r >= n_out_rows) return;
  const int64_t n = position[r];
  const V* src = reinterpret_cast<const V*>(values) + n * vecs_per_row;
  const V* base = residual == nullptr ? nullptr : reinterpret_cast<const V*>(residual) + r * vecs_per_row;
  V* dst = reinterpret_cast<V*>(out) + r * vecs_per_row;
  for (int64_t u = lane; u < vecs_per_row; u += group) {
    V o;
    if (base == nullptr) {
      if (n >= 0) {
        o = src[u];
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) o.val[j] = static_cast<scalar_t>(0);
      }
    } else {
      o = base[u];
      if (n >= 0) add_scaled(o, src[u], scale);
    }
    dst[u] = o;
  }
}

// out[index[i]] += scale * values[i], row by row, in place; claimed[r] marks rows written.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_kernel(const scalar_t* __restrict__ values, const int64_t* __restrict__ index,
                            scalar_t* __restrict__ out, int* __restrict__ claimed, int64_t n_rows,
                            int64_t n_out_rows, int64_t vecs_per_row, int group_log2,
                            at::opmath_type<scalar_t> scale) {
  using V = Vec<scalar_t, kVec>;
  const int group = 1 << group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads >> group_log2) +
                      (threadIdx.x >> group_log2);
  if (row >= n_rows) return;
  const int64_t r = index[row];
  CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < n_out_rows, "scatter_add_: index out of range [0, M)");
  if (lane == 0) {
    CUDA_KERNEL_ASSERT_MSG(atomicExch(claimed + r, 1) == 0,
                           "scatter_add_: index entries must be distinct");
  }
  const V* src = reinterpret_cast<const V*>(values) + row * vecs_per_row;
  V* dst = reinterpret_cast<V*>(out) + r * vecs_per_row;
  for (int64_t u = lane; u < vecs_per_row; u += group) {
    V o = dst[u];
    add_scaled(o, src[u], scale);
    dst[u] = o;
  }
}

// The out-of-place scatters: residual is undefined for scatter_rows (zeros elsewhere).
Tensor write_rows(const char* op, const Tensor& values_in, const Tensor& index_in,
                  const Tensor& residual_in, at::IntArrayRef size, double scale) {
  const Tensor values = values_in.contiguous();
  const Tensor index = index_in.contiguous();
  const Tensor residual = residual_in.defined() ? residual_in.contiguous() : residual_in;
  Tensor out = at::empty(size, values.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t N = values.size(0), D = values.size(1), M = leading_rows(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor position = at::full({std::max<int64_t>(M, 1)}, -1, index.options());
  if (N > 0) {  // also for D = 0 or M = 0, so that bad indices are reported
    TORCH_CHECK(ceil_div(N, kThreads) <= INT_MAX, op, ": ", N, " rows are more than one launch can cover");
    positions_kernel<<<static_cast<unsigned>(ceil_div(N, kThreads)), kThreads, 0, stream>>>(
        index.const_data_ptr<int64_t>(), N, M,
        reinterpret_cast<unsigned long long*>(position.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (M == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* res = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const int vec = res == nullptr ? vec_width<scalar_t>(D, {v, o}) : vec_width<scalar_t>(D, {v, o, res});
    with_vec_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const RowGrid grid = row_grid(op, M, D / kVec);
      write_rows_kernel<scalar_t, kVec><<<grid.blocks, kThreads, 0, stream>>>(
          v, res, reinterpret_cast<const long long*>(position.const_data_ptr<int64_t>()), o, M,
          D / kVec, grid.group_log2, static_cast<at::opmath_type<scalar_t>>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

Tensor scatter_pad_cuda(const Tensor& values, const Tensor& index, const Tensor& residual,
                        double scale) {
  check_scatter_pad("scatter_pad", values, index, residual, scale);
  const c10::cuda::CUDAGuard guard(residual.device());
  return write_rows("scatter_pad", values, index, residual, residual.sizes(), scale);
}

Tensor scatter_rows_cuda(const Tensor& values, const Tensor& index, c10::SymIntArrayRef size) {
  const std::vector<int64_t> shape = check_scatter_rows(values, index, size);
  const c10::cuda::CUDAGuard guard(values.device());
  return write_rows("scatter_rows", values, index, Tensor(), shape, 1.0);
}

void scatter_add__cuda(const Tensor& residual, const Tensor& values_in, const Tensor& index_in,
                       double scale) {
  check_scatter_pad("scatter_add_", values_in, index_in, residual, scale);
  TORCH_CHECK(residual.is_contiguous(), "scatter_add_: residual must be contiguous (it is updated in place)");
  const c10::cuda::CUDAGuard guard(residual.device());
  const int64_t N = values_in.size(0), D = values_in.size(1), M = leading_rows(residual);
  if (N == 0) return;
  const Tensor values = values_in.contiguous();
  const Tensor index = index_in.contiguous();
  Tensor claimed = at::zeros({std::max<int64_t>(M, 1)}, index.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "scatter_add_", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    scalar_t* o = residual.data_ptr<scalar_t>();
    with_vec_width<scalar_t>(vec_width<scalar_t>(D, {v, o}), [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      // D = 0 still launches (one lane per row), so that bad indices are reported.
      const RowGrid grid = row_grid("scatter_add_", N, D / kVec);
      scatter_add_rows_kernel<scalar_t, kVec><<<grid.blocks, kThreads, 0, stream>>>(
          v, index.const_data_ptr<int64_t>(), o, claimed.data_ptr<int>(), N, M, D / kVec,
          grid.group_log2, static_cast<at::opmath_type<scalar_t>>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(localgp, CUDA, m) {
  m.impl("gate_compact", &gate_compact_cuda);
  m.impl("gate_compact_linear", &gate_compact_linear_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("gate_plan", &gate_plan_cuda);
  m.impl("scatter_pad", &scatter_pad_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("scatter_add_", &scatter_add__cuda);
}

}  // namespace localgp
