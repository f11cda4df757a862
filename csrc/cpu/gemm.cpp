// C++ CPU kernel of the gemm op (see unlearn_kernels/ops/gemm.py): a b (+ bias rows), or a batch of products,
// through csrc/gemm.h, so that a float32 GEMM of enough work takes torch's oneDNN matmul on a non-Intel CPU with
// AVX-512 (2.0-2.3x torch's MKL on the AMD EPYC of docs/benchmarks.md). The generic curvature operators build their gradient
// graphs' linear layers and matrix products on it.
#include <ATen/Functions.h>
#include <torch/library.h>

#include <optional>

#include "../gemm.h"
#include "../message.h"

namespace unlearn_kernels {
namespace {

at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(a.dim() == b.dim() && (a.dim() == 2 || (a.dim() == 3 && a.size(0) == b.size(0))),
                    message("gemm: a and b must be 2-D, or 3-D with one batch size, got shapes ", a.sizes(), " and ",
                            b.sizes())
                        .c_str());
  TORCH_CHECK_VALUE(a.size(-1) == b.size(-2),
                    message("gemm: a's columns must match b's rows, got shapes ", a.sizes(), " and ", b.sizes())
                        .c_str());
  TORCH_CHECK_VALUE(a.is_floating_point() && a.scalar_type() == b.scalar_type(),
                    message("gemm: a and b must have one floating dtype, got ", a.scalar_type(), " and ",
                            b.scalar_type())
                        .c_str());
  TORCH_CHECK_VALUE(a.is_cpu() && b.is_cpu(),
                    message("gemm: the C++ CPU kernel needs CPU tensors, got ", a.device(), " and ", b.device())
                        .c_str());
  if (!bias.has_value()) return gemm(a, b);
  const at::Tensor& c = *bias;
  TORCH_CHECK_VALUE(a.dim() == 2, message("gemm: a bias needs 2-D a and b, got shapes ", a.sizes(), " and ",
                                          b.sizes()).c_str());
  TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == b.size(1) && c.scalar_type() == a.scalar_type() && c.is_cpu(),
                    message("gemm: bias must be a (", b.size(1), ",) CPU tensor of dtype ", a.scalar_type(),
                            ", got shape ", c.sizes(), ", ", c.scalar_type(), " on ", c.device())
                        .c_str());
  return gemm_bias(c, a, b);
}

}  // namespace
}  // namespace unlearn_kernels

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("gemm", &unlearn_kernels::gemm_cpu); }
