// The CPU stages of the fused MLP Hessian-vector product (the passes are device-agnostic, in
// csrc/mlp_hvp.cpp; the math is written out there): one row loop per layer for the biases, (act,
// act', act'') and the R-forward, one for the backward through the activation, the target count,
// and one row loop for the loss (one softmax per row serves the gradient and all K tangents, which
// the single-tangent softmax_ce_hvp op cannot do without copying the logits K times).
#include "../mlp_hvp.h"
#include "../message.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>

namespace unlearn_kernels::mlp_hvp {

// --------------------------------------------------------------------------- CPU kernels
namespace {

// Elements (or row elements) per parallel task: enough work that scheduling is negligible.
constexpr int64_t kGrain = 32768;
// Rows the loss takes at a time (its per-row sums and logs are kept on the stack).
constexpr int64_t kLossTile = 64;

// act, act' and act'' of one vector of pre-activations, in one go (they share exp/erf/tanh). The
// activation is a template parameter so that each row loop below is compiled without a switch.
template <Activation A, typename scalar_t>
void activation_vec(const at::vec::Vectorized<scalar_t>& a, at::vec::Vectorized<scalar_t>& h,
                    at::vec::Vectorized<scalar_t>& d1, at::vec::Vectorized<scalar_t>& d2) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec one(1), two(2), half(0.5);
  if constexpr (A == Activation::kIdentity) {
    h = a;
    d1 = one;
  } else if constexpr (A == Activation::kReLU) {
    const Vec zero(0);
    h = at::vec::maximum(a, zero);  // NaN-propagating, like torch.relu
    d1 = Vec::blendv(zero, one, a > zero);
  } else if constexpr (A == Activation::kGELU) {  // exact form: a Phi(a), Phi the standard normal CDF, phi its density
    const Vec cdf = half * (one + (a * Vec(M_SQRT1_2)).erf());
    const Vec pdf = (a * a * Vec(-0.5)).exp() * Vec(0.5 * M_2_SQRTPI * M_SQRT1_2);
    h = a * cdf;
    d1 = cdf + a * pdf;
    d2 = pdf * (two - a * a);
  } else if constexpr (A == Activation::kTanh) {
    h = a.tanh();
    d1 = one - h * h;
    d2 = Vec(-2) * h * d1;
  } else {
    static_assert(A == Activation::kSigmoid);
    h = one / (one + a.neg().exp());
    d1 = h * (one - h);
    d2 = d1 * (one - two * h);
  }
}

// The data of one activate call. Pointers are copied into the row loop's locals (by value), so
// the compiler keeps them in registers instead of reloading them after every store.
template <typename scalar_t>
struct LayerRows {
  const scalar_t* ar;   // (N, (K+1) d)
  const scalar_t* t;    // (N, K, d) or null
  const scalar_t* b;    // (d) or null
  const scalar_t* vb;   // (K, d) or null
  scalar_t* h;          // (N, d)
  scalar_t* d1;         // (N, d), null for the identity
  scalar_t* d2;         // (N, d) or null
  scalar_t* rh;         // (N, K, d)
  scalar_t* ra;         // (N, K, d) or null
  int64_t K, d;
};

template <Activation A, typename scalar_t>
void activate_rows(const LayerRows<scalar_t> p, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t K = p.K, d = p.d;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* ari = p.ar + i * (K + 1) * d;
    for (int64_t j = 0; j < d; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), d - j), idx = i * d + j;
      Vec a = Vec::loadu(ari + j, n);
      if (p.b != nullptr) a = a + Vec::loadu(p.b + j, n);
      Vec h, v1, v2;
      activation_vec<A, scalar_t>(a, h, v1, v2);
      h.store(p.h + idx, n);
      if constexpr (has_first(A)) v1.store(p.d1 + idx, n);
      if constexpr (has_second(A)) v2.store(p.d2 + idx, n);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t rk = (i * K + k) * d + j;
        Vec r = Vec::loadu(ari + (k + 1) * d + j, n);
        if (p.vb != nullptr) r = r + Vec::loadu(p.vb + k * d + j, n);
        if (p.t != nullptr) r = r + Vec::loadu(p.t + rk, n);
        if constexpr (has_second(A)) r.store(p.ra + rk, n);
        if constexpr (has_first(A)) {
          (v1 * r).store(p.rh + rk, n);
        } else {
          r.store(p.rh + rk, n);
        }
      }
    }
  }
}

// One pass over each row of the layer (see Kernels::activate): the biases, (act, act', act'') and
// the K R-derivatives. Vectorised (AVX2 exp/erf/tanh) in the default build, which defines
// CPU_CAPABILITY_AVX2 (setup.py); scalar libm calls in a generic-architecture build.
void activate_cpu(Activation act, const at::Tensor& ar, const at::Tensor& t, const at::Tensor& b,
                  const at::Tensor& vb, at::Tensor& h, at::Tensor& d1, at::Tensor& d2, at::Tensor& rh,
                  at::Tensor& ra) {
  assert_activate_layout(act, ar, t, h, d1, d2, rh, ra);
  const int64_t N = rh.size(0), K = rh.size(1), d = rh.size(2);
  const at::Tensor bc = b.defined() ? b.contiguous() : b, vbc = vb.defined() ? vb.contiguous() : vb;
  AT_DISPATCH_FLOATING_TYPES(ar.scalar_type(), "mlp_hvp_activate_cpu", [&] {
    const auto ptr = [](const at::Tensor& x) { return x.defined() ? x.const_data_ptr<scalar_t>() : nullptr; };
    const auto mut = [](at::Tensor& x) { return x.defined() ? x.mutable_data_ptr<scalar_t>() : nullptr; };
    const LayerRows<scalar_t> rows{ptr(ar), ptr(t), ptr(bc), ptr(vbc), mut(h), mut(d1), mut(d2), mut(rh), mut(ra), K, d};
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / ((K + 1) * d)), [&](int64_t begin, int64_t end) {
      switch (act) {
        case Activation::kIdentity: return activate_rows<Activation::kIdentity>(rows, begin, end);
        case Activation::kReLU: return activate_rows<Activation::kReLU>(rows, begin, end);
        case Activation::kGELU: return activate_rows<Activation::kGELU>(rows, begin, end);
        case Activation::kTanh: return activate_rows<Activation::kTanh>(rows, begin, end);
        case Activation::kSigmoid: return activate_rows<Activation::kSigmoid>(rows, begin, end);
      }
    });
  });
}

// Rows [begin, end) of the backward through the activation (see Kernels::backward); the pointers
// are parameters, i.e. locals, for the reason given at LayerRows.
template <typename scalar_t>
void backward_rows(const scalar_t* p1, const scalar_t* p2, const scalar_t* pra, scalar_t* pg, scalar_t* prg,
                   int64_t K, int64_t d, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t j = 0; j < d; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), d - j), idx = i * d + j;
      const Vec v1 = Vec::loadu(p1 + idx, n);
      const Vec v2g = p2 != nullptr ? Vec::loadu(p2 + idx, n) * Vec::loadu(pg + idx, n) : Vec(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t rat = (i * K + k) * d + j;
        Vec r = v1 * Vec::loadu(prg + rat, n);
        if (p2 != nullptr) r = at::vec::fmadd(v2g, Vec::loadu(pra + rat, n), r);
        r.store(prg + rat, n);
      }
      if (pg != nullptr) (v1 * Vec::loadu(pg + idx, n)).store(pg + idx, n);
    }
  }
}

void backward_cpu(const at::Tensor& d1, const at::Tensor& d2, const at::Tensor& ra, at::Tensor& g, at::Tensor& rg) {
  TORCH_INTERNAL_ASSERT(d1.is_contiguous() && rg.is_contiguous() && rg.dim() == 3);
  TORCH_INTERNAL_ASSERT(d2.defined() == ra.defined() && (!d2.defined() || (d2.is_contiguous() && ra.is_contiguous())));
  TORCH_INTERNAL_ASSERT(g.defined() ? g.is_contiguous() : !d2.defined());
  const int64_t N = rg.size(0), K = rg.size(1), d = rg.size(2);
  AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "mlp_hvp_backward_cpu", [&] {
    const scalar_t* p1 = d1.const_data_ptr<scalar_t>();
    const scalar_t* p2 = d2.defined() ? d2.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pra = ra.defined() ? ra.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pg = g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* prg = rg.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / ((K + 1) * d)), [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t>(p1, p2, pra, pg, prg, K, d, begin, end);
    });
  });
}

// Whether x[0:n] holds no NaN or Inf.
template <typename scalar_t>
bool all_finite(const scalar_t* x, int64_t n) {
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) finite &= std::isfinite(x[j]);
  return finite;
}

int64_t count_kept_cpu(const char* op, const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const at::Tensor y = target.contiguous();
  const int64_t* py = y.const_data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    if (py[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(py[i] >= 0 && py[i] < C, message(op, ": target[", i, "] = ", py[i], " is out of range for ", C,
                                                       " classes (and is not ignore_index=", ignore_index, ")")
                                                   .c_str());
    ++kept;
  }
  return kept;
}

// One tangent's loss R-row r (C entries) in place, relative to the row's top class c: r_j <- weighted(j, v_j) with
// v_j = (r_j - r_c) - sum_k p_k (r_k - r_c), the same as r_j - <p, r> since sum_k p_k = 1, where r_c - <p, r> cancels
// in float32 at p_c ~ 1 (1.6e-2 of a confident row's product); the sum in double. Returns that sum, rounded (for the
// finiteness check). The uncached loss rows and the cached product's both take their rows so.
template <typename scalar_t, typename Weighted>
scalar_t loss_r_row(const scalar_t* p, const Weighted& weighted, scalar_t* r, int64_t c, int64_t C) {
  const scalar_t rc = r[c];
  double sum_pr = 0;
  for (int64_t j = 0; j < C; ++j) sum_pr += static_cast<double>(p[j]) * (r[j] - rc);
  const scalar_t dot = static_cast<scalar_t>(sum_pr);
  for (int64_t j = 0; j < C; ++j) r[j] = weighted(j, (r[j] - rc) - dot);
  return dot;
}

void loss_cpu(at::Tensor& z, const at::Tensor& target, at::Tensor& rz, double label_smoothing, int64_t ignore_index,
              double scale, at::Tensor& flags, at::Tensor& values) {
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && rz.is_contiguous() && rz.dim() == 3);
  TORCH_INTERNAL_ASSERT(!values.defined() || (values.is_contiguous() && values.scalar_type() == at::kDouble));
  double* pv = values.defined() ? values.mutable_data_ptr<double>() : nullptr;
  const int64_t N = z.size(0), C = z.size(1), K = rz.size(1);
  const at::Tensor y = target.contiguous();
  std::atomic<bool> bad_logits{false}, bad_tangent{false};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_hvp_loss_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    using DVec = at::vec::Vectorized<double>;
    const int64_t* py = y.const_data_ptr<int64_t>();
    scalar_t* pz = z.mutable_data_ptr<scalar_t>();
    scalar_t* prz = rz.mutable_data_ptr<scalar_t>();
    const scalar_t row_scale = static_cast<scalar_t>(scale);
    const scalar_t off = static_cast<scalar_t>(label_smoothing / C);  // smoothed mass on every class
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / ((K + 1) * C)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> p(C);
      // per row of a tile: sum_c exp(z_c - max), its part over the classes other than the target, the loss less
      // log(sum), and the top class (the first at the max)
      std::array<double, kLossTile> sum, rest, base;
      std::array<int64_t, kLossTile> top;
      std::array<bool, kLossTile> ignored;
      bool bl = false, bt = false;
      // Tiles of rows: the row max, exp(z - max) over the tile's logits at once (full vectors: a row of C < 8
      // classes would fill part of one), the double sums, their logs a vector at a time (a scalar log per
      // row cost as much as the rest of the row), then each row's gradient and tangents.
      for (int64_t first = begin; first < end; first += kLossTile) {
        const int64_t rows = std::min<int64_t>(kLossTile, end - first);
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* zi = pz + (first + r) * C;
          ignored[r] = py[first + r] == ignore_index;
          if (ignored[r]) {
            // An ignored row adds nothing only while it is finite: a NaN or Inf there (from x or a
            // hidden layer) reaches every product through the backward's 0 * Inf.
            if (!all_finite(zi, C)) bl = true;
            base[r] = 0.0;  // read by the tile's vector of logs, then overwritten by the row's 0
            continue;
          }
          scalar_t m = -std::numeric_limits<scalar_t>::infinity();
          top[r] = 0;
          for (int64_t j = 0; j < C; ++j) {
            if (std::isnan(zi[j]) || zi[j] > m) {
              m = zi[j];
              top[r] = j;
            }
          }
          if (!std::isfinite(m)) bl = true;
          double z_sum = 0;
          if (label_smoothing > 0) {
            for (int64_t j = 0; j < C; ++j) z_sum += zi[j];
          }
          // the row's loss is m + log(sum) - (1 - eps) z_t - (eps / C) sum_c z_c
          base[r] = static_cast<double>(m) - (1.0 - label_smoothing) * zi[py[first + r]] -
                    label_smoothing / static_cast<double>(C) * z_sum;
          for (int64_t j = 0; j < C; ++j) zi[j] -= m;
        }
        scalar_t* tile = pz + first * C;  // an ignored row's exps are overwritten by its zeros below
        for (int64_t j = 0; j < rows * C; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), rows * C - j);
          Vec::loadu(tile + j, n).exp().store(tile + j, n);
        }
        // sums in double: in float a confident row's exp(z - m) ~ 1e-9 falls below half an ulp of the
        // running sum once the top class is in it, and every later class was dropped (p_y - 1 came out 0
        // with 100,000 classes, where torch's float32 is off by 6%)
        // the target's term apart: the target's p_y - 1 below is minus rest / sum, where (sum - e_y) / sum would
        // cancel in double too once 1 - p_y falls below ~1e-9
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* ei = tile + r * C;
          if (ignored[r]) {
            sum[r] = 1.0;
            continue;
          }
          const int64_t t = py[first + r];
          double others = 0;
          for (int64_t j = 0; j < t; ++j) others += ei[j];
          for (int64_t j = t + 1; j < C; ++j) others += ei[j];
          rest[r] = others;
          sum[r] = others + ei[t];
        }
        if (pv != nullptr) {
          for (int64_t r = 0; r < rows; r += DVec::size()) {
            const int64_t n = std::min<int64_t>(DVec::size(), rows - r);
            (DVec::loadu(base.data() + r, n) + DVec::loadu(sum.data() + r, n).log()).store(pv + first + r, n);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = first + r;
          scalar_t* zi = pz + i * C;
          if (ignored[r]) {
            if (!all_finite(prz + i * K * C, K * C)) bt = true;
            std::fill(zi, zi + C, scalar_t(0));
            std::fill(prz + i * K * C, prz + (i + 1) * K * C, scalar_t(0));
            if (pv != nullptr) pv[i] = 0.0;
            continue;
          }
          const scalar_t inv_sum = static_cast<scalar_t>(1.0 / sum[r]);
          for (int64_t j = 0; j < C; ++j) {
            p[j] = zi[j] * inv_sum;
            zi[j] = (p[j] - off) * row_scale;
          }
          // the target's p_y - 1 as minus the other classes' share: in float32, p_y - 1 of a well-fit row
          // (1 - p_y ~ 1e-5, where an unlearning method meets its retain rows) kept an absolute error of ~6e-8, a
          // relative error of ~1e-2 in the row's largest gradient entry
          zi[py[i]] = static_cast<scalar_t>((label_smoothing * (1.0 - 1.0 / C) - rest[r] / sum[r]) * scale);
          const auto weighted = [&](int64_t j, scalar_t v) { return p[j] * v * row_scale; };
          for (int64_t k = 0; k < K; ++k) {
            if (!std::isfinite(loss_r_row(p.data(), weighted, prz + (i * K + k) * C, top[r], C))) bt = true;
          }
        }
      }
      if (bl) bad_logits = true;
      if (bt) bad_tangent = true;
    });
  });
  flags[0] = static_cast<int>(bad_logits.load());
  flags[1] = static_cast<int>(bad_tangent.load());
}

// 1,024 rows of a 128-wide layer: a block's activations and act' (512 KiB each in float32) stay in a core's L2
// cache; on the AMD EPYC (1 MiB L2 a core) a value-and-gradient pass over 2,048 rows of the digits MLP is 7-10%
// faster than in one block, a cached product over its 1,797 rows about 15%.
constexpr int64_t kBlockElements = 1024 * 128;

// Kernels::cached_loss_rows a row at a time: the row's top class, then per tangent its double sum and the row, while
// the row is in cache (ATen's ops made five passes over the block, ~70 us of a ~1.2 ms digits product before the top
// class, which adds an argmax and a gather).
bool cached_loss_rows_cpu(const at::Tensor& p, const at::Tensor& sp, at::Tensor& rg, bool check_finite) {
  if (!(p.is_contiguous() && sp.is_contiguous() && rg.is_contiguous())) {
    return cached_loss_rows_aten(p, sp, rg, check_finite);
  }
  const int64_t n = rg.size(0), K = rg.size(1), C = rg.size(2);
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(rg.scalar_type(), "mlp_hvp_cached_loss_rows_cpu", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* psp = sp.const_data_ptr<scalar_t>();
    scalar_t* pr = rg.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kGrain / (K * C)), [&](int64_t begin, int64_t end) {
      bool b = false;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* pi = pp + i * C;
        const scalar_t* si = psp + i * C;
        int64_t c = 0;
        for (int64_t j = 1; j < C; ++j) c = pi[j] > pi[c] ? j : c;
        const auto weighted = [&](int64_t j, scalar_t v) { return si[j] * v; };
        for (int64_t k = 0; k < K; ++k) {
          if (!std::isfinite(loss_r_row(pi, weighted, pr + (i * K + k) * C, c, C))) b = true;
        }
      }
      if (b) bad = true;
    });
  });
  return !(check_finite && bad.load());
}

const Kernels kCpuKernels{&activate_cpu, &backward_cpu, &count_kept_cpu, &loss_cpu, &cached_loss_rows_cpu,
                          kBlockElements};

std::vector<at::Tensor> mlp_hvp_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                    at::TensorList v_weights, const c10::List<std::optional<at::Tensor>>& v_biases,
                                    double label_smoothing, int64_t ignore_index, bool check_finite) {
  return run(kCpuKernels, x, target, weights, biases, activations, v_weights, v_biases, label_smoothing, ignore_index,
             check_finite);
}

at::Tensor mlp_hvp_flat_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                            const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                            const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                            double label_smoothing, int64_t ignore_index, bool check_finite) {
  return run_flat(kCpuKernels, x, target, weights, biases, activations, V, weight_offsets, bias_offsets,
                  label_smoothing, ignore_index, check_finite);
}

std::tuple<at::Tensor, at::Tensor> mlp_value_grad_flat_cpu(
    const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations, at::IntArrayRef weight_offsets,
    at::IntArrayRef bias_offsets, double label_smoothing, int64_t ignore_index, bool with_gradient, bool check_finite) {
  return run_value_grad_flat(kCpuKernels, x, target, weights, biases, activations, weight_offsets, bias_offsets,
                             label_smoothing, ignore_index, with_gradient, check_finite);
}

std::vector<at::Tensor> mlp_hvp_state_cpu(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                                          const c10::List<std::optional<at::Tensor>>& biases,
                                          at::IntArrayRef activations, double label_smoothing, int64_t ignore_index,
                                          bool check_finite) {
  return run_state(kCpuKernels, x, target, weights, biases, activations, label_smoothing, ignore_index, check_finite);
}

at::Tensor mlp_hvp_flat_cached_cpu(const at::Tensor& x, at::TensorList state, at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                   const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                                   bool check_finite) {
  return run_cached_flat(kCpuKernels, x, state, weights, biases, activations, V, weight_offsets, bias_offsets,
                         check_finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("mlp_hvp", &mlp_hvp_cpu);
  m.impl("mlp_hvp_flat", &mlp_hvp_flat_cpu);
  m.impl("mlp_value_grad_flat", &mlp_value_grad_flat_cpu);
  m.impl("mlp_hvp_state", &mlp_hvp_state_cpu);
  m.impl("mlp_hvp_flat_cached", &mlp_hvp_flat_cached_cpu);
}

}  // namespace unlearn_kernels::mlp_hvp
