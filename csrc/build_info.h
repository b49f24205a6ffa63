// What fastpred._C was built with, for module.cpp (kept free of ATen headers so
// that the module's pybind11 source compiles quickly).
#pragma once

#include <cstdint>
#include <string>

namespace fastpred {

// Implemented in cuda/cusolver.cpp when built with CUDA, else in module.cpp.
bool built_with_cuda();
// cuSOLVER version as MAJOR*1000 + MINOR*100 + PATCH of the library loaded at
// run time (0 without CUDA).
int64_t cusolver_version();
// Whether cusolverDnXsyevBatched can be called (symbol present, >= 11.7.1).
bool has_syevd_batched();

// "" when this module holds device code for the current GPU, else why not (the
// CUDA error text, e.g. no kernel image for this architecture).
std::string cuda_kernel_image_error();

// Whether this process resolved the LAPACK/BLAS symbols the CPU kernels call
// directly (cpu_ops.cpp); without them the CPU ops fall back to ATen.
bool has_native_lapack();

}  // namespace fastpred
