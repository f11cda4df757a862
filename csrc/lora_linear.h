// The fused LoRA linear layer y = x W^T + b + s (x A^T) B^T, its backward and its JVP, as one
// device-agnostic pass of GEMMs (cuBLAS on CUDA tensors; on the CPU ATen's, or oneDNN's through
// csrc/gemm.h for the large float32 ones outside its parallel regions): every rank-r term is folded into a
// big GEMM's output (addmm with beta = 1) instead of a separate pass over it. Defined in
// csrc/cpu/lora_linear.cpp and registered for CPU there; csrc/cuda/lora_linear.cu registers the
// same functions for CUDA under a device guard. x is 2-D (N, in); the Python op flattens the
// leading dims.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace unlearn_kernels::lora {

// y = x W^T + b + s (x A^T) B^T.
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& lora_a, const at::Tensor& lora_b, double scale);

// (grad_x, grad_a, grad_b); an output whose output_mask entry is false is returned undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& lora_a,
                                                        const at::Tensor& lora_b, double scale,
                                                        std::array<bool, 3> output_mask);

// (y, s [(x dA^T) B^T + (x A^T) dB^T]); an absent tangent is zero.
std::tuple<at::Tensor, at::Tensor> jvp(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, double scale,
                                       const std::optional<at::Tensor>& tangent_a,
                                       const std::optional<at::Tensor>& tangent_b);

}  // namespace unlearn_kernels::lora
