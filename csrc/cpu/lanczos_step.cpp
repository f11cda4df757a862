// C++ CPU kernel of one Lanczos step (see unlearn_kernels/ops/lanczos_step.py):
//   alpha = <hq, q>; w = hq - alpha q - beta_prev q_prev; w -= B^T (B w) twice (CGS2);
//   beta = ||w||; q_next = w / beta.
// The vector length d is cut into blocks (processed in parallel, a fixed number of them so the
// result does not depend on the thread count), each walked in tiles that stay in L1 while the
// m rows of the basis B stream past. Three passes read B once each:
//   1. alpha, ||hq||^2 and B hq, B q, B q_prev, from which the first CGS coefficients follow:
//      c1 = B w = B hq - alpha B q - beta_prev B q_prev (cancellation here is repaired by pass 2);
//   2. w = hq - alpha q - beta_prev q_prev - B^T c1, stored, and c2 = B w;
//   3. w -= B^T c2 and ||w||^2; then a last sweep scales w by 1 / beta.
// Sums accumulate in double; per-block partial sums are added in block order (deterministic).
#include "../lanczos_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace unlearn_kernels {
namespace {

constexpr int64_t kTile = 512;         // elements of w kept in L1 while the basis rows stream past
constexpr int64_t kMinBlock = 8192;    // elements per parallel task, at least
constexpr int64_t kMaxBlocks = 128;    // parallel tasks, at most (bounds the partial-sum buffers)
constexpr double kBreakdownRtolEps = 16.0;  // breakdown: beta <= 16 eps ||hq||

struct Blocks {
  int64_t size, count;
};

Blocks make_blocks(int64_t d) {
  const int64_t per = (d + kMaxBlocks - 1) / kMaxBlocks;
  const int64_t size = std::max(kMinBlock, (per + kTile - 1) / kTile * kTile);
  return {size, std::max<int64_t>(1, (d + size - 1) / size)};
}

// Runs fn(block, begin, end) for every block in parallel; fn writes partials[block * width ...].
template <typename Fn>
std::vector<double> blockwise(const Blocks& blocks, int64_t d, int64_t width, const Fn& fn) {
  std::vector<double> partials(blocks.count * width, 0.0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      fn(partials.data() + b * width, b * blocks.size, std::min(d, (b + 1) * blocks.size));
    }
  });
  return partials;
}

// Column sums of the (count x width) partials, in block order.
std::vector<double> reduce(const std::vector<double>& partials, int64_t count, int64_t width) {
  std::vector<double> total(width, 0.0);
  for (int64_t b = 0; b < count; ++b) {
    for (int64_t j = 0; j < width; ++j) total[j] += partials[b * width + j];
  }
  return total;
}

// The basis rows are walked four at a time: four independent accumulation chains (a single
// chain is bound by the FMA latency, not by memory) that share each load of the tile of x or w.

// out[r] += B[j + r, i0:i0+n] . x[i0:i0+n] for r < 4.
template <typename T, typename X>
void dot4(const T* B, int64_t d, int64_t j, int64_t i0, int64_t n, const X* x, double* out) {
  const T *r0 = B + j * d + i0, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
  const X* xt = x + i0;
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(xt[i]);
    s0 += static_cast<double>(r0[i]) * v;
    s1 += static_cast<double>(r1[i]) * v;
    s2 += static_cast<double>(r2[i]) * v;
    s3 += static_cast<double>(r3[i]) * v;
  }
  out[0] += s0;
  out[1] += s1;
  out[2] += s2;
  out[3] += s3;
}

// out[0] += B[j, i0:i0+n] . x[i0:i0+n]
template <typename T, typename X>
void dot1(const T* B, int64_t d, int64_t j, int64_t i0, int64_t n, const X* x, double* out) {
  const T* r0 = B + j * d + i0;
  const X* xt = x + i0;
  double s0 = 0;
#pragma omp simd reduction(+ : s0)
  for (int64_t i = 0; i < n; ++i) s0 += static_cast<double>(r0[i]) * static_cast<double>(xt[i]);
  out[0] += s0;
}

// out[j] += B[j, i0:i0+n] . x[i0:i0+n] for every row j < m.
template <typename T, typename X>
void project_tile(const T* B, int64_t d, int64_t m, int64_t i0, int64_t n, const X* x, double* out) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) dot4(B, d, j, i0, n, x, out + j);
  for (; j < m; ++j) dot1(B, d, j, i0, n, x, out + j);
}

// wt[0:n] -= sum_j c[j] B[j, i0:i0+n]
template <typename T>
void subtract_projection(double* wt, const T* B, const double* c, int64_t d, int64_t m, int64_t i0, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const T *r0 = B + j * d + i0, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
    const double c0 = c[j], c1 = c[j + 1], c2 = c[j + 2], c3 = c[j + 3];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      wt[i] -= c0 * static_cast<double>(r0[i]) + c1 * static_cast<double>(r1[i]) +
               c2 * static_cast<double>(r2[i]) + c3 * static_cast<double>(r3[i]);
    }
  }
  for (; j < m; ++j) {
    const T* r0 = B + j * d + i0;
    const double cj = c[j];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) wt[i] -= cj * static_cast<double>(r0[i]);
  }
}

// Pass 1 on one tile: acc = [alpha, ||hq||^2, B hq (m), B q (m), B q_prev (m)].
template <typename T>
void pass1_tile(const T* hq, const T* q, const T* qp, const T* B, int64_t d, int64_t m, int64_t i0, int64_t n,
                double* acc) {
  double a = 0, h2 = 0;
#pragma omp simd reduction(+ : a, h2)
  for (int64_t i = i0; i < i0 + n; ++i) {
    const double h = hq[i];
    a += h * static_cast<double>(q[i]);
    h2 += h * h;
  }
  acc[0] += a;
  acc[1] += h2;
  // Three sweeps over each group of four rows: the second and third read them from L1.
  double *bh = acc + 2, *bq = bh + m, *bp = bq + m;
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    dot4(B, d, j, i0, n, hq, bh + j);
    dot4(B, d, j, i0, n, q, bq + j);
    dot4(B, d, j, i0, n, qp, bp + j);
  }
  for (; j < m; ++j) {
    dot1(B, d, j, i0, n, hq, bh + j);
    dot1(B, d, j, i0, n, q, bq + j);
    dot1(B, d, j, i0, n, qp, bp + j);
  }
}

template <typename T>
std::tuple<double, double> lanczos_step_impl(const T* hq, const T* q, const T* qp, const T* B, T* w, int64_t d,
                                             int64_t m, double beta_prev) {
  const Blocks blocks = make_blocks(d);
  // Pass 1: alpha, ||hq||^2, B hq, B q, B q_prev.
  const int64_t w1 = 2 + 3 * m;
  const std::vector<double> s1 = reduce(
      blockwise(blocks, d, w1,
                [&](double* acc, int64_t begin, int64_t end) {
                  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
                    pass1_tile(hq, q, qp, B, d, m, i0, std::min(kTile, end - i0), acc);
                  }
                }),
      blocks.count, w1);
  const double alpha = s1[0], hq_norm = std::sqrt(s1[1]);
  std::vector<double> c1(m);
  for (int64_t j = 0; j < m; ++j) c1[j] = s1[2 + j] - alpha * s1[2 + m + j] - beta_prev * s1[2 + 2 * m + j];

  // Pass 2: w = hq - alpha q - beta_prev q_prev - B^T c1, stored; then c2 = B w (and ||w||^2).
  const std::vector<double> s2 = reduce(
      blockwise(blocks, d, m + 1,
                [&](double* acc, int64_t begin, int64_t end) {
                  double wt[kTile];
                  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
                    const int64_t n = std::min(kTile, end - i0);
#pragma omp simd
                    for (int64_t i = 0; i < n; ++i) {
                      wt[i] = static_cast<double>(hq[i0 + i]) - alpha * static_cast<double>(q[i0 + i]) -
                              beta_prev * static_cast<double>(qp[i0 + i]);
                    }
                    subtract_projection(wt, B, c1.data(), d, m, i0, n);
                    double w2 = 0;
#pragma omp simd reduction(+ : w2)
                    for (int64_t i = 0; i < n; ++i) {
                      w[i0 + i] = static_cast<T>(wt[i]);
                      w2 += wt[i] * wt[i];
                    }
                    acc[m] += w2;
                    project_tile(B, d, m, i0, n, w, acc);
                  }
                }),
      blocks.count, m + 1);

  // Pass 3 (only with a basis): w -= B^T c2 and ||w||^2.
  double w_norm2 = s2[m];
  if (m > 0) {
    w_norm2 = reduce(blockwise(blocks, d, 1,
                               [&](double* acc, int64_t begin, int64_t end) {
                                 double wt[kTile];
                                 for (int64_t i0 = begin; i0 < end; i0 += kTile) {
                                   const int64_t n = std::min(kTile, end - i0);
                                   for (int64_t i = 0; i < n; ++i) wt[i] = static_cast<double>(w[i0 + i]);
                                   subtract_projection(wt, B, s2.data(), d, m, i0, n);
                                   double w2 = 0;
#pragma omp simd reduction(+ : w2)
                                   for (int64_t i = 0; i < n; ++i) {
                                     w[i0 + i] = static_cast<T>(wt[i]);
                                     w2 += wt[i] * wt[i];
                                   }
                                   acc[0] += w2;
                                 }
                               }),
                     blocks.count, 1)[0];
  }
  double beta = std::sqrt(w_norm2);
  const bool breakdown = beta <= kBreakdownRtolEps * std::numeric_limits<T>::epsilon() * hq_norm;
  const double scale = breakdown ? 0.0 : 1.0 / beta;
  at::parallel_for(0, d, kMinBlock, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) w[i] = static_cast<T>(static_cast<double>(w[i]) * scale);
  });
  return {alpha, breakdown ? 0.0 : beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_step_cpu(const at::Tensor& hq_in, const at::Tensor& q_in,
                                                                const at::Tensor& q_prev_in,
                                                                const at::Tensor& beta_prev_in,
                                                                const at::Tensor& basis_in) {
  check_lanczos_step_inputs(hq_in, q_in, q_prev_in, beta_prev_in, basis_in);
  constexpr const char* op = "lanczos_step";
  const int64_t d = hq_in.size(0);
  const auto dtype = hq_in.scalar_type();
  const double beta_prev = beta_prev_in.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(beta_prev), op, ": beta_prev must be finite, got ", beta_prev);
  const at::Tensor hq = hq_in.contiguous(), q = q_in.contiguous(), q_prev = q_prev_in.contiguous();
  const at::Tensor basis = basis_in.contiguous();
  const int64_t m = basis.size(0);
  at::Tensor q_next = at::empty({d}, hq.options());
  double alpha = 0, beta = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "lanczos_step_cpu", [&] {
    std::tie(alpha, beta) = lanczos_step_impl<scalar_t>(
        hq.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), q_prev.const_data_ptr<scalar_t>(),
        basis.const_data_ptr<scalar_t>(), q_next.mutable_data_ptr<scalar_t>(), d, m, beta_prev);
  });
  const auto f64 = hq.options().dtype(at::kDouble);
  return {q_next, at::scalar_tensor(alpha, f64), at::scalar_tensor(beta, f64)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("lanczos_step", &lanczos_step_cpu); }

}  // namespace unlearn_kernels
