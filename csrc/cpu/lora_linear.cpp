// The fused LoRA linear pass (see csrc/lora_linear.h): ATen GEMMs, written once for every device.
// The adapter is folded into the frozen layer's big GEMMs, by merging it into the weight (many
// rows) or as a rank-r update accumulated into their output (few rows); the scale s is applied to
// the small operands, never to a full (N, out) tensor. On CPU the tall-skinny rank-r products run
// over row chunks in parallel (see for_row_chunks).
#include "../lora_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace unlearn_kernels::lora {
namespace {

// The checks of the Python op, for callers of the dispatcher op itself.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (N, in), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must have shape (out, ", x.size(1),
                    "), got ", weight.sizes());
  const int64_t n_out = weight.size(0), n_in = x.size(1);
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(0) >= 1 && lora_a.size(1) == n_in, op,
                    ": lora_a must have shape (rank, ", n_in, ") with rank >= 1, got ", lora_a.sizes());
  const int64_t rank = lora_a.size(0);
  TORCH_CHECK_VALUE(lora_b.dim() == 2 && lora_b.size(0) == n_out && lora_b.size(1) == rank, op,
                    ": lora_b must have shape (", n_out, ", ", rank, ") = (out, rank), got ", lora_b.sizes());
  TORCH_CHECK_VALUE(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n_out), op, ": bias must have shape (",
                    n_out, ",), got ", bias->sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  for (const at::Tensor* t : {&weight, &lora_a, &lora_b}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": every tensor must have x's dtype ", x.scalar_type(),
                     ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": every tensor must be on x's device ", x.device(), ", got ",
                      t->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                     " must equal x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ", x.device());
  }
}

// t has the given shape, and x's dtype and device.
void check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                   " must equal x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// Whether to merge the adapter into the weight, W' = W + s B A, for the big GEMMs. Forming W' costs
// out * in * r multiply-adds and one write and read of an (out, in) matrix; the separate rank-r
// terms cost N * r * (in + out) and, on CPU, the bandwidth of extra passes over (N, in) and
// (N, out) tensors. Merging is cheaper once N >= in * out / (in + out) (512 rows for 1024 x 1024).
bool merge(int64_t rows, int64_t n_in, int64_t n_out) { return rows * (n_in + n_out) >= n_in * n_out; }

// Row chunks for the tall-skinny rank-r products on CPU: one per thread, at least kMinRows rows
// each. MKL's own threading of an (N, in) x (in, r) product, or of a reduction over N, makes its
// threads meet several times per call; on a busy machine that cost up to 10x the arithmetic. Here
// each thread runs a single-threaded GEMM on its own rows and the threads meet once. Off the CPU
// (the current stream is per thread) there is one chunk.
int64_t row_chunks(const at::Tensor& t) {
  constexpr int64_t kMinRows = 256;
  if (!t.is_cpu()) return 1;
  return std::clamp<int64_t>(t.size(0) / kMinRows, 1, at::get_num_threads());
}

template <typename Fn>
void for_row_chunks(int64_t rows, int64_t chunks, const Fn& fn) {
  if (chunks == 1) return fn(0, 0, rows);
  const at::ThreadLocalState caller;  // grad mode and dispatch keys are per thread: the workers take ours
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t c = begin; c < end; ++c) fn(c, rows * c / chunks, rows * (c + 1) / chunks);
  });
}

// out (N, r) = x (N, k) m^T for a small m (r, k), row chunk by row chunk.
void rows_times_t(at::Tensor& out, const at::Tensor& x, const at::Tensor& m) {
  for_row_chunks(x.size(0), row_chunks(x), [&](int64_t, int64_t r0, int64_t r1) {
    at::Tensor rows = out.slice(0, r0, r1);
    at::mm_out(rows, x.slice(0, r0, r1), m.t());
  });
}

// a^T b (r, k) for a (N, r) with few columns and b (N, k): per-chunk partial products, summed.
at::Tensor t_times_rows(const at::Tensor& a, const at::Tensor& b) {
  const int64_t chunks = row_chunks(b);
  if (chunks == 1) return at::mm(a.t(), b);
  at::Tensor partial = at::empty({chunks, a.size(1), b.size(1)}, b.options());
  for_row_chunks(b.size(0), chunks, [&](int64_t c, int64_t r0, int64_t r1) {
    at::Tensor part = partial.select(0, c);
    at::mm_out(part, a.slice(0, r0, r1).t(), b.slice(0, r0, r1));
  });
  at::Tensor sum = partial.select(0, 0);
  for (int64_t c = 1; c < chunks; ++c) sum.add_(partial.select(0, c));  // a few small adds (sum(0) was slower)
  return sum;
}

at::Tensor x_times_a_t(const at::Tensor& x, const at::Tensor& lora_a) {
  at::Tensor xa = at::empty({x.size(0), lora_a.size(0)}, x.options());
  rows_times_t(xa, x, lora_a);
  return xa;
}

// y = x W^T + b + s xa B^T, into a fresh contiguous output.
at::Tensor adapted_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, const at::Tensor& xa) {
  if (merge(x.size(0), x.size(1), weight.size(0))) {
    const at::Tensor merged = at::addmm(weight, lora_b, lora_a, /*beta=*/1, /*alpha=*/scale);
    return bias.has_value() ? at::addmm(*bias, x, merged.t()) : at::mm(x, merged.t());
  }
  at::Tensor out = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  return out.addmm_(xa, lora_b.t(), /*beta=*/1, /*alpha=*/scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                           const at::Tensor& lora_b, double scale) {
  check_inputs("lora_linear", x, weight, bias, lora_a, lora_b, scale);
  const at::Tensor xa = x_times_a_t(x, lora_a);
  return {adapted_linear(x, weight, bias, lora_a, lora_b, scale, xa), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& lora_a,
                                                        const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                                        std::array<bool, 3> output_mask) {
  const char* op = "lora_linear_backward";
  check_inputs(op, x, weight, std::nullopt, lora_a, lora_b, scale);
  check_like(op, "grad_out", grad_out, std::array<int64_t, 2>{x.size(0), weight.size(0)}, x);
  check_like(op, "xa", xa, std::array<int64_t, 2>{x.size(0), lora_a.size(0)}, x);
  const auto [need_x, need_a, need_b] = output_mask;
  const int64_t n_in = x.size(1), n_out = weight.size(0), rank = lora_a.size(0);
  at::Tensor grad_x, grad_a, grad_b, g;  // g = s gy B, (N, r): shared by grad_x and grad_a
  if (need_x) {
    // grad_x and g side by side in one (N, in + r) buffer, [grad_x, g] = gy [W + s B A, s B] when
    // merging (one GEMM reads gy for both), so grad_x is always a column slice (the fake's layout).
    at::Tensor both = at::empty({x.size(0), n_in + rank}, x.options());
    grad_x = both.narrow(1, 0, n_in);
    g = both.narrow(1, n_in, rank);
    if (merge(x.size(0), n_in, n_out)) {
      at::Tensor right = at::empty({n_out, n_in + rank}, weight.options());
      at::Tensor merged = right.narrow(1, 0, n_in), scaled_b = right.narrow(1, n_in, rank);
      at::addmm_out(merged, weight, lora_b, lora_a, /*beta=*/1, /*alpha=*/scale);
      at::mul_out(scaled_b, lora_b, scale);
      at::mm_out(both, grad_out, right);
    } else {
      rows_times_t(g, grad_out, lora_b.t().mul(scale));
      at::mm_out(grad_x, grad_out, weight).addmm_(g, lora_a);
    }
  } else if (need_a) {
    g = at::empty({x.size(0), rank}, x.options());
    rows_times_t(g, grad_out, lora_b.t().mul(scale));
  }
  if (need_a) grad_a = t_times_rows(g, x);
  // s gy^T xa, as (s xa^T gy)^T: the reduction over N reads gy row-wise.
  if (need_b) grad_b = t_times_rows(xa, grad_out).mul_(scale).t().contiguous();
  return {grad_x, grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor> jvp(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, double scale,
                                       const std::optional<at::Tensor>& tangent_a,
                                       const std::optional<at::Tensor>& tangent_b) {
  const char* op = "lora_linear_jvp";
  check_inputs(op, x, weight, bias, lora_a, lora_b, scale);
  if (tangent_a.has_value()) check_like(op, "tangent_a", *tangent_a, lora_a.sizes(), x);
  if (tangent_b.has_value()) check_like(op, "tangent_b", *tangent_b, lora_b.sizes(), x);
  const int64_t rank = lora_a.size(0);
  // [xa, x dA^T] = x [A; dA]^T: one read of x for both.
  const at::Tensor left = x_times_a_t(x, tangent_a.has_value() ? at::cat({lora_a, *tangent_a}, 0) : lora_a);
  const at::Tensor xa = left.narrow(1, 0, rank);
  at::Tensor out = adapted_linear(x, weight, bias, lora_a, lora_b, scale, xa);
  at::Tensor tangent;
  if (tangent_a.has_value() && tangent_b.has_value()) {
    tangent = at::mm(left, at::cat({*tangent_b, lora_b}, 1).mul_(scale).t());  // [xa, x dA^T] s[dB, B]^T
  } else if (tangent_a.has_value()) {
    tangent = at::mm(left.narrow(1, rank, rank), lora_b.mul(scale).t());
  } else if (tangent_b.has_value()) {
    tangent = at::mm(xa, tangent_b->mul(scale).t());
  } else {
    tangent = at::zeros_like(out);
  }
  return {out, tangent};
}

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("lora_linear", &forward);
  m.impl("lora_linear_backward", &backward);
  m.impl("lora_linear_jvp", &jvp);
}

}  // namespace unlearn_kernels::lora
