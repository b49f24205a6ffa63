// CUDA implementations of corr_ema_ and rebuild: tensor logic and cuBLAS here,
// the kernels in kernels.cu.
//
// Everything is enqueued on torch's current stream; nothing reads device memory
// on the host (the EMA weight may live on the device). For one matrix the
// symmetric products use cuBLAS syrk (one triangle, half a GEMM) and a kernel
// fills the other triangle; for a stack, one batched GEMM.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>

#include "../fastpred.h"
#include "kernels.h"

namespace fastpred {
namespace {

using at::Tensor;

// Column-major lower triangle of alpha * A A^T into c, A column-major (n x k,
// lda n), i.e. a row-major (k, n) tensor: the row-major upper triangle of
// alpha * a^T a. torch's handle, bound to the current stream.
void syrk(const Tensor& a, int64_t n, int64_t k, const Tensor& c, double alpha) {
  TORCH_CHECK(n <= INT_MAX && k <= INT_MAX, "fastpred: dimension exceeds cuBLAS's int interface");
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const int ni = static_cast<int>(n), ki = static_cast<int>(k);
  if (a.scalar_type() == at::kFloat) {
    const float al = static_cast<float>(alpha), be = 0.f;
    TORCH_CUDABLAS_CHECK(cublasSsyrk(handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, ni, ki, &al,
                                     a.const_data_ptr<float>(), ni, &be, c.mutable_data_ptr<float>(), ni));
  } else {
    const double al = alpha, be = 0.;
    TORCH_CUDABLAS_CHECK(cublasDsyrk(handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, ni, ki, &al,
                                     a.const_data_ptr<double>(), ni, &be, c.mutable_data_ptr<double>(), ni));
  }
}

void corr_ema_cuda(const Tensor& corr, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& mean) {
  check_corr_ema_args(corr, x, weight, mean);  // before anything is written
  // The mean kernel writes through a raw pointer.
  TORCH_CHECK(!mean.has_value() || mean->is_contiguous(), "fastpred::corr_ema_: on CUDA, mean must be contiguous");
  c10::cuda::CUDAGuard guard(corr.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t d = corr.size(-1), n = x.size(-2);
  const int64_t batch = corr.numel() / std::max<int64_t>(1, d * d);
  const Tensor xf = x.to(at::kFloat).contiguous();  // (..., N, d)
  // A device weight is read by the kernels; a CPU one is a kernel argument.
  const Tensor w_dev = weight.is_cpu() ? Tensor() : weight.to(at::kFloat);
  const float w_host = weight.is_cpu() ? weight.item<float>() : 0.f;
  const float* w_ptr = w_dev.defined() ? w_dev.const_data_ptr<float>() : nullptr;
  if (d > 0 && batch > 0) {
    Tensor out = corr.is_contiguous() ? corr : corr.contiguous();
    Tensor g;
    bool full = true;
    if (batch == 1) {
      g = at::empty({d, d}, xf.options());
      syrk(xf, d, n, g, 1.0);  // x (N, d) row-major is column-major (d, N): one triangle of x^T x
      full = false;
    } else {
      Tensor x3 = xf.view({batch, n, d});
      g = at::matmul(x3.mT(), x3);  // (batch, d, d)
    }
    cuda::blend(out.mutable_data_ptr<float>(), g.const_data_ptr<float>(), d, batch, static_cast<float>(n), full,
                w_ptr, w_host, stream);
    if (!out.is_same(corr)) corr.copy_(out);
  }
  if (mean.has_value()) {
    const Tensor batch_mean = xf.mean(-2).contiguous();  // (..., d)
    if (batch_mean.numel() > 0) {
      cuda::lerp_vector(mean->mutable_data_ptr<float>(), batch_mean.const_data_ptr<float>(), batch_mean.numel(),
                        w_ptr, w_host, stream);
    }
  }
}

Tensor rebuild_cuda(const Tensor& s, const Tensor& u, double eps, double power, c10::string_view eps_mode,
                    double min_eig) {
  const EpsMode mode = parse_eps_mode(eps_mode);
  check_rebuild_args(s, u);
  TORCH_CHECK(s.device() == u.device(), "fastpred::rebuild: s is on ", s.device(), ", u on ", u.device());
  c10::cuda::CUDAGuard guard(u.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t d = u.size(-1);
  Tensor w = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  if (w.numel() == 0) return w;
  const int64_t batch = u.numel() / (d * d);
  const bool nonneg = nonnegative_map(eps, mode, min_eig);
  const Tensor s2 = s.reshape({batch, d}).contiguous();
  const Tensor u3 = u.reshape({batch, d, d});
  Tensor w3 = w.view({batch, d, d});
  Tensor f = at::empty({batch, d}, s.options());  // sqrt(p), or p
  if (u.scalar_type() == at::kFloat) {
    cuda::eig_map<float>(s2.const_data_ptr<float>(), f.mutable_data_ptr<float>(), d, batch, eps, power,
                         mode == EpsMode::kRelative, min_eig, nonneg, stream);
  } else {
    cuda::eig_map<double>(s2.const_data_ptr<double>(), f.mutable_data_ptr<double>(), d, batch, eps, power,
                          mode == EpsMode::kRelative, min_eig, nonneg, stream);
  }
  // r[b][j][i] = u[b][i][j] f[b][j]: the column-major matrix U diag(f).
  Tensor r = at::empty({batch, d, d}, u.options());
  at::mul_out(r, u3.mT(), f.unsqueeze(-1));
  if (nonneg && batch == 1) {
    syrk(r.view({d, d}), d, d, w3, 1.0);  // V V^T, one triangle
  } else if (nonneg) {
    at::matmul_out(w3, r.mT(), r);  // V V^T
  } else {
    at::matmul_out(w3, r.mT(), u3.mT());  // (U diag p) U^T
  }
  if (u.scalar_type() == at::kFloat) {
    cuda::mirror_upper<float>(w3.mutable_data_ptr<float>(), d, batch, stream);
  } else {
    cuda::mirror_upper<double>(w3.mutable_data_ptr<double>(), d, batch, stream);
  }
  return w;
}

}  // namespace

std::string cuda_kernel_image_error() { return cuda::kernel_image_error(); }

TORCH_LIBRARY_IMPL(fastpred, CUDA, m) {
  m.impl("corr_ema_", &corr_ema_cuda);
  m.impl("rebuild", &rebuild_cuda);
}

}  // namespace fastpred
