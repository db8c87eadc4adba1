// gate_compact, gate_compact_linear, gate_plan, gather_rows and the scatters of csrc/cuda/compaction.cu
// against references built from ATen ops.
#include "common.h"
#include "compaction.cpp"  // csrc/cuda/compaction.cu after rewrite.py

using at::Tensor;
using localgp::keep_margin;

const std::vector<at::ScalarType> kFloats = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
std::mt19937 rng(1);
template <class T> const T& pick(const std::vector<T>& v) { return v[rng() % v.size()]; }

// Everything gate_compact returns follows from x and the keep mask.
void check_outputs(const localgp::CompactOutputs& got, const Tensor& x, const Tensor& keep,
                   const std::string& what) {
  auto [packed, index, cu_seqlens, max_seqlen, got_keep] = got;
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const Tensor ref_index = keep.reshape(-1).nonzero().view(-1);
  const Tensor counts = keep.sum(1);
  const Tensor ref_cu = at::cat({at::zeros({1}, at::kLong), counts.cumsum(0)}).to(at::kInt);
  EXPECT(got_keep.equal(keep), what << ": keep");
  EXPECT(index.equal(ref_index), what << ": index");
  EXPECT(packed.equal(x.reshape({B * T, D}).index_select(0, ref_index)), what << ": packed");
  EXPECT(packed.scalar_type() == x.scalar_type() && packed.is_contiguous(), what << ": packed layout");
  EXPECT(cu_seqlens.equal(ref_cu), what << ": cu_seqlens " << cu_seqlens << " vs " << ref_cu);
  EXPECT(max_seqlen.dim() == 0 && max_seqlen.scalar_type() == at::kInt &&
             max_seqlen.item<int64_t>() == (B > 0 ? counts.max().item<int64_t>() : 0),
         what << ": max_seqlen");
}

Tensor frames(int64_t B, int64_t T, int64_t D, at::ScalarType dtype) {
  if (rng() % 3 == 0) return at::randn({B, D, T}).to(dtype).transpose(1, 2);  // non-contiguous
  return at::randn({B, T, D}).to(dtype);
}

Tensor random_lengths(int64_t B, int64_t T) {
  Tensor lengths = at::randint(0, T + 1, {B}, at::kLong);
  if (B > 0) lengths[0] = T;
  if (B > 1) lengths[1] = std::min<int64_t>(rng() % 2, T);  // 0 or 1
  return lengths.to(pick<at::ScalarType>({at::kLong, at::kInt, at::kShort}));  // int16: converted
}

void test_gate_compact() {
  // pattern 0: random margins, 1: nothing kept, 2: everything kept (but padding).
  // T past one 256-frame tile; B*tiles well past one 4096-entry step of the finalize scan.
  std::vector<std::array<int64_t, 3>> shapes;
  for (int64_t B : {0, 1, 3})
    for (int64_t T : {0, 1, 37, 256, 300, 513})
      for (int64_t D : {0, 1, 3, 8, 33}) shapes.push_back({B, T, D});
  shapes.push_back({2500, 300, 3});
  shapes.push_back({3, 2000, 2});
  for (auto [B, T, D] : shapes) {
    for (int pattern = 0; pattern < 3; ++pattern) {
      const Tensor x = frames(B, T, D, pick(kFloats));
      Tensor logits = at::randn({B, T, 2}).mul(2);
      if (pattern > 0) logits.select(2, pattern == 1 ? 0 : 1).add_(100);
      logits = logits.to(pick(kFloats));
      const Tensor lengths = random_lengths(B, T);
      const double threshold = std::uniform_real_distribution<double>(0.05, 0.95)(rng);
      // The kernel's own float32 arithmetic: logits[..., 1] - logits[..., 0] > logit(threshold).
      const Tensor margin = logits.select(2, 1).to(at::kFloat) - logits.select(2, 0).to(at::kFloat);
      const Tensor valid = at::arange(T).unsqueeze(0) < lengths.to(at::kLong).unsqueeze(1);
      const Tensor keep = (margin > keep_margin(threshold)).logical_and(valid);
      check_outputs(localgp::gate_compact_cuda(x, logits, lengths, threshold), x, keep,
                    "gate_compact B=" + str(B) + " T=" + str(T) + " D=" + str(D) + " pattern=" + str(pattern));
    }
  }

  // Errors found on the device, reported with the first offending b (and t).
  const Tensor x = at::randn({3, 513, 4});
  Tensor logits = at::randn({3, 513, 2});
  const auto run = [&](std::vector<int64_t> lengths) {
    localgp::gate_compact_cuda(x, logits, at::tensor(lengths, at::kLong), 0.5);
  };
  EXPECT_ERROR(run({3, 514, -1}), "gate_compact: lengths must lie in [0, T=513], got lengths[1]=514");
  EXPECT_ERROR(run({-1, 3, 3}), "got lengths[0]=-1");
  logits[2][300][1] = NAN;  // in the second tile of sequence 2
  EXPECT_ERROR(run({513, 513, 513}), "gate_compact: logits give no decision at valid frames: a NaN logit, or both classes the same infinity (first at b=2, t=300)");
  logits[1][7][0] = NAN;
  EXPECT_ERROR(run({513, 513, 513}), "(first at b=1, t=7)");
  EXPECT_ERROR(run({513, 8, 0}), "(first at b=1, t=7)");
  EXPECT(error_of([&] { run({513, 7, 300}); }) == "(no error)", "NaN past the lengths is ignored");
  EXPECT_ERROR(localgp::gate_compact_cuda(at::randn({2, 0, 3}), at::randn({2, 0, 2}),
                                          at::tensor({1, 0}), 0.5),
               "lengths must lie in [0, T=0], got lengths[0]=1");
  // Argument checks (csrc/checks.h) run before any launch.
  EXPECT_ERROR(localgp::gate_compact_cuda(x.to(at::kInt), logits, at::tensor({1, 1, 1}), 0.5),
               "gate_compact: x must be float16, bfloat16, float32 or float64, got Int");
  EXPECT_ERROR(localgp::gate_compact_cuda(x, logits, at::tensor({1, 1}), 0.5),
               "lengths has 2 entries but x has batch size B=3");
}

void test_gate_compact_linear() {
  // H=0 (bias only), odd H (scalar loads), H=8192 / 8193: w1 - w0 in shared memory or not.
  for (int64_t H : {0, 1, 5, 8, 64, 200, 8192, 8193}) {
    for (int64_t T : {1, 65, 200}) {
      const int64_t B = 3;
      const Tensor x = frames(B, T, 6, pick(kFloats));
      const auto hidden_dtype = pick(kFloats);
      Tensor hidden = at::randn({B, T, H}).to(hidden_dtype);
      if (rng() % 3 == 0) hidden = at::randn({B, T, H + 1}).to(hidden_dtype).narrow(2, 1, H);  // misaligned rows
      const auto weight_dtype = pick(kFloats);
      const Tensor weight = at::randn({2, H}).div(std::sqrt(H + 1.0)).to(weight_dtype);
      const Tensor bias = at::randn({2}).to(weight_dtype);
      const Tensor lengths = random_lengths(B, T);
      const double threshold = std::uniform_real_distribution<double>(0.1, 0.9)(rng);
      const auto got = localgp::gate_compact_linear_cuda(x, hidden, weight, bias, lengths, threshold);
      // Reference margin in float64; frames within 1e-4 of the threshold may go either way
      // (the kernel sums in float32, in another order).
      const Tensor w = weight.to(at::kFloat).to(at::kDouble), b = bias.to(at::kFloat).to(at::kDouble);
      const Tensor margin = at::matmul(hidden.to(at::kDouble), w[1] - w[0]) + (b[1] - b[0]);
      const Tensor valid = at::arange(T).unsqueeze(0) < lengths.to(at::kLong).unsqueeze(1);
      const Tensor keep = (margin > keep_margin(threshold)).logical_and(valid);
      const Tensor tie = (margin - keep_margin(threshold)).abs() < 1e-4;
      const Tensor got_keep = std::get<4>(got);
      const std::string what = "gate_compact_linear H=" + str(H) + " T=" + str(T);
      EXPECT(got_keep.logical_xor(keep).logical_and(tie.logical_not()).any().item<bool>() == false, what << ": keep");
      check_outputs(got, x, got_keep, what);
    }
  }
  const Tensor x = at::randn({2, 10, 4});
  Tensor hidden = at::randn({2, 10, 16});
  hidden[1][2][5] = NAN;
  hidden[1][9][0] = NAN;
  const auto run = [&](std::vector<int64_t> lengths) {
    localgp::gate_compact_linear_cuda(x, hidden, at::randn({2, 16}), at::randn({2}), at::tensor(lengths), 0.5);
  };
  EXPECT_ERROR(run({10, 10}), "gate_compact_linear: the gate logits give no decision at valid frames: a NaN logit, or both classes the same infinity (first at b=1, t=2)");
  EXPECT(error_of([&] { run({10, 2}); }) == "(no error)", "NaN past the lengths is ignored");
  EXPECT_ERROR(run({10, 11}), "gate_compact_linear: lengths must lie in [0, T=10], got lengths[1]=11");
}

void test_gather_rows() {
  for (int64_t D : {0, 1, 3, 8, 16, 100, 1000}) {
    for (auto dtype : kFloats) {
      Tensor src = at::randn({4, 7, D}).to(dtype);
      if (D > 1 && rng() % 2) src = at::randn({4, 7, D + 1}).to(dtype).narrow(2, 1, D);  // odd offsets
      const Tensor index = at::randint(0, 28, {50}, at::kLong);  // with repeats
      const Tensor got = localgp::gather_rows_cuda(src, index);
      EXPECT(got.equal(src.reshape({28, D}).index_select(0, index)), "gather_rows D=" << D << " " << dtype);
    }
  }
  EXPECT(localgp::gather_rows_cuda(at::randn({5, 3}), at::zeros({0}, at::kLong)).sizes() == at::IntArrayRef({0, 3}), "gather_rows N=0");
  EXPECT_ERROR(localgp::gather_rows_cuda(at::randn({5, 3}), at::tensor({0, 5}, at::kLong)), "device-side assert triggered: gather_rows: index out of range");
  EXPECT_ERROR(localgp::gather_rows_cuda(at::randn({5, 3}), at::tensor({-1}, at::kLong)), "gather_rows: index out of range");
  EXPECT_ERROR(localgp::gather_rows_cuda(at::randn({5, 0}), at::tensor({7}, at::kLong)), "gather_rows: index out of range");
  EXPECT_ERROR(localgp::gather_rows_cuda(at::ones({5, 3}, at::kInt), at::tensor({0}, at::kLong)),
               "gather_rows: src must be float16, bfloat16, float32 or float64, got Int");
}

void test_gate_plan() {
  // Module m of the plan = gate_compact on logits[:, :, m]; offsets on the host; infinite logits
  // follow the margin rule (+inf keep logit: kept) and the same infinity twice is an error.
  for (int64_t M : {0, 1, 3}) {
    for (int64_t B : {0, 1, 3}) {
      for (int64_t T : {0, 1, 37, 300}) {
        Tensor logits = at::randn({B, T, M, 2}).mul(2);
        if (B * T * M > 1) {  // one infinite logit per frame: a decision
          logits.select(3, 1).view(-1)[0] = INFINITY;
          logits.select(3, 0).view(-1)[B * T * M - 1] = INFINITY;
        }
        logits = logits.to(pick(kFloats));
        const Tensor lengths = random_lengths(B, T);
        const double threshold = std::uniform_real_distribution<double>(0.05, 0.95)(rng);
        auto [index, cu_seqlens, max_seqlen, keep, offsets] = localgp::gate_plan_cuda(logits, lengths, threshold);
        const std::string what = "gate_plan M=" + str(M) + " B=" + str(B) + " T=" + str(T);
        EXPECT(offsets.device().is_cpu() && offsets.size(0) == M + 1, what << ": offsets");
        EXPECT(keep.sizes() == at::IntArrayRef({M, B, T}) && cu_seqlens.sizes() == at::IntArrayRef({M, B + 1}) &&
                   max_seqlen.sizes() == at::IntArrayRef({M}), what << ": shapes");
        const Tensor x = at::randn({B, T, 2});
        for (int64_t m = 0; m < M; ++m) {
          const int64_t begin = offsets[m].item<int64_t>(), end = offsets[m + 1].item<int64_t>();
          auto [p, ref_index, ref_cu, ref_max, ref_keep] = localgp::gate_compact_cuda(
              x, logits.select(2, m), lengths, threshold);
          EXPECT(keep[m].equal(ref_keep) && index.narrow(0, begin, end - begin).equal(ref_index) &&
                     cu_seqlens[m].equal(ref_cu) && max_seqlen[m].item<int>() == ref_max.item<int>(),
                 what << ": module " << m);
        }
      }
    }
  }
  Tensor logits = at::randn({2, 300, 3, 2});
  logits[1][260][2][0] = INFINITY;
  logits[1][260][2][1] = INFINITY;
  EXPECT_ERROR(localgp::gate_plan_cuda(logits, at::tensor({300, 300}), 0.5),
               "gate_plan: logits give no decision at valid frames: a NaN logit, or both classes the same infinity (first at module 2, b=1, t=260)");
  EXPECT(error_of([&] { localgp::gate_plan_cuda(logits, at::tensor({300, 260}), 0.5); }) == "(no error)",
         "infinite logits past the lengths are ignored");
  EXPECT_ERROR(localgp::gate_plan_cuda(at::randn({2, 5, 3}), at::tensor({5, 5}), 0.5),
               "gate_plan: logits must have shape (B, T, M, 2)");
}

// The three scatters against residual + scale * (values scattered into zeros), in the op-math
// type, rounded once.
void test_scatters() {
  for (int64_t D : {0, 1, 3, 8, 16, 100, 1000}) {
    for (auto dtype : kFloats) {
      Tensor residual = at::randn({3, 9, D}).to(dtype);
      if (rng() % 2) residual = at::randn({3, D, 9}).to(dtype).transpose(1, 2);
      const int64_t N = rng() % 28;  // 0 to 27 of the 27 rows
      const Tensor index = at::randperm(27, at::kLong).narrow(0, 0, N);
      Tensor values = at::randn({N, D}).to(dtype);
      if (D > 1 && rng() % 2) values = at::randn({N, D + 1}).to(dtype).narrow(1, 1, D);
      const double scale = std::uniform_real_distribution<double>(-2, 2)(rng);
      const auto acc = at::toOpMathType(dtype);
      const Tensor y = at::zeros({27, D}, acc).index_copy_(0, index, values.to(acc));
      const Tensor ref = (residual.to(acc).reshape({27, D}) + y * scale).to(dtype).view({3, 9, D});
      const std::string what = "D=" + str(D) + " N=" + str(N) + " " + str(dtype);
      const Tensor got = localgp::scatter_pad_cuda(values, index, residual, scale);
      EXPECT(got.sizes() == residual.sizes() && got.is_contiguous() && got.equal(ref), "scatter_pad " << what);
      Tensor in_place = residual.contiguous().clone();
      localgp::scatter_add__cuda(in_place, values, index, scale);
      EXPECT(in_place.equal(ref), "scatter_add_ " << what);
      const Tensor rows = localgp::scatter_rows_cuda(values, index, c10::fromIntArrayRefSlow({3, 9, D}));
      EXPECT(rows.equal(y.to(dtype).view({3, 9, D})), "scatter_rows " << what);
    }
  }
  const Tensor repeated = at::tensor({3, 0, 3}, at::kLong);
  EXPECT_ERROR(localgp::scatter_pad_cuda(at::randn({1, 3}), at::tensor({10}, at::kLong), at::randn({2, 5, 3}), 1.0),
               "device-side assert triggered: scatter: index out of range");
  EXPECT_ERROR(localgp::scatter_pad_cuda(at::randn({3, 3}), repeated, at::randn({2, 5, 3}), 1.0),
               "scatter: index entries must be distinct");
  EXPECT_ERROR(localgp::scatter_rows_cuda(at::randn({3, 3}), repeated, c10::fromIntArrayRefSlow({10, 3})),
               "scatter: index entries must be distinct");
  Tensor residual = at::randn({10, 3});
  EXPECT_ERROR(localgp::scatter_add__cuda(residual, at::randn({3, 3}), repeated, 1.0),
               "scatter_add_: index entries must be distinct");
  EXPECT_ERROR(localgp::scatter_add__cuda(residual, at::randn({1, 3}), at::tensor({10}, at::kLong), 1.0),
               "scatter_add_: index out of range");
  EXPECT_ERROR(localgp::scatter_rows_cuda(at::randn({1, 0}), at::tensor({4}, at::kLong), c10::fromIntArrayRefSlow({2, 0})),
               "scatter: index out of range");
}

int main() {
  at::manual_seed(0);
  return run_tests("compaction", [] {
    test_gate_compact();
    test_gate_compact_linear();
    test_gather_rows();
    test_gate_plan();
    test_scatters();
  });
}
