// Input checks of the lanczos_step op, shared by its CPU and CUDA kernels (csrc/cpu/lanczos_step.cpp,
// csrc/cuda/lanczos_step.cu); every message names the argument at fault.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace unlearn_kernels {

inline void check_lanczos_step_inputs(const at::Tensor& hq, const at::Tensor& q, const at::Tensor& q_prev,
                                      const at::Tensor& beta_prev, const at::Tensor& basis) {
  constexpr const char* op = "lanczos_step";
  TORCH_CHECK_VALUE(hq.dim() == 1, op, ": hq must be 1-D, got shape ", hq.sizes());
  const int64_t d = hq.size(0);
  TORCH_CHECK_VALUE(q.sizes() == hq.sizes() && q_prev.sizes() == hq.sizes(), op,
                    ": q and q_prev must have the shape of hq (", d, ",), got ", q.sizes(), " and ", q_prev.sizes());
  TORCH_CHECK_VALUE(basis.dim() == 2 && basis.size(1) == d, op, ": basis must have shape (m, ", d, "), got ",
                    basis.sizes());
  TORCH_CHECK_VALUE(beta_prev.numel() == 1, op, ": beta_prev must be a scalar tensor, got shape ", beta_prev.sizes());
  const auto dtype = hq.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": hq must be float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(q.scalar_type() == dtype && q_prev.scalar_type() == dtype && basis.scalar_type() == dtype, op,
                   ": q, q_prev and basis must have the dtype of hq (", dtype, ")");
  for (const at::Tensor* t : {&q, &q_prev, &beta_prev, &basis}) {
    TORCH_CHECK_VALUE(t->device() == hq.device(), op, ": all inputs must be on ", hq.device(), ", got ", t->device());
  }
}

}  // namespace unlearn_kernels
