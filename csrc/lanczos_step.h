// Checks of the lanczos_step op and its breakdown threshold, shared by its CPU and CUDA kernels
// (csrc/cpu/lanczos_step.cpp, csrc/cuda/lanczos_step.cu). The messages are word for word those of the
// Python backends' checks (unlearn_kernels/contracts/lanczos_step.py), so every backend raises the same
// error for the same input.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <utility>

#include "message.h"

namespace unlearn_kernels {

// Breakdown: a beta <= kStepBreakdownEps eps ||hq|| is returned as 0 (STEP_BREAKDOWN_EPS in
// unlearn_kernels/contracts/lanczos_step.py, the Python backends' threshold).
constexpr double kStepBreakdownEps = 16.0;

// Shapes, dtypes and devices: the shapes of hq and q first.
inline void check_lanczos_step_inputs(const at::Tensor& hq, const at::Tensor& q, const at::Tensor& q_prev,
                                      const at::Tensor& beta_prev, const at::Tensor& basis) {
  constexpr const char* op = "lanczos_step";
  using Named = std::pair<const char*, const at::Tensor*>;
  TORCH_CHECK_VALUE(hq.dim() == 1, message(op, ": hq must be 1-D (d,), got shape ", hq.sizes()).c_str());
  for (const auto& [name, t] : {Named{"q", &q}, Named{"q_prev", &q_prev}}) {
    TORCH_CHECK_VALUE(t->sizes() == hq.sizes(),
                      message(op, ": ", name, " must have the shape of hq ", hq.sizes(), ", got ", t->sizes()).c_str());
  }
  const int64_t d = hq.size(0);
  TORCH_CHECK_VALUE(basis.dim() == 2 && basis.size(1) == d,
                    message(op, ": basis must have shape (m, ", d, "), got ", basis.sizes()).c_str());
  TORCH_CHECK_VALUE(beta_prev.numel() == 1,
                    message(op, ": beta_prev must hold one number, got shape ", beta_prev.sizes()).c_str());
  const auto dtype = hq.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   message(op, ": hq must be float32 or float64, got ", dtype).c_str());
  for (const auto& [name, t] : {Named{"q", &q}, Named{"q_prev", &q_prev}, Named{"basis", &basis}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == dtype,
                     message(op, ": ", name, " dtype ", t->scalar_type(), " must equal hq dtype ", dtype).c_str());
  }
  for (const auto& [name, t] :
       {Named{"q", &q}, Named{"q_prev", &q_prev}, Named{"beta_prev", &beta_prev}, Named{"basis", &basis}}) {
    TORCH_CHECK_VALUE(t->device() == hq.device(),
                      message(op, ": ", name, " is on ", t->device(), " but hq is on ", hq.device()).c_str());
  }
}

// After the step: beta_prev finite, then alpha and beta. A NaN or Inf anywhere in hq, q, q_prev or
// basis reaches alpha or beta (Inf in hq makes alpha non-finite even where the breakdown test zeroes
// beta), so these two scalars cover the vectors without another pass over them.
inline void check_lanczos_step_values(double beta_prev, double alpha, double beta) {
  constexpr const char* op = "lanczos_step";
  TORCH_CHECK_VALUE(std::isfinite(beta_prev), message(op, ": beta_prev must be finite, got NaN or Inf").c_str());
  TORCH_CHECK_VALUE(std::isfinite(alpha) && std::isfinite(beta),
                    message(op,
                            ": alpha or beta is not finite: hq, q, q_prev or basis contains NaN or Inf, "
                            "or their products overflow")
                        .c_str());
}

}  // namespace unlearn_kernels
