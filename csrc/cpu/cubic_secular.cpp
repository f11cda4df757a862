// C++ CPU solver of the cubic-regularised model in an eigenbasis (float64):
//   minimise c^T y + 1/2 sum_i lambda_i y_i^2 + (M/6) ||y||^3,
// whose global minimiser is y_i = -c_i / (lambda_i + sigma) with sigma = (M/2) ||y|| and
// sigma >= max(0, -lambda_min). The same algorithm as cubic_secular_solve_ref in
// unlearn_kernels/ops/cubic_secular.py (see its docstring): safeguarded Newton on
// phi(t) = 1/||y|| - M/(2 sigma) in t = sigma - max(0, -lambda_min), and the hard case.
#include <ATen/Functions.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../message.h"

namespace unlearn_kernels {
namespace {

constexpr double kEps = std::numeric_limits<double>::epsilon();
constexpr double kClusterRtolEps = 8.0;   // bottom eigenspace: lambda_i - lambda_min <= 8 eps max|lambda|
constexpr double kHardCaseRtolEps = 8.0;  // c vanishes there: ||c_bottom|| <= 8 eps (||c|| + sigma ||y||)

struct Secular {
  double phi, slope, residual;  // phi(t), phi'(t), 1 - M ||y|| / (2 sigma)
};

// ||v|| scaled by max |v_i|, so that no square overflows or underflows (as torch's vector_norm).
double scaled_norm(const double* v, size_t n) {
  double amax = 0, sum = 0;
  for (size_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(v[i]));
  if (amax == 0.0) return 0.0;
  for (size_t i = 0; i < n; ++i) sum += (v[i] / amax) * (v[i] / amax);
  return amax * std::sqrt(sum);
}

// y (the work buffer) = c / (s + t), then phi(t), phi'(t) and the relative residual, as the reference.
Secular secular(const std::vector<double>& s, const double* c, double shift, double t, double M,
                std::vector<double>& y) {
  const size_t k = s.size();
  for (size_t i = 0; i < k; ++i) y[i] = c[i] / (s[i] + t);
  const double y_norm = scaled_norm(y.data(), k), sigma = shift + t;
  const double inf = std::numeric_limits<double>::infinity();
  if (y_norm == 0.0) return {inf, inf, 1.0};  // underflow (a huge M): phi = +inf, bisect
  double cubic = 0;  // sum (y_i / ||y||)^2 / (s_i + t): ||y||^3 would underflow for a huge M
  for (size_t i = 0; i < k; ++i) cubic += (y[i] / y_norm) * (y[i] / y_norm) / (s[i] + t);
  const double residual = 1.0 - M * y_norm / (2.0 * sigma);
  return {residual / y_norm, cubic / y_norm + M / (2.0 * sigma) / sigma, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cubic_secular_solve_cpu(const at::Tensor& eigvals_in,
                                                                       const at::Tensor& coeffs_in, double M,
                                                                       double tol, int64_t max_iter) {
  constexpr const char* op = "cubic_secular_solve";
  TORCH_CHECK_VALUE(eigvals_in.dim() == 1 && coeffs_in.sizes() == eigvals_in.sizes(),
                    message(op, ": eigvals and coeffs must be 1-D of one length, got ", eigvals_in.sizes(), " and ",
                            coeffs_in.sizes())
                        .c_str());
  TORCH_CHECK_TYPE(eigvals_in.scalar_type() == at::kDouble && coeffs_in.scalar_type() == at::kDouble,
                   message(op, ": eigvals and coeffs must be float64, got ", eigvals_in.scalar_type(), " and ",
                           coeffs_in.scalar_type())
                       .c_str());
  TORCH_CHECK_VALUE(std::isfinite(M) && M > 0, message(op, ": M must be finite and > 0, got ", M).c_str());
  TORCH_CHECK_VALUE(tol > 0 && tol < 1, message(op, ": tol must be in (0, 1), got ", tol).c_str());
  TORCH_CHECK_VALUE(max_iter >= 1, message(op, ": max_iter must be >= 1, got ", max_iter).c_str());
  const at::Tensor eigvals = eigvals_in.contiguous(), coeffs = coeffs_in.contiguous();
  const int64_t k = eigvals.size(0);
  const double* lam = eigvals.const_data_ptr<double>();
  const double* c = coeffs.const_data_ptr<double>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(lam[i]) && std::isfinite(c[i]),
                      message(op, ": eigvals or coeffs contain NaN or Inf").c_str());
  }
  const auto f64 = eigvals.options();
  at::Tensor y = at::zeros({k}, f64);
  double* yp = y.mutable_data_ptr<double>();
  auto result = [&](double sigma, bool hard) {
    return std::make_tuple(y, at::scalar_tensor(sigma, f64), at::scalar_tensor(hard, f64.dtype(at::kBool)));
  };
  if (k == 0) return result(0.0, false);

  double lam_min = lam[0], scale = 0;
  for (int64_t i = 0; i < k; ++i) {
    lam_min = std::min(lam_min, lam[i]);
    scale = std::max(scale, std::abs(lam[i]));
  }
  const double c_norm = scaled_norm(c, k), shift = std::max(0.0, -lam_min);
  // lambda_i + sigma = s_i + t, with s_i exactly 0 at lambda_min when lambda_min < 0.
  std::vector<double> s(k);
  for (int64_t i = 0; i < k; ++i) s[i] = lam[i] + shift;

  if (lam_min < 0) {
    // Hard case test at sigma = -lambda_min, on the coordinates off the bottom eigenspace.
    const double radius = 2.0 * shift / M;
    std::vector<double> c_bottom;
    int64_t first_bottom = -1;
    for (int64_t i = 0; i < k; ++i) {
      if (lam[i] - lam_min <= kClusterRtolEps * kEps * scale) {
        c_bottom.push_back(c[i]);
        if (first_bottom < 0) first_bottom = i;
      } else {
        yp[i] = -c[i] / s[i];
      }
    }
    const double rest = scaled_norm(yp, k);  // y is 0 on the bottom eigenspace here
    if (scaled_norm(c_bottom.data(), c_bottom.size()) <= kHardCaseRtolEps * kEps * (c_norm + shift * radius) &&
        rest < radius) {
      // tau = sqrt(radius^2 - rest^2), written so that radius^2 cannot overflow
      const double ratio = rest / radius;
      yp[first_bottom] = -std::copysign(radius * std::sqrt((1.0 - ratio) * (1.0 + ratio)), c[first_bottom]);
      return result(shift, true);
    }
  } else if (c_norm == 0.0) {
    return result(0.0, false);
  }

  // phi < 0 just right of t = 0, and phi(hi) >= 0 since ||y(sigma)|| <= ||c|| / (lambda_min + sigma):
  // hi = sigma_hi - shift, sigma_hi = (-lambda_min + sqrt(lambda_min^2 + 2 M ||c||)) / 2, written without
  // the difference that cancels when 2 M ||c|| << lambda_min^2, and with r = sqrt(2 M ||c||) and a hypot
  // so that no square overflows (2 M ||c|| = inf gave hi = 0: the Newton step for a huge M)
  const double r = std::sqrt(2.0) * std::sqrt(M) * std::sqrt(c_norm);
  double lo = 0.0, hi = 0.5 * r * (r / (std::abs(lam_min) + std::hypot(lam_min, r)));
  double t = hi;
  std::vector<double> work(k);
  for (int64_t it = 0; it < max_iter; ++it) {
    const Secular f = secular(s, c, shift, t, M, work);
    // the bracket relative to t, not sigma: near the hard case y depends on lambda_min + sigma = t
    // (or on a tiny s_i + t), which the bracket must resolve when t << eps sigma
    if (std::abs(f.residual) <= tol || hi - lo <= kEps * t) break;
    (f.phi > 0 ? hi : lo) = t;
    const double t_newton = t - f.phi / f.slope;
    t = (lo < t_newton && t_newton < hi) ? t_newton : 0.5 * (lo + hi);
  }
  for (int64_t i = 0; i < k; ++i) yp[i] = -c[i] / (s[i] + t);
  return result(shift + t, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) { m.impl("cubic_secular_solve", &cubic_secular_solve_cpu); }

}  // namespace unlearn_kernels
