// CPU kernels of corr_ema_, eigh and rebuild.
//
// Where they differ from the torch reference (fastpred/backends/reference.py):
//  * x^T x and V V^T are symmetric: only row panels of the lower triangle are
//    multiplied (BLAS gemm on sub-blocks, about 5/8 of a full product at four
//    panels) and the strict upper triangle is mirrored from the lower one, so
//    results are exactly symmetric.
//  * eigh calls LAPACK syevd directly with a workspace cached per thread and
//    size, into the eigenvector buffer it returns (no workspace query, no
//    allocation of work arrays, no info tensor per call).
// The BLAS/LAPACK routines are those torch itself links (MKL in the x86 wheels,
// which export sgemm_/ssyevd_ from libtorch_cpu.so). They are declared weak: on a
// torch build that does not export them the pointers are null and the same
// mathematics runs through ATen instead (see has_native_lapack()).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/lerp.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "fastpred.h"

extern "C" {
// Fortran BLAS/LAPACK (LP64), the calling convention ATen uses for them.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
void ssyevd_(const char* jobz, const char* uplo, const int* n, float* a, const int* lda, float* w,
             float* work, const int* lwork, int* iwork, const int* liwork, int* info)
    __attribute__((weak));
void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
             double* work, const int* lwork, int* iwork, const int* liwork, int* info)
    __attribute__((weak));
}

namespace fastpred {
namespace {

using at::Tensor;

template <typename T>
struct Lapack;

template <>
struct Lapack<float> {
  static bool available() { return sgemm_ != nullptr && ssyevd_ != nullptr; }
  static void gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda,
                   const float* b, int ldb, float beta, float* c, int ldc) {
    sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
  static void syevd(int n, float* a, float* w, float* work, int lwork, int* iwork, int liwork, int* info) {
    ssyevd_("V", "U", &n, a, &n, w, work, &lwork, iwork, &liwork, info);
  }
};

template <>
struct Lapack<double> {
  static bool available() { return dgemm_ != nullptr && dsyevd_ != nullptr; }
  static void gemm(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a, int lda,
                   const double* b, int ldb, double beta, double* c, int ldc) {
    dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
  static void syevd(int n, double* a, double* w, double* work, int lwork, int* iwork, int liwork, int* info) {
    dsyevd_("V", "U", &n, a, &n, w, work, &lwork, iwork, &liwork, info);
  }
};

void check_int32(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "fastpred: ", what, " = ", v,
              " exceeds the 32-bit BLAS/LAPACK interface");
}

// Rows per panel of the lower triangle. One panel is a full gemm; k panels cost
// (k + 1) / (2k) of its flops, but thin panels run below gemm's peak. Measured
// with MKL on two threads: d = 256 -> 2 panels (0.30 ms vs 0.37 ms for addmm at
// N = 512), d = 1024 -> 4 panels (19 vs 23 ms at N = 2048); thinner was slower.
int64_t panel_rows(int64_t n) {
  if (n <= 160) return n;
  return std::max<int64_t>(128, (n + 3) / 4);
}

// Copies the strict lower triangle of the row-major n x n matrix c onto its
// strict upper triangle, in 32 x 32 tiles (the source is read column-wise).
template <typename T>
void mirror_lower(T* c, int64_t n) {
  constexpr int64_t kTile = 32;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t i0 = ti * kTile, i1 = std::min(n, i0 + kTile);
      for (int64_t j0 = i0; j0 < n; j0 += kTile) {
        const int64_t j1 = std::min(n, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) c[i * n + j] = c[j * n + i];
        }
      }
    }
  });
}

// Row-major c (n x n) <- beta * c + alpha * P with P[i][j] = sum_r a[r][i] b[r][j],
// a and b row-major (k x n): P = a^T b, assumed symmetric (a == b, or a^T b
// symmetric by construction). Only the lower triangle is multiplied, panel by
// panel; the upper one is mirrored. beta == 0 ignores c's old values (BLAS), NaN
// included.
template <typename T>
void symmetric_product(int64_t n, int64_t k, T alpha, const T* a, const T* b, T beta, T* c) {
  // Column-major, a is A (n x k, lda n) and P = A B^T. Row-major rows [r0, r1),
  // columns [0, r1) of c are column-major rows [0, r1), columns [r0, r1).
  const int64_t rows = panel_rows(n);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows);
    Lapack<T>::gemm("N", "T", static_cast<int>(r1), static_cast<int>(r1 - r0), static_cast<int>(k), alpha, a,
                    static_cast<int>(n), b + r0, static_cast<int>(n), beta, c + r0 * n, static_cast<int>(n));
  }
  mirror_lower(c, n);
}

// ----------------------------------------------------------------- corr_ema_
void corr_ema_cpu(const Tensor& corr, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& mean) {
  check_corr_ema_args(corr, x, weight, mean);  // before anything is written
  const int64_t d = corr.size(-1), n = x.size(-2);
  const int64_t batch = corr.numel() / std::max<int64_t>(1, d * d);
  const double w = weight.item<double>();  // on the CPU (checked)
  const Tensor xf = x.to(at::kFloat).contiguous();  // (..., N, d)
  if (d > 0 && batch > 0) {
    check_int32(std::max(d, n), "dimension");
    Tensor out = corr.is_contiguous() ? corr : corr.contiguous();
    if (Lapack<float>::available()) {
      const float beta = static_cast<float>(1.0 - w), alpha = static_cast<float>(w / n);
      const float* xp = xf.const_data_ptr<float>();
      float* cp = out.mutable_data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b) {
        symmetric_product<float>(d, n, alpha, xp + b * n * d, xp + b * n * d, beta, cp + b * d * d);
      }
    } else {
      Tensor c3 = out.view({batch, d, d});
      Tensor x3 = xf.view({batch, n, d});
      c3.baddbmm_(x3.mT(), x3, 1.0 - w, w / n);
    }
    if (!out.is_same(corr)) corr.copy_(out);
  }
  if (mean.has_value()) {
    const Tensor batch_mean = xf.mean(-2);  // (..., d)
    if (w == 1.0) {
      mean->copy_(batch_mean);  // the first update overwrites, whatever mean held (NaN included)
    } else {
      mean->lerp_(batch_mean, w);
    }
  }
}

// ---------------------------------------------------------------------- eigh
// Work arrays of syevd for the last size seen, one set per thread and dtype
// (LAPACK's optimal sizes, queried once per size).
template <typename T>
struct SyevdWorkspace {
  int n = -1;
  std::vector<T> work;
  std::vector<int> iwork;

  void ensure(int size, T* a, T* w) {
    if (size == n) return;
    T work_query = 0;
    int iwork_query = 0, info = 0;
    Lapack<T>::syevd(size, a, w, &work_query, -1, &iwork_query, -1, &info);
    TORCH_INTERNAL_ASSERT(info == 0, "syevd workspace query failed, info = ", info);
    work.resize(std::max<int64_t>(1, static_cast<int64_t>(work_query)));
    iwork.resize(std::max(1, iwork_query));
    n = size;
  }
};

template <typename T>
void syevd_stack(T* vecs, T* vals, int64_t batch, int64_t n) {
  thread_local SyevdWorkspace<T> ws;
  const int ni = static_cast<int>(n);
  ws.ensure(ni, vecs, vals);
  for (int64_t b = 0; b < batch; ++b) {
    int info = 0;
    Lapack<T>::syevd(ni, vecs + b * n * n, vals + b * n, ws.work.data(), static_cast<int>(ws.work.size()),
                     ws.iwork.data(), static_cast<int>(ws.iwork.size()), &info);
    TORCH_INTERNAL_ASSERT(info >= 0, "syevd: illegal argument ", -info);
    TORCH_CHECK_LINALG(info == 0, "fastpred::eigh: syevd did not converge for matrix ", b, " (info = ", info,
                       ")");
  }
}

std::tuple<Tensor, Tensor> eigh_cpu(const Tensor& a) {
  TORCH_CHECK(a.dim() >= 2 && a.size(-1) == a.size(-2), "fastpred::eigh: a must be (..., n, n), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "fastpred::eigh: a must be float32 or float64, got ", a.scalar_type());
  const int64_t n = a.size(-1);
  const int64_t batch = n == 0 ? 0 : a.numel() / (n * n);
  if (!Lapack<float>::available() || !Lapack<double>::available()) {
    auto [vals, vecs] = at::linalg_eigh(a);
    return {vals, vecs};
  }
  check_int32(n * n, "n * n");
  // Row-major storage of a is the column-major matrix a^T: its upper triangle is
  // a's lower one (uplo 'U'), and column j of the column-major result, i.e. row j
  // of the buffer, is eigenvector j. Returning buffer.mT gives eigenvectors in
  // columns with torch.linalg.eigh's strides, without a copy.
  Tensor buffer = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  buffer.copy_(a);
  Tensor vals = at::empty(a.sizes().slice(0, a.dim() - 1), a.options());
  if (batch > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastpred_eigh", [&] {
      syevd_stack<scalar_t>(buffer.mutable_data_ptr<scalar_t>(), vals.mutable_data_ptr<scalar_t>(), batch, n);
    });
  }
  return {vals, buffer.mT()};
}

// ------------------------------------------------------------------- rebuild
template <typename T>
void eig_map_row(const T* s, int64_t d, double eps, double power, EpsMode mode, double min_eig, T* p) {
  // EigMap.__call__ (fastpred/eig_map.py) step by step, in T: clamp(s, 0), amax (NaN propagates).
  T s_max = T(0);
  bool first = true;
  for (int64_t j = 0; j < d; ++j) {
    const T v = s[j] < T(0) ? T(0) : s[j];
    if (first || v > s_max || std::isnan(v)) s_max = v;
    first = false;
    if (std::isnan(s_max)) break;
  }
  const T tpow = static_cast<T>(power), teps = static_cast<T>(eps), tmin = static_cast<T>(min_eig);
  if (mode == EpsMode::kRelative) {
    const T denom = s_max > T(0) ? s_max : T(1);
    for (int64_t j = 0; j < d; ++j) {
      const T v = s[j] < T(0) ? T(0) : s[j];
      const T q = pow_like_aten<T>(v / denom, tpow) + teps;
      p[j] = q < tmin ? tmin : q;
    }
  } else {
    const T boost = teps * s_max;
    for (int64_t j = 0; j < d; ++j) {
      const T v = s[j] < T(0) ? T(0) : s[j];
      p[j] = pow_like_aten<T>(v, tpow) + boost;
    }
  }
}

// r (row-major d x d) with r[j][i] = u[i][j] * f[j] (f null: 1). u is read
// through its strides (su0 along rows, su1 along columns): contiguous when u is
// column-major, as eigh returns it.
template <typename T>
void scaled_transpose(const T* u, int64_t su0, int64_t su1, const T* f, int64_t d, T* r) {
  at::parallel_for(0, d, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const T fj = f ? f[j] : T(1);
      const T* col = u + j * su1;
      T* row = r + j * d;
      if (su0 == 1) {
        for (int64_t i = 0; i < d; ++i) row[i] = col[i] * fj;
      } else {
        for (int64_t i = 0; i < d; ++i) row[i] = col[i * su0] * fj;
      }
    }
  });
}

template <typename T>
void rebuild_stack(const Tensor& s, const Tensor& u, Tensor& w, double eps, double power, EpsMode mode,
                   double min_eig) {
  const int64_t batch = s.size(0), d = s.size(1);
  const bool nonneg = nonnegative_map(eps, mode, min_eig);
  std::vector<T> p(d), r(d * d), r2;
  const T* sp = s.const_data_ptr<T>();
  const T* up = u.const_data_ptr<T>();
  T* wp = w.mutable_data_ptr<T>();
  const int64_t su0 = u.stride(1), su1 = u.stride(2);
  for (int64_t b = 0; b < batch; ++b) {
    eig_map_row<T>(sp + b * s.stride(0), d, eps, power, mode, min_eig, p.data());
    const T* ub = up + b * u.stride(0);
    if (nonneg) {
      for (auto& v : p) v = std::sqrt(v);
      scaled_transpose<T>(ub, su0, su1, p.data(), d, r.data());  // V^T, V = U diag(sqrt p)
      symmetric_product<T>(d, d, T(1), r.data(), r.data(), T(0), wp + b * d * d);
    } else {
      scaled_transpose<T>(ub, su0, su1, p.data(), d, r.data());  // (U diag p)^T
      const T* ut = ub;                                          // U^T, row-major
      if (su0 != 1 || su1 != d) {
        r2.resize(d * d);
        scaled_transpose<T>(ub, su0, su1, nullptr, d, r2.data());
        ut = r2.data();
      }
      symmetric_product<T>(d, d, T(1), r.data(), ut, T(0), wp + b * d * d);
    }
  }
}

Tensor rebuild_cpu(const Tensor& s, const Tensor& u, double eps, double power, c10::string_view eps_mode,
                   double min_eig) {
  const EpsMode mode = parse_eps_mode(eps_mode);
  check_rebuild_args(s, u);
  const int64_t d = u.size(-1);
  Tensor w = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  if (w.numel() == 0) return w;
  const int64_t batch = u.numel() / (d * d);
  if (!Lapack<float>::available() || !Lapack<double>::available()) {
    // ATen route, the reference's own formula.
    Tensor p = at::empty_like(s);
    Tensor s2 = s.reshape({batch, d}).contiguous();
    Tensor p2 = p.view({batch, d});
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "fastpred_eig_map", [&] {
      for (int64_t b = 0; b < batch; ++b) {
        eig_map_row<scalar_t>(s2.const_data_ptr<scalar_t>() + b * d, d, eps, power, mode, min_eig,
                              p2.mutable_data_ptr<scalar_t>() + b * d);
      }
    });
    if (nonnegative_map(eps, mode, min_eig)) {
      Tensor v = at::mul(u, p.sqrt().unsqueeze(-2));
      w.copy_(at::matmul(v, v.mT()));
    } else {
      w.copy_(at::matmul(at::mul(u, p.unsqueeze(-2)), u.mT()));
    }
    return w;
  }
  check_int32(d * d, "d * d");
  Tensor s2 = s.reshape({batch, d}).contiguous();
  Tensor u3 = u.reshape({batch, d, d});
  Tensor w3 = w.view({batch, d, d});
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "fastpred_rebuild", [&] {
    rebuild_stack<scalar_t>(s2, u3, w3, eps, power, mode, min_eig);
  });
  return w;
}

}  // namespace

bool has_native_lapack() { return Lapack<float>::available() && Lapack<double>::available(); }

TORCH_LIBRARY_IMPL(fastpred, CPU, m) {
  m.impl("corr_ema_", &corr_ema_cpu);
  m.impl("eigh", &eigh_cpu);
  m.impl("rebuild", &rebuild_cpu);
}

}  // namespace fastpred
