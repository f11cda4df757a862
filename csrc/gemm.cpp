// See gemm.h.
#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <atomic>

#if defined(__x86_64__)
namespace at::native {
// torch's oneDNN GEMM, result = beta * result + alpha * mat1 mat2, declared in a header torch does not
// ship (aten/src/ATen/native/mkldnn/Matmul.h). Weak: a torch that exports no function of this signature
// leaves it null, and every GEMM takes ATen's route.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace at::native
#endif

namespace unlearn_kernels {
namespace {

// The conditions of the oneDNN route that do not change in a process: the function is exported, torch
// was built with oneDNN, and the CPU has what oneDNN's float32 matmul in torch requires on x86
// (AVX-512 BW, VL and DQ; torch refuses the call otherwise).
bool onednn_present() {
#if defined(__x86_64__)
  static const bool present = &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() &&
                              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("avx512dq");
  return present;
#else
  return false;
#endif
}

// Whether this CPU's vendor makes oneDNN the faster route (see gemm.h): any x86 vendor but Intel.
bool onednn_preferred() {
#if defined(__x86_64__)
  static const bool preferred = [] {
    __builtin_cpu_init();
    return !__builtin_cpu_is("intel");
  }();
  return preferred;
#else
  return false;
#endif
}

std::atomic<bool> onednn_forced{false};

bool takes_onednn(const at::Tensor& a, const at::Tensor& b) {
  if (!(a.is_cpu() && b.is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
        a.dim() == b.dim() && (a.dim() == 2 || a.dim() == 3))) {
    return false;
  }
  const int64_t batch = a.dim() == 3 ? a.size(0) : 1;  // oneDNN's matmul takes a batch of products too
  return batch * a.size(-2) * a.size(-1) * b.size(-1) >= kOneDnnMinWork && onednn_gemm_available();
}

}  // namespace

bool onednn_gemm_available() {
  return onednn_present() && at::globalContext().userEnabledMkldnn() && (onednn_preferred() || onednn_forced.load());
}

void set_onednn_gemm_forced(bool forced) { onednn_forced.store(forced); }

void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
#if defined(__x86_64__)
  if (out.is_cpu() && out.scalar_type() == at::kFloat && out.dim() == a.dim() && takes_onednn(a, b)) {
    at::native::mkldnn_matmul(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
    return;
  }
#endif
  at::Tensor& result = const_cast<at::Tensor&>(out);
  if (a.dim() == 3) {
    if (beta == 0.0 && alpha == 1.0) {
      at::bmm_out(result, a, b);
    } else {
      at::baddbmm_out(result, out, a, b, beta, alpha);
    }
  } else if (beta == 0.0 && alpha == 1.0) {
    at::mm_out(result, a, b);
  } else {
    at::addmm_out(result, out, a, b, beta, alpha);
  }
}

at::Tensor gemm_bias(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (!takes_onednn(a, b)) return at::addmm(bias, a, b);
  // a buffer of its own: the bias expanded to one row is the bias itself, which the GEMM would then write
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  out.copy_(bias.expand({a.size(0), b.size(1)}));
  gemm_into(out, a, b, /*beta=*/1);
  return out;
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = a.dim() == 3 ? at::empty({a.size(0), a.size(1), b.size(2)}, a.options())
                                : at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b);
  return out;
}

}  // namespace unlearn_kernels
