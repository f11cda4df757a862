// CUDA registration of the fused LoRA linear pass. The pass is the device-agnostic one of
// csrc/cpu/lora_linear.cpp (ATen GEMMs, here cuBLAS with float32 accumulation for float16 and
// bfloat16): every rank-r term is accumulated into the output of a big GEMM (beta = 1), which is
// also the epilogue a hand-written kernel would fuse, so there is no kernel of our own to launch.
// This file only sets the device of the inputs for the calls.
#include "../lora_linear.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace unlearn_kernels::lora {
namespace {

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  return forward(x, weight, bias, lora_a, lora_b, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& weight, const at::Tensor& lora_a,
                                                             const at::Tensor& lora_b, double scale,
                                                             std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return backward(grad_out, x, weight, lora_a, lora_b, scale, output_mask);
}

std::tuple<at::Tensor, at::Tensor> jvp_cuda(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                            const at::Tensor& lora_b, double scale,
                                            const std::optional<at::Tensor>& tangent_a,
                                            const std::optional<at::Tensor>& tangent_b) {
  const c10::cuda::CUDAGuard guard(x.device());
  return jvp(x, weight, bias, lora_a, lora_b, scale, tangent_a, tangent_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("lora_linear", &forward_cuda);
  m.impl("lora_linear_backward", &backward_cuda);
  m.impl("lora_linear_jvp", &jvp_cuda);
}

}  // namespace unlearn_kernels::lora
