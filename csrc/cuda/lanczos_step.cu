// CUDA kernels of one Lanczos step (see unlearn_kernels/ops/lanczos_step.py), with the scheme of
// the CPU kernel (csrc/cpu/lanczos_step.cpp), which reads the basis B (m x d) as few times as it can:
//   pass1: per tile partial sums of alpha = <hq, q> and ||hq||^2 (the vectors only);
//   pass2: w = hq - alpha q - beta_prev q_prev, stored, and per tile partial sums of c1 = B w;
//   pass3: w -= B^T c1, stored, and per tile partial sums of c2 = B w and ||w||^2;
//   decide: again = ||c2|| > eps ||w||, on the device;
//   pass4: if again, w -= B^T c2; ||w||^2 either way;   finish: beta, breakdown, scale; scale: w /= beta.
// Each block owns a kTile-wide column tile: its threads stream the rows of B for the updates, and
// for the dot products each warp takes whole rows against the tile held in shared memory (no block
// barrier per row). Partial sums per tile are added up by row_sum in a fixed order, so results
// are deterministic, and the flag never leaves the device; beta_prev, alpha and beta are read back
// once at the end, for the checks of the values (one host synchronisation per step).
#include "../lanczos_step.h"
#include "../message.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <math_constants.h>
#include <tuple>

namespace unlearn_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 1024;  // columns per block
constexpr int kPer = kTile / kThreads;  // columns per thread

template <typename T>
struct Eps;
template <>
struct Eps<float> {
  static constexpr double value = FLT_EPSILON;
};
template <>
struct Eps<double> {
  static constexpr double value = DBL_EPSILON;
};

__device__ double warp_sum(double x) {
  for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block, valid in thread 0. `scratch` holds kWarps doubles.
__device__ double block_sum(double x, double* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kWarps; ++i) total += scratch[i];
  }
  return total;
}

// out[r * n_tiles + tile] = B_r[tile] . vec[tile] for each row r, one warp per row; vec in shared memory.
template <typename T>
__device__ void rows_dot_tile(const T* __restrict__ B, const double* vec, int64_t d, int64_t m, int64_t col0,
                              int ncols, double* __restrict__ out, int64_t n_tiles, int64_t tile) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t j = warp; j < m; j += kWarps) {
    const T* row = B + j * d + col0;
    double s = 0;
    for (int i = lane; i < ncols; i += 32) s += static_cast<double>(row[i]) * vec[i];
    s = warp_sum(s);
    if (lane == 0) out[j * n_tiles + tile] = s;
  }
}

// part[tile] = <hq, q>, part[n_tiles + tile] = ||hq||^2 on the tile.
template <typename T>
__global__ void pass1_kernel(const T* __restrict__ hq, const T* __restrict__ q, int64_t d, int64_t n_tiles,
                             double* __restrict__ part) {
  __shared__ double scratch[kWarps];
  const int64_t tile = blockIdx.x, col0 = tile * kTile;
  const int ncols = static_cast<int>(d - col0 < kTile ? d - col0 : kTile);
  double a = 0, h2 = 0;
  for (int i = threadIdx.x; i < ncols; i += kThreads) {
    const double h = hq[col0 + i];
    a += h * static_cast<double>(q[col0 + i]);
    h2 += h * h;
  }
  a = block_sum(a, scratch);
  if (threadIdx.x == 0) part[tile] = a;
  h2 = block_sum(h2, scratch);
  if (threadIdx.x == 0) part[n_tiles + tile] = h2;
}

// w = hq - alpha q - beta_prev q_prev, stored; bpart[j * n_tiles + tile] = B_j . w (the stored, rounded w).
template <typename T>
__global__ void pass2_kernel(const T* __restrict__ hq, const T* __restrict__ q, const T* __restrict__ qp,
                             const T* __restrict__ B, T* __restrict__ w, const double* __restrict__ sums1,
                             const double* __restrict__ beta_prev_ptr, int64_t d, int64_t m, int64_t n_tiles,
                             double* __restrict__ bpart) {
  __shared__ double sh[kTile];
  const int64_t tile = blockIdx.x, col0 = tile * kTile;
  const int ncols = static_cast<int>(d - col0 < kTile ? d - col0 : kTile);
  const double alpha = sums1[0], beta_prev = *beta_prev_ptr;
  for (int i = threadIdx.x; i < ncols; i += kThreads) {
    const T stored = static_cast<T>(static_cast<double>(hq[col0 + i]) - alpha * static_cast<double>(q[col0 + i]) -
                                    beta_prev * static_cast<double>(qp[col0 + i]));
    w[col0 + i] = stored;
    sh[i] = static_cast<double>(stored);
  }
  __syncthreads();
  rows_dot_tile(B, sh, d, m, col0, ncols, bpart, n_tiles, tile);
}

// w -= B^T c, stored; then, when `project`, part[j * n_tiles + tile] = B_j . w (the stored w) and
// part[m * n_tiles + tile] = ||w||^2; else part[tile] = ||w||^2. `apply` (read on the device) set
// to 0 skips the update and the reads of B.
template <typename T>
__global__ void update_kernel(const T* __restrict__ B, T* __restrict__ w, const double* __restrict__ c,
                              const int* __restrict__ apply, bool project, int64_t d, int64_t m, int64_t n_tiles,
                              double* __restrict__ part) {
  __shared__ double sh[kTile];
  __shared__ double scratch[kWarps];
  const int64_t tile = blockIdx.x, col0 = tile * kTile;
  const int ncols = static_cast<int>(d - col0 < kTile ? d - col0 : kTile);
  const bool update = apply == nullptr || *apply != 0;
  double wt[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int i = threadIdx.x + k * kThreads;
    wt[k] = i < ncols ? static_cast<double>(w[col0 + i]) : 0.0;
  }
  if (update) {
    for (int64_t j = 0; j < m; ++j) {
      const double cj = c[j];
      const T* row = B + j * d + col0;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int i = threadIdx.x + k * kThreads;
        if (i < ncols) wt[k] -= cj * static_cast<double>(row[i]);
      }
    }
  }
  double w2 = 0;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < ncols) {
      const T stored = static_cast<T>(wt[k]);
      if (update) w[col0 + i] = stored;
      sh[i] = static_cast<double>(stored);  // the next projection sees the rounded vector
      w2 += sh[i] * sh[i];
    }
  }
  w2 = block_sum(w2, scratch);  // its barriers also publish sh
  if (threadIdx.x == 0) part[(project ? m * n_tiles : 0) + tile] = w2;
  if (project) rows_dot_tile(B, sh, d, m, col0, ncols, part, n_tiles, tile);
}

// out[r] = sum_t in[r * n + t], one block per row, in a fixed order.
__global__ void row_sum_kernel(const double* __restrict__ in, int64_t n, double* __restrict__ out) {
  __shared__ double scratch[kWarps];
  const double* row = in + blockIdx.x * n;
  double s = 0;
  for (int64_t t = threadIdx.x; t < n; t += kThreads) s += row[t];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// again = ||c2||^2 > eps^2 ||w||^2: whether the second update would move w by more than its rounding.
__global__ void decide_kernel(const double* __restrict__ sums, int64_t m, double eps, int* __restrict__ again) {
  double c2 = 0;
  for (int64_t j = 0; j < m; ++j) c2 += sums[j] * sums[j];
  *again = c2 > eps * eps * sums[m] ? 1 : 0;
}

// alpha, beta (0 on breakdown) and the scale 1 / beta (0 on breakdown).
__global__ void finish_kernel(const double* __restrict__ sums1, const double* __restrict__ w_norm2, double eps,
                              double* __restrict__ alpha, double* __restrict__ beta, double* __restrict__ scale) {
  // ||hq||^2 beyond float64: the breakdown test cannot be read; refused as an overflow (beta = Inf), as on the CPU
  const double hq_norm = sqrt(sums1[1]);
  const bool overflow = !isfinite(hq_norm);
  const double b = overflow ? CUDART_INF : sqrt(*w_norm2);
  const bool breakdown = !overflow && b <= kStepBreakdownEps * eps * hq_norm;
  *alpha = sums1[0];
  *beta = breakdown ? 0.0 : b;
  *scale = breakdown || overflow ? 0.0 : 1.0 / b;
}

template <typename T>
__global__ void scale_kernel(T* __restrict__ w, int64_t d, const double* __restrict__ scale) {
  const double s = *scale;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < d;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    w[i] = static_cast<T>(static_cast<double>(w[i]) * s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_step_cuda(const at::Tensor& hq_in, const at::Tensor& q_in,
                                                                 const at::Tensor& q_prev_in,
                                                                 const at::Tensor& beta_prev_in,
                                                                 const at::Tensor& basis_in) {
  check_lanczos_step_inputs(hq_in, q_in, q_prev_in, beta_prev_in, basis_in);
  constexpr const char* op = "lanczos_step";
  const int64_t d = hq_in.size(0);
  const auto dtype = hq_in.scalar_type();
  const c10::cuda::CUDAGuard guard(hq_in.device());
  const at::Tensor hq = hq_in.contiguous(), q = q_in.contiguous(), q_prev = q_prev_in.contiguous();
  const at::Tensor basis = basis_in.contiguous();
  const at::Tensor beta_prev = beta_prev_in.reshape({}).to(at::kDouble).contiguous();
  const int64_t m = basis.size(0);
  const auto f64 = hq.options().dtype(at::kDouble);
  at::Tensor w = at::empty({d}, hq.options());
  at::Tensor out = at::zeros({3}, f64);  // alpha, beta, scale
  // The checks of the values read beta_prev, alpha and beta back at once: one synchronisation.
  const auto checked = [&] {
    const at::Tensor values = at::cat({beta_prev.reshape({1}), out.narrow(0, 0, 2)}).cpu();
    const double* v = values.const_data_ptr<double>();
    check_lanczos_step_values(v[0], v[1], v[2]);
    return std::make_tuple(w, out[0].clone(), out[1].clone());
  };
  if (d == 0) return checked();

  const int64_t n_tiles = (d + kTile - 1) / kTile;
  TORCH_CHECK(n_tiles <= INT32_MAX, message(op, ": d = ", d, " is too large").c_str());
  at::Tensor part1 = at::empty({2, n_tiles}, f64), sums1 = at::empty({2}, f64);
  at::Tensor part2 = at::empty({m, n_tiles}, f64), c1 = at::empty({m}, f64);
  at::Tensor part3 = at::empty({m + 1, n_tiles}, f64), sums3 = at::empty({m + 1}, f64);
  at::Tensor part4 = at::empty({n_tiles}, f64), sums4 = at::empty({1}, f64);
  at::Tensor again = at::empty({1}, hq.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto tiles = static_cast<unsigned>(n_tiles);
  AT_DISPATCH_FLOATING_TYPES(dtype, "lanczos_step_cuda", [&] {
    const scalar_t* hq_p = hq.const_data_ptr<scalar_t>();
    const scalar_t* q_p = q.const_data_ptr<scalar_t>();
    const scalar_t* qp_p = q_prev.const_data_ptr<scalar_t>();
    const scalar_t* b_p = basis.const_data_ptr<scalar_t>();
    scalar_t* w_p = w.mutable_data_ptr<scalar_t>();
    pass1_kernel<scalar_t><<<tiles, kThreads, 0, stream>>>(hq_p, q_p, d, n_tiles, part1.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_sum_kernel<<<2, kThreads, 0, stream>>>(part1.const_data_ptr<double>(), n_tiles,
                                               sums1.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pass2_kernel<scalar_t><<<tiles, kThreads, 0, stream>>>(hq_p, q_p, qp_p, b_p, w_p, sums1.const_data_ptr<double>(),
                                                           beta_prev.const_data_ptr<double>(), d, m, n_tiles,
                                                           part2.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const double* w_norm2 = nullptr;
    if (m > 0) {
      row_sum_kernel<<<static_cast<unsigned>(m), kThreads, 0, stream>>>(part2.const_data_ptr<double>(), n_tiles,
                                                                       c1.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      update_kernel<scalar_t><<<tiles, kThreads, 0, stream>>>(b_p, w_p, c1.const_data_ptr<double>(), nullptr, true, d,
                                                              m, n_tiles, part3.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      row_sum_kernel<<<static_cast<unsigned>(m + 1), kThreads, 0, stream>>>(part3.const_data_ptr<double>(), n_tiles,
                                                                           sums3.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      decide_kernel<<<1, 1, 0, stream>>>(sums3.const_data_ptr<double>(), m, Eps<scalar_t>::value,
                                         again.mutable_data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // The last pass: the second update (when `again`; none without a basis) and ||w||^2.
    update_kernel<scalar_t><<<tiles, kThreads, 0, stream>>>(b_p, w_p, sums3.const_data_ptr<double>(),
                                                            m > 0 ? again.const_data_ptr<int>() : nullptr, false, d,
                                                            m, n_tiles, part4.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_sum_kernel<<<1, kThreads, 0, stream>>>(part4.const_data_ptr<double>(), n_tiles,
                                               sums4.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    w_norm2 = sums4.const_data_ptr<double>();
    double* o = out.mutable_data_ptr<double>();
    finish_kernel<<<1, 1, 0, stream>>>(sums1.const_data_ptr<double>(), w_norm2, Eps<scalar_t>::value, o, o + 1, o + 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto grid = static_cast<unsigned>(std::min<int64_t>((d + kThreads - 1) / kThreads, 4096));
    scale_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(w_p, d, o + 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return checked();
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) { m.impl("lanczos_step", &lanczos_step_cuda); }

}  // namespace unlearn_kernels
