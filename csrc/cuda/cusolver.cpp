// cuSOLVER eigensolvers for fastpred's GPU eigh: Xsyevd matrix by matrix and
// the batched divide-and-conquer XsyevBatched (cuSOLVER >= 11.7.1, which CuPy
// does not wrap).
//
// Host code only (compiled by the C++ compiler, no device code). The calls are
// asynchronous on torch's current stream: `info` stays on the device, the caller
// (fastpred/eigh_driver.py) inspects it later, so nothing here synchronizes the
// host. The caller also owns the workspaces (cached per shape), so that a steady
// state allocates nothing and can be captured in a CUDA graph.
//
// Handles: one cuSOLVER handle and params object per (thread, device), leased
// from a pool and returned at thread exit (cuSOLVER handles are not thread-safe;
// torch's own pool lives in libtorch_cuda_linalg.so, which torch loads lazily and
// extensions do not link).
//
// XsyevBatched is looked up at run time in the loaded libcusolver, so the module
// also loads against an older cuSOLVER; has_syevd_batched() reports it.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>
#include <dlfcn.h>
#include <library_types.h>
#include <torch/library.h>

#include <climits>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "../fastpred.h"

namespace fastpred {
namespace {

using at::Tensor;

// --------------------------------------------------------------- handles
struct Solver {
  cusolverDnHandle_t handle = nullptr;
  cusolverDnParams_t params = nullptr;
};

class SolverPool {
 public:
  Solver acquire(int device) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& free = free_[device];
      if (!free.empty()) {
        Solver s = free.back();
        free.pop_back();
        return s;
      }
    }
    Solver s;
    TORCH_CUSOLVER_CHECK(cusolverDnCreate(&s.handle));
    TORCH_CUSOLVER_CHECK(cusolverDnCreateParams(&s.params));
    return s;
  }
  void release(int device, Solver s) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_[device].push_back(s);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<int, std::vector<Solver>> free_;
};

SolverPool& pool() {
  static auto* p = new SolverPool();  // never destroyed: handles may outlive static destruction
  return *p;
}

// This thread's solvers, returned to the pool when the thread ends.
struct ThreadSolvers {
  std::unordered_map<int, Solver> by_device;
  ~ThreadSolvers() {
    for (auto& [device, s] : by_device) pool().release(device, s);
  }
};

// The solver for `device`, bound to torch's current stream on it.
Solver& current_solver(c10::DeviceIndex device) {
  thread_local ThreadSolvers mine;
  auto it = mine.by_device.find(device);
  if (it == mine.by_device.end()) it = mine.by_device.emplace(device, pool().acquire(device)).first;
  TORCH_CUSOLVER_CHECK(cusolverDnSetStream(it->second.handle, c10::cuda::getCurrentCUDAStream(device).stream()));
  return it->second;
}

// ------------------------------------------------------- XsyevBatched symbols
using XsyevBatchedBufferSizeFn = cusolverStatus_t (*)(cusolverDnHandle_t, cusolverDnParams_t, cusolverEigMode_t,
                                                      cublasFillMode_t, int64_t, cudaDataType, const void*,
                                                      int64_t, cudaDataType, const void*, cudaDataType, size_t*,
                                                      size_t*, int64_t);
using XsyevBatchedFn = cusolverStatus_t (*)(cusolverDnHandle_t, cusolverDnParams_t, cusolverEigMode_t,
                                            cublasFillMode_t, int64_t, cudaDataType, void*, int64_t, cudaDataType,
                                            void*, cudaDataType, void*, size_t, void*, size_t, int*, int64_t);

#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
// Built against a header that declares them: the looked-up types must match.
static_assert(std::is_same_v<decltype(&cusolverDnXsyevBatched_bufferSize), XsyevBatchedBufferSizeFn>);
static_assert(std::is_same_v<decltype(&cusolverDnXsyevBatched), XsyevBatchedFn>);
#endif

struct BatchedSymbols {
  XsyevBatchedBufferSizeFn buffer_size = nullptr;
  XsyevBatchedFn run = nullptr;
};

int64_t loaded_cusolver_version() {
  int major = 0, minor = 0, patch = 0;
  if (cusolverGetProperty(MAJOR_VERSION, &major) != CUSOLVER_STATUS_SUCCESS ||
      cusolverGetProperty(MINOR_VERSION, &minor) != CUSOLVER_STATUS_SUCCESS ||
      cusolverGetProperty(PATCH_LEVEL, &patch) != CUSOLVER_STATUS_SUCCESS) {
    return 0;
  }
  return major * 1000 + minor * 100 + patch;
}

const BatchedSymbols& batched_symbols() {
  static const BatchedSymbols symbols = [] {
    BatchedSymbols s;
    if (loaded_cusolver_version() < 11701) return s;
    // The libcusolver this module is bound to: the one that defines Xsyevd.
    Dl_info where;
    if (dladdr(reinterpret_cast<void*>(&cusolverDnXsyevd), &where) == 0 || where.dli_fname == nullptr) return s;
    void* lib = dlopen(where.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return s;
    s.buffer_size = reinterpret_cast<XsyevBatchedBufferSizeFn>(dlsym(lib, "cusolverDnXsyevBatched_bufferSize"));
    s.run = reinterpret_cast<XsyevBatchedFn>(dlsym(lib, "cusolverDnXsyevBatched"));
    if (s.buffer_size == nullptr || s.run == nullptr) s = BatchedSymbols{};
    return s;
  }();
  return symbols;
}

// ------------------------------------------------------------------ checks
struct Problem {
  int64_t batch, n;
  cudaDataType type;
};

// a (..., n, n) contiguous float32/float64 on a CUDA device, w (..., n) like it.
Problem check_problem(const char* op, const Tensor& a, const Tensor& w) {
  TORCH_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got ", a.device());
  TORCH_CHECK(a.dim() >= 2 && a.size(-1) == a.size(-2), op, ": a must be (..., n, n), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": a must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.is_contiguous(), op, ": a must be contiguous");
  TORCH_CHECK(w.scalar_type() == a.scalar_type() && w.device() == a.device() && w.is_contiguous() &&
                  w.sizes() == a.sizes().slice(0, a.dim() - 1),
              op, ": w must be a contiguous ", a.scalar_type(), " tensor of shape (..., n) on ", a.device(),
              ", got ", w.scalar_type(), " ", w.sizes(), " on ", w.device());
  const int64_t n = a.size(-1);
  return {n == 0 ? 0 : a.numel() / (n * n), n, a.scalar_type() == at::kFloat ? CUDA_R_32F : CUDA_R_64F};
}

void check_outputs(const char* op, const Problem& p, const Tensor& a, const Tensor& info, const Tensor& work_device,
                   const Tensor& work_host, const std::vector<int64_t>& needed) {
  TORCH_CHECK(info.scalar_type() == at::kInt && info.device() == a.device() && info.is_contiguous() &&
                  info.numel() == p.batch,
              op, ": info must be a contiguous int32 tensor of ", p.batch, " elements on ", a.device());
  TORCH_CHECK(work_device.scalar_type() == at::kByte && work_device.device() == a.device() &&
                  work_device.is_contiguous(),
              op, ": work_device must be a contiguous uint8 tensor on ", a.device());
  TORCH_CHECK(work_host.scalar_type() == at::kByte && work_host.is_cpu() && work_host.is_contiguous(), op,
              ": work_host must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(work_device.numel() >= needed[0] && work_host.numel() >= needed[1], op, ": workspace too small: ",
              work_device.numel(), " device and ", work_host.numel(), " host bytes given, ", needed[0], " and ",
              needed[1], " needed (syevd_workspace_size)");
}

// Row-major storage of each a[b] is the column-major a[b]^T: its upper triangle
// is the lower triangle of a[b], and column j of the result (row j of a[b]) is
// eigenvector j.
constexpr cublasFillMode_t kUplo = CUBLAS_FILL_MODE_UPPER;
constexpr cusolverEigMode_t kJobz = CUSOLVER_EIG_MODE_VECTOR;

std::vector<int64_t> workspace_size(const Problem& p, const Tensor& a, const Tensor& w, bool batched) {
  Solver& s = current_solver(a.device().index());
  size_t device_bytes = 0, host_bytes = 0;
  if (batched) {
    const BatchedSymbols& sym = batched_symbols();
    TORCH_CHECK(sym.run != nullptr, "fastpred::syevd_batched_: cusolverDnXsyevBatched needs cuSOLVER >= 11.7.1 "
                "(CUDA 12.6 Update 2); the loaded one is ", loaded_cusolver_version());
    TORCH_CUSOLVER_CHECK(sym.buffer_size(s.handle, s.params, kJobz, kUplo, p.n, p.type, a.const_data_ptr(), p.n,
                                         p.type, w.const_data_ptr(), p.type, &device_bytes, &host_bytes, p.batch));
  } else {
    TORCH_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(s.handle, s.params, kJobz, kUplo, p.n, p.type,
                                                     a.const_data_ptr(), p.n, p.type, w.const_data_ptr(), p.type,
                                                     &device_bytes, &host_bytes));
  }
  return {static_cast<int64_t>(device_bytes), static_cast<int64_t>(host_bytes)};
}

std::vector<int64_t> syevd_workspace_size_cuda(const Tensor& a, const Tensor& w, bool batched) {
  const Problem p = check_problem("fastpred::syevd_workspace_size", a, w);
  c10::cuda::CUDAGuard guard(a.device());
  if (p.batch == 0 || p.n == 0) return {0, 0};
  return workspace_size(p, a, w, batched);
}

void* host_ptr(const Tensor& t) { return t.numel() > 0 ? t.mutable_data_ptr() : nullptr; }

// ------------------------------------------------------------------- ops
void syevd_cuda(const Tensor& a, const Tensor& w, const Tensor& info, const Tensor& work_device,
                const Tensor& work_host) {
  constexpr const char* op = "fastpred::syevd_";
  const Problem p = check_problem(op, a, w);
  c10::cuda::CUDAGuard guard(a.device());
  if (p.batch == 0 || p.n == 0) return;
  check_outputs(op, p, a, info, work_device, work_host, workspace_size(p, a, w, false));
  Solver& s = current_solver(a.device().index());
  const int64_t elem = static_cast<int64_t>(a.element_size());
  auto* a_ptr = static_cast<char*>(a.mutable_data_ptr());
  auto* w_ptr = static_cast<char*>(w.mutable_data_ptr());
  int* info_ptr = info.mutable_data_ptr<int>();
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CUSOLVER_CHECK(cusolverDnXsyevd(s.handle, s.params, kJobz, kUplo, p.n, p.type, a_ptr + b * p.n * p.n * elem,
                                          p.n, p.type, w_ptr + b * p.n * elem, p.type, work_device.mutable_data_ptr(),
                                          static_cast<size_t>(work_device.numel()), host_ptr(work_host),
                                          static_cast<size_t>(work_host.numel()), info_ptr + b));
  }
}

void syevd_batched_cuda(const Tensor& a, const Tensor& w, const Tensor& info, const Tensor& work_device,
                        const Tensor& work_host) {
  constexpr const char* op = "fastpred::syevd_batched_";
  const Problem p = check_problem(op, a, w);
  c10::cuda::CUDAGuard guard(a.device());
  if (p.batch == 0 || p.n == 0) return;
  TORCH_CHECK(p.n * p.n * p.batch <= INT_MAX, op, ": n * n * batch = ", p.n * p.n * p.batch,
              " exceeds cuSOLVER's limit INT32_MAX; split the batch (eigh_driver does)");
  check_outputs(op, p, a, info, work_device, work_host, workspace_size(p, a, w, true));
  Solver& s = current_solver(a.device().index());
  TORCH_CUSOLVER_CHECK(batched_symbols().run(s.handle, s.params, kJobz, kUplo, p.n, p.type, a.mutable_data_ptr(),
                                             p.n, p.type, w.mutable_data_ptr(), p.type,
                                             work_device.mutable_data_ptr(), static_cast<size_t>(work_device.numel()),
                                             host_ptr(work_host), static_cast<size_t>(work_host.numel()),
                                             info.mutable_data_ptr<int>(), p.batch));
}

}  // namespace

bool built_with_cuda() { return true; }
int64_t cusolver_version() { return loaded_cusolver_version(); }
bool has_syevd_batched() { return batched_symbols().run != nullptr; }

TORCH_LIBRARY_IMPL(fastpred, CUDA, m) {
  m.impl("syevd_", &syevd_cuda);
  m.impl("syevd_batched_", &syevd_batched_cuda);
  m.impl("syevd_workspace_size", &syevd_workspace_size_cuda);
}

}  // namespace fastpred
