// The eigenvalue map's scalar pieces (fastpred.eig_map.EigMap), shared by the CPU and
// CUDA kernels. No ATen headers: kernels.cu includes it.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FASTPRED_HOST_DEVICE __host__ __device__
#else
#define FASTPRED_HOST_DEVICE
#endif

namespace fastpred {

enum class EpsMode { kRelative, kAbsolute };

// Whether eig_map can only return p >= 0 for these settings (decided without
// data), so that W = V V^T with V = U diag(sqrt p): EigMap.nonnegative.
inline bool nonnegative_map(double eps, EpsMode mode, double min_eig) {
  return mode == EpsMode::kRelative ? min_eig >= 0 : eps >= 0;
}

// x ** power with the special cases ATen's pow(Tensor, Scalar) takes, so that
// results match the reference to the last bit for the common powers.
template <typename T>
FASTPRED_HOST_DEVICE inline T pow_like_aten(T x, T power) {
  using std::pow;
  using std::sqrt;
  if (power == T(0.5)) return sqrt(x);
  if (power == T(1)) return x;
  if (power == T(2)) return x * x;
  return pow(x, power);
}

}  // namespace fastpred
