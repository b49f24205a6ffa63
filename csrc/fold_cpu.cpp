// CPU kernels of fold_ and install_: the guards of a DirectPred step, each one pass.
//
// fold_ (Eq. 19 and its guards, the torch reference is fastpred/backends/reference.py
// fold_): the step's summed moments are judged (every entry of gram, total, count
// finite), the weight of each F decided (1 for its first fold, 1 - rho after, 0 when
// the step is not usable or that F received no sample), and the EMA
// F <- F + w (G / n - F) applied, with the mean's when asked. The judgement reads G
// once (an integer test of the exponent bits, which vectorizes); the EMA reads G and F
// once and writes F, only when the step is usable, so a skipped step writes nothing.
//
// install_ (the install guard of a rebuild): W <- new when every entry of new is
// finite, else W is kept whole.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastpred.h"

namespace fastpred {
namespace {

using at::Tensor;

// Whether every entry of a float32 array is finite: the exponent bits of Inf and NaN
// are all ones. An integer OR-reduction, in parallel chunks.
bool all_finite(const float* p, int64_t n) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(p);
    uint32_t any = 0;
    for (int64_t i = i0; i < i1; ++i) any |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
    if (any) bad = true;
  });
  return !bad;
}

bool all_finite(const double* p, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(p[i]);
  return ok;
}

// torch.lerp's formula (ATen/native/Lerp.h): exact at both ends, as the reference's ema_.
inline float lerp(float a, float b, float w) {
  return std::abs(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

// state[i] <- state[i] + w (sum[i] / n - state[i]) for i < len; w == 1 overwrites.
void ema_row(float* state, const float* sum, int64_t len, float n, float w) {
  if (w == 1.0f) {
    for (int64_t i = 0; i < len; ++i) state[i] = sum[i] / n;
  } else {
    for (int64_t i = 0; i < len; ++i) state[i] = lerp(state[i], sum[i] / n, w);
  }
}

void check_contiguous_float(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape && t.is_cpu(),
              "fastpred::fold_: ", name, " must be a contiguous float32 CPU tensor of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

std::tuple<Tensor, Tensor> fold_cpu(const Tensor& corr, const Tensor& gram, const Tensor& total, const Tensor& count,
                                    const Tensor& first, double rho, const std::optional<Tensor>& mean) {
  // Everything checked before anything is written.
  TORCH_CHECK(corr.dim() >= 2 && corr.size(-1) == corr.size(-2), "fastpred::fold_: corr must be (..., d, d), got ",
              corr.sizes());
  const int64_t d = corr.size(-1);
  const auto stack = corr.sizes().slice(0, corr.dim() - 2);
  const auto vec = corr.sizes().slice(0, corr.dim() - 1);
  check_contiguous_float(corr, "corr", corr.sizes());
  check_contiguous_float(gram, "gram", corr.sizes());
  check_contiguous_float(total, "total", vec);
  check_contiguous_float(count, "count", stack);
  if (mean.has_value()) check_contiguous_float(*mean, "mean", vec);
  TORCH_CHECK(first.scalar_type() == at::kBool && first.sizes() == stack && first.is_cpu(),
              "fastpred::fold_: first must be a bool CPU tensor of shape ", stack, ", got ", first.scalar_type(), " ",
              first.sizes());
  TORCH_CHECK(rho >= 0 && rho < 1, "fastpred::fold_: rho must be in [0, 1), got ", rho);
  const int64_t batch = count.numel();
  const float* c = count.const_data_ptr<float>();
  const bool usable = all_finite(gram.const_data_ptr<float>(), gram.numel()) &&
                      all_finite(total.const_data_ptr<float>(), total.numel()) && all_finite(c, batch);
  Tensor weight = at::empty(stack, corr.options());
  Tensor usable_t = at::empty({}, corr.options().dtype(at::kBool));
  usable_t.fill_(usable);
  const Tensor first_c = first.contiguous();
  const bool* f = first_c.const_data_ptr<bool>();
  float* w = weight.mutable_data_ptr<float>();
  // As the reference: the weight 1 - rho is rounded to float32 once.
  const float blend = static_cast<float>(1.0 - rho);
  for (int64_t b = 0; b < batch; ++b) w[b] = usable && c[b] > 0 ? (f[b] ? 1.0f : blend) : 0.0f;
  for (int64_t b = 0; b < batch; ++b) {
    if (w[b] == 0.0f) continue;  // kept: nothing is read or written
    const float n = c[b] < 1.0f ? 1.0f : c[b];
    float* fb = corr.mutable_data_ptr<float>() + b * d * d;
    const float* gb = gram.const_data_ptr<float>() + b * d * d;
    at::parallel_for(0, d, 16, [&](int64_t r0, int64_t r1) {
      ema_row(fb + r0 * d, gb + r0 * d, (r1 - r0) * d, n, w[b]);
    });
    if (mean.has_value()) {
      ema_row(mean->mutable_data_ptr<float>() + b * d, total.const_data_ptr<float>() + b * d, d, n, w[b]);
    }
  }
  return {weight, usable_t};
}

Tensor install_cpu(const Tensor& weight, const Tensor& new_) {
  TORCH_CHECK(weight.sizes() == new_.sizes() && weight.scalar_type() == new_.scalar_type() && weight.is_contiguous() &&
                  new_.is_contiguous() && new_.is_cpu() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble),
              "fastpred::install_: weight and new must be contiguous CPU tensors of one shape and dtype (float32 or "
              "float64), got ",
              weight.scalar_type(), " ", weight.sizes(), " and ", new_.scalar_type(), " ", new_.sizes());
  bool ok;
  if (weight.scalar_type() == at::kFloat) {
    ok = all_finite(new_.const_data_ptr<float>(), new_.numel());
  } else {
    ok = all_finite(new_.const_data_ptr<double>(), new_.numel());
  }
  if (ok && weight.numel() > 0) {
    std::memcpy(weight.mutable_data_ptr(), new_.const_data_ptr(), weight.nbytes());
  }
  Tensor out = at::empty({}, weight.options().dtype(at::kBool));
  out.fill_(ok);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastpred, CPU, m) {
  m.impl("fold_", &fold_cpu);
  m.impl("install_", &install_cpu);
}

}  // namespace fastpred
