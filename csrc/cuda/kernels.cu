// CUDA kernels of corr_ema_ and rebuild (Eq. 19 and Eq. 18): the EMA blend, the
// triangle mirror and the eigenvalue map. Host logic (tensors, cuBLAS) is in
// ops_cuda.cpp; this file includes no ATen header, so nvcc compiles it quickly.
//
// None of them reads device memory on the host: the EMA weight may be a device
// tensor (the predictor decides skips and first updates on the GPU) and the map's
// max is reduced on the device.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cmath>

#include "../eig_map.h"
#include "kernels.h"

namespace fastpred::cuda {
namespace {

constexpr int kTile = 32;     // square tiles of the triangle kernels
constexpr int kTileRows = 8;  // threads per tile column; each covers kTile / kTileRows rows
constexpr int kMapThreads = 256;

// torch.lerp's formula (ATen's lerp kernel), so that results match the
// reference's tensor-weight path; weight == 1 returns `end` exactly (old NaN ignored).
template <typename T>
__device__ __forceinline__ T lerp_like_torch(T self, T end, T weight) {
  if (weight == T(1)) return end;
  return (weight < T(0.5)) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

template <typename T>
__device__ __forceinline__ T load_weight(const T* w_dev, T w_host) {
  return w_dev != nullptr ? *w_dev : w_host;
}

// Tile (blockIdx.y, blockIdx.x) of a symmetric matrix stored in one triangle of g
// (row-major, the upper one r <= c) staged in shared memory so that value(i, j) is
// element (r, c) of the full matrix. With `full`, g holds the whole matrix.
template <typename T>
struct SymmetricTile {
  T (*smem)[kTile + 1];
  bool transposed = false, diagonal = false;

  __device__ void load(const T* g, int64_t d, bool full) {
    const int ty = blockIdx.y, tx = blockIdx.x;
    transposed = !full && ty > tx;  // below the diagonal: read the mirrored tile
    diagonal = !full && ty == tx;
    const int64_t r0 = static_cast<int64_t>(transposed ? tx : ty) * kTile;
    const int64_t c0 = static_cast<int64_t>(transposed ? ty : tx) * kTile;
    for (int i = threadIdx.y; i < kTile; i += kTileRows) {
      const int64_t r = r0 + i, c = c0 + threadIdx.x;
      smem[i][threadIdx.x] = (r < d && c < d) ? g[r * d + c] : T(0);
    }
    __syncthreads();
  }

  __device__ T value(int i, int j) const {
    if (transposed || (diagonal && i > j)) return smem[j][i];
    return smem[i][j];
  }
};

// grid (tiles, tiles, batch), block (kTile, kTileRows).
template <typename T>
__global__ void blend_kernel(T* __restrict__ corr, const T* __restrict__ g, int64_t d, T n, bool full,
                             const T* w_dev, T w_host) {
  __shared__ T smem[kTile][kTile + 1];
  const int64_t b = blockIdx.z;
  SymmetricTile<T> tile{smem};
  tile.load(g + b * d * d, d, full);
  const T w = load_weight(w_dev, w_host);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  for (int i = threadIdx.y; i < kTile; i += kTileRows) {
    const int64_t r = static_cast<int64_t>(blockIdx.y) * kTile + i;
    if (r < d && c < d) {
      T* out = corr + b * d * d + r * d + c;
      *out = lerp_like_torch(*out, tile.value(i, threadIdx.x) / n, w);
    }
  }
}

// Tiles above the diagonal are only read, so blocks never race.
template <typename T>
__global__ void mirror_upper_kernel(T* __restrict__ m, int64_t d) {
  if (blockIdx.y < blockIdx.x) return;
  __shared__ T smem[kTile][kTile + 1];
  T* mb = m + static_cast<int64_t>(blockIdx.z) * d * d;
  SymmetricTile<T> tile{smem};
  tile.load(mb, d, /*full=*/false);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  for (int i = threadIdx.y; i < kTile; i += kTileRows) {
    const int64_t r = static_cast<int64_t>(blockIdx.y) * kTile + i;
    if (r < d && c < d && r > c) mb[r * d + c] = tile.value(i, threadIdx.x);
  }
}

template <typename T>
__global__ void lerp_vector_kernel(T* __restrict__ mean, const T* __restrict__ batch_mean, int64_t count,
                                   const T* w_dev, T w_host) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < count) mean[k] = lerp_like_torch(mean[k], batch_mean[k], load_weight(w_dev, w_host));
}

// One block per row: clamp(s, 0), max over the row (NaN propagates), the map.
template <typename T>
__global__ void eig_map_kernel(const T* __restrict__ s, T* __restrict__ f, int64_t d, T eps, T power, bool relative,
                               T min_eig, bool take_sqrt) {
  __shared__ T partial[kMapThreads];
  const T* sb = s + static_cast<int64_t>(blockIdx.x) * d;
  T* fb = f + static_cast<int64_t>(blockIdx.x) * d;
  T m = T(0);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const T v = sb[j] < T(0) ? T(0) : sb[j];
    m = (v > m || isnan(v)) ? v : m;
  }
  partial[threadIdx.x] = m;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const T o = partial[threadIdx.x + stride], v = partial[threadIdx.x];
      partial[threadIdx.x] = (o > v || isnan(o)) ? o : v;
    }
    __syncthreads();
  }
  const T s_max = partial[0];
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const T v = sb[j] < T(0) ? T(0) : sb[j];
    T p;
    if (relative) {
      const T q = pow_like_aten<T>(v / (s_max > T(0) ? s_max : T(1)), power) + eps;
      p = q < min_eig ? min_eig : q;
    } else {
      p = pow_like_aten<T>(v, power) + eps * s_max;
    }
    fb[j] = take_sqrt ? sqrt(p) : p;
  }
}

// CUDA caps gridDim.z (the batch axis of the triangle kernels) at 65535: larger
// stacks are launched in chunks of at most that many matrices.
constexpr int64_t kMaxGridZ = 65535;

dim3 tile_grid(int64_t d, int64_t batch) {
  const auto tiles = static_cast<unsigned>((d + kTile - 1) / kTile);
  return dim3(tiles, tiles, static_cast<unsigned>(batch));
}

// Calls launch(first, count) for consecutive chunks of the batch, each <= kMaxGridZ.
template <typename Launch>
void for_batch_chunks(int64_t batch, Launch launch) {
  for (int64_t first = 0; first < batch; first += kMaxGridZ) {
    launch(first, std::min(kMaxGridZ, batch - first));
  }
}

}  // namespace

void blend(float* corr, const float* g, int64_t d, int64_t batch, float n, bool full, const float* w_dev,
           float w_host, cudaStream_t stream) {
  for_batch_chunks(batch, [&](int64_t first, int64_t count) {
    blend_kernel<float><<<tile_grid(d, count), dim3(kTile, kTileRows), 0, stream>>>(
        corr + first * d * d, g + first * d * d, d, n, full, w_dev, w_host);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void lerp_vector(float* mean, const float* batch_mean, int64_t count, const float* w_dev, float w_host,
                 cudaStream_t stream) {
  constexpr int threads = 256;
  lerp_vector_kernel<float><<<static_cast<unsigned>((count + threads - 1) / threads), threads, 0, stream>>>(
      mean, batch_mean, count, w_dev, w_host);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void eig_map(const T* s, T* f, int64_t d, int64_t batch, double eps, double power, bool relative, double min_eig,
             bool take_sqrt, cudaStream_t stream) {
  eig_map_kernel<T><<<static_cast<unsigned>(batch), kMapThreads, 0, stream>>>(
      s, f, d, static_cast<T>(eps), static_cast<T>(power), relative, static_cast<T>(min_eig), take_sqrt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void mirror_upper(T* m, int64_t d, int64_t batch, cudaStream_t stream) {
  for_batch_chunks(batch, [&](int64_t first, int64_t count) {
    mirror_upper_kernel<T><<<tile_grid(d, count), dim3(kTile, kTileRows), 0, stream>>>(m + first * d * d, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template void eig_map<float>(const float*, float*, int64_t, int64_t, double, double, bool, double, bool,
                             cudaStream_t);
template void eig_map<double>(const double*, double*, int64_t, int64_t, double, double, bool, double, bool,
                              cudaStream_t);
template void mirror_upper<float>(float*, int64_t, int64_t, cudaStream_t);
template void mirror_upper<double>(double*, int64_t, int64_t, cudaStream_t);

const char* kernel_image_error() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, blend_kernel<float>);
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();  // clear it, so that it is not reported by the next launch check
  return cudaGetErrorString(err);
}

}  // namespace fastpred::cuda
