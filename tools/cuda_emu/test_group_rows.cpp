// group_rows of csrc/cuda/group_rows.cu against a stable lexicographic sort done with ATen.
#include "common.h"
#include "group_rows.cpp"  // csrc/cuda/group_rows.cu after rewrite.py

using at::Tensor;

// Stable sort of the rows by their mask, column 0 most significant: stable sorts by each
// column, the last column first (LSD radix sort).
Tensor reference_perm(const Tensor& masks) {
  Tensor perm = at::arange(masks.size(0));
  for (int64_t c = masks.size(1) - 1; c >= 0; --c) {
    const Tensor column = masks.select(1, c).index_select(0, perm).to(at::kByte);
    perm = perm.index_select(0, std::get<1>(column.sort(/*stable=*/true, 0, false)));
  }
  return perm;
}

void check_case(const Tensor& masks, const std::string& what) {
  const int64_t R = masks.size(0);
  auto [perm, offsets, inverse] = localgp::group_rows_cuda(masks);
  const Tensor ref_perm = reference_perm(masks);
  // A group starts wherever a sorted row differs from the one before it.
  const Tensor sorted = masks.index_select(0, ref_perm);
  Tensor starts = at::zeros({0}, at::kLong);
  if (R > 1) {
    starts = (sorted.narrow(0, 1, R - 1) != sorted.narrow(0, 0, R - 1)).any(1).nonzero().view(-1) + 1;
  }
  const Tensor ref_offsets = at::cat({at::zeros({R > 0 ? 1 : 0}, at::kLong), starts, at::full({1}, R, at::kLong)});
  EXPECT(perm.equal(ref_perm), what << " perm");
  EXPECT(offsets.equal(ref_offsets), what << " offsets " << offsets << " vs " << ref_offsets);
  EXPECT(inverse.equal(ref_perm.argsort()), what << " inverse");
}

void test_group_rows() {
  std::mt19937 rng(3);
  // M around the 32-column ballots and 64-column words; R past one block (256) and past one
  // step of the offsets scan (1024); R=0 and M=0.
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (int64_t R : {0, 1, 2, 7, 40, 257})
    for (int64_t M : {0, 1, 3, 31, 32, 33, 64, 65, 130}) shapes.push_back({R, M});
  shapes.push_back({1100, 5});
  shapes.push_back({1100, 70});
  for (auto [R, M] : shapes) {
    for (int mode = 0; mode < 3; ++mode) {
      Tensor masks;
      if (mode == 0) {  // a few distinct masks: groups of several rows
        const Tensor patterns = at::rand({1 + static_cast<int64_t>(rng() % 5), M}) > 0.5;
        masks = patterns.index_select(0, at::randint(0, patterns.size(0), {R}, at::kLong));
      } else if (mode == 1) {  // independent rows: mostly groups of one
        masks = at::rand({R, M}) > 0.5;
      } else {  // all rows alike, viewed transposed (non-contiguous)
        masks = (at::rand({1, M}) > 0.5).expand({R, M}).t().contiguous().t();
      }
      check_case(masks, "R=" + str(R) + " M=" + str(M) + " mode=" + str(mode));
    }
  }
  EXPECT_ERROR(localgp::group_rows_cuda(at::zeros({3, 2})), "group_rows: masks must be bool");
}

int main() {
  at::manual_seed(0);
  return run_tests("group_rows", test_group_rows);
}
