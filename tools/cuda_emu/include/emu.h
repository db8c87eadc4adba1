// Runs CUDA kernels on the CPU: just enough of CUDA for csrc/cuda/*.cu (after rewrite.py),
// so that their logic and indexing can be tested against ATen on a machine without a GPU.
//
// A launch runs its blocks one after another. The threads of a block are fibers on the
// calling thread: each runs until it reaches a barrier (__syncthreads, or a warp intrinsic,
// which synchronizes its warp), then another runnable one runs. Fibers, because real threads
// made a 1024-thread block cost milliseconds per barrier on a 2-core machine. A fiber is
// entered once through ucontext and switched with _setjmp/_longjmp afterwards (swapcontext
// makes a system call per switch); fiber i serves thread i of every block. The order is
// shuffled at every round, so that a missing barrier tends to show up as a wrong result.
// `__shared__` variables become function statics (one block at a time: one copy is enough);
// a device assert ends its thread and makes the launch throw.
#pragma once
#undef _FORTIFY_SOURCE  // its longjmp check rejects jumps to another stack
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>
using std::isnan;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

typedef struct emu_stream* cudaStream_t;
typedef int cudaError_t;
enum cudaMemcpyKind { cudaMemcpyDeviceToHost = 2 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75 };
// Compute capability 0: varlen attention takes its math path (FlashAttention needs a GPU).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) { *value = 0; return 0; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned long long n) : x(static_cast<unsigned>(n)) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

inline dim3 threadIdx, blockIdx, blockDim, gridDim;  // of the running fiber

template <class T> T min(T a, T b) { return b < a ? b : a; }
template <class T> T max(T a, T b) { return a < b ? b : a; }

namespace emu {

// Threads that exit stop counting, as __syncthreads does on the GPU.
struct Barrier {
  int expected = 0, arrived = 0;
  unsigned generation = 0;
};

struct Thread {
  Barrier* waiting_on = nullptr;  // blocked while waiting_on->generation == waiting_generation
  unsigned waiting_generation = 0;
  unsigned warp_ops = 0;  // picks the slot buffer of the next warp intrinsic
  bool done = false;
};

struct Warp {
  Barrier barrier;
  unsigned live = 0xffffffffu;  // lanes that have not exited
  uint64_t slots[2][32];        // two buffers: a lane may write the next before all read this one
};

struct Block {
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier barrier;
  std::vector<unsigned char> smem;  // dynamic shared memory
  const std::function<void()>* kernel;
  int current = 0;  // the running thread
  std::string traps;  // the distinct messages of its device asserts (or exceptions)
};
inline Block* block = nullptr;

struct Fiber {
  ucontext_t entry;  // how it is entered the first time
  jmp_buf resume;    // where it continues after a barrier
  std::unique_ptr<char[]> stack;
  bool started = false;
};
inline std::deque<Fiber> fibers;  // a deque: ucontext_t must not move
inline jmp_buf scheduler;

inline void yield() {
  if (_setjmp(fibers[block->current].resume) == 0) _longjmp(scheduler, 1);
}

struct Trap {
  const char* message;
};

inline Thread& self() { return block->threads[block->current]; }
inline int lane() { return threadIdx.x % 32; }
inline Warp& warp() { return block->warps[threadIdx.x / 32]; }

inline void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
}

inline void arrive_and_wait(Barrier& b) {
  if (++b.arrived == b.expected) return release(b);
  Thread& t = self();
  t.waiting_on = &b;
  t.waiting_generation = b.generation;
  yield();
}

inline void leave(Barrier& b) {
  if (--b.expected == b.arrived && b.arrived > 0) release(b);
}

inline void trap(const char* message) { throw Trap{message}; }

template <class T> T* dynamic_smem() { return reinterpret_cast<T*>(block->smem.data()); }

// Every lane of the warp publishes `value`; returns the slots of all lanes once all have.
inline const uint64_t* warp_exchange(unsigned mask, uint64_t value) {
  Warp& w = warp();
  // The kernels use full masks: every lane must take part (see also run_thread).
  if ((mask & ~w.live) != 0) trap("emu: warp intrinsic names lanes that have exited");
  uint64_t* slots = w.slots[self().warp_ops++ % 2];
  slots[lane()] = value;
  arrive_and_wait(w.barrier);
  return slots;
}

template <class T> uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T> T shuffle(unsigned mask, T v, int src_lane) {
  const uint64_t* slots = warp_exchange(mask, to_bits(v));
  if (src_lane < 0 || src_lane >= 32) return v;  // out of range: the lane keeps its own value
  T out;
  std::memcpy(&out, &slots[src_lane], sizeof(T));
  return out;
}

// As on the GPU, every thread that trips an assert reports it.
inline void report(const std::string& message) {
  if (block->traps.find(message) != std::string::npos) return;
  block->traps += (block->traps.empty() ? "" : "; ") + message;
}

inline void run_thread() {
  Block& b = *block;
  try {
    (*b.kernel)();
  } catch (const Trap& e) {  // nothing may unwind past the fiber
    report(e.message);
  } catch (const std::exception& e) {
    report(std::string("exception in a kernel: ") + e.what());
  }
  if (warp().barrier.arrived > 0) report("emu: a lane exited while its warp waits in a warp intrinsic");
  self().done = true;
  leave(b.barrier);
  leave(warp().barrier);
  warp().live &= ~(1u << lane());
}

[[noreturn]] inline void fiber_main() {
  for (;;) {
    run_thread();
    yield();  // resumed by the next block
  }
}

inline void run_block(Block& b, std::mt19937& rng) {
  constexpr size_t kStack = 256 << 10;
  const int n = static_cast<int>(b.threads.size());
  while (static_cast<int>(fibers.size()) < n) {
    Fiber& f = fibers.emplace_back();
    f.stack.reset(new char[kStack]);
    getcontext(&f.entry);
    f.entry.uc_stack.ss_sp = f.stack.get();
    f.entry.uc_stack.ss_size = kStack;
    f.entry.uc_link = nullptr;
    makecontext(&f.entry, fiber_main, 0);
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (int live = n; live > 0;) {
    bool ran = false;
    std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      Thread& t = b.threads[i];
      if (t.done || (t.waiting_on && t.waiting_on->generation == t.waiting_generation)) continue;
      t.waiting_on = nullptr;
      b.current = i;
      threadIdx = dim3(i);
      if (_setjmp(scheduler) == 0) {  // back here when the fiber waits or ends
        Fiber& f = fibers[i];
        if (f.started) _longjmp(f.resume, 1);
        f.started = true;
        setcontext(&f.entry);
      }
      ran = true;
      live -= t.done;
    }
    if (!ran) {
      for (Fiber& f : fibers) f.started = false;  // abandon the stuck threads' stacks
      throw std::runtime_error("emu: deadlock, threads wait at barriers others never reach");
    }
  }
}

struct Config {
  dim3 grid, block;
  size_t smem;
};
inline Config cfg(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return {grid, block, smem};
}

template <class F> void launch(Config c, F kernel) {
  if (c.block.x % 32 != 0 || c.block.x > 1024 || c.block.y * c.block.z * c.grid.y * c.grid.z != 1)
    throw std::runtime_error("emu: only 1-D launches with whole warps are emulated");
  if (c.smem > 48 << 10)  // the default limit; more needs cudaFuncSetAttribute, never called here
    throw std::runtime_error("emu: a launch asks for more than 48 KiB of dynamic shared memory");
  const std::function<void()> fn = kernel;
  static std::mt19937 rng(12345);
  for (unsigned bx = 0; bx < c.grid.x; ++bx) {
    Block b;
    b.threads.resize(c.block.x);
    b.warps.resize(c.block.x / 32);
    for (Warp& w : b.warps) w.barrier.expected = 32;
    b.barrier.expected = static_cast<int>(c.block.x);
    b.smem.assign(c.smem, 0xAB);  // garbage, as on the GPU
    b.kernel = &fn;
    blockIdx = dim3(bx);
    blockDim = c.block;
    gridDim = c.grid;
    block = &b;
    run_block(b, rng);
    block = nullptr;
    // On the GPU the kernel would stop and the next CUDA call fail.
    if (!b.traps.empty()) throw std::runtime_error("device-side assert triggered: " + b.traps);
  }
}
}  // namespace emu

#define EMU_KERNEL_ASSERT_MSG(cond, msg) \
  do {                                   \
    if (!(cond)) emu::trap(msg);         \
  } while (0)
#define EMU_KERNEL_ASSERT(cond) EMU_KERNEL_ASSERT_MSG(cond, #cond)

inline void __syncthreads() { emu::arrive_and_wait(emu::block->barrier); }
inline unsigned __ballot_sync(unsigned mask, bool p) {
  const uint64_t* slots = emu::warp_exchange(mask, p);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= (slots[i] != 0 ? 1u : 0u) << i;
  return bits & mask;
}
template <class T> T __shfl_xor_sync(unsigned m, T v, int o) { return emu::shuffle(m, v, emu::lane() ^ o); }
template <class T> T __shfl_up_sync(unsigned m, T v, int o) { return emu::shuffle(m, v, emu::lane() - o); }
template <class T> T __shfl_down_sync(unsigned m, T v, int o) { return emu::shuffle(m, v, emu::lane() + o); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <class T> T __ldg(const T* p) { return *p; }
// Fibers never run at the same time: plain read-modify-write is atomic here.
template <class T> T atomicMin(T* p, T v) { const T old = *p; if (v < old) *p = v; return old; }
template <class T> T atomicMax(T* p, T v) { const T old = *p; if (old < v) *p = v; return old; }
template <class T> T atomicCAS(T* p, T compare, T v) { const T old = *p; if (old == compare) *p = v; return old; }
template <class T> T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
