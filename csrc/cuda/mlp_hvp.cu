// CUDA kernels of the fused MLP Hessian-vector product. The passes themselves (cuBLAS matmuls through
// ATen) are the device-agnostic `run`, `run_flat` and `run_state` in csrc/mlp_hvp.cpp; this file supplies its device stages
// (see csrc/mlp_hvp.h): a layer's biases, (act, act', act'') and R-forward in one kernel; the
// backward through the activation for the gradient and all K R-derivatives in one kernel (one
// thread per (row, feature), looping over K, so the gradient is read once and written after the K
// updates); the target count (ATen ops); and the loss rows (one warp per row: one softmax serves
// the gradient and the K tangents).
#include "../mlp_hvp.h"
#include "../message.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

namespace unlearn_kernels::mlp_hvp {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Blocks for a grid-stride loop over n elements.
unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, int64_t{1} << 20));
}

// One thread per (row, feature) of the layer (see Kernels::activate): the biases, (act, act',
// act'') and, looping over K, the R-derivatives of all tangents. ar and h are not __restrict__: the
// forward passes them as one buffer (K = 0), which each thread reads at its element before writing it.
template <typename scalar_t>
__global__ void activate_kernel(Activation act, const scalar_t* ar, const scalar_t* __restrict__ t,
                                const scalar_t* __restrict__ b, const scalar_t* __restrict__ vb,
                                scalar_t* h, scalar_t* __restrict__ d1, scalar_t* __restrict__ d2,
                                scalar_t* __restrict__ rh, scalar_t* __restrict__ ra, int64_t N, int64_t K,
                                int64_t d) {
  const scalar_t one = 1, two = 2, half = 0.5;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < N * d;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / d, j = idx - i * d;
    const scalar_t* ari = ar + i * (K + 1) * d;
    const scalar_t x = ari[j] + (b != nullptr ? b[j] : scalar_t(0));
    scalar_t hv, g1 = one, g2 = 0;
    switch (act) {
      case Activation::kIdentity:
        hv = x;
        break;
      case Activation::kReLU:
        hv = (x > 0 || isnan(x)) ? x : scalar_t(0);  // NaN-propagating, like torch.relu
        g1 = x > 0 ? one : scalar_t(0);
        break;
      case Activation::kGELU: {  // exact form: x Phi(x)
        const scalar_t cdf = half * (one + erf(x * scalar_t(M_SQRT1_2)));
        const scalar_t pdf = exp(-half * x * x) * scalar_t(0.5 * M_2_SQRTPI * M_SQRT1_2);
        hv = x * cdf;
        g1 = cdf + x * pdf;
        g2 = pdf * (two - x * x);
        break;
      }
      case Activation::kTanh:
        hv = tanh(x);
        g1 = one - hv * hv;
        g2 = -two * hv * g1;
        break;
      default:  // kSigmoid
        hv = one / (one + exp(-x));
        g1 = hv * (one - hv);
        g2 = g1 * (one - two * hv);
        break;
    }
    h[idx] = hv;
    if (d1 != nullptr) d1[idx] = g1;
    if (d2 != nullptr) d2[idx] = g2;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t rk = (i * K + k) * d + j;
      scalar_t r = ari[(k + 1) * d + j];
      if (vb != nullptr) r += vb[k * d + j];
      if (t != nullptr) r += t[rk];
      if (ra != nullptr) ra[rk] = r;
      rh[rk] = g1 * r;  // g1 = 1 for the identity
    }
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ d1, const scalar_t* __restrict__ d2,
                                const scalar_t* __restrict__ ra, scalar_t* __restrict__ g, scalar_t* __restrict__ rg,
                                int64_t N, int64_t K, int64_t d) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < N * d;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / d, j = idx - i * d;
    const scalar_t v1 = d1[idx], vg = g != nullptr ? g[idx] : scalar_t(0);  // g is null only when d2 is
    const scalar_t v2g = d2 != nullptr ? d2[idx] * vg : scalar_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = (i * K + k) * d + j;
      rg[r] = d2 != nullptr ? v1 * rg[r] + v2g * ra[r] : v1 * rg[r];
    }
    if (g != nullptr) g[idx] = v1 * vg;
  }
}

template <typename scalar_t>
__device__ scalar_t warp_sum(scalar_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// NaN-propagating maximum over the warp (a NaN anywhere makes the row max NaN: reported as bad).
template <typename scalar_t>
__device__ scalar_t warp_max(scalar_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const scalar_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = (isnan(other) || other > v) ? other : v;
  }
  return v;
}

// One warp per row. p_j = exp(z_j - m) / sum is recomputed where needed instead of stored, so any
// number of classes works without shared memory; the logits row is overwritten last.
template <typename scalar_t>
__global__ void loss_kernel(scalar_t* __restrict__ z, const int64_t* __restrict__ y, scalar_t* __restrict__ rz,
                            int64_t N, int64_t C, int64_t K, scalar_t off, scalar_t scale,
                            int64_t ignore_index, int* __restrict__ flags, double* __restrict__ values,
                            double label_smoothing) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  if (row >= N) return;  // uniform across the warp: blockDim is a multiple of 32
  scalar_t* zi = z + row * C;
  scalar_t* ri = rz + row * K * C;
  const int64_t target = y[row];
  if (target == ignore_index) {
    // An ignored row adds nothing only while it is finite (as in loss_cpu): a NaN or Inf there reaches
    // every product through the backward's 0 * Inf, so it is flagged before the row is zeroed.
    bool finite_z = true, finite_r = true;
    for (int64_t j = lane; j < C; j += kWarp) {
      finite_z &= isfinite(zi[j]);
      zi[j] = 0;
    }
    for (int64_t j = lane; j < K * C; j += kWarp) {
      finite_r &= isfinite(ri[j]);
      ri[j] = 0;
    }
    if (!finite_z) flags[0] = 1;  // every writer stores the same 1
    if (!finite_r) flags[1] = 1;
    if (values != nullptr && lane == 0) values[row] = 0.0;
    return;
  }
  scalar_t m = -INFINITY;
  for (int64_t j = lane; j < C; j += kWarp) m = (isnan(zi[j]) || zi[j] > m) ? zi[j] : m;
  m = warp_max(m);
  if (lane == 0 && !isfinite(m)) flags[0] = 1;
  // sums in double, as loss_cpu's: in float a confident row's exp(z - m) ~ 1e-9 falls below half an ulp of
  // the lane's running sum once the top class is in it, and that lane's later classes were dropped (1/32 of
  // the small probabilities: p_y - 1 3% off with 20,000 classes)
  // read by every lane before the shuffles of warp_sum: lane target % 32 overwrites it in the last loop
  const double z_target = static_cast<double>(zi[target]);
  // the top class (the first at the max; 0 for a NaN row, which is reported as bad)
  int64_t top = C;
  for (int64_t j = lane; j < C; j += kWarp) {
    if (zi[j] == m) {
      top = j;
      break;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, top, offset);
    top = other < top ? other : top;
  }
  if (top == C) top = 0;
  // the target's term apart (as loss_cpu's): the target's p_y - 1 below is minus rest / total, where
  // (total - e_y) / total would cancel in double too once 1 - p_y falls below ~1e-9
  double others = 0;
  for (int64_t j = lane; j < C; j += kWarp) {
    if (j != target) others += static_cast<double>(exp(zi[j] - m));
  }
  const double rest = warp_sum(others);
  const double total = rest + static_cast<double>(exp(static_cast<scalar_t>(z_target) - m));
  if (values != nullptr) {  // the row's loss, as loss_cpu's, before the logits are overwritten
    double z_sum = 0;
    if (label_smoothing > 0) {  // uniform across the warp
      for (int64_t j = lane; j < C; j += kWarp) z_sum += static_cast<double>(zi[j]);
      z_sum = warp_sum(z_sum);
    }
    if (lane == 0) {
      values[row] = static_cast<double>(m) + log(total) - (1.0 - label_smoothing) * z_target -
                    label_smoothing / static_cast<double>(C) * z_sum;
    }
  }
  const scalar_t inv_sum = static_cast<scalar_t>(1.0 / total);
  // R-rows relative to the top class c, as loss_cpu's: (r_j - r_c) - sum_k p_k (r_k - r_c); every lane reads r_c
  // before the shuffles of warp_sum, after which lane c % 32 overwrites it
  for (int64_t k = 0; k < K; ++k) {
    scalar_t* r = ri + k * C;
    const scalar_t rc = r[top];
    double sum_pr = 0;  // in double, as the sum above
    for (int64_t j = lane; j < C; j += kWarp) {
      sum_pr += static_cast<double>(exp(zi[j] - m) * inv_sum) * static_cast<double>(r[j] - rc);
    }
    const scalar_t dot = static_cast<scalar_t>(warp_sum(sum_pr));
    if (lane == 0 && !isfinite(dot)) flags[1] = 1;
    __syncwarp();  // every lane's read of r_c is done (a shuffle orders no memory)
    for (int64_t j = lane; j < C; j += kWarp) r[j] = exp(zi[j] - m) * inv_sum * ((r[j] - rc) - dot) * scale;
  }
  // the target's p_y - 1 as minus the other classes' share (as loss_cpu's: float's p_y - 1 of a well-fit row
  // kept ~6e-8 absolute of a 1 - p_y ~ 1e-5)
  const double target_grad = label_smoothing * (1.0 - 1.0 / static_cast<double>(C)) - rest / total;
  __syncwarp();  // every lane's read of z_target is done before lane target % 32 writes it (K = 0: no shuffle between)
  for (int64_t j = lane; j < C; j += kWarp) {
    zi[j] = j == target ? static_cast<scalar_t>(target_grad * static_cast<double>(scale))
                        : (exp(zi[j] - m) * inv_sum - off) * scale;
  }
}

void activate_cuda(Activation act, const at::Tensor& ar, const at::Tensor& t, const at::Tensor& b,
                   const at::Tensor& vb, at::Tensor& h, at::Tensor& d1, at::Tensor& d2, at::Tensor& rh,
                   at::Tensor& ra) {
  assert_activate_layout(act, ar, t, h, d1, d2, rh, ra);
  const int64_t N = rh.size(0), K = rh.size(1), d = rh.size(2);
  if (N * d == 0) return;
  const at::Tensor bc = b.defined() ? b.contiguous() : b, vbc = vb.defined() ? vb.contiguous() : vb;
  AT_DISPATCH_FLOATING_TYPES(ar.scalar_type(), "mlp_hvp_activate_cuda", [&] {
    const auto ptr = [](const at::Tensor& x) { return x.defined() ? x.const_data_ptr<scalar_t>() : nullptr; };
    const auto mut = [](at::Tensor& x) { return x.defined() ? x.mutable_data_ptr<scalar_t>() : nullptr; };
    activate_kernel<scalar_t><<<grid_for(N * d), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        act, ptr(ar), ptr(t), ptr(bc), ptr(vbc), mut(h), mut(d1), mut(d2), mut(rh), mut(ra), N, K, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const at::Tensor& d1, const at::Tensor& d2, const at::Tensor& ra, at::Tensor& g, at::Tensor& rg) {
  TORCH_INTERNAL_ASSERT(d1.is_contiguous() && rg.is_contiguous() && rg.dim() == 3);
  TORCH_INTERNAL_ASSERT(d2.defined() == ra.defined() && (!d2.defined() || (d2.is_contiguous() && ra.is_contiguous())));
  TORCH_INTERNAL_ASSERT(g.defined() ? g.is_contiguous() : !d2.defined());
  const int64_t N = rg.size(0), K = rg.size(1), d = rg.size(2);
  if (N * d == 0) return;
  AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "mlp_hvp_backward_cuda", [&] {
    backward_kernel<scalar_t><<<grid_for(N * d), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        d1.const_data_ptr<scalar_t>(), d2.defined() ? d2.const_data_ptr<scalar_t>() : nullptr,
        ra.defined() ? ra.const_data_ptr<scalar_t>() : nullptr, g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr,
        rg.mutable_data_ptr<scalar_t>(), N, K, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int64_t count_kept_cuda(const char* op, const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const at::Tensor kept = target != ignore_index;
  const at::Tensor bad_target = (kept & ((target < 0) | (target >= C))).nonzero();
  if (bad_target.numel() > 0) {
    const int64_t row = bad_target[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false,
                      message(op, ": target[", row, "] = ", target[row].item<int64_t>(), " is out of range for ", C,
                              " classes (and is not ignore_index=", ignore_index, ")")
                          .c_str());
  }
  return kept.sum().item<int64_t>();
}

void loss_cuda(at::Tensor& z, const at::Tensor& target, at::Tensor& rz, double label_smoothing, int64_t ignore_index,
               double scale, at::Tensor& flags, at::Tensor& values) {
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && rz.is_contiguous() && rz.dim() == 3);
  TORCH_INTERNAL_ASSERT(!values.defined() || (values.is_contiguous() && values.scalar_type() == at::kDouble));
  const int64_t N = z.size(0), C = z.size(1), K = rz.size(1);
  const at::Tensor y = target.contiguous();
  constexpr int rows_per_block = kThreads / kWarp;
  const auto blocks = static_cast<unsigned int>((N + rows_per_block - 1) / rows_per_block);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_hvp_loss_cuda", [&] {
    loss_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        z.mutable_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), rz.mutable_data_ptr<scalar_t>(), N, C, K,
        static_cast<scalar_t>(label_smoothing / C), static_cast<scalar_t>(scale), ignore_index,
        flags.mutable_data_ptr<int>(), values.defined() ? values.mutable_data_ptr<double>() : nullptr, label_smoothing);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const Kernels kCudaKernels{&activate_cuda, &backward_cuda, &count_kept_cuda, &loss_cuda, &cached_loss_rows_aten,
                           0};  // all rows at once

std::vector<at::Tensor> mlp_hvp_cuda(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                                     const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                     at::TensorList v_weights, const c10::List<std::optional<at::Tensor>>& v_biases,
                                     double label_smoothing, int64_t ignore_index, bool check_finite) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run(kCudaKernels, x, target, weights, biases, activations, v_weights, v_biases, label_smoothing, ignore_index,
             check_finite);
}

at::Tensor mlp_hvp_flat_cuda(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                             const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                             double label_smoothing, int64_t ignore_index, bool check_finite) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run_flat(kCudaKernels, x, target, weights, biases, activations, V, weight_offsets, bias_offsets,
                  label_smoothing, ignore_index, check_finite);
}

std::tuple<at::Tensor, at::Tensor> mlp_value_grad_flat_cuda(
    const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations, at::IntArrayRef weight_offsets,
    at::IntArrayRef bias_offsets, double label_smoothing, int64_t ignore_index, bool with_gradient, bool check_finite) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run_value_grad_flat(kCudaKernels, x, target, weights, biases, activations, weight_offsets, bias_offsets,
                             label_smoothing, ignore_index, with_gradient, check_finite);
}

std::vector<at::Tensor> mlp_hvp_state_cuda(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                                           const c10::List<std::optional<at::Tensor>>& biases,
                                           at::IntArrayRef activations, double label_smoothing, int64_t ignore_index,
                                           bool check_finite) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run_state(kCudaKernels, x, target, weights, biases, activations, label_smoothing, ignore_index, check_finite);
}

at::Tensor mlp_hvp_flat_cached_cuda(const at::Tensor& x, at::TensorList state, at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                    const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                                    bool check_finite) {
  const c10::cuda::CUDAGuard guard(x.device());
  return run_cached_flat(kCudaKernels, x, state, weights, biases, activations, V, weight_offsets, bias_offsets,
                         check_finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("mlp_hvp", &mlp_hvp_cuda);
  m.impl("mlp_hvp_flat", &mlp_hvp_flat_cuda);
  m.impl("mlp_value_grad_flat", &mlp_value_grad_flat_cuda);
  m.impl("mlp_hvp_state", &mlp_hvp_state_cuda);
  m.impl("mlp_hvp_flat_cached", &mlp_hvp_flat_cached_cuda);
}

}  // namespace unlearn_kernels::mlp_hvp
