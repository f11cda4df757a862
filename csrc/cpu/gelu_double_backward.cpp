// C++ CPU kernel of the gelu_double_backward op (see unlearn_kernels/ops/gelu_double_backward.py). GELU's backward
// is gx = gy f'(x); for a cotangent ggx of gx this computes both derivatives of <ggx, gx>,
//   d gy = ggx f'(x),   d x = ggx gy f''(x),
// in one pass over the elements: for the exact GELU f = x Phi(x), f' = Phi + x phi, f'' = phi (2 - x^2); for the
// tanh approximation f = x (1 + t) / 2 with t = tanh(u), u = k (x + c x^3), f' = (1 + t) / 2 + x (1 - t^2) u' / 2,
// f'' = (1 - t^2) (u' - x t u'^2 + x u'' / 2), with 1 - t^2 = 4 e / (1 + e)^2 and (1 + t) / 2 = 1 / (1 + e^(-2u)),
// e = e^(-2|u|) (1 - t * t cancelled to 0 at |x| ~ 5 in float32). Torch's double backward of GELU makes about ten
// passes over the tensor; the generic Hessian's GELUs take this op (unlearn_kernels/curvature/graph_ops.py).
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "../message.h"

namespace unlearn_kernels {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task of at::parallel_for

template <typename scalar_t, bool kTanh>
void gelu_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* ggx, scalar_t* d_gy, scalar_t* d_x,
                 int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  // Beyond |x| = 30 (tanh form) or 40 (exact) f' is 0 or 1 and f'' is 0 to every float's precision: x is clamped
  // there, so that no x^2 or x u'^2 overflows into 0 * Inf; (x - x) keeps an Inf or NaN x a NaN, as torch's own.
  constexpr double kBound = kTanh ? 30.0 : 40.0;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const Vec one(scalar_t(1)), two(scalar_t(2)), half(scalar_t(0.5));
    const Vec low = Vec(static_cast<scalar_t>(-kBound)), high = Vec(static_cast<scalar_t>(kBound));
    for (int64_t i = begin; i < end; i += kLanes) {
      const int64_t count = std::min(kLanes, end - i);
      const Vec raw = Vec::loadu(x + i, count), a = Vec::loadu(ggx + i, count);
      const Vec xv = at::vec::clamp(raw, low, high) + (raw - raw);
      Vec f1, f2;
      if constexpr (kTanh) {
        const Vec k(scalar_t(M_2_SQRTPI * M_SQRT1_2)), c(scalar_t(0.044715));  // k = sqrt(2 / pi)
        const Vec x2 = xv * xv;
        const Vec u = k * (xv + c * x2 * xv);
        const Vec u1 = k * (one + Vec(scalar_t(3)) * c * x2), u2 = Vec(scalar_t(6)) * k * c * xv;
        // 1 - tanh(u)^2 and (1 + tanh(u)) / 2 without the cancellation of 1 - t * t and 1 + t where |t| -> 1
        const Vec e = (Vec(scalar_t(-2)) * u.abs()).exp();
        const Vec sech2 = Vec(scalar_t(4)) * e / ((one + e) * (one + e));
        const Vec rising = one / (one + (Vec(scalar_t(-2)) * u).exp());
        f1 = rising + half * xv * sech2 * u1;
        f2 = sech2 * (u1 - xv * u.tanh() * u1 * u1 + half * xv * u2);
      } else {
        const Vec phi = (Vec(scalar_t(-0.5)) * xv * xv).exp() * Vec(scalar_t(M_2_SQRTPI * M_SQRT1_2 * 0.5));
        const Vec cdf = half * (one + (xv * Vec(scalar_t(M_SQRT1_2))).erf());
        f1 = cdf + xv * phi;
        f2 = phi * (two - xv * xv);
      }
      (a * f1).store(d_gy + i, count);
      (a * Vec::loadu(gy + i, count) * f2).store(d_x + i, count);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gelu_double_backward_cpu(const at::Tensor& gy, const at::Tensor& x,
                                                             const at::Tensor& ggx, c10::string_view approximate) {
  TORCH_CHECK_VALUE(gy.sizes() == x.sizes() && ggx.sizes() == x.sizes(),
                    message("gelu_double_backward: gy, x and ggx must have one shape, got ", gy.sizes(), ", ",
                            x.sizes(), " and ", ggx.sizes())
                        .c_str());
  const auto type = x.scalar_type();
  TORCH_CHECK_VALUE((type == at::kFloat || type == at::kDouble) && gy.scalar_type() == type &&
                        ggx.scalar_type() == type,
                    message("gelu_double_backward: gy, x and ggx must be one of float32 and float64, got ",
                            gy.scalar_type(), ", ", type, " and ", ggx.scalar_type())
                        .c_str());
  TORCH_CHECK_VALUE(gy.is_cpu() && x.is_cpu() && ggx.is_cpu(),
                    message("gelu_double_backward: the C++ CPU kernel needs CPU tensors, got ", gy.device(), ", ",
                            x.device(), " and ", ggx.device())
                        .c_str());
  const bool tanh_form = approximate == "tanh";
  TORCH_CHECK_VALUE(tanh_form || approximate == "none",
                    message("gelu_double_backward: approximate must be 'none' or 'tanh', got '",
                            std::string(approximate), "'")
                        .c_str());
  const at::Tensor g = gy.contiguous(), xc = x.contiguous(), a = ggx.contiguous();
  at::Tensor d_gy = at::empty_like(xc), d_x = at::empty_like(xc);
  if (xc.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(type, "gelu_double_backward_cpu", [&] {
      const auto run = tanh_form ? gelu_kernel<scalar_t, true> : gelu_kernel<scalar_t, false>;
      run(g.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
          d_gy.mutable_data_ptr<scalar_t>(), d_x.mutable_data_ptr<scalar_t>(), xc.numel());
    });
  }
  return {d_gy, d_x};
}

}  // namespace
}  // namespace unlearn_kernels

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("gelu_double_backward", &unlearn_kernels::gelu_double_backward_cpu);
}
