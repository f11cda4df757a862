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
// At fixed weights everything that does not depend on the tangents can be kept between products
// (`run_state`): the layer inputs h_l, act'(a_l), act''(a_l) g_l, d_l and softmax(z). A product
// from that state (`run_cached_flat`) runs only the R-forward, the loss's R-rows and the
// R-backward: per layer h V^T, Rh W^T, Rd^T h, d^T Rh, Rd W and d V, with no activation function
// evaluated and no softmax.
//
// This file holds the device-agnostic passes (GEMMs through gemm.h: oneDNN or MKL/OpenBLAS on CPU,
// cuBLAS on GPU); each backend supplies its fused elementwise stages through `Kernels`
// (csrc/cpu/mlp_hvp.cpp, csrc/cuda/mlp_hvp.cu) and registers the ops for its dispatch key. The cached
// pass uses ATen elementwise ops only.
#include "mlp_hvp.h"
#include "gemm.h"
#include "message.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>

namespace unlearn_kernels::mlp_hvp {

// --------------------------------------------------------------------------- the pass
namespace {

constexpr int64_t kNumActivations = 5;

void check_like(const char* op, const at::Tensor& x, const at::Tensor& t, const char* what, size_t l) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(),
      message(op, ": ", what, "[", l, "] has dtype ", t.scalar_type(), " but x has ", x.scalar_type()).c_str());
  TORCH_CHECK_VALUE(t.device() == x.device(),
                    message(op, ": ", what, "[", l, "] is on ", t.device(), " but x on ", x.device()).c_str());
}

// x, the layers' shapes, dtypes and devices, and the activation codes.
void check_layers(const char* op, const at::Tensor& x, at::TensorList weights,
                  const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations) {
  const size_t L = weights.size();
  TORCH_CHECK_VALUE(L >= 1, message(op, ": at least one layer is needed, got 0 weights").c_str());
  TORCH_CHECK_VALUE(biases.size() == L && activations.size() == L,
                    message(op,
                            ": weights, biases and activations must all "
                            "have one entry per layer, got ",
                            L, ", ", biases.size(), " and ", activations.size())
                        .c_str());
  TORCH_CHECK_VALUE(x.dim() == 2, message(op, ": x must be 2-D (N, in_features), got shape ", x.sizes()).c_str());
  TORCH_CHECK_VALUE(x.size(0) > 0, message(op, ": x has no rows (the mean loss over 0 samples is undefined)").c_str());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   message(op, ": x must be float32 or float64, got ", x.scalar_type()).c_str());
  int64_t in_features = x.size(1);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK_VALUE(w.dim() == 2,
                      message(op, ": weights[", l, "] must be 2-D (out, in), got shape ", w.sizes()).c_str());
    TORCH_CHECK_VALUE(w.size(1) == in_features,
                      message(op, ": weights[", l, "] has shape ", w.sizes(), " but its input has ", in_features,
                              " features (", l == 0 ? "x" : "the previous layer's output", ")")
                          .c_str());
    check_like(op, x, w, "weights", l);
    const int64_t out = w.size(0);
    TORCH_CHECK_VALUE(out > 0, message(op, ": weights[", l, "] has no output features").c_str());
    const std::optional<at::Tensor> b = biases[l];
    if (b.has_value()) {
      TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == out,
                        message(op, ": biases[", l, "] must have shape (", out, ",), got ", b->sizes()).c_str());
      check_like(op, x, *b, "biases", l);
    }
    TORCH_CHECK_VALUE(activations[l] >= 0 && activations[l] < kNumActivations,
                      message(op, ": activations[", l, "] = ", activations[l],
                              " is not an activation code (0 identity, 1 relu, 2 gelu, 3 tanh, 4 sigmoid)")
                          .c_str());
    in_features = out;
  }
}

// The refusal of NaN or +Inf logits (a kept row's max, or any entry of an ignored row), after "<op>: ".
constexpr const char* kBadLogits = "the logits contain NaN or +Inf (check x, the weights and the biases)";

// check_layers, and the targets and label smoothing of the loss; `op` names the op in messages.
void check_model(const char* op, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                 const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                 double label_smoothing) {
  check_layers(op, x, weights, biases, activations);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong,
                   message(op, ": target must be int64 class indices, got ", target.scalar_type()).c_str());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == x.size(0),
                    message(op, ": target must have shape (", x.size(0), ",), got ", target.sizes()).c_str());
  TORCH_CHECK_VALUE(target.device() == x.device(),
                    message(op, ": target is on ", target.device(), " but x on ", x.device()).c_str());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    message(op, ": label_smoothing must be in [0, 1], got ", label_smoothing).c_str());
}

void check_inputs(const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                  const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                  at::TensorList v_weights, const c10::List<std::optional<at::Tensor>>& v_biases,
                  double label_smoothing) {
  const size_t L = weights.size();
  TORCH_CHECK_VALUE(
      biases.size() == L && activations.size() == L && v_weights.size() == L && v_biases.size() == L,
      message("mlp_hvp: weights, biases, activations, v_weights and v_biases must all have one entry per "
              "layer, got ",
              L, ", ", biases.size(), ", ", activations.size(), ", ", v_weights.size(), " and ", v_biases.size())
          .c_str());
  check_model("mlp_hvp", x, target, weights, biases, activations, label_smoothing);
  const int64_t K = v_weights[0].dim() == 3 ? v_weights[0].size(0) : -1;
  TORCH_CHECK_VALUE(
      K >= 1,
      message("mlp_hvp: v_weights[0] must be 3-D (K, out, in) with K >= 1, got shape ", v_weights[0].sizes()).c_str());
  for (size_t l = 0; l < L; ++l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    const at::Tensor& v = v_weights[l];
    TORCH_CHECK_VALUE(v.dim() == 3 && v.size(0) == K && v.size(1) == out && v.size(2) == in,
                      message("mlp_hvp: v_weights[", l, "] must have shape (K, out, in) = (", K, ", ", out, ", ", in,
                              "), got ", v.sizes())
                          .c_str());
    check_like("mlp_hvp", x, v, "v_weights", l);
    const std::optional<at::Tensor> vb = v_biases[l];
    if (vb.has_value()) {
      const std::optional<at::Tensor> b = biases[l];
      TORCH_CHECK_VALUE(b.has_value(),
                        message("mlp_hvp: v_biases[", l, "] is given but layer ", l, " has no bias").c_str());
      TORCH_CHECK_VALUE(
          vb->dim() == 2 && vb->size(0) == K && vb->size(1) == out,
          message("mlp_hvp: v_biases[", l, "] must have shape (K, out) = (", K, ", ", out, "), got ", vb->sizes())
              .c_str());
      check_like("mlp_hvp", x, *vb, "v_biases", l);
    }
  }
}

// The rows whose target is not ignore_index, the mean's denominator (count_kept checks the targets); a
// ValueError where there is none.
int64_t kept_rows(const char* op, const Kernels& kernels, const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t num_kept = kernels.count_kept(op, target, C, ignore_index);
  TORCH_CHECK_VALUE(num_kept > 0, message(op, ": every target is ignore_index=", ignore_index,
                                          " (the mean loss over 0 samples is undefined)")
                                      .c_str());
  return num_kept;
}

// The rows of a block of the passes that take their rows in blocks (the value-and-gradient pass, the cached
// product), for K tangents: about Kernels::block_elements / (K x the widest layer output), at least 64, so that
// a very wide layer still gets matmuls of some height; all N rows where the backend takes no blocks.
int64_t block_rows(const Kernels& kernels, at::TensorList weights, int64_t N, int64_t K) {
  if (kernels.block_elements <= 0) return std::max<int64_t>(N, 1);
  int64_t width = 1;
  for (const at::Tensor& w : weights) width = std::max(width, w.size(0));
  return std::max<int64_t>(64, kernels.block_elements / (K * width));
}

// The forward with no tangents through the backend's activation stage: h[0] = x and h[l + 1] = act_l(h[l]
// W_l^T + b_l) (h[L] the logits), with act'(a_l) in d1[l] and act''(a_l) in d2[l] where the activation has
// them. A layer input h[l] with 0 < l < keep_from is released once the next layer has read it.
void forward(const Kernels& kernels, const at::Tensor& x, at::TensorList weights,
             const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations, int64_t keep_from,
             std::vector<at::Tensor>& h, std::vector<at::Tensor>& d1, std::vector<at::Tensor>& d2) {
  const int64_t L = static_cast<int64_t>(weights.size()), N = x.size(0);
  h.assign(L + 1, at::Tensor());
  d1.assign(L, at::Tensor());
  d2.assign(L, at::Tensor());
  h[0] = x;
  for (int64_t l = 0; l < L; ++l) {
    const auto act = static_cast<Activation>(activations[l]);
    const int64_t out = weights[l].size(0);
    at::Tensor rh = at::empty({N, 0, out}, x.options()), ra;
    if (has_first(act)) d1[l] = at::empty({N, out}, x.options());
    if (has_second(act)) {
      d2[l] = at::empty({N, out}, x.options());
      ra = at::empty({N, 0, out}, x.options());
    }
    const std::optional<at::Tensor> b = biases[l];
    const at::Tensor none;
    h[l + 1] = gemm(h[l], weights[l].t());  // activated in place: one fresh buffer per layer
    kernels.activate(act, h[l + 1], none, b.has_value() ? *b : none, none, h[l + 1], d1[l], d2[l], rh, ra);
    if (l > 0 && l < keep_from) h[l] = at::Tensor();
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
    const at::Tensor ar = gemm(h[l], stacked);
    const at::Tensor t = l > 0 ? gemm(rh[l].view({N * K, in}), weights[l].t()) : at::Tensor();
    kernels.activate(act(l), ar, t, bias(biases, l), bias(v_biases, l), h[l + 1], d1[l], d2[l], rh[l + 1], ra[l]);
  }

  // Loss rows, in place: the logits become the gradient g, their R-derivative becomes Rg.
  at::Tensor g = h[L], rg = rh[L];
  h[L] = rh[L] = at::Tensor();
  const int64_t num_kept = kept_rows("mlp_hvp", kernels, target, g.size(1), ignore_index);
  at::Tensor flags = at::zeros({2}, g.options().dtype(at::kInt));
  at::Tensor no_values;
  kernels.loss(g, target, rg, label_smoothing, ignore_index, 1.0 / static_cast<double>(num_kept), flags, no_values);
  if (check_finite) {
    const at::Tensor f = flags.cpu();
    TORCH_CHECK_VALUE(f[0].item<int>() == 0, message("mlp_hvp: ", kBadLogits).c_str());
    TORCH_CHECK_VALUE(f[1].item<int>() == 0, "mlp_hvp: the R-derivative of the logits contains NaN or Inf "
                      "(check v_weights and v_biases, then x and the weights: an Inf weight under a saturating "
                      "activation leaves the logits finite)");
  }

  // Backward and R-backward, layer by layer from the top.
  std::vector<at::Tensor> out_w(L), out_b;
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    if (has_first(act(l))) kernels.backward(d1[l], d2[l], ra[l], g, rg);  // g, rg become d_l, Rd_l
    d1[l] = d2[l] = ra[l] = at::Tensor();
    const at::Tensor rg_flat = rg.view({N, K * out});
    out_w[l] = gemm(rg_flat.t(), h[l]).view({K, out, in});
    if (l > 0) out_w[l].add_(gemm(g.t(), rh[l].view({N, K * in})).view({out, K, in}).transpose(0, 1));
    if (bias(biases, l).defined()) out_b.push_back(rg.sum(0));
    if (l > 0) {
      at::Tensor rg_next = gemm(rg.view({N * K, out}), weights[l]).view({N, K * in});
      gemm_into(rg_next, g, v_weights[l].transpose(0, 1).reshape({out, K * in}), 1.0);
      // g_{l-1} feeds d_{l-1}^T Rh_{l-2} (only above the first layer) and the act'' term: on the
      // first layer of a ReLU MLP neither exists, and one matmul is saved.
      g = (l - 1 > 0 || has_second(act(l - 1))) ? gemm(g, weights[l]) : at::Tensor();
      rg = rg_next.view({N, K, in});
    }
    h[l] = rh[l] = at::Tensor();
  }
  std::vector<at::Tensor> result(std::move(out_w));
  result.insert(result.end(), out_b.rbegin(), out_b.rend());
  return result;
}


// --------------------------------------------------------------------------- the flat-vector form
namespace {

// The chosen blocks of a flat parameter vector (weight_offsets / bias_offsets, -1 = not chosen):
// checks that they tile its first rows in order (a vector of `d` rows, or any length for d = -1), and
// returns the lowest layer with a chosen block and the vector's length. `op` names the op in messages.
std::pair<size_t, int64_t> check_blocks(const char* op, at::TensorList weights,
                                        const c10::List<std::optional<at::Tensor>>& biases,
                                        at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets, int64_t d) {
  const size_t L = weights.size();
  TORCH_CHECK_VALUE(
      weight_offsets.size() == L && bias_offsets.size() == L && biases.size() == L,
      message(op, ": weights, biases, weight_offsets and bias_offsets must have one entry per layer, got ", L,
              ", ", biases.size(), ", ", weight_offsets.size(), " and ", bias_offsets.size())
          .c_str());
  // The chosen blocks as (offset, size, layer, is_bias), checked to tile [0, d).
  struct Block { int64_t offset, size; size_t layer; bool bias; };
  std::vector<Block> blocks;  // a bias block's size is its layer's width (the passes check the bias shape)
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(weights[l].dim() == 2,
                      message(op, ": weights[", l, "] must be 2-D (out, in), got shape ", weights[l].sizes()).c_str());
    // not read as "not chosen": a sign slip would drop a block
    for (const auto& [kind, offset] : {std::pair<const char*, int64_t>{"weight", weight_offsets[l]},
                                       std::pair<const char*, int64_t>{"bias", bias_offsets[l]}}) {
      TORCH_CHECK_VALUE(offset >= -1, message(op, ": ", kind, "_offsets[", l, "] = ", offset, ": an offset is a row of ",
                                              d >= 0 ? "V" : "the flat gradient",
                                              " (>= 0), or -1 for a parameter that is not chosen")
                                          .c_str());
    }
    if (weight_offsets[l] >= 0) blocks.push_back({weight_offsets[l], weights[l].numel(), l, false});
    if (bias_offsets[l] >= 0) {
      const std::optional<at::Tensor> b = biases[l];
      TORCH_CHECK_VALUE(b.has_value(),
                        message(op, ": bias_offsets[", l, "] = ", bias_offsets[l], " but layer ", l, " has no bias").c_str());
      blocks.push_back({bias_offsets[l], weights[l].size(0), l, true});
    }
  }
  // stable: blocks at one offset stay in layer order (weight before bias), as the Python check sorts them
  std::stable_sort(blocks.begin(), blocks.end(), [](const Block& a, const Block& b) { return a.offset < b.offset; });
  int64_t next = 0;
  size_t lowest = L;
  for (const Block& b : blocks) {
    TORCH_CHECK_VALUE(b.offset == next,
                      message(op, ": the chosen parameter blocks must tile the ",
                              d >= 0 ? message(d, " rows of V") : std::string("flat vector"),
                              " in order without gaps or overlaps, but ", b.bias ? "bias" : "weight",
                              "_offsets[", b.layer, "] = ", b.offset, " where row ", next, " was expected")
                          .c_str());
    next += b.size;
    lowest = std::min(lowest, b.layer);
  }
  TORCH_CHECK_VALUE(d < 0 || next == d,
                    message(op, ": the chosen parameters have ", next, " entries but V has ", d, " rows").c_str());
  return {lowest, next};
}

// Checks V (d, K) against x and that the chosen blocks tile V's d rows; returns the lowest layer
// with a chosen block.
size_t check_flat_layout(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                         const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets) {
  TORCH_CHECK_VALUE(V.dim() == 2 && V.size(1) >= 1,
                    message("mlp_hvp_flat: V must be 2-D (d, K) with K >= 1, got shape ", V.sizes()).c_str());
  TORCH_CHECK_TYPE(V.scalar_type() == x.scalar_type(),
                   message("mlp_hvp_flat: V has dtype ", V.scalar_type(), " but x has ", x.scalar_type()).c_str());
  TORCH_CHECK_VALUE(V.device() == x.device(),
                    message("mlp_hvp_flat: V is on ", V.device(), " but x on ", x.device()).c_str());
  return check_blocks("mlp_hvp_flat", weights, biases, weight_offsets, bias_offsets, V.size(0)).first;
}

// The block of V (d, K) that starts at row `offset` as K tangents of `shape` (a copy where V's
// layout needs one); undefined for a block that is not chosen.
at::Tensor tangent_block(const at::Tensor& V, int64_t offset, at::IntArrayRef shape) {
  if (offset < 0) return at::Tensor();
  std::vector<int64_t> sizes{V.size(1)};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return V.t().narrow(1, offset, c10::multiply_integers(shape)).reshape(sizes);
}

// The chosen products (out_w[l]: (K, out, in), out_b[l]: (K, out); undefined where not chosen)
// in V's row layout, as (K, d) storage returned transposed: each block is one contiguous copy.
at::Tensor gather_flat(const std::vector<at::Tensor>& out_w, const std::vector<at::Tensor>& out_b, const at::Tensor& V,
                       at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets) {
  const int64_t K = V.size(1);
  at::Tensor result = at::empty({K, V.size(0)}, V.options());  // the blocks tile every row
  for (const auto l : c10::irange(out_w.size())) {
    if (weight_offsets[l] >= 0) result.narrow(1, weight_offsets[l], out_w[l][0].numel()).copy_(out_w[l].view({K, -1}));
    if (bias_offsets[l] >= 0) result.narrow(1, bias_offsets[l], out_b[l].size(1)).copy_(out_b[l]);
  }
  return result.t();
}

}  // namespace

at::Tensor run_flat(const Kernels& kernels, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                    const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                    double label_smoothing, int64_t ignore_index, bool check_finite) {
  check_flat_layout(x, weights, biases, V, weight_offsets, bias_offsets);
  const size_t L = weights.size();
  std::vector<at::Tensor> v_weights(L);
  c10::List<std::optional<at::Tensor>> v_biases;
  for (size_t l = 0; l < L; ++l) {  // parameters not chosen get a zero tangent
    const at::Tensor v = tangent_block(V, weight_offsets[l], weights[l].sizes());
    v_weights[l] = v.defined() ? v : at::zeros({V.size(1), weights[l].size(0), weights[l].size(1)}, V.options());
    const at::Tensor vb = tangent_block(V, bias_offsets[l], {weights[l].size(0)});
    v_biases.push_back(vb.defined() ? std::optional<at::Tensor>(vb) : std::nullopt);
  }
  const std::vector<at::Tensor> products = run(kernels, x, target, weights, biases, activations, v_weights, v_biases,
                                               label_smoothing, ignore_index, check_finite);
  // run returns every weight's product, then those of the present biases.
  std::vector<at::Tensor> out_w(products.begin(), products.begin() + L), out_b(L);
  size_t bias_index = L;
  for (size_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor> b = biases[l];
    if (b.has_value()) out_b[l] = products[bias_index++];
  }
  return gather_flat(out_w, out_b, V, weight_offsets, bias_offsets);
}

// --------------------------------------------------------------------------- value and gradient
namespace {

const at::Tensor kNone;

// A block's backward: per layer from the top d_l = act'(a_l) g_l (g in place), dW_l = d_l^T h_{l-1}, db_l =
// sum_rows d_l and g_{l-1} = d_l W_l, down to the lowest chosen layer, each block's part written (the first
// block) or added into its place in the flat gradient. g_{l-1} goes into h[l]'s buffer (the pass's own, as l > 0;
// its last reader was dW_l).
void add_block_gradient(const Kernels& kernels, at::Tensor g, std::vector<at::Tensor>& h, std::vector<at::Tensor>& d1,
                        at::TensorList weights, at::IntArrayRef activations, at::IntArrayRef weight_offsets,
                        at::IntArrayRef bias_offsets, int64_t lowest, bool first, at::Tensor& grad) {
  const int64_t L = static_cast<int64_t>(weights.size()), n = g.size(0);
  for (int64_t l = L - 1; l >= lowest; --l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    if (has_first(static_cast<Activation>(activations[l]))) {
      at::Tensor no_r = at::empty({n, 0, out}, g.options());
      kernels.backward(d1[l], kNone, kNone, g, no_r);  // g <- act'(a_l) g
    }
    if (weight_offsets[l] >= 0) {
      at::Tensor part = grad.narrow(0, weight_offsets[l], out * in).view({out, in});
      gemm_into(part, g.t(), h[l], first ? 0.0 : 1.0);  // beta 0: part is not read
    }
    if (bias_offsets[l] >= 0) {
      at::Tensor part = grad.narrow(0, bias_offsets[l], out);
      if (first) {
        at::sum_out(part, g, {0});
      } else {
        part.add_(g.sum(0));
      }
    }
    if (l > lowest) {
      gemm_into(h[l], g, weights[l]);
      g = h[l];
    }
    h[l] = d1[l] = at::Tensor();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> run_value_grad_flat(
    const Kernels& kernels, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations, at::IntArrayRef weight_offsets,
    at::IntArrayRef bias_offsets, double label_smoothing, int64_t ignore_index, bool with_gradient,
    bool check_finite) {
  constexpr const char* op = "mlp_value_grad_flat";
  check_model(op, x, target, weights, biases, activations, label_smoothing);
  const auto [lowest, d] = check_blocks(op, weights, biases, weight_offsets, bias_offsets, -1);
  const int64_t L = static_cast<int64_t>(weights.size()), N = x.size(0), C = weights[L - 1].size(0);
  const int64_t num_kept = kept_rows(op, kernels, target, C, ignore_index);
  at::Tensor flags = at::zeros({2}, x.options().dtype(at::kInt)), rows = at::empty({N}, x.options().dtype(at::kDouble));
  at::Tensor grad = at::empty({with_gradient ? d : 0}, x.options());
  const int64_t block = block_rows(kernels, weights, N, 1);
  for (int64_t first = 0; first < N; first += block) {
    const int64_t n = std::min(block, N - first);
    // act' is kept for the backward, and the inputs of the layers it reaches
    std::vector<at::Tensor> h, d1, d2;
    forward(kernels, x.narrow(0, first, n), weights, biases, activations,
            with_gradient ? static_cast<int64_t>(lowest) : L, h, d1, d2);
    d2.clear();  // act'' g enters the Hessian, not the gradient
    // The loss rows turn the logits into g = dL/dz and give each row's loss in double (from the row's max and
    // its sum of exp(z - max), as F.cross_entropy with label smoothing eps: lse(z) - (1 - eps) z_t - (eps / C)
    // sum_c z_c); their mean over the kept rows is the value.
    at::Tensor g = h[L], no_tangents = at::empty({n, 0, C}, x.options()), block_losses = rows.narrow(0, first, n);
    kernels.loss(g, target.narrow(0, first, n), no_tangents, label_smoothing, ignore_index,
                 1.0 / static_cast<double>(num_kept), flags, block_losses);
    if (check_finite) {  // as run's: a NaN or Inf in an ignored row reaches the gradient through 0 * Inf
      TORCH_CHECK_VALUE(flags.cpu()[0].item<int>() == 0, message(op, ": ", kBadLogits).c_str());
    }
    if (with_gradient) add_block_gradient(kernels, g, h, d1, weights, activations, weight_offsets, bias_offsets,
                                          static_cast<int64_t>(lowest), first == 0, grad);
  }
  const at::Tensor value = rows.sum().div_(static_cast<double>(num_kept));
  if (check_finite) {
    TORCH_CHECK_VALUE(std::isfinite(value.item<double>()),
                      message(op, ": the loss is not finite (NaN or Inf in the logits: check x, the weights and the "
                                  "biases)")
                          .c_str());
    TORCH_CHECK_VALUE(!with_gradient || at::isfinite(grad).all().item<bool>(),
                      message(op, ": the gradient is not finite (check x and the weights: an Inf under a saturating "
                                  "activation leaves the logits finite)")
                          .c_str());
  }
  return {value, grad};
}

// --------------------------------------------------------------------------- fixed weights
namespace {

// An absent state entry (no act' for the identity, no act'' term for the identity and ReLU).
at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

std::vector<at::Tensor> run_state(const Kernels& kernels, const at::Tensor& x, const at::Tensor& target,
                                  at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                                  at::IntArrayRef activations, double label_smoothing, int64_t ignore_index,
                                  bool check_finite) {
  check_model("mlp_hvp", x, target, weights, biases, activations, label_smoothing);
  const int64_t L = static_cast<int64_t>(weights.size()), N = x.size(0);
  const auto act = [&](int64_t l) { return static_cast<Activation>(activations[l]); };
  std::vector<at::Tensor> h, d1, d2;
  forward(kernels, x, weights, biases, activations, 0, h, d1, d2);
  // softmax(z) (zero on ignored rows) for the loss's R-rows, then the logits become the gradient.
  at::Tensor g = h[L];
  const int64_t C = g.size(1);
  const int64_t num_kept = kept_rows("mlp_hvp", kernels, target, C, ignore_index);
  // in double, cast back: float32's vectorised sum drops a confident row's small classes from the normaliser
  at::Tensor p = at::softmax(g, 1, at::kDouble).to(g.scalar_type());
  if (num_kept < N) p.mul_((target != ignore_index).unsqueeze(1).to(p.scalar_type()));
  at::Tensor flags = at::zeros({2}, g.options().dtype(at::kInt)), no_tangents = at::empty({N, 0, C}, g.options());
  at::Tensor no_values;
  kernels.loss(g, target, no_tangents, label_smoothing, ignore_index, 1.0 / static_cast<double>(num_kept), flags,
               no_values);
  if (check_finite) {
    TORCH_CHECK_VALUE(flags.cpu()[0].item<int>() == 0, message("mlp_hvp: ", kBadLogits).c_str());
  }
  // The gradient's backward: d_l = act'(a_l) g_l and act''(a_l) g_l per layer.
  std::vector<at::Tensor> d(L), s(L);
  for (int64_t l = L - 1; l >= 0; --l) {
    if (has_second(act(l))) s[l] = d2[l] * g;
    d[l] = has_first(act(l)) ? d1[l] * g : g;
    if (l > 0) g = gemm(d[l], weights[l]);
  }
  std::vector<at::Tensor> state(h.begin() + 1, h.end() - 1);  // h_1 .. h_{L-1}
  state.insert(state.end(), d.begin(), d.end());
  for (const at::Tensor& t : d1) state.push_back(t.defined() ? t : absent(x));
  for (const at::Tensor& t : s) state.push_back(t.defined() ? t : absent(x));
  state.push_back(p);
  state.push_back(p * (1.0 / static_cast<double>(num_kept)));
  return state;
}

bool cached_loss_rows_aten(const at::Tensor& p, const at::Tensor& sp, at::Tensor& rg, bool check_finite) {
  const int64_t n = rg.size(0), K = rg.size(1);
  rg.sub_(rg.gather(2, p.argmax(1).view({n, 1, 1}).expand({n, K, 1})));
  // summed in double, as the uncached kernel's rows: in float the lanes that hold a confident row's top class
  // would drop the small classes' terms
  const at::Tensor dot = at::sum(rg * p.unsqueeze(1), {2}, /*keepdim=*/true, at::kDouble).to(rg.scalar_type());
  const bool finite = !check_finite || at::isfinite(dot).all().item<bool>();
  rg.sub_(dot).mul_(sp.unsqueeze(1));
  return finite;
}

namespace {

// Memory for a call's per-block buffers, kept by the CPU thread between calls. glibc serves a buffer above its
// mmap threshold (128 KiB at first) with fresh pages and gives them back to the system when it is freed, so each
// product paid page faults on zeroed pages for buffers of the same sizes (115-310 a product on the digits MLP,
// up to a quarter of its time, as the threshold moved); the blocks' buffers have the same sizes block after
// block and call after call. A call takes views of the thread's buffer (uninitialised), or fresh tensors where it
// is too small, and grows it when it ends to what one block needed, up to kMaxKeptBytes. Elsewhere take() is
// at::empty: a device's caching allocator keeps its memory already.
class BlockScratch {
 public:
  explicit BlockScratch(const at::TensorOptions& options) : options_(options), on_cpu_(options.device().is_cpu()) {}
  BlockScratch(const BlockScratch&) = delete;
  BlockScratch& operator=(const BlockScratch&) = delete;
  ~BlockScratch() {
    if (on_cpu_) kept().reserve(std::max(needed_, used_));
  }

  // A new block begins: the views taken so far are not read again.
  void next_block() {
    needed_ = std::max(needed_, used_);
    used_ = 0;
  }

  // An uninitialised contiguous tensor of `shape`, valid until the call ends (a view of the kept buffer).
  at::Tensor take(at::IntArrayRef shape) {
    if (!on_cpu_) return at::empty(shape, options_);
    const size_t bytes = c10::multiply_integers(shape) * c10::elementSize(c10::typeMetaToScalarType(options_.dtype()));
    const size_t offset = used_;
    used_ += (bytes + kAlign - 1) / kAlign * kAlign;
    const Kept& k = kept();
    if (used_ > k.bytes) return at::empty(shape, options_);
    return at::from_blob(static_cast<char*>(k.data) + offset, shape, options_);
  }

 private:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kMaxKeptBytes = size_t{64} << 20;
  struct Kept {
    void* data = nullptr;
    size_t bytes = 0;
    ~Kept() { std::free(data); }
    void reserve(size_t wanted) {
      if (wanted <= bytes || wanted > kMaxKeptBytes) return;
      std::free(data);
      data = std::aligned_alloc(kAlign, wanted);  // a multiple of kAlign
      bytes = data ? wanted : 0;
    }
  };
  static Kept& kept() {
    thread_local Kept buffer;
    return buffer;
  }

  at::TensorOptions options_;
  bool on_cpu_;
  size_t used_ = 0, needed_ = 0;
};

// Layers narrower than this (the logits of a classifier) compute their R-forward transposed on the
// CPU: MKL's row-major GEMM with an (N, out) result of under 16 columns ran 1.1-1.8x slower than the
// (out, N) product plus a copy back (N = 1,797 and 2,048; docs/benchmarks.md).
constexpr int64_t kNarrowLayer = 16;

// Ra_l without its bias tangent, (N, K out), for a narrow layer: h V^T and Rh W^T as (out, N)
// products. `v` (K, out, in) or undefined (weight not chosen), `rh` (N, K, in) or undefined (l == lo).
at::Tensor narrow_r_forward(BlockScratch& scratch, const at::Tensor& input, const at::Tensor& rh,
                            const at::Tensor& weight, const at::Tensor& v, int64_t K) {
  const int64_t N = input.size(0), out = weight.size(0), in = weight.size(1);
  at::Tensor rt;  // (K, out, N)
  if (v.defined()) rt = gemm(v.reshape({K * out, in}), input.t()).view({K, out, N});
  if (rh.defined()) {
    at::Tensor w_rh = gemm(weight, rh.view({N * K, in}).t()).view({out, N, K}).permute({2, 0, 1});
    rt = rt.defined() ? rt.add_(w_rh) : w_rh;
  }
  at::Tensor r = scratch.take({N, K * out});
  if (!rt.defined()) return r.zero_();
  return r.view({N, K, out}).copy_(rt.permute({2, 0, 1})).view({N, K * out});
}

// The cached state's tensors by role, narrowed to the rows [row, row + n) of a block.
struct BlockState {
  const at::Tensor& x;
  at::TensorList state;
  int64_t L, row, n;
  at::Tensor rows(const at::Tensor& t) const { return t.narrow(0, row, n); }
  at::Tensor input(int64_t l) const { return rows(l == 0 ? x : state[l - 1]); }
  at::Tensor grad(int64_t l) const { return rows(state[L - 1 + l]); }
  at::Tensor first(int64_t l) const { return rows(state[2 * L - 1 + l]); }
  at::Tensor second(int64_t l) const { return rows(state[3 * L - 1 + l]); }
  at::Tensor softmax() const { return rows(state[4 * L - 1]); }
  at::Tensor scaled_softmax() const { return rows(state[4 * L]); }
};

// One block's products, from the lowest chosen layer `lo` up, written (the first block) or added into
// out_w[l] ((K out, in): Rd^T h), out_wt[l] ((out, K in): d^T Rh) and out_b[l] ((K, out)) for the chosen blocks.
void add_block_products(const Kernels& kernels, BlockScratch& scratch, const BlockState& s, at::TensorList weights,
                        at::IntArrayRef activations,
                        const std::vector<at::Tensor>& v_weights, const std::vector<at::Tensor>& v_biases,
                        at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets, int64_t K, int64_t lo,
                        bool check_finite, bool first_block, std::vector<at::Tensor>& out_w,
                        std::vector<at::Tensor>& out_wt, std::vector<at::Tensor>& out_b) {
  const int64_t L = s.L, n = s.n;
  const auto act = [&](int64_t l) { return static_cast<Activation>(activations[l]); };
  // Rh is zero up to the lowest chosen layer (the tangents below it are zero), so both passes start (and
  // stop) there; weights that are not chosen skip their h V^T and d V terms.
  std::vector<at::Tensor> rh(L + 1), ra(L);
  for (int64_t l = lo; l < L; ++l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    const at::Tensor input = s.input(l);
    at::Tensor r;  // Ra_l without its bias tangent, (n, K out)
    if (out < kNarrowLayer && input.is_cpu()) {
      r = narrow_r_forward(scratch, input, l > lo ? rh[l] : at::Tensor(), weights[l], v_weights[l], K);
    } else if (v_weights[l].defined()) {
      r = scratch.take({n, K * out});
      gemm_into(r, input, v_weights[l].reshape({K * out, in}).t());
      if (l > lo) gemm_into(r.view({n * K, out}), rh[l].view({n * K, in}), weights[l].t(), 1.0);
    } else if (l > lo) {
      r = scratch.take({n, K * out});
      gemm_into(r.view({n * K, out}), rh[l].view({n * K, in}), weights[l].t());
    } else {
      r = scratch.take({n, K * out}).zero_();
    }
    at::Tensor r3 = r.view({n, K, out});
    if (v_biases[l].defined()) r3.add_(v_biases[l]);
    if (!has_first(act(l))) {
      rh[l + 1] = r3;
    } else if (has_second(act(l))) {
      ra[l] = r3;
      rh[l + 1] = scratch.take({n, K, out});
      at::mul_out(rh[l + 1], r3, s.first(l).unsqueeze(1));
    } else {
      rh[l + 1] = r3.mul_(s.first(l).unsqueeze(1));
    }
  }
  // The loss's R-rows: Rg = (diag(p) - p p^T) Rz / N per tangent (p is zero on ignored rows).
  at::Tensor rg = rh[L];
  rh[L] = at::Tensor();
  TORCH_CHECK_VALUE(kernels.cached_loss_rows(s.softmax(), s.scaled_softmax(), rg, check_finite),
                    "mlp_hvp: the R-derivative of the logits contains NaN or Inf (check V, then x and the weights: an "
                    "Inf weight under a saturating activation leaves the logits finite)");
  // The R-backward, layer by layer from the top down to the lowest chosen layer.
  const double beta = first_block ? 0.0 : 1.0;  // beta 0: the first block's products are written, not read
  for (int64_t l = L - 1; l >= lo; --l) {
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    if (has_first(act(l))) rg.mul_(s.first(l).unsqueeze(1));
    if (has_second(act(l))) rg.addcmul_(s.second(l).unsqueeze(1), ra[l]);
    ra[l] = at::Tensor();
    const at::Tensor input = s.input(l);
    if (weight_offsets[l] >= 0) {
      if (first_block) out_w[l] = at::empty({K * out, in}, input.options());
      gemm_into(out_w[l], rg.view({n, K * out}).t(), input, beta);
      if (l > lo) {
        if (first_block) out_wt[l] = at::empty({out, K * in}, input.options());
        gemm_into(out_wt[l], s.grad(l).t(), rh[l].view({n, K * in}), beta);
      }
    }
    if (bias_offsets[l] >= 0) {
      if (first_block) {
        out_b[l] = rg.sum(0);
      } else {
        out_b[l].add_(rg.sum(0));
      }
    }
    if (l > lo) {
      at::Tensor rg_next = scratch.take({n * K, in});
      gemm_into(rg_next, rg.view({n * K, out}), weights[l]);
      rg_next = rg_next.view({n, K * in});
      if (v_weights[l].defined()) {
        gemm_into(rg_next, s.grad(l), v_weights[l].transpose(0, 1).reshape({out, K * in}), 1.0);
      }
      rg = rg_next.view({n, K, in});
    }
    rh[l] = at::Tensor();
  }
}

// The products of run_cached_flat for the (d, K) tangents V (validated), from the lowest chosen
// layer `lo` up, in gather_flat's layout; the rows go through in blocks (block_rows).
at::Tensor cached_products(const Kernels& kernels, const at::Tensor& x, at::TensorList state, at::TensorList weights,
                           at::IntArrayRef activations, const at::Tensor& V, at::IntArrayRef weight_offsets,
                           at::IntArrayRef bias_offsets, int64_t lo, bool check_finite) {
  const int64_t L = static_cast<int64_t>(weights.size()), N = x.size(0), K = V.size(1);
  std::vector<at::Tensor> v_weights(L), v_biases(L);
  for (int64_t l = lo; l < L; ++l) {
    v_weights[l] = tangent_block(V, weight_offsets[l], weights[l].sizes());
    v_biases[l] = tangent_block(V, bias_offsets[l], {weights[l].size(0)});
  }
  const int64_t block = block_rows(kernels, weights, N, K);
  std::vector<at::Tensor> out_w(L), out_wt(L), out_b(L);
  BlockScratch scratch(x.options());
  for (int64_t row = 0; row < N; row += block) {
    scratch.next_block();
    const BlockState s{x, state, L, row, std::min(block, N - row)};
    add_block_products(kernels, scratch, s, weights, activations, v_weights, v_biases, weight_offsets, bias_offsets,
                       K, lo, check_finite, row == 0, out_w, out_wt, out_b);
  }
  for (int64_t l = lo; l < L; ++l) {
    if (weight_offsets[l] < 0) continue;
    const int64_t out = weights[l].size(0), in = weights[l].size(1);
    out_w[l] = out_w[l].view({K, out, in});
    if (out_wt[l].defined()) out_w[l].add_(out_wt[l].view({out, K, in}).transpose(0, 1));
  }
  return gather_flat(out_w, out_b, V, weight_offsets, bias_offsets);
}

// Nothing is shared between tangents in the cached pass, so they go through in chunks whose
// (N, chunk, width) buffers hold at most this many elements: a K-wide layout only costs cache
// locality there (docs/benchmarks.md has the measurement).
constexpr int64_t kChunkElements = int64_t{1} << 18;

}  // namespace

at::Tensor run_cached_flat(const Kernels& kernels, const at::Tensor& x, at::TensorList state, at::TensorList weights,
                           const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                           const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                           bool check_finite) {
  constexpr const char* op = "mlp_hvp_flat_cached";
  check_layers(op, x, weights, biases, activations);
  const int64_t lo = static_cast<int64_t>(check_flat_layout(x, weights, biases, V, weight_offsets, bias_offsets));
  const int64_t L = static_cast<int64_t>(weights.size()), N = x.size(0), K = V.size(1);
  const auto act = [&](int64_t l) { return static_cast<Activation>(activations[l]); };
  TORCH_CHECK_VALUE(static_cast<int64_t>(state.size()) == 4 * L + 1,
                    message(op, ": state must be the ", 4 * L + 1, " tensors mlp_hvp_state returns for ", L,
                            " layers, got ", state.size())
                        .c_str());
  const auto check_state = [&](int64_t i, bool present, int64_t width) {
    const at::Tensor& t = state[i];
    check_like(op, x, t, "state", static_cast<size_t>(i));
    if (present) {
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == width,
                        message(op, ": state[", i, "] has shape ", t.sizes(), " but (", N, ", ", width,
                                ") was expected: pass the state that mlp_hvp_state "
                                "returned for these x, weights and activations")
                            .c_str());
    } else {
      TORCH_CHECK_VALUE(
          t.numel() == 0,
          message(op, ": state[", i, "] has shape ", t.sizes(),
                  " but is empty for this "
                  "layer's activation: pass the state that mlp_hvp_state returned for these x, weights and "
                  "activations")
              .c_str());
    }
  };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t out = weights[l].size(0);
    if (l > 0) check_state(l - 1, true, weights[l].size(1));
    check_state(L - 1 + l, true, out);
    check_state(2 * L - 1 + l, has_first(act(l)), out);
    check_state(3 * L - 1 + l, has_second(act(l)), out);
  }
  check_state(4 * L - 1, true, weights[L - 1].size(0));
  check_state(4 * L, true, weights[L - 1].size(0));

  int64_t width = 0;
  for (const at::Tensor& w : weights) width = std::max(width, w.size(0));
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / (N * width));
  if (chunk >= K) {
    return cached_products(kernels, x, state, weights, activations, V, weight_offsets, bias_offsets, lo, check_finite);
  }
  at::Tensor result = at::empty({K, V.size(0)}, V.options());
  for (int64_t k = 0; k < K; k += chunk) {
    const int64_t kc = std::min(chunk, K - k);
    const at::Tensor Vk = V.narrow(1, k, kc).contiguous();  // contiguous tangent blocks for the matmuls
    result.narrow(0, k, kc).copy_(
        cached_products(kernels, x, state, weights, activations, Vk, weight_offsets, bias_offsets, lo, check_finite)
            .t());
  }
  return result.t();
}

}  // namespace unlearn_kernels::mlp_hvp
