// Exact Hessian-vector products of the mean softmax cross entropy of an MLP w.r.t. all its weights
// and biases, for K tangents in one pass (Pearlmutter's R-operator). Layer l maps h_{l-1} to
// a_l = h_{l-1} W_l^T + b_l, h_l = act_l(a_l); the logits are z = h_L. With tangent (V_l, c_l):
//
//   R-forward:   Ra_l = Rh_{l-1} W_l^T + h_{l-1} V_l^T + c_l,          Rh_l = act'(a_l) Ra_l
//   loss:        g_L  = (softmax(z) - t) / N,                          Rg_L = H_ce(z) Rz / N
//                (N counts the rows whose target is not ignore_index; the others are 0)
//   backward:    d_l  = act'(a_l) g_l,     Rd_l = act''(a_l) Ra_l g_l + act'(a_l) Rg_l
//                g_{l-1} = d_l W_l,        Rg_{l-1} = Rd_l W_l + d_l V_l
//   products:    HV_l = Rd_l^T h_{l-1} + d_l^T Rh_{l-1},               Hc_l = sum_rows Rd_l
//
// The K tangents share the forward and the backward; R-quantities are laid out (N, K, d), so every
// product above for all K tangents is one plain matmul (no batched or strided GEMM). The weight
// gradients d_l^T h_{l-1} are never formed: the HVP does not need them.
//
// This file holds the device-agnostic passes `run` and `run_flat` (also used by
// csrc/cuda/mlp_hvp.cu) and the CPU stages: one row loop per layer for the biases, (act, act',
// act'') and the R-forward, one for the backward through the activation, the target count, and
// one row loop for the loss (one softmax per row serves the gradient and all K tangents, which the
// single-tangent softmax_ce_hvp op cannot do without copying the logits K times).
#include "../mlp_hvp.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

namespace unlearn_kernels::mlp_hvp {

// --------------------------------------------------------------------------- the pass
namespace {

constexpr int64_t kNumActivations = 5;

void check_inputs(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                  const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                  at::TensorList v_weights, const c10::List<std::optional<at::Tensor>>& v_biases,
                  double label_smoothing) {
  const size_t L = weights.size();
  TORCH_CHECK_VALUE(L >= 1, "mlp_hvp: at least one layer is needed, got 0 weights");
  TORCH_CHECK_VALUE(biases.size() == L && activations.size() == L && v_weights.size() == L && v_biases.size() == L,
                    "mlp_hvp: weights, biases, activations, v_weights and v_biases must all have one entry per "
                    "layer, got ", L, ", ", biases.size(), ", ", activations.size(), ", ", v_weights.size(), " and ",
                    v_biases.size());
  TORCH_CHECK_VALUE(x.dim() == 2, "mlp_hvp: x must be 2-D (N, in_features), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) > 0, "mlp_hvp: x has no rows (the mean loss over 0 samples is undefined)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "mlp_hvp: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "mlp_hvp: target must be int64 class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == x.size(0), "mlp_hvp: target must have shape (",
                    x.size(0), ",), got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == x.device(), "mlp_hvp: target is on ", target.device(), " but x on ",
                    x.device());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "mlp_hvp: label_smoothing must be in [0, 1], got ", label_smoothing);
  const auto check_like_x = [&](const at::Tensor& t, const char* what, size_t l) {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "mlp_hvp: ", what, "[", l, "] has dtype ",
                     t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), "mlp_hvp: ", what, "[", l, "] is on ", t.device(), " but x on ",
                      x.device());
  };
  int64_t in_features = x.size(1);
  const int64_t K = v_weights[0].dim() == 3 ? v_weights[0].size(0) : -1;
  TORCH_CHECK_VALUE(K >= 1, "mlp_hvp: v_weights[0] must be 3-D (K, out, in) with K >= 1, got shape ",
                    v_weights[0].sizes());
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK_VALUE(w.dim() == 2, "mlp_hvp: weights[", l, "] must be 2-D (out, in), got shape ", w.sizes());
    TORCH_CHECK_VALUE(w.size(1) == in_features, "mlp_hvp: weights[", l, "] has shape ", w.sizes(), " but its input has ",
                      in_features, " features (", l == 0 ? "x" : "the previous layer's output", ")");
    check_like_x(w, "weights", l);
    const int64_t out = w.size(0);
    TORCH_CHECK_VALUE(out > 0, "mlp_hvp: weights[", l, "] has no output features");
    const std::optional<at::Tensor> b = biases[l];
    if (b.has_value()) {
      TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == out, "mlp_hvp: biases[", l, "] must have shape (", out,
                        ",), got ", b->sizes());
      check_like_x(*b, "biases", l);
    }
    TORCH_CHECK_VALUE(activations[l] >= 0 && activations[l] < kNumActivations, "mlp_hvp: activations[", l,
                      "] = ", activations[l], " is not an activation code (0 identity, 1 relu, 2 gelu, 3 tanh, 4 sigmoid)");
    const at::Tensor& v = v_weights[l];
    TORCH_CHECK_VALUE(v.dim() == 3 && v.size(0) == K && v.size(1) == out && v.size(2) == in_features,
                      "mlp_hvp: v_weights[", l, "] must have shape (K, out, in) = (", K, ", ", out, ", ", in_features,
                      "), got ", v.sizes());
    check_like_x(v, "v_weights", l);
    const std::optional<at::Tensor> vb = v_biases[l];
    if (vb.has_value()) {
      TORCH_CHECK_VALUE(b.has_value(), "mlp_hvp: v_biases[", l, "] is given but layer ", l, " has no bias");
      TORCH_CHECK_VALUE(vb->dim() == 2 && vb->size(0) == K && vb->size(1) == out, "mlp_hvp: v_biases[", l,
                        "] must have shape (K, out) = (", K, ", ", out, "), got ", vb->sizes());
      check_like_x(*vb, "v_biases", l);
    }
    in_features = out;
  }
}

}  // namespace

std::vector<at::Tensor> run(const Kernels& kernels, const at::Tensor& x, const at::Tensor& target,
                            at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                            at::IntArrayRef activations, at::TensorList v_weights,
                            const c10::List<std::optional<at::Tensor>>& v_biases, double label_smoothing,
                            int64_t ignore_index, bool check_finite) {
  check_inputs(x, target, weights, biases, activations, v_weights, v_biases, label_smoothing);
  const int64_t L = static_cast<int64_t>(weights.size());
  const int64_t N = x.size(0), K = v_weights[0].size(0);
  const auto act = [&](int64_t l) { return static_cast<Activation>(activations[l]); };
  const auto bias = [](const c10::List<std::optional<at::Tensor>>& list, int64_t l) {
    const std::optional<at::Tensor> t = list[l];
    return t.has_value() ? *t : at::Tensor();
  };

  // Forward and R-forward together, all K tangents at once in the (N, K, d) layout: h[l] is the
  // input of layer l (h[L] the logits), rh[l] its R-derivative (rh[0] = 0); d1/d2 the activation
  // derivatives, ra[l] the R-pre-activation (kept only where act'' is needed in the backward).
  // One matmul per layer serves the forward and the h V^T terms of all K tangents, and the
  // biases are added inside the activation kernel (no bias copies, no separate R pass).
  std::vector<at::Tensor> h(L + 1), rh(L + 1), d1(L), d2(L), ra(L);
  h[0] = x;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    const at::Tensor stacked = at::cat({weights[l], v_weights[l].reshape({K * out, in})}).t();
    h[l + 1] = at::empty({N, out}, x.options());
    rh[l + 1] = at::empty({N, K, out}, x.options());
    if (has_first(act(l))) d1[l] = at::empty({N, out}, x.options());
    if (has_second(act(l))) {
      d2[l] = at::empty({N, out}, x.options());
      ra[l] = at::empty({N, K, out}, x.options());
    }
    const at::Tensor ar = at::mm(h[l], stacked);
    const at::Tensor t = l > 0 ? at::mm(rh[l].view({N * K, in}), weights[l].t()) : at::Tensor();
    kernels.activate(act(l), ar, t, bias(biases, l), bias(v_biases, l), h[l + 1], d1[l], d2[l], rh[l + 1], ra[l]);
  }

  // Loss rows, in place: the logits become the gradient g, their R-derivative becomes Rg.
  at::Tensor g = h[L], rg = rh[L];
  h[L] = rh[L] = at::Tensor();
  const int64_t C = g.size(1);
  const int64_t num_kept = kernels.count_kept(target, C, ignore_index);
  TORCH_CHECK_VALUE(num_kept > 0, "mlp_hvp: every target is ignore_index=", ignore_index,
                    " (the mean loss over 0 samples is undefined)");
  at::Tensor flags = at::zeros({2}, g.options().dtype(at::kInt));
  kernels.loss(g, target, rg, label_smoothing, ignore_index, 1.0 / static_cast<double>(num_kept), flags);
  if (check_finite) {
    const at::Tensor f = flags.cpu();
    TORCH_CHECK_VALUE(f[0].item<int>() == 0,
                      "mlp_hvp: the logits contain NaN or +Inf (check x, the weights and the biases)");
    TORCH_CHECK_VALUE(f[1].item<int>() == 0, "mlp_hvp: the R-derivative of the logits contains NaN or Inf "
                      "(check v_weights and v_biases)");
  }

  // Backward and R-backward, layer by layer from the top.
  std::vector<at::Tensor> out_w(L), out_b;
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    if (has_first(act(l))) kernels.backward(d1[l], d2[l], ra[l], g, rg);  // g, rg become d_l, Rd_l
    d1[l] = d2[l] = ra[l] = at::Tensor();
    const at::Tensor rg_flat = rg.view({N, K * out});
    out_w[l] = at::mm(rg_flat.t(), h[l]).view({K, out, in});
    if (l > 0) out_w[l].add_(at::mm(g.t(), rh[l].view({N, K * in})).view({out, K, in}).transpose(0, 1));
    if (bias(biases, l).defined()) out_b.push_back(rg.sum(0));
    if (l > 0) {
      at::Tensor rg_next = at::mm(rg.view({N * K, out}), weights[l]).view({N, K * in});
      rg_next.addmm_(g, v_weights[l].transpose(0, 1).reshape({out, K * in}));
      // g_{l-1} feeds d_{l-1}^T Rh_{l-2} (only above the first layer) and the act'' term: on the
      // first layer of a ReLU MLP neither exists, and one matmul is saved.
      g = (l - 1 > 0 || has_second(act(l - 1))) ? at::mm(g, weights[l]) : at::Tensor();
      rg = rg_next.view({N, K, in});
    }
    h[l] = rh[l] = at::Tensor();
  }
  std::vector<at::Tensor> result(std::move(out_w));
  result.insert(result.end(), out_b.rbegin(), out_b.rend());
  return result;
}

at::Tensor run_flat(const Kernels& kernels, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                    const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                    double label_smoothing, int64_t ignore_index, bool check_finite) {
  const size_t L = weights.size();
  TORCH_CHECK_VALUE(V.dim() == 2 && V.size(1) >= 1, "mlp_hvp_flat: V must be 2-D (d, K) with K >= 1, got shape ",
                    V.sizes());
  TORCH_CHECK_TYPE(V.scalar_type() == x.scalar_type(), "mlp_hvp_flat: V has dtype ", V.scalar_type(), " but x has ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(V.device() == x.device(), "mlp_hvp_flat: V is on ", V.device(), " but x on ", x.device());
  TORCH_CHECK_VALUE(weight_offsets.size() == L && bias_offsets.size() == L && biases.size() == L,
                    "mlp_hvp_flat: weights, biases, weight_offsets and bias_offsets must have one entry per layer, got ",
                    L, ", ", biases.size(), ", ", weight_offsets.size(), " and ", bias_offsets.size());
  const int64_t d = V.size(0), K = V.size(1);
  // The chosen blocks as (offset, size, layer, is_bias), checked to tile [0, d).
  struct Block { int64_t offset, size; size_t layer; bool bias; };
  std::vector<Block> blocks;  // a bias block's size is its layer's width (run checks the bias shape)
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(weights[l].dim() == 2, "mlp_hvp_flat: weights[", l, "] must be 2-D (out, in), got shape ",
                      weights[l].sizes());
    if (weight_offsets[l] >= 0) blocks.push_back({weight_offsets[l], weights[l].numel(), l, false});
    if (bias_offsets[l] >= 0) {
      const std::optional<at::Tensor> b = biases[l];
      TORCH_CHECK_VALUE(b.has_value(), "mlp_hvp_flat: bias_offsets[", l, "] = ", bias_offsets[l], " but layer ", l,
                        " has no bias");
      blocks.push_back({bias_offsets[l], weights[l].size(0), l, true});
    }
  }
  std::sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.offset < b.offset; });
  int64_t next = 0;
  for (const Block& b : blocks) {
    TORCH_CHECK_VALUE(b.offset == next, "mlp_hvp_flat: the chosen parameter blocks must tile the ", d,
                      " rows of V in order without gaps or overlaps, but ", b.bias ? "bias" : "weight", "_offsets[",
                      b.layer, "] = ", b.offset, " where row ", next, " was expected");
    next += b.size;
  }
  TORCH_CHECK_VALUE(next == d, "mlp_hvp_flat: the chosen parameters have ", next, " entries but V has ", d, " rows");

  // Tangents: each block of V as (K, *shape); parameters not chosen get a zero tangent.
  const at::Tensor cols = V.t();  // (K, d): row k is tangent k
  std::vector<at::Tensor> v_weights(L);
  c10::List<std::optional<at::Tensor>> v_biases;
  for (size_t l = 0; l < L; ++l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    v_weights[l] = weight_offsets[l] >= 0 ? cols.narrow(1, weight_offsets[l], out * in).reshape({K, out, in})
                                          : at::zeros({K, out, in}, V.options());
    v_biases.push_back(bias_offsets[l] >= 0 ? std::optional<at::Tensor>(cols.narrow(1, bias_offsets[l], out).reshape({K, out}))
                                            : std::nullopt);
  }
  const std::vector<at::Tensor> products = run(kernels, x, target, weights, biases, activations, v_weights, v_biases,
                                               label_smoothing, ignore_index, check_finite);
  // run returns every weight's product, then those of the present biases.
  // Laid out (K, d) and returned transposed: each product block is then one contiguous copy.
  at::Tensor result = at::empty({K, d}, V.options());
  size_t bias_index = L;
  for (size_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor> b = biases[l];
    if (weight_offsets[l] >= 0) result.narrow(1, weight_offsets[l], weights[l].numel()).copy_(products[l].view({K, -1}));
    if (b.has_value()) {
      if (bias_offsets[l] >= 0) result.narrow(1, bias_offsets[l], b->numel()).copy_(products[bias_index]);
      ++bias_index;
    }
  }
  return result.t();
}

// --------------------------------------------------------------------------- CPU kernels
namespace {

// Elements (or row elements) per parallel task: enough work that scheduling is negligible.
constexpr int64_t kGrain = 32768;

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

int64_t count_kept_cpu(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const at::Tensor y = target.contiguous();
  const int64_t* py = y.const_data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    if (py[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(py[i] >= 0 && py[i] < C, "mlp_hvp: target[", i, "] = ", py[i], " is out of range for ", C,
                      " classes (and is not ignore_index=", ignore_index, ")");
    ++kept;
  }
  return kept;
}

void loss_cpu(at::Tensor& z, const at::Tensor& target, at::Tensor& rz, double label_smoothing, int64_t ignore_index,
              double scale, at::Tensor& flags) {
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && rz.is_contiguous() && rz.dim() == 3);
  const int64_t N = z.size(0), C = z.size(1), K = rz.size(1);
  const at::Tensor y = target.contiguous();
  std::atomic<bool> bad_logits{false}, bad_tangent{false};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_hvp_loss_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const int64_t* py = y.const_data_ptr<int64_t>();
    scalar_t* pz = z.mutable_data_ptr<scalar_t>();
    scalar_t* prz = rz.mutable_data_ptr<scalar_t>();
    const scalar_t row_scale = static_cast<scalar_t>(scale);
    const scalar_t off = static_cast<scalar_t>(label_smoothing / C);  // smoothed mass on every class
    const scalar_t on = static_cast<scalar_t>(1.0 - label_smoothing);
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / ((K + 1) * C)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> p(C);
      bool bl = false, bt = false;
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* zi = pz + i * C;
        if (py[i] == ignore_index) {
          std::fill(zi, zi + C, scalar_t(0));
          std::fill(prz + i * K * C, prz + (i + 1) * K * C, scalar_t(0));
          continue;
        }
        scalar_t m = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < C; ++j) m = (std::isnan(zi[j]) || zi[j] > m) ? zi[j] : m;
        if (!std::isfinite(m)) bl = true;
        // exp(z - m) a vector at a time (the padded lanes of the last one are not stored).
        for (int64_t j = 0; j < C; ++j) p[j] = zi[j] - m;
        for (int64_t j = 0; j < C; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), C - j);
          Vec::loadu(p.data() + j, n).exp().store(p.data() + j, n);
        }
        scalar_t sum = 0;
        for (int64_t j = 0; j < C; ++j) sum += p[j];
        const scalar_t inv_sum = scalar_t(1) / sum;
        for (int64_t j = 0; j < C; ++j) {
          p[j] *= inv_sum;
          zi[j] = (p[j] - off) * row_scale;
        }
        zi[py[i]] -= on * row_scale;
        for (int64_t k = 0; k < K; ++k) {
          scalar_t* r = prz + (i * K + k) * C;
          scalar_t dot = 0;
          for (int64_t j = 0; j < C; ++j) dot += p[j] * r[j];
          if (!std::isfinite(dot)) bt = true;
          for (int64_t j = 0; j < C; ++j) r[j] = p[j] * (r[j] - dot) * row_scale;
        }
      }
      if (bl) bad_logits = true;
      if (bt) bad_tangent = true;
    });
  });
  flags[0] = static_cast<int>(bad_logits.load());
  flags[1] = static_cast<int>(bad_tangent.load());
}

const Kernels kCpuKernels{&activate_cpu, &backward_cpu, &count_kept_cpu, &loss_cpu};

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

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CPU, m) {
  m.impl("mlp_hvp", &mlp_hvp_cpu);
  m.impl("mlp_hvp_flat", &mlp_hvp_flat_cpu);
}

}  // namespace unlearn_kernels::mlp_hvp
