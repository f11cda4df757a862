// Input checks of the softmax_ce_grad / softmax_ce_hvp ops and the row layout their kernels take,
// shared by their CPU and CUDA kernels (csrc/cpu/softmax_ce.cpp, csrc/cuda/softmax_ce.cu). The
// messages are word for word those of the Python backends' checks
// (unlearn_kernels/contracts/softmax_ce.py), so every backend raises the same error for the same input.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "message.h"

namespace unlearn_kernels::softmax_ce {

constexpr const char* kBadLogits = "logits contain NaN or +Inf (or a row that is all -Inf)";
constexpr const char* kBadTangent = "tangent contains NaN or Inf";

// Rows may be strided; the class dimension must be dense (copied where it is not).
inline at::Tensor rows_dense(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

inline void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, message(op, ": logits must be 2-D (N, C), got shape ", logits.sizes()).c_str());
  const auto type = logits.scalar_type();  // float8 is a floating type too, which no kernel takes
  TORCH_CHECK_TYPE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble,
                   message(op, ": logits must be float16, bfloat16, float32 or float64, got ", type).c_str());
  // a softmax over no classes is undefined
  TORCH_CHECK_VALUE(logits.size(1) >= 1,
                    message(op, ": logits must have at least one class (C >= 1), got shape ", logits.sizes()).c_str());
}

inline void check_grad_args(const at::Tensor& logits, const at::Tensor& target, double label_smoothing) {
  constexpr const char* op = "softmax_ce_grad";
  check_logits(op, logits);
  TORCH_CHECK_VALUE(
      target.dim() == 1 && target.size(0) == logits.size(0),
      message(op, ": target must have shape (N,) = (", logits.size(0), ",), got ", target.sizes()).c_str());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong,
                   message(op, ": target must hold integer class indices (int64), got ", target.scalar_type()).c_str());
  TORCH_CHECK_VALUE(target.device() == logits.device(),
                    message(op, ": target is on ", target.device(), " but logits on ", logits.device()).c_str());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    message(op, ": label_smoothing must be in [0, 1], got ", label_smoothing).c_str());
}

inline void check_hvp_args(const at::Tensor& logits, const at::Tensor& tangent) {
  constexpr const char* op = "softmax_ce_hvp";
  check_logits(op, logits);
  TORCH_CHECK_VALUE(
      tangent.sizes() == logits.sizes(),
      message(op, ": tangent shape ", tangent.sizes(), " must equal logits shape ", logits.sizes()).c_str());
  TORCH_CHECK_TYPE(
      tangent.scalar_type() == logits.scalar_type(),
      message(op, ": tangent dtype ", tangent.scalar_type(), " must equal logits dtype ", logits.scalar_type())
          .c_str());
  TORCH_CHECK_VALUE(tangent.device() == logits.device(),
                    message(op, ": tangent is on ", tangent.device(), " but logits on ", logits.device()).c_str());
}

// Raises for the FIRST row whose target is neither in [0, C) nor ignore_index. Called only after a
// kernel has flagged a bad target (the rows are scanned in order on the host, whatever order the
// parallel kernel met them in). target: int64 on the CPU, contiguous.
inline void check_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t* y = target.const_data_ptr<int64_t>();
  for (int64_t row = 0; row < target.numel(); ++row) {
    TORCH_CHECK_VALUE(y[row] == ignore_index || (y[row] >= 0 && y[row] < C),
                      message("softmax_ce_grad: target[", row, "] = ", y[row], " is out of range for ", C,
                              " classes (and is not ignore_index=", ignore_index, ")")
                          .c_str());
  }
}

}  // namespace unlearn_kernels::softmax_ce
