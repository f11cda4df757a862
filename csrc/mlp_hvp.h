// The exact Hessian-vector product of softmax cross entropy over an MLP (Linear + elementwise
// activation chain), by Pearlmutter's R-operator: forward, R-forward, backward and R-backward in
// one pass for K tangents at once. The passes themselves (ATen matmuls, so MKL/OpenBLAS on CPU and
// cuBLAS on GPU) are device-agnostic and live in csrc/mlp_hvp.cpp, compiled in every build; each
// backend supplies only its fused elementwise kernels through `Kernels` (csrc/cpu/mlp_hvp.cpp,
// csrc/cuda/mlp_hvp.cu) and registers the ops for its dispatch key.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace unlearn_kernels::mlp_hvp {

// Activation codes of the op schema (unlearn_kernels/ops/mlp_hvp.py maps names to them).
enum class Activation : int64_t { kIdentity = 0, kReLU = 1, kGELU = 2, kTanh = 3, kSigmoid = 4 };

// Whether act' is not identically 1 / act'' not identically 0 (which derivative buffers exist).
constexpr bool has_first(Activation act) { return act != Activation::kIdentity; }
constexpr bool has_second(Activation act) { return act != Activation::kIdentity && act != Activation::kReLU; }

// The device-specific fused elementwise stages; every tensor is contiguous and of one dtype.
struct Kernels {
  // One layer's forward and R-forward after its matmuls. ar (N, (K+1) d) holds, per row, the
  // pre-activation without bias followed by the K R-pre-activations without bias
  // ([h W^T | h V_1^T | .. | h V_K^T], one matmul); t (N, K, d) is the Rh W^T term (undefined on the
  // first layer, where Rh = 0); b (d) and vb (K, d) are the bias and its tangents (each may be
  // undefined). With a = ar_0 + b and r_k = ar_k + vb_k + t_k, writes h = act(a) (N, d),
  // d1 = act'(a) and d2 = act''(a) where defined (d1 undefined for the identity, d2 for the
  // identity and ReLU), rh_k = act'(a) r_k (N, K, d), and ra_k = r_k where d2 is defined. With K = 0, h may
  // be ar itself (in place: each element is read before it is written).
  void (*activate)(Activation act, const at::Tensor& ar, const at::Tensor& t, const at::Tensor& b,
                   const at::Tensor& vb, at::Tensor& h, at::Tensor& d1, at::Tensor& d2, at::Tensor& rh,
                   at::Tensor& ra);
  // Backward through the activation for the gradient g (N, d) and its R-derivative rg (N, K, d):
  // rg <- d2 * ra * g + d1 * rg, then g <- d1 * g. d2 and ra (the R-pre-activation) are undefined
  // for ReLU; g is undefined when d2 is and no layer below needs the gradient (then only rg moves).
  void (*backward)(const at::Tensor& d1, const at::Tensor& d2, const at::Tensor& ra, at::Tensor& g,
                   at::Tensor& rg);
  // The number of rows whose target is not ignore_index (the mean's denominator); raises a
  // ValueError naming the first kept target outside [0, C) (after "<op>: ").
  int64_t (*count_kept)(const char* op, const at::Tensor& target, int64_t C, int64_t ignore_index);
  // Rows of the mean softmax cross entropy, in place: z (N, C) logits -> (softmax(z) - t) * scale,
  // rz (N, K, C) -> (diag(p) - p p^T) rz * scale per tangent, with scale = 1 / (rows kept); rows whose
  // target is ignore_index become 0. Targets are in range (count_kept checked them). Sets flags[0] if a kept
  // row max of z, or an ignored row of z, is not finite, flags[1] if some kept <p, rz_k>, or an ignored
  // row of rz, is not finite (flags: int32 (2,) on
  // the device of z). Where `values` (float64 (N,) on z's device) is defined it receives each row's loss,
  // logsumexp(z) - (1 - eps) z_t - (eps / C) sum_c z_c from the row's max and its sum of exp(z - max) (0 on an
  // ignored row).
  void (*loss)(at::Tensor& z, const at::Tensor& target, at::Tensor& rz, double label_smoothing,
               int64_t ignore_index, double scale, at::Tensor& flags, at::Tensor& values);
  // The cached product's loss R-rows, in place: rg (n, K, C) -> (diag(p) - p p^T) rg per tangent, scaled, from a
  // block's kept softmax p (n, C) and scaled softmax sp (p / rows kept, 0 on ignored rows), each row taken relative
  // to its top class c ((r_j - r_c) - sum_k p_k (r_k - r_c), as sum_k p_k = 1: r_c - <p, r> cancels in float32 where
  // p_c ~ 1), the sums in double. Returns false if check_finite and some <p, r_k> is not finite.
  bool (*cached_loss_rows)(const at::Tensor& p, const at::Tensor& sp, at::Tensor& rg, bool check_finite);
  // The value-and-gradient pass and the cached product take their rows in blocks whose widest layer output has
  // about this many entries (over all tangents), so that a block's buffers stay in the cache from its forward to
  // its backward (0: all rows at once).
  int64_t block_elements;
};

// Kernels::cached_loss_rows in ATen ops, for any device (the CUDA table's; the CPU's for strided inputs).
bool cached_loss_rows_aten(const at::Tensor& p, const at::Tensor& sp, at::Tensor& rg, bool check_finite);

// What every Kernels::activate relies on (the pass allocates the buffers so).
inline void assert_activate_layout(Activation act, const at::Tensor& ar, const at::Tensor& t, const at::Tensor& h,
                                   const at::Tensor& d1, const at::Tensor& d2, const at::Tensor& rh,
                                   const at::Tensor& ra) {
  TORCH_INTERNAL_ASSERT(ar.is_contiguous() && h.is_contiguous() && rh.is_contiguous() && rh.dim() == 3);
  TORCH_INTERNAL_ASSERT(!t.defined() || t.is_contiguous());
  TORCH_INTERNAL_ASSERT(has_first(act) == d1.defined() && has_second(act) == d2.defined() && d2.defined() == ra.defined());
}

// The whole pass (see the op schema in csrc/ops.cpp): validates the inputs, then returns the
// (K, out, in) products for every weight followed by the (K, out) products for every present bias.
std::vector<at::Tensor> run(const Kernels& kernels, const at::Tensor& x, const at::Tensor& target,
                            at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                            at::IntArrayRef activations, at::TensorList v_weights,
                            const c10::List<std::optional<at::Tensor>>& v_biases, double label_smoothing,
                            int64_t ignore_index, bool check_finite);

// The flat-vector form (see mlp_hvp_flat in csrc/ops.cpp): validates V and the offsets, runs `run`
// on views of V's blocks and writes the products into one (d, K) tensor.
at::Tensor run_flat(const Kernels& kernels, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
                    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                    const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                    double label_smoothing, int64_t ignore_index, bool check_finite);

// The mean loss (a float64 0-dim tensor) and, with `with_gradient`, its gradient w.r.t. the chosen
// weights and biases as one flat vector in the blocks' layout (see mlp_value_grad_flat in csrc/ops.cpp;
// an empty tensor without): the forward through the backend's activation stage, the loss in double
// from the logits, and the backward down to the lowest chosen layer.
std::tuple<at::Tensor, at::Tensor> run_value_grad_flat(
    const Kernels& kernels, const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations, at::IntArrayRef weight_offsets,
    at::IntArrayRef bias_offsets, double label_smoothing, int64_t ignore_index, bool with_gradient, bool check_finite);

// What stays fixed between products at fixed weights (see mlp_hvp_state in csrc/ops.cpp): validates
// the inputs, runs the forward and the gradient's backward and returns, for L layers, the layer
// inputs h_1 .. h_{L-1}, then d_l = act'(a_l) g_l, act'(a_l) and act''(a_l) g_l for every layer (an
// empty tensor where the activation has no such term), then softmax(z) and softmax(z) / (rows kept),
// both zero on ignored rows: 4 L + 1 tensors.
std::vector<at::Tensor> run_state(const Kernels& kernels, const at::Tensor& x, const at::Tensor& target,
                                  at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                                  at::IntArrayRef activations, double label_smoothing, int64_t ignore_index,
                                  bool check_finite);

// run_flat from that state (see mlp_hvp_flat_cached in csrc/ops.cpp): the R-forward, the loss's
// R-rows and the R-backward only, in ATen ops on any device (the kernels give only the blocks' size).
at::Tensor run_cached_flat(const Kernels& kernels, const at::Tensor& x, at::TensorList state, at::TensorList weights,
                           const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                           const at::Tensor& V, at::IntArrayRef weight_offsets, at::IntArrayRef bias_offsets,
                           bool check_finite);

}  // namespace unlearn_kernels::mlp_hvp
