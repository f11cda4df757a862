// C++ CPU kernel of weights_fingerprint (see unlearn_kernels/ops/weights_fingerprint.py): per tensor
// its float64 sum and its position checksum sum_i t_i r(i mod L) (1 + i div L), with
// r(j) = 1 + frac(j * golden ratio) and L = 65521, both accumulated in double over the row-major values.
// The curvature operators fingerprint every parameter and buffer before each product; one call for
// all of them replaces two torch ops and a read-back per tensor (65 of the digits MLP's ~1,800 us).
#include <ATen/Dispatch_v2.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../message.h"

namespace unlearn_kernels {
namespace {

constexpr int64_t kRampLength = 65521;  // a prime: rows of a weight fall on other ramp positions

// r(j) in double, exactly as the reference computes it (j * g, its fractional part, plus one).
const std::vector<double>& ramp() {
  static const std::vector<double> values = [] {
    const double golden = (std::sqrt(5.0) - 1.0) / 2.0;
    std::vector<double> r(kRampLength);
    for (int64_t j = 0; j < kRampLength; ++j) {
      const double x = static_cast<double>(j) * golden;
      r[j] = (x - std::trunc(x)) + 1.0;
    }
    return r;
  }();
  return values;
}

// (sum, checksum) of n contiguous values, in chunks of kRampLength (chunk c weighs 1 + c).
template <typename T>
std::pair<double, double> fingerprint(const T* x, int64_t n) {
  const double* r = ramp().data();
  double sum = 0.0, checksum = 0.0;
  for (int64_t start = 0, chunk = 1; start < n; start += kRampLength, ++chunk) {
    const int64_t len = std::min(kRampLength, n - start);
    const T* xs = x + start;
    double s = 0.0, c = 0.0;
#pragma omp simd reduction(+ : s, c)
    for (int64_t j = 0; j < len; ++j) {
      const double v = static_cast<double>(xs[j]);
      s += v;
      c += v * r[j];
    }
    sum += s;
    checksum += c * static_cast<double>(chunk);
  }
  return {sum, checksum};
}

at::Tensor weights_fingerprint_cpu(at::TensorList tensors) {
  at::Tensor out = at::zeros({static_cast<int64_t>(tensors.size()), 2}, at::TensorOptions().dtype(at::kDouble));
  double* values = out.data_ptr<double>();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided,
                message("weights_fingerprint: the C++ CPU kernel needs strided CPU tensors, got ", t.device(), " ",
                        t.layout(), " for tensor ", i)
                    .c_str());
    const at::Tensor flat = t.contiguous();  // row-major order, as the reference's reshape(-1)
    // every real dtype a parameter or buffer may have: integers signed and unsigned, bool, every float
    AT_DISPATCH_V2(flat.scalar_type(), "weights_fingerprint", AT_WRAP([&] {
      const auto [sum, checksum] = fingerprint(flat.const_data_ptr<scalar_t>(), flat.numel());
      values[2 * i] = sum;
      values[2 * i + 1] = checksum;
    }), AT_EXPAND(AT_ALL_TYPES), AT_EXPAND(AT_BAREBONES_UNSIGNED_TYPES), AT_EXPAND(AT_FLOAT8_TYPES), at::kHalf,
                   at::kBFloat16, at::kBool);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("weights_fingerprint", &weights_fingerprint_cpu); }

}  // namespace unlearn_kernels
