// dash_kernels._C: registers the CUDA kernels as torch operators (namespace dash_kernels_cuda), reached from
// Python through torch.ops; the fake (meta) kernels and autograd live in dash_kernels/ops/*/op.py.
#include <Python.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

// compute capabilities (major * 10 + minor) this build has machine code for; setup.py defines it
#ifndef DASH_BUILT_ARCHS
#define DASH_BUILT_ARCHS 90
#endif

namespace dash {
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& w,
                                                                  c10::IntArrayRef windows, c10::IntArrayRef sinks,
                                                                  double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_attention_bwd(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& o, const at::Tensor& lse, c10::IntArrayRef windows, c10::IntArrayRef sinks, double scale);
int64_t shared_memory_bytes(int64_t head_dim);

std::vector<int64_t> built_archs() { return {DASH_BUILT_ARCHS}; }
}  // namespace dash

TORCH_LIBRARY(dash_kernels_cuda, m) {
  m.def("mixed_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor w, int[] windows, int[] sinks, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mixed_attention_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor w, Tensor o, Tensor lse, int[] windows, "
        "int[] sinks, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("shared_memory_bytes(int head_dim) -> int", &dash::shared_memory_bytes);
  m.def("built_archs() -> int[]", &dash::built_archs);
}

TORCH_LIBRARY_IMPL(dash_kernels_cuda, CUDA, m) {
  m.impl("mixed_attention_fwd", &dash::mixed_attention_fwd);
  m.impl("mixed_attention_bwd", &dash::mixed_attention_bwd);
}

// An importable module (the operators register when the library loads).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "DASH CUDA kernels (see torch.ops.dash_kernels_cuda)", -1, nullptr};
  return PyModule_Create(&module);
}
