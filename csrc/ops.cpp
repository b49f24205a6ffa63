// Operator schemas of the `fastpred` namespace (the one TORCH_LIBRARY block).
//
// Kernels register per device with TORCH_LIBRARY_IMPL: cpu_ops.cpp (CPU),
// cuda/kernels.cu and cuda/cusolver.cpp (CUDA). Fake (meta) kernels for
// torch.compile live next to the Python wrappers in fastpred/backends/csrc.py.
// Triton kernels register other names in this namespace from Python
// (`fastpred::triton_*`, a torch.library fragment): the names here carry no prefix.
#include <torch/library.h>

#include "fastpred.h"

namespace fastpred {

EpsMode parse_eps_mode(c10::string_view eps_mode) {
  if (eps_mode == "relative") return EpsMode::kRelative;
  if (eps_mode == "absolute") return EpsMode::kAbsolute;
  TORCH_CHECK(false, "eps_mode must be 'relative' or 'absolute', got '", std::string(eps_mode), "'");
}

void check_rebuild_args(const at::Tensor& s, const at::Tensor& u) {
  TORCH_CHECK(u.dim() >= 2 && u.size(-1) == u.size(-2), "fastpred::rebuild: u must be (..., d, d), got ",
              u.sizes());
  TORCH_CHECK(s.dim() == u.dim() - 1 && s.sizes() == u.sizes().slice(0, u.dim() - 1),
              "fastpred::rebuild: s must be (..., d) with u's leading shape, got s ", s.sizes(), " and u ",
              u.sizes());
  TORCH_CHECK(s.scalar_type() == u.scalar_type() &&
                  (u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble),
              "fastpred::rebuild: s and u must both be float32 or both float64, got ", s.scalar_type(), " and ",
              u.scalar_type());
}

void check_corr_ema_args(const at::Tensor& corr, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& mean) {
  constexpr const char* op = "fastpred::corr_ema_";
  TORCH_CHECK(corr.dim() >= 2 && corr.size(-1) == corr.size(-2), op, ": corr must be (..., d, d), got ",
              corr.sizes());
  TORCH_CHECK(corr.scalar_type() == at::kFloat, op, ": corr must be float32, got ", corr.scalar_type());
  TORCH_CHECK(x.dim() == corr.dim() && x.size(-1) == corr.size(-1), op,
              ": x must be (..., N, d) with corr's leading shape, got x ", x.sizes(), " and corr ", corr.sizes());
  TORCH_CHECK(x.sizes().slice(0, x.dim() - 2) == corr.sizes().slice(0, corr.dim() - 2), op,
              ": x and corr must have the same leading (batch) shape, got ", x.sizes(), " and ", corr.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.device() == corr.device(), op, ": x is on ", x.device(), ", corr on ", corr.device());
  TORCH_CHECK(x.size(-2) > 0, op, ": x has no rows (N = 0)");
  TORCH_CHECK(weight.dim() == 0, op, ": weight must be a 0-dim tensor, got shape ", weight.sizes());
  TORCH_CHECK(weight.is_cpu() || weight.device() == corr.device(), op, ": weight must be on ", corr.device(),
              " or the CPU, got ", weight.device());
  if (mean.has_value()) {
    TORCH_CHECK(mean->sizes() == corr.sizes().slice(0, corr.dim() - 1) && mean->scalar_type() == at::kFloat &&
                    mean->device() == corr.device(),
                op, ": mean must be a float32 tensor of shape ", corr.sizes().slice(0, corr.dim() - 1), " on ",
                corr.device(), ", got ", mean->scalar_type(), " ", mean->sizes(), " on ", mean->device());
  }
}

}  // namespace fastpred

TORCH_LIBRARY(fastpred, m) {
  // corr <- corr + weight * (x^T x / N - corr) (Eq. 19); mean (if given) gets the
  // same EMA of the batch mean. weight: 0-dim float tensor, on corr's device (read
  // there, no host sync) or on the CPU. weight == 1 overwrites corr, NaN included.
  m.def("corr_ema_(Tensor(a!) corr, Tensor x, Tensor weight, Tensor(b!)? mean=None) -> ()");
  // The fold of one step's summed moments into F (Eq. 19), judged by those moments:
  // usable = every entry of gram, total, count finite; per F, weight = usable && count > 0
  // ? (first ? 1 : 1 - rho) : 0; corr <- corr + weight (gram / count - corr), mean likewise.
  // Returns the weights (...) and the 0-dim bool usable. CPU (csrc/fold_cpu.cpp).
  m.def(
      "fold_(Tensor(a!) corr, Tensor gram, Tensor total, Tensor count, Tensor first, float rho, "
      "Tensor(b!)? mean=None) -> (Tensor weight, Tensor usable)");
  // weight <- new where every entry of new is finite (else kept whole); returns the 0-dim
  // bool "installed". CPU (csrc/fold_cpu.cpp).
  m.def("install_(Tensor(a!) weight, Tensor new) -> Tensor");
  // Eigenvalues (ascending) and eigenvectors of the lower triangle of a symmetric
  // (..., n, n) matrix, as torch.linalg.eigh (eigenvectors in columns,
  // column-major strides).
  m.def("eigh(Tensor a) -> (Tensor eigenvalues, Tensor eigenvectors)");
  // W = U diag(p) U^T, p = eig_map(s; eps, power, eps_mode, min_eig) (Eq. 18).
  m.def("rebuild(Tensor s, Tensor u, float eps, float power, str eps_mode, float min_eig) -> Tensor");
  // cuSOLVER eigensolvers in place on a stack a (B, n, n) (row-major storage; the
  // lower triangle is read; row j of a[b] receives eigenvector j), w (B, n)
  // eigenvalues, info (B,) int32 left on the device. The caller owns (and caches)
  // the workspaces: work_device (uint8, on a's device), work_host (uint8, CPU).
  m.def(
      "syevd_(Tensor(a!) a, Tensor(b!) w, Tensor(c!) info, Tensor(d!) work_device, "
      "Tensor(e!) work_host) -> ()");
  m.def(
      "syevd_batched_(Tensor(a!) a, Tensor(b!) w, Tensor(c!) info, Tensor(d!) work_device, "
      "Tensor(e!) work_host) -> ()");
  // [device bytes, host bytes] that syevd_ (batched=False) or syevd_batched_ needs for a, w.
  m.def("syevd_workspace_size(Tensor a, Tensor w, bool batched) -> int[]");
}
