// C++ CPU kernel of one Lanczos step (see unlearn_kernels/ops/lanczos_step.py):
//   alpha = <hq, q>; w = hq - alpha q - beta_prev q_prev; w -= B^T (B w), a second time only when
//   needed; beta = ||w||; q_next = w / beta.
// The basis B (m x d, 14 MB at m = 35, d = 1e5 in float32) dominates the memory traffic, so the
// kernel touches it as few times as it can: twice per step when one Gram-Schmidt pass is enough,
// otherwise three times from memory and once from cache.
//   0. alpha and ||hq||^2 (the vectors only; float64 sums);
//   1. w = hq - alpha q - beta_prev q_prev, stored, c1 = B w and ||w||^2              (reads B once);
//   2. one pass is enough (DGKS, kappa = 1/sqrt(2)) when it keeps more than half of ||w||^2: for
//      orthonormal rows ||w - B^T c1||^2 = ||w||^2 - ||c1||^2, so pass 1 predicts it. Then
//      w -= B^T c1 and ||w||^2                                                        (reads B once),
//      and the prediction is checked on the new ||w||^2 (a basis far from orthonormal fails it:
//      then a second pass, c2 = B w and w -= B^T c2, reads B twice more);
//   2'. otherwise (hq near span(B)) classical Gram-Schmidt twice (CGS2): w -= B^T c1, then
//      c2 = B w on the same tile while it is still in cache (reads B once), and
//   3. only if ||c2|| > eps ||w||: w -= B^T c2                                        (reads B once);
//   then a sweep over w scales it by 1 / beta.
// One pass leaves B w_new = (I - B B^T) c1 plus rounding: with the kappa rule ||c1|| <= ||w_new||, so
// the new vector is as orthogonal to B as B's rows are to each other, up to rounding (in a Lanczos
// run with full reorthogonalisation c1 is only the lost orthogonality, far below that bound).
// Skipping pass 3 when ||c2|| <= eps ||w|| leaves |B q_next| <= eps elementwise: the correction it
// would make, of norm about ||c2|| for orthonormal rows, is at the rounding level of storing w.
// The length d is cut into blocks (processed in parallel, a fixed number of them so the result
// does not depend on the thread count), each walked in tiles: a tile's products with the basis
// rows are summed in the vectors' type (at most kTile / 8 terms per SIMD lane), tile sums in
// float64, added over blocks in block order (deterministic).
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

constexpr int64_t kTile = 1024;        // elements of w per tile: the tile of B (m x kTile) stays in L2
constexpr int64_t kMinBlock = 8192;    // elements per parallel task, at least
constexpr int64_t kMaxBlocks = 128;    // parallel tasks, at most (bounds the partial-sum buffers)

struct Blocks {
  int64_t size, count;
};

Blocks make_blocks(int64_t d) {
  const int64_t per = (d + kMaxBlocks - 1) / kMaxBlocks;
  const int64_t size = std::max(kMinBlock, (per + kTile - 1) / kTile * kTile);
  return {size, std::max<int64_t>(1, (d + size - 1) / size)};
}

// Runs fn(acc, begin, end) on every block in parallel, acc = that block's `width` partial sums,
// and returns their column sums, added in block order.
template <typename Fn>
std::vector<double> blockwise_sum(const Blocks& blocks, int64_t d, int64_t width, const Fn& fn) {
  std::vector<double> partials(blocks.count * width, 0.0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      fn(partials.data() + b * width, b * blocks.size, std::min(d, (b + 1) * blocks.size));
    }
  });
  std::vector<double> total(width, 0.0);
  for (int64_t b = 0; b < blocks.count; ++b) {
    for (int64_t j = 0; j < width; ++j) total[j] += partials[b * width + j];
  }
  return total;
}

// out[j] += B[j, i0:i0+n] . x[0:n] for every row j < m. Rows go four at a time: four independent
// accumulation chains that share each load of x.
template <typename T>
void project_tile(const T* B, int64_t d, int64_t m, int64_t i0, int64_t n, const T* x, double* out) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const T *r0 = B + j * d + i0, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i];
      s0 += r0[i] * v;
      s1 += r1[i] * v;
      s2 += r2[i] * v;
      s3 += r3[i] * v;
    }
    out[j] += s0;
    out[j + 1] += s1;
    out[j + 2] += s2;
    out[j + 3] += s3;
  }
  for (; j < m; ++j) {
    const T* r0 = B + j * d + i0;
    T s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t i = 0; i < n; ++i) s0 += r0[i] * x[i];
    out[j] += s0;
  }
}

// w[0:n] -= sum_j c[j] B[j, i0:i0+n]
template <typename T>
void subtract_projection(T* w, const T* B, const T* c, int64_t d, int64_t m, int64_t i0, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const T *r0 = B + j * d + i0, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
    const T c0 = c[j], c1 = c[j + 1], c2 = c[j + 2], c3 = c[j + 3];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) w[i] -= c0 * r0[i] + c1 * r1[i] + c2 * r2[i] + c3 * r3[i];
  }
  for (; j < m; ++j) {
    const T* r0 = B + j * d + i0;
    const T cj = c[j];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) w[i] -= cj * r0[i];
  }
}

// In float64 for float32 vectors too: float32 squares underflow below about 1e-23 (a false breakdown)
// and overflow above about 1e19, where the float64 squares of any float32 value cannot.
template <typename T>
double squared_norm(const T* w, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(w[i]) * static_cast<double>(w[i]);
  return s;
}

// sum_{j < m} c[j]^2
double squared_sum(const std::vector<double>& c, int64_t m) {
  double s = 0;
  for (int64_t j = 0; j < m; ++j) s += c[j] * c[j];
  return s;
}

template <typename T>
std::vector<T> to_vector(const std::vector<double>& c, int64_t m) {
  return std::vector<T>(c.begin(), c.begin() + m);
}

template <typename T>
std::tuple<double, double> lanczos_step_impl(const T* hq, const T* q, const T* qp, const T* B, T* w, int64_t d,
                                             int64_t m, double beta_prev) {
  const Blocks blocks = make_blocks(d);
  // Pass 0: alpha and ||hq||^2, in float64 (alpha is exact to float64 rounding for float32 vectors too).
  const std::vector<double> s0 = blockwise_sum(blocks, d, 2, [&](double* acc, int64_t begin, int64_t end) {
    double a = 0, h2 = 0;
#pragma omp simd reduction(+ : a, h2)
    for (int64_t i = begin; i < end; ++i) {
      const double h = hq[i];
      a += h * static_cast<double>(q[i]);
      h2 += h * h;
    }
    acc[0] += a;
    acc[1] += h2;
  });
  const double alpha = s0[0], hq_norm = std::sqrt(s0[1]);

  // Pass 1: w = hq - alpha q - beta_prev q_prev (formed in float64, stored), c1 = B w and ||w||^2.
  const std::vector<double> s1 = blockwise_sum(blocks, d, m + 1, [&](double* acc, int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end; i0 += kTile) {
      const int64_t n = std::min(kTile, end - i0);
#pragma omp simd
      for (int64_t i = i0; i < i0 + n; ++i) {
        w[i] = static_cast<T>(static_cast<double>(hq[i]) - alpha * static_cast<double>(q[i]) -
                              beta_prev * static_cast<double>(qp[i]));
      }
      project_tile(B, d, m, i0, n, w + i0, acc);
      acc[m] += squared_norm(w + i0, n);
    }
  });
  // w -= B^T c (one read of B); returns the new ||w||^2.
  const auto subtract_pass = [&](const std::vector<double>& c) {
    const std::vector<T> ct = to_vector<T>(c, m);
    return blockwise_sum(blocks, d, 1, [&](double* acc, int64_t begin, int64_t end) {
      for (int64_t i0 = begin; i0 < end; i0 += kTile) {
        const int64_t n = std::min(kTile, end - i0);
        subtract_projection(w + i0, B, ct.data(), d, m, i0, n);
        acc[0] += squared_norm(w + i0, n);
      }
    })[0];
  };
  const double eps = std::numeric_limits<T>::epsilon();
  const double w1_norm2 = s1[m];
  double w_norm2 = 0;
  if (squared_sum(s1, m) <= 0.5 * w1_norm2) {
    // Pass 2, one Gram-Schmidt pass; checked on the new norm, a second one if the check fails.
    w_norm2 = subtract_pass(s1);
    if (w_norm2 < 0.5 * w1_norm2) {
      const std::vector<double> c2 = blockwise_sum(blocks, d, m, [&](double* acc, int64_t begin, int64_t end) {
        for (int64_t i0 = begin; i0 < end; i0 += kTile) project_tile(B, d, m, i0, std::min(kTile, end - i0), w + i0, acc);
      });
      w_norm2 = subtract_pass(c2);
    }
  } else {
    // Pass 2': w -= B^T c1; then c2 = B w and ||w||^2 on the tile just written (B's tile is in cache).
    const std::vector<T> c1t = to_vector<T>(s1, m);
    const std::vector<double> s2 = blockwise_sum(blocks, d, m + 1, [&](double* acc, int64_t begin, int64_t end) {
      for (int64_t i0 = begin; i0 < end; i0 += kTile) {
        const int64_t n = std::min(kTile, end - i0);
        subtract_projection(w + i0, B, c1t.data(), d, m, i0, n);
        project_tile(B, d, m, i0, n, w + i0, acc);
        acc[m] += squared_norm(w + i0, n);
      }
    });
    w_norm2 = s2[m];
    // Pass 3, the second Gram-Schmidt pass, when its correction is above the rounding level of w.
    if (squared_sum(s2, m) > eps * eps * w_norm2) w_norm2 = subtract_pass(s2);
  }
  // ||hq||^2 beyond float64 (entries above ~1e154): the breakdown test cannot be read (every beta passed it, a
  // false breakdown), so the step is refused as an overflow (beta = Inf, see check_lanczos_step_values)
  const bool overflow = !std::isfinite(hq_norm);
  const double beta = overflow ? std::numeric_limits<double>::infinity() : std::sqrt(w_norm2);
  const bool breakdown = !overflow && beta <= kStepBreakdownEps * eps * hq_norm;
  const double scale = breakdown || overflow ? 0.0 : 1.0 / beta;
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
  const int64_t d = hq_in.size(0);
  const auto dtype = hq_in.scalar_type();
  const double beta_prev = beta_prev_in.item<double>();
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
  check_lanczos_step_values(beta_prev, alpha, beta);
  const auto f64 = hq.options().dtype(at::kDouble);
  return {q_next, at::scalar_tensor(alpha, f64), at::scalar_tensor(beta, f64)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("lanczos_step", &lanczos_step_cpu); }

}  // namespace unlearn_kernels
