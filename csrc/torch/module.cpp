// The Python module sq_kernels._C. Importing it runs the TORCH_LIBRARY_IMPL blocks of the other
// files in this folder, which register the CUDA kernels for the sq_kernels::* ops defined in Python.
#include <torch/extension.h>

#include <string>
#include <vector>

static std::vector<std::string> built_archs() {
  std::vector<std::string> archs;
#ifdef SQK_HAS_SM80
  archs.push_back("sm80-family (CUTLASS 2.x)");
#endif
#ifdef SQK_HAS_SM90
  archs.push_back("sm90a (CUTLASS 3.x)");
#endif
  return archs;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sq-kernels CUDA kernels; use them through sq_kernels.ops";
  m.def("built_archs", &built_archs, "kernel families compiled into this extension");
}
