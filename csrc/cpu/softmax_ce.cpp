// C++ CPU kernels for the softmax cross-entropy gradient and Hessian-vector product on logits.
// Rows of under kTileClasses classes go in tiles of rows (see hvp_tile); the others one row at a time (rows in
// parallel): pass 1 finds the row max (and the hvp its top class), pass 2
// writes exp(z - max) into the output row while accumulating its sum (and <exp, u - u_top>), pass 3
// rescales the output row in place (the gradient of a row whose target is its top class sums the other
// classes' exponentials before). The row stays in cache between passes, so no N x C temporary is ever
// allocated.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../softmax_ce.h"
#include "../message.h"

namespace unlearn_kernels {
namespace {

template <typename T>
constexpr bool kVectorised = std::is_same_v<T, float> || std::is_same_v<T, double>;

// Rows per parallel task: enough work per task that scheduling is negligible.
int64_t grain_rows(int64_t num_classes) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_classes));
}

// NaN-propagating maximum of one row (a NaN anywhere makes the row max NaN, which the finite
// check below reports).
template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* z, int64_t C) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if constexpr (kVectorised<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    if (C >= Vec::size()) {
      Vec vmax(m);
      for (; j + Vec::size() <= C; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(z + j));
      m = at::vec::vec_reduce_all<scalar_t>(
          [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    }
  }
  for (; j < C; ++j) {
    const acc_t x = static_cast<acc_t>(z[j]);
    m = (std::isnan(x) || x > m) ? x : m;
  }
  return m;
}

// The row's top class: its first column at the row max m (column 0 where m is NaN, which is reported).
// A vector at a time, as row_max.
template <typename scalar_t, typename acc_t>
int64_t top_class(const scalar_t* z, int64_t C, acc_t m) {
  int64_t j = 0;
  if constexpr (kVectorised<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec vm(m);
    for (; j + Vec::size() <= C; j += Vec::size()) {
      const int at_max = (Vec::loadu(z + j) != vm).zero_mask();  // a bit per lane equal to m
      if (at_max != 0) return j + __builtin_ctz(at_max);
    }
  }
  for (; j < C; ++j) {
    if (static_cast<acc_t>(z[j]) == m) return j;
  }
  return 0;
}

// Writes e_j = exp(z_j - m) into out, returns sum_j e_j; if u is given also returns
// sum_j e_j (u_j - u_top) in *dot_u. Vector lanes accumulate short blocks that are then added in
// double, so the sums stay as accurate as PyTorch's cascade summation for long rows.
template <typename scalar_t, typename acc_t>
double row_exp(const scalar_t* z, const scalar_t* u, scalar_t u_top, scalar_t* out, int64_t C, acc_t m,
               double* dot_u) {
  double sum = 0, dot = 0;
  int64_t j = 0;
  if constexpr (kVectorised<scalar_t>) {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kBlock = 16 * Vec::size();
    const Vec vm(m), vtop(u_top);
    const auto add = [](Vec& a, Vec& b) { return a + b; };
    while (j + Vec::size() <= C) {
      const int64_t block_end = std::min(C - C % Vec::size(), j + kBlock);
      Vec vsum(0), vdot(0);
      for (; j < block_end; j += Vec::size()) {
        const Vec e = (Vec::loadu(z + j) - vm).exp();
        e.store(out + j);
        vsum = vsum + e;
        if (u != nullptr) vdot = at::vec::fmadd(e, Vec::loadu(u + j) - vtop, vdot);
      }
      sum += at::vec::vec_reduce_all<scalar_t>(add, vsum);
      if (u != nullptr) dot += at::vec::vec_reduce_all<scalar_t>(add, vdot);
    }
  }
  for (; j < C; ++j) {
    const acc_t e = std::exp(static_cast<acc_t>(z[j]) - m);
    out[j] = static_cast<scalar_t>(e);
    sum += e;
    if (u != nullptr) dot += static_cast<double>(e) * static_cast<double>(u[j] - u_top);
  }
  if (dot_u != nullptr) *dot_u = dot;
  return sum;
}

// sum_j x_j over a row, in short float blocks added in double (as row_exp's sums).
template <typename scalar_t>
double row_sum(const scalar_t* x, int64_t C) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kBlock = 16 * Vec::size();
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  double sum = 0;
  int64_t j = 0;
  while (j + Vec::size() <= C) {
    const int64_t block_end = std::min(C - C % Vec::size(), j + kBlock);
    Vec vsum(0);
    for (; j < block_end; j += Vec::size()) vsum = vsum + Vec::loadu(x + j);
    sum += at::vec::vec_reduce_all<scalar_t>(add, vsum);
  }
  for (; j < C; ++j) sum += x[j];
  return sum;
}

// The tangent is taken relative to the row's top class c: p (u - <p, u>) = p ((u - u_c) - <p, u - u_c>), as
// sum_j p_j = 1. At a well-fit row (p_c ~ 1) u_c - <p, u> cancels in float32: 4e-2 of the row's largest entry at
// 1 - p_c ~ 1e-5, as in torch's float32 formula; <p, u - u_c> holds no p_c u_c term to cancel.
// Reduced-precision inputs keep exp(z - m) in fp32 until the final write, so pass 2 and 3 are
// fused for them (a second exp instead of a lossy round trip through the output row).
template <typename scalar_t>
void hvp_row(const scalar_t* z, const scalar_t* u, scalar_t* out, int64_t C, bool* bad_logits, bool* bad_tangent) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m = row_max<scalar_t, acc_t>(z, C);
  if (!std::isfinite(m)) *bad_logits = true;
  const int64_t top = top_class<scalar_t, acc_t>(z, C, m);
  if constexpr (kVectorised<scalar_t>) {
    const scalar_t u_top = u[top];
    double dot = 0;
    const double sum = row_exp<scalar_t, acc_t>(z, u, u_top, out, C, m, &dot);
    const acc_t inv_sum = static_cast<acc_t>(1.0 / sum);
    const acc_t mean_r = static_cast<acc_t>(dot / sum);  // <p, u - u_top>
    if (!std::isfinite(mean_r)) *bad_tangent = true;
    // every class relative to the top class too: u_j - (u_top + mean_r) would round to eps |u_top|, 4.6e-5 of a
    // well-fit row's largest entry where the tangent's entries share an offset of 100
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec vinv(inv_sum), vmean(mean_r), vtop(u_top);
    int64_t j = 0;
    for (; j + Vec::size() <= C; j += Vec::size()) {
      (Vec::loadu(out + j) * vinv * ((Vec::loadu(u + j) - vtop) - vmean)).store(out + j);
    }
    for (; j < C; ++j) out[j] = out[j] * inv_sum * ((u[j] - u_top) - mean_r);
  } else {
    const acc_t u_top = static_cast<acc_t>(u[top]);
    double sum = 0, dot = 0;
    for (int64_t j = 0; j < C; ++j) {
      const acc_t e = std::exp(static_cast<acc_t>(z[j]) - m);
      sum += e;
      dot += static_cast<double>(e) * static_cast<double>(static_cast<acc_t>(u[j]) - u_top);
    }
    const acc_t inv_sum = static_cast<acc_t>(1.0 / sum), mean_r = static_cast<acc_t>(dot / sum);
    if (!std::isfinite(mean_r)) *bad_tangent = true;
    for (int64_t j = 0; j < C; ++j) {
      const acc_t p = std::exp(static_cast<acc_t>(z[j]) - m) * inv_sum;
      out[j] = static_cast<scalar_t>(p * ((static_cast<acc_t>(u[j]) - u_top) - mean_r));
    }
  }
}

// Where the target is a top class, its p_y - 1 is minus the other classes' share, rest / sum: 1 / sum - 1 kept
// float32's absolute error of ~6e-8, 4e-2 of a well-fit row's gradient at 1 - p_y ~ 1e-5 (torch's float32 too).
// The reduced-precision path (and the tiles) sum the others in the same loop as the row, so take it so always.
template <typename scalar_t>
void grad_row(const scalar_t* z, int64_t y, scalar_t* out, int64_t C, double smoothing, bool* bad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m = row_max<scalar_t, acc_t>(z, C);
  if (!std::isfinite(m)) *bad_logits = true;
  const acc_t off = static_cast<acc_t>(smoothing / C);  // smoothed target mass on every class
  const double target_extra = smoothing - smoothing / C;  // the target's entry is p_y - 1 + this
  if constexpr (kVectorised<scalar_t>) {
    const bool target_on_top = static_cast<acc_t>(z[y]) == m;
    const double sum = row_exp<scalar_t, acc_t>(z, nullptr, scalar_t(0), out, C, m, nullptr);
    const scalar_t e_y = out[y];
    double p_y_minus_1 = e_y / sum - 1.0;
    if (target_on_top) {
      out[y] = 0;
      p_y_minus_1 = -row_sum(out, C) / sum;
    }
    const acc_t inv_sum = static_cast<acc_t>(1.0 / sum);
    using Vec = at::vec::Vectorized<scalar_t>;
    const Vec vinv(inv_sum), voff(off);
    int64_t j = 0;
    for (; j + Vec::size() <= C; j += Vec::size()) {
      (Vec::loadu(out + j) * vinv - voff).store(out + j);
    }
    for (; j < C; ++j) out[j] = out[j] * inv_sum - off;
    out[y] = static_cast<scalar_t>(p_y_minus_1 + target_extra);
  } else {
    double sum = 0, rest = 0;
    for (int64_t j = 0; j < C; ++j) {
      const acc_t e = std::exp(static_cast<acc_t>(z[j]) - m);
      sum += e;
      if (j != y) rest += e;
    }
    const acc_t inv_sum = static_cast<acc_t>(1.0 / sum);
    for (int64_t j = 0; j < C; ++j) {
      const acc_t g = std::exp(static_cast<acc_t>(z[j]) - m) * inv_sum - off;
      out[j] = static_cast<scalar_t>(j == y ? static_cast<acc_t>(target_extra - rest / sum) : g);
    }
  }
}

// Rows of fewer than kTileClasses classes go a tile of rows at a time (float32 and float64): each row's max and
// z - max into the output, the tile's exponentials in full vectors, then each row's double sums and its entries.
// There a row's own vectors hold few or none of its classes (a scalar exp each): against the row path, 4,096 x 10
// rows 205 -> 139 us for the hvp, 1,797 x 10 96 -> 66 us (best of many calls, one thread, on an Intel Xeon); from
// 16 classes on the rows' own vectors were as fast or faster (the tile's sums go a class at a time).
constexpr int64_t kTileClasses = 16;
constexpr int64_t kTileElements = 4096;

int64_t tile_rows(int64_t C) { return std::max<int64_t>(1, kTileElements / C); }

// exp in place over n contiguous values, in full vectors (the tail a partial one).
template <typename scalar_t>
void exp_in_place(scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t k = std::min<int64_t>(Vec::size(), n - j);
    Vec::loadu(x + j, k).exp().store(x + j, k);
  }
}

// Rows [0, rows) of a tile: z, u strided by zs, us; out dense. As hvp_row: every class relative to the top class.
template <typename scalar_t>
void hvp_tile(const scalar_t* z, int64_t zs, const scalar_t* u, int64_t us, scalar_t* out, int64_t rows, int64_t C,
              int64_t* top, bool* bad_logits, bool* bad_tangent) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* zr = z + r * zs;
    const scalar_t m = row_max<scalar_t, scalar_t>(zr, C);
    if (!std::isfinite(m)) *bad_logits = true;
    top[r] = top_class<scalar_t, scalar_t>(zr, C, m);
    for (int64_t j = 0; j < C; ++j) out[r * C + j] = zr[j] - m;
  }
  exp_in_place(out, rows * C);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* ur = u + r * us;
    scalar_t* e = out + r * C;
    const scalar_t u_top = ur[top[r]];
    double sum = 0, dot = 0;
    for (int64_t j = 0; j < C; ++j) {
      sum += e[j];
      dot += static_cast<double>(e[j]) * static_cast<double>(ur[j] - u_top);
    }
    const scalar_t inv_sum = static_cast<scalar_t>(1.0 / sum), mean_r = static_cast<scalar_t>(dot / sum);
    if (!std::isfinite(mean_r)) *bad_tangent = true;
    for (int64_t j = 0; j < C; ++j) e[j] = e[j] * inv_sum * ((ur[j] - u_top) - mean_r);
  }
}

// As grad_row, a tile at a time; p_y - 1 is always minus the other classes' share (their sum comes with the row's).
// Rows whose target is ignore_index are zero, and out of range ones are flagged (their logits unread).
template <typename scalar_t>
void grad_tile(const scalar_t* z, int64_t zs, const int64_t* y, scalar_t* out, int64_t rows, int64_t C,
               double smoothing, int64_t ignore_index, bool* bad_logits, bool* bad_target) {
  const auto kept = [&](int64_t r) { return y[r] != ignore_index && y[r] >= 0 && y[r] < C; };
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* o = out + r * C;
    if (!kept(r)) {
      if (y[r] != ignore_index) *bad_target = true;
      std::fill(o, o + C, scalar_t(0));  // exp(0) below, then zeroed again
      continue;
    }
    const scalar_t* zr = z + r * zs;
    const scalar_t m = row_max<scalar_t, scalar_t>(zr, C);
    if (!std::isfinite(m)) *bad_logits = true;
    for (int64_t j = 0; j < C; ++j) o[j] = zr[j] - m;
  }
  exp_in_place(out, rows * C);
  const scalar_t off = static_cast<scalar_t>(smoothing / C);  // smoothed target mass on every class
  const double target_extra = smoothing - smoothing / C;      // the target's entry is p_y - 1 + this
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* e = out + r * C;
    if (!kept(r)) {
      std::fill(e, e + C, scalar_t(0));
      continue;
    }
    double sum = 0, rest = 0;
    for (int64_t j = 0; j < C; ++j) {
      sum += e[j];
      if (j != y[r]) rest += e[j];
    }
    const scalar_t inv_sum = static_cast<scalar_t>(1.0 / sum);
    for (int64_t j = 0; j < C; ++j) e[j] = e[j] * inv_sum - off;
    e[y[r]] = static_cast<scalar_t>(target_extra - rest / sum);
  }
}

// Rows [begin, end) of one parallel task: tile(first, rows) over tiles of rows where a row has under kTileClasses
// classes (float32 and float64; tile is a generic lambda, so only those dtypes instantiate it), else row(i) a row at a
// time.
template <typename scalar_t, typename Tile, typename Row>
void tiles_or_rows(int64_t begin, int64_t end, int64_t C, const Tile& tile, const Row& row) {
  int64_t i = begin;
  if constexpr (kVectorised<scalar_t>) {
    if (C < kTileClasses) {
      for (const int64_t step = tile_rows(C); i < end; i += step) tile(i, std::min(end - i, step));
    }
  }
  for (; i < end; ++i) row(i);
}

at::Tensor softmax_ce_hvp_cpu(const at::Tensor& logits_in, const at::Tensor& tangent_in, bool check_finite) {
  softmax_ce::check_hvp_args(logits_in, tangent_in);
  const at::Tensor logits = softmax_ce::rows_dense(logits_in), tangent = softmax_ce::rows_dense(tangent_in);
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({N, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  std::atomic<bool> bad_logits{false}, bad_tangent{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_ce_hvp_cpu", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* u = tangent.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t zs = logits.stride(0), us = tangent.stride(0);
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      bool bl = false, bt = false;
      std::vector<int64_t> top;  // a tile's top classes
      tiles_or_rows<scalar_t>(
          begin, end, C,
          [&](auto i, auto rows) {
            top.resize(rows);
            hvp_tile<scalar_t>(z + i * zs, zs, u + i * us, us, o + i * C, rows, C, top.data(), &bl, &bt);
          },
          [&](int64_t i) { hvp_row<scalar_t>(z + i * zs, u + i * us, o + i * C, C, &bl, &bt); });
      if (bl) bad_logits = true;
      if (bt) bad_tangent = true;
    });
  });
  if (check_finite) {
    TORCH_CHECK_VALUE(!bad_logits, message("softmax_ce_hvp: ", softmax_ce::kBadLogits).c_str());
    TORCH_CHECK_VALUE(!bad_tangent, message("softmax_ce_hvp: ", softmax_ce::kBadTangent).c_str());
  }
  return out;
}

at::Tensor softmax_ce_grad_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, double label_smoothing,
                               int64_t ignore_index, bool check_finite) {
  softmax_ce::check_grad_args(logits_in, target_in, label_smoothing);
  const at::Tensor logits = softmax_ce::rows_dense(logits_in), target = target_in.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({N, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  std::atomic<bool> bad_logits{false}, bad_target{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_ce_grad_cpu", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* y = target.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t zs = logits.stride(0);
    at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
      bool bl = false, bt = false;
      tiles_or_rows<scalar_t>(
          begin, end, C,
          [&](auto i, auto rows) {
            grad_tile<scalar_t>(z + i * zs, zs, y + i, o + i * C, rows, C, label_smoothing, ignore_index, &bl, &bt);
          },
          [&](int64_t i) {
            if (y[i] == ignore_index) {
              std::fill(o + i * C, o + (i + 1) * C, scalar_t(0));
            } else if (y[i] < 0 || y[i] >= C) {
              bt = true;
            } else {
              grad_row<scalar_t>(z + i * zs, y[i], o + i * C, C, label_smoothing, &bl);
            }
          });
      if (bl) bad_logits = true;
      if (bt) bad_target = true;
    });
  });
  if (bad_target) softmax_ce::check_targets(target, C, ignore_index);  // names the first bad row
  if (check_finite) {
    TORCH_CHECK_VALUE(!bad_logits, message("softmax_ce_grad: ", softmax_ce::kBadLogits).c_str());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("softmax_ce_grad", &softmax_ce_grad_cpu);
  m.impl("softmax_ce_hvp", &softmax_ce_hvp_cpu);
}

}  // namespace unlearn_kernels
