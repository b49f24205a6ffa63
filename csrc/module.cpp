// The Python module fastpred._C. Importing it runs the operator registrations
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL in the other sources); the functions here
// only report how the module was built, for tests and error messages.
#include <pybind11/pybind11.h>

#include "build_info.h"

namespace fastpred {

#ifndef FASTPRED_WITH_CUDA
bool built_with_cuda() { return false; }
int64_t cusolver_version() { return 0; }
bool has_syevd_batched() { return false; }
std::string cuda_kernel_image_error() { return "fastpred._C was built without CUDA"; }
#endif

}  // namespace fastpred

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpred's compiled operators (torch.ops.fastpred.*); see fastpred/backends/csrc.py";
  m.def("built_with_cuda", &fastpred::built_with_cuda,
        "Whether the CUDA kernels and the cuSOLVER binding were compiled and linked in.");
  m.def("cusolver_version", &fastpred::cusolver_version,
        "cuSOLVER loaded at run time, MAJOR*1000 + MINOR*100 + PATCH (0 without CUDA).");
  m.def("has_syevd_batched", &fastpred::has_syevd_batched,
        "Whether cusolverDnXsyevBatched (cuSOLVER >= 11.7.1) can be called.");
  m.def("cuda_kernel_image_error", &fastpred::cuda_kernel_image_error,
        "'' when the CUDA kernels can run on the current GPU, else why not.");
  m.def("has_native_lapack", &fastpred::has_native_lapack,
        "Whether the CPU kernels call BLAS/LAPACK directly (else they use ATen).");
}
