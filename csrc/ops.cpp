// Every schema of the localgp op library. Kernels register per device in csrc/cpu/ and
// csrc/cuda/; the CPU library is complete without the CUDA files.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import localgp._C` only needs to find a module; the ops register when the library loads.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(localgp, m) {
  // Threshold the keep probability softmax(logits)[..., 1] > threshold of every valid frame
  // (t < lengths[b]) and pack the kept frames of x, sequence after sequence.
  m.def(
      "gate_compact(Tensor x, Tensor logits, Tensor lengths, float threshold=0.5) -> "
      "(Tensor packed, Tensor index, Tensor cu_seqlens, Tensor max_seqlen, Tensor keep)");
  // Same, with the two-class logits computed in the kernel from the gate's hidden features
  // (B,T,H), weight (2,H) and bias (2,), so they never go to memory.
  m.def(
      "gate_compact_linear(Tensor x, Tensor hidden, Tensor weight, Tensor bias, Tensor lengths, "
      "float threshold=0.5) -> "
      "(Tensor packed, Tensor index, Tensor cu_seqlens, Tensor max_seqlen, Tensor keep)");
  // Rows of src (..., D) flattened to (M, D), picked by index (N,) -> (N, D).
  m.def("gather_rows(Tensor src, Tensor index) -> Tensor");
  // All of a layer's gate decisions in one step (one host read on CUDA): logits (B, T, M, 2)
  // of M modules -> for module m, its kept frames b*T+t at index[offsets[m]:offsets[m+1]],
  // cu_seqlens[m] (B+1,) int32, max_seqlen[m], keep[m] (B, T). offsets (M+1,) int64 is on
  // the CPU whatever the device: the caller splits index without another device read.
  m.def(
      "gate_plan(Tensor logits, Tensor lengths, float threshold=0.5) -> "
      "(Tensor index, Tensor cu_seqlens, Tensor max_seqlen, Tensor keep, Tensor offsets)");
  // residual + scale * y, y = values (N, D) scattered to the rows `index` of residual's
  // flattened (M, D) view, zeros elsewhere. index entries must be distinct (checked).
  m.def("scatter_pad(Tensor values, Tensor index, Tensor residual, float scale=1.0) -> Tensor");
  // The same add in place: residual[index[n]] += scale * values[n]; other rows untouched.
  m.def(
      "scatter_add_(Tensor(a!) residual, Tensor values, Tensor index, float scale=1.0) -> ()");
  // A new (size) tensor, (..., D): values at the rows `index`, zeros elsewhere; every row is
  // written once. index entries must be distinct (checked).
  m.def("scatter_rows(Tensor values, Tensor index, SymInt[] size) -> Tensor");
  // masks (R, M) bool -> perm (R,) putting rows with equal masks together (groups ordered by
  // mask, rows in original order inside a group), offsets (G+1,), inverse (R,) of perm.
  m.def("group_rows(Tensor masks) -> (Tensor perm, Tensor offsets, Tensor inverse)");
  // Self-attention inside each packed sequence: q, k, v (N, H, Dh), cu_seqlens int32 (B+1),
  // max_seqlen an upper bound of the longest sequence. Returns out (N, H, Dh) and the
  // log-sum-exp of the scaled scores (H, N) for the backward, float32 (float64 for float64).
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, "
      "float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens, int max_seqlen, float scale) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
