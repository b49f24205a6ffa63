// Launchers of fastpred's CUDA kernels (kernels.cu), called by ops_cuda.cpp.
//
// Plain pointers and sizes only: kernels.cu includes no ATen header, so nvcc
// compiles it in seconds; the tensor logic lives in the C++ sources. Each launcher
// enqueues on `stream` and checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastpred::cuda {

// corr[b] <- lerp(corr[b], G[b] / n, w) for b < batch, corr and g row-major
// (batch, d, d). `full`: g holds whole matrices; else only the upper triangle
// r <= c of each (cuBLAS syrk's column-major lower one). w = *w_dev when w_dev is
// not null, else w_host; w == 1 overwrites (old NaN ignored).
void blend(float* corr, const float* g, int64_t d, int64_t batch, float n, bool full, const float* w_dev,
           float w_host, cudaStream_t stream);

// mean <- lerp(mean, batch_mean, w), count elements.
void lerp_vector(float* mean, const float* batch_mean, int64_t count, const float* w_dev, float w_host,
                 cudaStream_t stream);

// f[b] = eig_map(s[b]) for each of `batch` rows of length d (fastpred.eig_map.EigMap),
// or its square root with take_sqrt.
template <typename T>
void eig_map(const T* s, T* f, int64_t d, int64_t batch, double eps, double power, bool relative, double min_eig,
             bool take_sqrt, cudaStream_t stream);

// In place, for each of `batch` row-major (d, d) matrices: the strict lower
// triangle becomes the mirror of the upper one.
template <typename T>
void mirror_upper(T* m, int64_t d, int64_t batch, cudaStream_t stream);

// "" when this module holds device code for the current GPU, else the CUDA error.
const char* kernel_image_error();

}  // namespace fastpred::cuda
