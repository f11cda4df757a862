// The fused LoRA linear pass (see csrc/lora_linear.h): GEMMs written once for every device, the big ones outside
// the parallel regions through csrc/gemm.h (oneDNN's for large float32 ones on an AMD AVX-512 CPU), those inside
// them ATen's.
// The adapter is folded into the frozen layer's big GEMMs, by merging it into the weight (many
// rows) or as a rank-r update accumulated into their output (few rows); the scale s is applied to
// the small operands, never to a full (N, out) tensor. On CPU all rank-r work of a pass runs in
// one parallel region (see for_chunks): the forward and the backward each add one to the frozen
// layer's.
#include "../lora_linear.h"
#include "../gemm.h"
#include "../message.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/ParallelGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace unlearn_kernels::lora {
namespace {

// The checks of the Python op, for callers of the dispatcher op itself.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  TORCH_CHECK_VALUE(x.dim() == 2, message(op, ": x must be 2-D (N, in), got shape ", x.sizes()).c_str());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                    message(op, ": weight must have shape (out, ", x.size(1), "), got ", weight.sizes()).c_str());
  const int64_t n_out = weight.size(0), n_in = x.size(1);
  TORCH_CHECK_VALUE(
      lora_a.dim() == 2 && lora_a.size(0) >= 1 && lora_a.size(1) == n_in,
      message(op, ": lora_a must have shape (rank, ", n_in, ") with rank >= 1, got ", lora_a.sizes()).c_str());
  const int64_t rank = lora_a.size(0);
  TORCH_CHECK_VALUE(
      lora_b.dim() == 2 && lora_b.size(0) == n_out && lora_b.size(1) == rank,
      message(op, ": lora_b must have shape (", n_out, ", ", rank, ") = (out, rank), got ", lora_b.sizes()).c_str());
  TORCH_CHECK_VALUE(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n_out),
                    message(op, ": bias must have shape (", n_out, ",), got ", bias->sizes()).c_str());
  TORCH_CHECK_VALUE(std::isfinite(scale), message(op, ": scale must be finite, got ", scale).c_str());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   message(op, ": x must be floating point, got ", x.scalar_type()).c_str());
  for (const at::Tensor* t : {&weight, &lora_a, &lora_b}) {
    TORCH_CHECK_TYPE(
        t->scalar_type() == x.scalar_type(),
        message(op, ": every tensor must have x's dtype ", x.scalar_type(), ", got ", t->scalar_type()).c_str());
    TORCH_CHECK_VALUE(t->device() == x.device(),
                      message(op, ": every tensor must be on x's device ", x.device(), ", got ", t->device()).c_str());
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(
        bias->scalar_type() == x.scalar_type(),
        message(op, ": bias dtype ", bias->scalar_type(), " must equal x dtype ", x.scalar_type()).c_str());
    TORCH_CHECK_VALUE(bias->device() == x.device(),
                      message(op, ": bias is on ", bias->device(), " but x is on ", x.device()).c_str());
  }
  // ATen converts a Scalar to the tensor's dtype: a scale beyond it would be an Inf factor (or an error).
  double largest = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_scale_range",
                                  [&] { largest = static_cast<double>(std::numeric_limits<scalar_t>::max()); });
  TORCH_CHECK_VALUE(std::abs(scale) <= largest, message(op, ": scale ", scale, " is beyond the range of x's dtype ",
                                                        x.scalar_type(), " (largest finite ", largest, ")")
                                                    .c_str());
}

// t has the given shape, and x's dtype and device.
void check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape,
                    message(op, ": ", name, " must have shape ", shape, ", got ", t.sizes()).c_str());
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(),
      message(op, ": ", name, " dtype ", t.scalar_type(), " must equal x dtype ", x.scalar_type()).c_str());
  TORCH_CHECK_VALUE(t.device() == x.device(),
                    message(op, ": ", name, " is on ", t.device(), " but x is on ", x.device()).c_str());
}

// Whether to merge the adapter into the weight, W' = W + s B A, for the big GEMMs. Forming W' costs
// out * in * r multiply-adds and one write and read of an (out, in) matrix; the separate rank-r
// terms cost N * r * (in + out) and, on CPU, extra passes over (N, in) and (N, out) tensors.
// Merging is cheaper once N >= in * out / (in + out) (512 rows for 1024 x 1024). Never in float16 or
// bfloat16: W' is then rounded to the input dtype, where every entry of s B A below half an ulp of W's
// entry is lost (most of a small adapter's update), and a row's output would depend on the batch size.
bool merge(const at::Tensor& x, int64_t n_out) {
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) return false;
  const int64_t rows = x.size(0), n_in = x.size(1);
  return rows * (n_in + n_out) >= n_in * n_out;
}

// Whether the merged weight w = W + s B A holds a NaN or Inf. On the CPU its sum is checked (a pass
// over w, ~1/500 of the GEMM that reads it; an overflowing sum of finite entries counts too): where
// s B A overflows, or W, A or B hold non-finite values, the caller takes the unmerged path, whose
// output is finite where x W^T + s (x A^T) B^T is and non-finite where the reference's is. Off the
// CPU the check would wait for the device at every call, so the merged weight is taken as it is.
bool merged_overflows(const at::Tensor& w) { return w.is_cpu() && !std::isfinite(w.sum().item<double>()); }

// Chunks for the rank-r work: on CPU one per thread once there are kMinRows rows per chunk; off
// the CPU one (the current stream is per thread, and the GPU is parallel by itself).
int64_t num_chunks(const at::Tensor& x) {
  constexpr int64_t kMinRows = 256;
  if (!x.is_cpu()) return 1;
  return std::clamp<int64_t>(x.size(0) / kMinRows, 1, at::get_num_threads());
}

// [begin, end) of chunk c of n items split in `chunks`.
std::pair<int64_t, int64_t> span(int64_t n, int64_t c, int64_t chunks) { return {n * c / chunks, n * (c + 1) / chunks}; }

// Runs fn(c) for every chunk in one parallel region, where each thread's ATen calls run
// single-threaded. Every ATen op with its own threading is a region whose threads meet at its
// end; on a machine whose cores are busy with other work each meeting can wait milliseconds for a
// descheduled thread, so the rank-r work of a pass (several small GEMMs, scalings, a transpose)
// is gathered into one region instead of one per op.
template <typename Fn>
void for_chunks(int64_t chunks, const Fn& fn) {
  if (chunks == 1) return fn(0);
  const at::ThreadLocalState caller;  // grad mode and dispatch keys are per thread: the workers take ours
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

// Rows [begin, end) of t along dim 0.
at::Tensor rows_of(const at::Tensor& t, std::pair<int64_t, int64_t> range) {
  return t.slice(0, range.first, range.second);
}

// The forward shared by the op and its JVP: y = x W^T + b + s xa B^T and, when left_weight L (r', in)
// is given (L = [A; dA] for the JVP), left = x L^T. One region computes, when merging,
// W' = W + s B A row block by row block, and left row chunk by row chunk; without merging, the few
// rows' xa is left's first r columns (L defaults to A).
std::pair<at::Tensor, at::Tensor> adapted_linear(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                 const at::Tensor& lora_b, double scale,
                                                 const std::optional<at::Tensor>& left_weight) {
  const int64_t rows = x.size(0), n_out = weight.size(0);
  bool merged = merge(x, n_out);
  const at::Tensor& l = left_weight.has_value() ? *left_weight : lora_a;
  const bool need_left = left_weight.has_value() || !merged;
  at::Tensor left = need_left ? at::empty({rows, l.size(0)}, x.options()) : at::Tensor();
  at::Tensor w = merged ? at::empty(weight.sizes(), weight.options()) : weight;
  const int64_t chunks = num_chunks(x);
  for_chunks(chunks, [&](int64_t c) {
    if (need_left) {
      at::Tensor left_rows = rows_of(left, span(rows, c, chunks));
      at::mm_out(left_rows, rows_of(x, span(rows, c, chunks)), l.t());
    }
    if (merged) {
      const auto block = span(n_out, c, chunks);
      at::Tensor w_rows = rows_of(w, block);
      at::addmm_out(w_rows, rows_of(weight, block), rows_of(lora_b, block), lora_a, /*beta=*/1, /*alpha=*/scale);
    }
  });
  if (merged && merged_overflows(w)) {
    merged = false;
    w = weight;
    if (!need_left) left = at::mm(x, l.t());
  }
  at::Tensor out = bias.has_value() ? gemm_bias(*bias, x, w.t()) : gemm(x, w.t());
  if (!merged) gemm_into(out, left.narrow(1, 0, lora_a.size(0)), lora_b.t(), /*beta=*/1, /*alpha=*/scale);
  return {out, left};
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  check_inputs("lora_linear", x, weight, bias, lora_a, lora_b, scale);
  return adapted_linear(x, weight, bias, lora_a, lora_b, scale, std::nullopt).first;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& lora_a,
                                                        const at::Tensor& lora_b, double scale,
                                                        std::array<bool, 3> output_mask) {
  const char* op = "lora_linear_backward";
  check_inputs(op, x, weight, std::nullopt, lora_a, lora_b, scale);
  check_like(op, "grad_out", grad_out, std::array<int64_t, 2>{x.size(0), weight.size(0)}, x);
  const auto [need_x, need_a, need_b] = output_mask;
  const int64_t rows = x.size(0), n_in = x.size(1), n_out = weight.size(0), rank = lora_a.size(0);
  bool merged = need_x && merge(x, n_out);
  // g = s gy B (N, r), for grad_a and, without merging, for grad_x = gy W + g A.
  const bool need_g = need_a || (need_x && !merged);
  const int64_t chunks = num_chunks(x);
  at::Tensor w = merged ? at::empty(weight.sizes(), weight.options()) : at::Tensor();  // W + s B A
  at::Tensor g = need_g ? at::empty({rows, rank}, x.options()) : at::Tensor();
  // Per-chunk partial sums of grad_a = g^T x and of grad_b^T = xa^T gy (the reduction over N reads
  // gy row by row), with xa = x A^T recomputed here rather than kept from the forward.
  at::Tensor part_a = need_a ? at::empty({chunks, rank, n_in}, x.options()) : at::Tensor();
  at::Tensor part_b = need_b ? at::empty({chunks, rank, n_out}, x.options()) : at::Tensor();
  // One region for all rank-r work: a row block of W + s B A, and a row chunk of x and gy. (Walking
  // the chunk in cache-sized blocks, to read gy's rows from memory once for both their uses, was
  // slower: MKL is less efficient on the smaller products.)
  for_chunks(chunks, [&](int64_t c) {
    if (merged) {
      const auto block = span(n_out, c, chunks);
      at::Tensor w_rows = rows_of(w, block);
      at::addmm_out(w_rows, rows_of(weight, block), rows_of(lora_b, block), lora_a, /*beta=*/1, /*alpha=*/scale);
    }
    const auto range = span(rows, c, chunks);
    const at::Tensor x_rows = rows_of(x, range), gy_rows = rows_of(grad_out, range);
    if (need_g) {
      at::Tensor g_rows = rows_of(g, range);
      at::mm_out(g_rows, gy_rows, lora_b).mul_(scale);
      if (need_a) {
        at::Tensor pa = part_a.select(0, c);
        at::mm_out(pa, g_rows.t(), x_rows);
      }
    }
    if (need_b) {
      at::Tensor pb = part_b.select(0, c);
      at::mm_out(pb, at::mm(x_rows, lora_a.t()).t(), gy_rows);
    }
  });
  at::Tensor grad_x, grad_a, grad_b;
  if (need_a || need_b) {
    const c10::ParallelGuard serial(true);  // a few small adds: parallel ops would each be a region
    for (int64_t c = 1; c < chunks; ++c) {
      if (need_a) part_a.select(0, 0).add_(part_a.select(0, c));
      if (need_b) part_b.select(0, 0).add_(part_b.select(0, c));
    }
    if (need_a) grad_a = part_a.select(0, 0);
    if (need_b) {
      grad_b = at::empty({n_out, rank}, x.options());
      at::mul_out(grad_b, part_b.select(0, 0).t(), scale);
    }
  }
  if (merged && merged_overflows(w)) {
    merged = false;
    if (!need_g) g = at::mm(grad_out, lora_b).mul_(scale);
  }
  if (need_x) {
    grad_x = gemm(grad_out, merged ? w : weight);
    if (!merged) gemm_into(grad_x, g, lora_a, /*beta=*/1);
  }
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
  // left = [xa, x dA^T] = x [A; dA]^T: one read of x for both.
  const at::Tensor left_weight = tangent_a.has_value() ? at::cat({lora_a, *tangent_a}, 0) : lora_a;
  auto [out, left] = adapted_linear(x, weight, bias, lora_a, lora_b, scale, left_weight);
  at::Tensor tangent;
  if (tangent_a.has_value() && tangent_b.has_value()) {
    tangent = gemm(left, at::cat({*tangent_b, lora_b}, 1).mul_(scale).t());  // [xa, x dA^T] s[dB, B]^T
  } else if (tangent_a.has_value()) {
    tangent = gemm(left.narrow(1, rank, rank), lora_b.mul(scale).t());
  } else if (tangent_b.has_value()) {
    tangent = gemm(left, tangent_b->mul(scale).t());
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
