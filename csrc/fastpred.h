// Declarations shared by the C++ sources of fastpred._C.
//
// Operators (schemas in ops.cpp, namespace `fastpred`; Python wrappers and fake
// kernels in fastpred/backends/csrc.py):
//   corr_ema_             Eq. 19 in place, one triangle computed, mirrored   CPU, CUDA
//   fold_                 Eq. 19's fold of a step's moments, judged by them  CPU
//   install_              W <- new where new is all finite, else kept          CPU
//   eigh                  symmetric eigendecomposition (LAPACK syevd)        CPU
//   rebuild               W = U diag(p) U^T, p = eig_map(s) (Eq. 18)         CPU, CUDA
//   syevd_                cuSOLVER Xsyevd matrix by matrix, caller's workspace  CUDA
//   syevd_batched_        cuSOLVER XsyevBatched (>= 11.7.1), caller's workspace CUDA
//   syevd_workspace_size  device and host bytes the two above need             CUDA
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "build_info.h"
#include "eig_map.h"

namespace fastpred {

// Parses "relative" / "absolute"; TORCH_CHECK names the accepted values.
EpsMode parse_eps_mode(c10::string_view eps_mode);

// The checks every device's fastpred::rebuild makes on (s, u): shapes and dtypes.
void check_rebuild_args(const at::Tensor& s, const at::Tensor& u);

// The checks every device's fastpred::corr_ema_ makes before writing anything:
// shapes, dtypes and devices of corr, x, weight (0-dim, on corr's device or the CPU)
// and mean.
void check_corr_ema_args(const at::Tensor& corr, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& mean);

}  // namespace fastpred
