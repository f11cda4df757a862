// C++ CPU kernel of the softmax_double_backward op (see unlearn_kernels/ops/softmax_double_backward.py). Softmax's
// backward over the last dim is gx = y (gy - s), s = sum(gy y); for the cotangent ggx of gx this computes both
// derivatives of <ggx, gx>,
//   d gy = y (ggx - t),   d y = ggx (gy - s) - gy t,   t = sum(ggx y),
// a row at a time: the row's two sums, then both outputs, while the row is in cache. Torch's double backward of
// softmax makes about ten passes over the whole tensor for the same result (4.7 ms for a (64, 4, 65, 65) float32
// map, one thread of the AMD EPYC of docs/benchmarks.md, where one softmax backward takes 0.25 ms): the generic
// Hessian's attention layers take this op (unlearn_kernels/curvature/graph_ops.py).
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../message.h"

namespace unlearn_kernels {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task of at::parallel_for

template <typename scalar_t>
void rows_kernel(const scalar_t* gy, const scalar_t* y, const scalar_t* ggx, scalar_t* d_gy, scalar_t* d_y,
                 int64_t rows, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * n;
      Vec s_acc(scalar_t(0)), t_acc(scalar_t(0));
      for (int64_t i = 0; i < n; i += kLanes) {  // a partial load fills the lanes past the row with zeros
        const int64_t count = std::min(kLanes, n - i);
        const Vec yv = Vec::loadu(y + o + i, count);
        s_acc = at::vec::fmadd(Vec::loadu(gy + o + i, count), yv, s_acc);
        t_acc = at::vec::fmadd(Vec::loadu(ggx + o + i, count), yv, t_acc);
      }
      const auto add = [](Vec& a, Vec& b) { return a + b; };
      const Vec s(at::vec::vec_reduce_all<scalar_t>(add, s_acc));
      const Vec t(at::vec::vec_reduce_all<scalar_t>(add, t_acc));
      for (int64_t i = 0; i < n; i += kLanes) {
        const int64_t count = std::min(kLanes, n - i);
        const Vec yv = Vec::loadu(y + o + i, count), gv = Vec::loadu(gy + o + i, count);
        const Vec ggv = Vec::loadu(ggx + o + i, count);
        (yv * (ggv - t)).store(d_gy + o + i, count);
        (ggv * (gv - s) - gv * t).store(d_y + o + i, count);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_double_backward_cpu(const at::Tensor& gy, const at::Tensor& y,
                                                                const at::Tensor& ggx) {
  TORCH_CHECK_VALUE(gy.dim() >= 1 && gy.sizes() == y.sizes() && gy.sizes() == ggx.sizes(),
                    message("softmax_double_backward: gy, y and ggx must have one shape of at least one dim, got ",
                            gy.sizes(), ", ", y.sizes(), " and ", ggx.sizes())
                        .c_str());
  TORCH_CHECK_VALUE((gy.scalar_type() == at::kFloat || gy.scalar_type() == at::kDouble) &&
                        y.scalar_type() == gy.scalar_type() && ggx.scalar_type() == gy.scalar_type(),
                    message("softmax_double_backward: gy, y and ggx must be one of float32 and float64, got ",
                            gy.scalar_type(), ", ", y.scalar_type(), " and ", ggx.scalar_type())
                        .c_str());
  TORCH_CHECK_VALUE(gy.is_cpu() && y.is_cpu() && ggx.is_cpu(),
                    message("softmax_double_backward: the C++ CPU kernel needs CPU tensors, got ", gy.device(), ", ",
                            y.device(), " and ", ggx.device())
                        .c_str());
  const at::Tensor g = gy.contiguous(), p = y.contiguous(), c = ggx.contiguous();
  at::Tensor d_gy = at::empty_like(g), d_y = at::empty_like(g);
  const int64_t n = g.size(-1);
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "softmax_double_backward_cpu", [&] {
      rows_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
                            d_gy.mutable_data_ptr<scalar_t>(), d_y.mutable_data_ptr<scalar_t>(), g.numel() / n, n);
    });
  }
  return {d_gy, d_y};
}

}  // namespace
}  // namespace unlearn_kernels

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("softmax_double_backward", &unlearn_kernels::softmax_double_backward_cpu);
}
