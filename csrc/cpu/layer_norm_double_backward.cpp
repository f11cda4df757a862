// C++ CPU kernel of the layer_norm_double_backward op (see unlearn_kernels/ops/layer_norm_double_backward.py). For a
// layer norm over the last dim, y = x^ w + b with x^ = (x - mean) rstd, its backward is gx = P(gy w), gw = sum over
// rows of gy x^, gb = sum of gy, where P(u) = rstd (u - mean(u) - x^ mean(u x^)). For the cotangents (a, c, e) of
// (gx, gw, gb) this computes the derivatives of <a, gx> + <c, gw> + <e, gb> w.r.t. gy, x and w,
//   d gy = w P(a) + c x^ + e
//   d x  = -(rstd^2 / n) [x^ (A - n g_ a_ - 3 m T) + T (g - g_) + n m (a - a_)] + P(c gy)
//   d w  = sum over rows of gy P(a)
// with g = gy w, g_ = mean(g), a_ = mean(a), m = mean(g x^), T = sum(a x^), A = sum(a g), a row at a time: the row's
// statistics, its sums, then both outputs while the row is in cache. Torch's double backward of a layer norm makes
// dozens of passes over the whole tensor; the generic Hessian's layer norms take this op
// (unlearn_kernels/curvature/graph_ops.py).
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <tuple>
#include <vector>

#include "../message.h"

namespace unlearn_kernels {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task of at::parallel_for

template <typename scalar_t>
scalar_t sum_all(const at::vec::Vectorized<scalar_t>& v) {
  return at::vec::vec_reduce_all<scalar_t>([](auto& a, auto& b) { return a + b; }, v);
}

template <typename scalar_t>
void rows_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* w, const scalar_t* a, const scalar_t* c,
                 const scalar_t* e, scalar_t* d_gy, scalar_t* d_x, double* d_w, int64_t rows, int64_t n, double eps) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  std::mutex d_w_lock;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / n), [&](int64_t begin, int64_t end) {
    // this task's rows' share of d w, summed in double (a float sum over thousands of rows drifts)
    std::vector<double> d_w_part(n, 0.0);
    std::vector<scalar_t> row_part(n);
    const scalar_t inv_n = scalar_t(1) / scalar_t(n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * n;
      // the row's mean and variance, two passes (as a layer norm's own statistics)
      Vec acc(scalar_t(0));
      for (int64_t i = 0; i < n; i += kLanes) acc = acc + Vec::loadu(x + o + i, std::min(kLanes, n - i));
      const scalar_t mean = sum_all(acc) * inv_n;
      acc = Vec(scalar_t(0));
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t count = std::min(kLanes, n - i);
        const Vec centred = Vec::loadu(x + o + i, count) - Vec(mean);
        // lanes past the row hold -mean after the subtraction: keep them out of the sum
        acc = at::vec::fmadd(Vec::set(Vec(scalar_t(0)), centred, count), centred, acc);
      }
      const scalar_t rstd = scalar_t(1) / std::sqrt(sum_all(acc) * inv_n + scalar_t(eps));
      // the row's sums (a partial load fills the lanes past the row with zeros, which add nothing)
      Vec sg(scalar_t(0)), sgx(scalar_t(0)), sa(scalar_t(0)), sax(scalar_t(0)), sag(scalar_t(0)), sh(scalar_t(0)),
          shx(scalar_t(0));
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t count = std::min(kLanes, n - i);
        const Vec gyv = Vec::loadu(gy + o + i, count);
        const Vec xh = Vec::set(Vec(scalar_t(0)), (Vec::loadu(x + o + i, count) - Vec(mean)) * Vec(rstd), count);
        const Vec g = gyv * Vec::loadu(w + i, count), av = Vec::loadu(a + o + i, count);
        const Vec h = Vec::loadu(c + i, count) * gyv;
        sg = sg + g;
        sgx = at::vec::fmadd(g, xh, sgx);
        sa = sa + av;
        sax = at::vec::fmadd(av, xh, sax);
        sag = at::vec::fmadd(av, g, sag);
        sh = sh + h;
        shx = at::vec::fmadd(h, xh, shx);
      }
      const scalar_t g_mean = sum_all(sg) * inv_n, m = sum_all(sgx) * inv_n, a_mean = sum_all(sa) * inv_n;
      const scalar_t t = sum_all(sax), big_a = sum_all(sag), h_mean = sum_all(sh) * inv_n;
      const scalar_t h_xh = sum_all(shx) * inv_n;
      const scalar_t nn = scalar_t(n), k = -rstd * rstd * inv_n;
      const Vec coeff_xh(k * (big_a - nn * g_mean * a_mean - scalar_t(3) * m * t) - rstd * h_xh);
      const Vec coeff_g(k * t), coeff_a(k * nn * m);
      const Vec shift(-k * t * g_mean - k * nn * m * a_mean - rstd * h_mean);
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t count = std::min(kLanes, n - i);
        const Vec gyv = Vec::loadu(gy + o + i, count), wv = Vec::loadu(w + i, count);
        const Vec xh = (Vec::loadu(x + o + i, count) - Vec(mean)) * Vec(rstd);
        const Vec av = Vec::loadu(a + o + i, count), g = gyv * wv;
        const Vec pa = Vec(rstd) * (av - Vec(a_mean) - xh * Vec(t * inv_n));
        (wv * pa + Vec::loadu(c + i, count) * xh + Vec::loadu(e + i, count)).store(d_gy + o + i, count);
        const Vec h = Vec::loadu(c + i, count) * gyv;
        (xh * coeff_xh + g * coeff_g + av * coeff_a + Vec(rstd) * h + shift).store(d_x + o + i, count);
        (gyv * pa).store(row_part.data() + i, count);
      }
      for (int64_t i = 0; i < n; ++i) d_w_part[i] += static_cast<double>(row_part[i]);
    }
    std::lock_guard<std::mutex> guard(d_w_lock);
    for (int64_t i = 0; i < n; ++i) d_w[i] += d_w_part[i];  // d_w: double, rounded to the dtype by the caller
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_double_backward_cpu(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& ggx, const at::Tensor& ggw,
    const at::Tensor& ggb, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && gy.sizes() == x.sizes() && ggx.sizes() == x.sizes(),
                    message("layer_norm_double_backward: gy, x and ggx must have one shape of at least one dim, got ",
                            gy.sizes(), ", ", x.sizes(), " and ", ggx.sizes())
                        .c_str());
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(n > 0, message("layer_norm_double_backward: x's last dim must be at least 1 (a layer norm over 0 "
                                   "features is undefined), got shape ",
                                   x.sizes())
                               .c_str());
  for (const at::Tensor* t : {&weight, &ggw, &ggb}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n,
                      message("layer_norm_double_backward: weight, ggw and ggb must be (", n, ",) tensors, got shapes ",
                              weight.sizes(), ", ", ggw.sizes(), " and ", ggb.sizes())
                          .c_str());
  }
  const auto type = x.scalar_type();
  TORCH_CHECK_VALUE((type == at::kFloat || type == at::kDouble) && gy.scalar_type() == type &&
                        ggx.scalar_type() == type && weight.scalar_type() == type && ggw.scalar_type() == type &&
                        ggb.scalar_type() == type,
                    message("layer_norm_double_backward: every tensor must be float32, or every one float64, got x ",
                            type, ", gy ", gy.scalar_type(), ", ggx ", ggx.scalar_type(), ", weight ",
                            weight.scalar_type(), ", ggw ", ggw.scalar_type(), ", ggb ", ggb.scalar_type())
                        .c_str());
  TORCH_CHECK_VALUE(gy.is_cpu() && x.is_cpu() && ggx.is_cpu() && weight.is_cpu() && ggw.is_cpu() && ggb.is_cpu(),
                    message("layer_norm_double_backward: the C++ CPU kernel needs CPU tensors, got x on ", x.device())
                        .c_str());
  TORCH_CHECK_VALUE(eps >= 0.0, message("layer_norm_double_backward: eps must be >= 0, got ", eps).c_str());
  const at::Tensor g = gy.contiguous(), xc = x.contiguous(), a = ggx.contiguous(), wc = weight.contiguous(),
                   cc = ggw.contiguous(), ec = ggb.contiguous();
  at::Tensor d_gy = at::empty_like(xc), d_x = at::empty_like(xc), d_w = at::zeros({n}, wc.options().dtype(at::kDouble));
  if (xc.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(type, "layer_norm_double_backward_cpu", [&] {
      rows_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                            a.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(),
                            d_gy.mutable_data_ptr<scalar_t>(), d_x.mutable_data_ptr<scalar_t>(),
                            d_w.mutable_data_ptr<double>(), xc.numel() / n, n, eps);
    });
  }
  return {d_gy, d_x, d_w.to(type)};
}

}  // namespace
}  // namespace unlearn_kernels

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("layer_norm_double_backward", &unlearn_kernels::layer_norm_double_backward_cpu);
}
