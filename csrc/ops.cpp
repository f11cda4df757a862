// Schemas of every unlearn_kernels op, in one place. Backends register their implementations
// per dispatch key in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the Python side lives in
// unlearn_kernels/ops/<op>.py (reference, fake/meta implementation, autograd, backend choice).
#include <Python.h>
#include <torch/library.h>

#include "gemm.h"

#include <string>

extern "C" {
// The CPU features the kernels were compiled for (setup.py's AVX2 flags), as text in the library that
// unlearn_kernels/_extension.py reads before loading it: on a CPU without them the load itself dies of an
// illegal instruction, which no Python `except` can catch.
#ifdef CPU_CAPABILITY_AVX2
__attribute__((used)) const char unlearn_kernels_cpu_features[] = "unlearn_kernels_cpu_features=avx2,fma,f16c;";
#else
__attribute__((used)) const char unlearn_kernels_cpu_features[] = "unlearn_kernels_cpu_features=;";
#endif

// An importable (empty) module: `from unlearn_kernels import _C` loads this library, which
// runs the static registrations below and in the per-backend files.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(unlearn_kernels, m) {
  // Per-sample gradient of softmax cross entropy w.r.t. the logits: softmax(z) - t, where t is
  // the (label-smoothed) one-hot target; rows whose target equals ignore_index are zero.
  m.def(
      "softmax_ce_grad(Tensor logits, Tensor target, float label_smoothing, int ignore_index, "
      "bool check_finite) -> Tensor");
  // Per-sample Hessian-vector product of softmax cross entropy w.r.t. the logits:
  // (diag(p) - p p^T) u = p * u - p * <p, u>, with p = softmax(z) row-wise.
  m.def("softmax_ce_hvp(Tensor logits, Tensor tangent, bool check_finite) -> Tensor");
  // Exact Hessian-vector products of the mean softmax cross entropy (as F.cross_entropy: rows whose
  // target is ignore_index are left out of the mean) of an MLP, h -> act_l(h W_l^T + b_l) per layer
  // (activations: 0 identity, 1 relu, 2 gelu (erf), 3 tanh, 4 sigmoid), w.r.t. all weights and biases,
  // for K tangents (v_weights[l]: (K, out, in); v_biases[l]: (K, out), or None for zero). Returns the
  // (K, out, in) products of every weight, then the (K, out) products of every present bias.
  m.def(
      "mlp_hvp(Tensor x, Tensor target, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "Tensor[] v_weights, Tensor?[] v_biases, float label_smoothing, int ignore_index, "
      "bool check_finite) -> Tensor[]");
  // The same products on flat parameter vectors: V (d, K) holds K tangents stacked over the chosen
  // weights and biases; weight_offsets[l] / bias_offsets[l] give the first row of W_l (row-major)
  // / b_l in V, or -1 for a parameter that is not chosen (zero tangent, product not returned).
  // The chosen blocks must tile the d rows exactly. Returns H V restricted to them, (d, K).
  m.def(
      "mlp_hvp_flat(Tensor x, Tensor target, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "Tensor V, int[] weight_offsets, int[] bias_offsets, float label_smoothing, int ignore_index, "
      "bool check_finite) -> Tensor");
  // The mean softmax cross entropy of that MLP (as F.cross_entropy, computed in float64 from the logits)
  // as a float64 0-dim tensor and, with with_gradient, its gradient w.r.t. the chosen weights and biases
  // as one flat vector (the blocks of weight_offsets / bias_offsets, as in mlp_hvp_flat, tiling it from
  // row 0; an empty tensor without). check_finite: NaN or +Inf logits (as mlp_hvp's), a loss or a gradient that is
  // not finite are errors.
  m.def(
      "mlp_value_grad_flat(Tensor x, Tensor target, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "int[] weight_offsets, int[] bias_offsets, float label_smoothing, int ignore_index, bool with_gradient, "
      "bool check_finite) -> (Tensor, Tensor)");
  // What stays fixed between products of mlp_hvp at fixed weights, for mlp_hvp_flat_cached: for L
  // layers the inputs h_1 .. h_{L-1} of layers 2 .. L, then d_l = act'(a_l) g_l (g_l the gradient
  // w.r.t. the layer's output), act'(a_l) and act''(a_l) g_l per layer (empty where the activation
  // has none), then softmax(z) and softmax(z) / (rows kept), both zero on ignored rows (4 L + 1 tensors).
  m.def(
      "mlp_hvp_state(Tensor x, Tensor target, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float label_smoothing, int ignore_index, bool check_finite) -> Tensor[]");
  // mlp_hvp_flat from that state (same x, weights, biases and activations): only the R-forward, the
  // loss's R-rows and the R-backward run.
  m.def(
      "mlp_hvp_flat_cached(Tensor x, Tensor[] state, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "Tensor V, int[] weight_offsets, int[] bias_offsets, bool check_finite) -> Tensor");
  // One Lanczos step: alpha = <hq, q>, w = hq - alpha q - beta_prev q_prev, CGS2 against the rows
  // of basis (m, d), beta = ||w||, q_next = w / beta (zeros and beta = 0 on breakdown). alpha and
  // beta are float64 0-dim tensors; beta_prev is a 0-dim float64 tensor on the vectors' device.
  m.def("lanczos_step(Tensor hq, Tensor q, Tensor q_prev, Tensor beta_prev, Tensor basis) -> (Tensor, Tensor, Tensor)");
  // Global minimiser y of c^T y + 1/2 sum_i lambda_i y_i^2 + (M/6)||y||^3 (float64, CPU); returns
  // (y, sigma = M||y||/2 as a 0-dim float64 tensor, hard_case as a 0-dim bool tensor).
  m.def("cubic_secular_solve(Tensor eigvals, Tensor coeffs, float M, float tol, int max_iter) -> (Tensor, Tensor, Tensor)");
  // Per tensor (strided, real or bool, CPU) its float64 sum and position checksum
  // sum_i t_i r(i mod 65521) (1 + i div 65521) over the row-major values, r(j) = 1 + frac(j * golden ratio):
  // a (n, 2) float64 tensor.
  m.def("weights_fingerprint(Tensor[] tensors) -> Tensor");
  // A frozen linear layer with a LoRA adapter, on 2-D x (N, in): y = x W^T + b + scale (x A^T) B^T
  // with W (out, in), b (out,) or None, A (rank, in), B (out, rank).
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale) -> Tensor");
  // Its backward for x, A and B (W and b are frozen); an output whose output_mask entry is false is
  // not computed (None).
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // (y, scale [(x dA^T) B^T + (x A^T) dB^T]) for tangents dA, dB on the adapter (None: zero).
  m.def(
      "lora_linear_jvp(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "Tensor? tangent_a, Tensor? tangent_b) -> (Tensor, Tensor)");
  // a b + bias (bias (N,) added to every row, or none) for 2-D a (M, K), b (K, N) of one floating dtype, or a batch
  // a (B, M, K), b (B, K, N) without bias, through csrc/gemm.h's route (oneDNN for float32 CPU GEMMs of enough
  // work on a non-Intel CPU with AVX-512).
  m.def("gemm(Tensor a, Tensor b, Tensor? bias) -> Tensor");
  // For softmax's backward over the last dim, gx = y (gy - sum(gy y)), and a cotangent ggx of gx: the derivatives
  // (d gy, d y) of <ggx, gx>, one row at a time.
  m.def("softmax_double_backward(Tensor gy, Tensor y, Tensor ggx) -> (Tensor, Tensor)");
  // For a layer norm over the last dim (gradients gx, gw, gb from gy, x, weight) and cotangents ggx, ggw, ggb of
  // them: the derivatives (d gy, d x, d w) of <ggx, gx> + <ggw, gw> + <ggb, gb>, one row at a time.
  m.def(
      "layer_norm_double_backward(Tensor gy, Tensor x, Tensor weight, Tensor ggx, Tensor ggw, Tensor ggb, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // For GELU's backward gx = gy f'(x) (approximate "none" or "tanh") and a cotangent ggx of gx: the derivatives
  // (d gy, d x) = (ggx f'(x), ggx gy f''(x)) of <ggx, gx>, in one pass.
  m.def("gelu_double_backward(Tensor gy, Tensor x, Tensor ggx, str approximate) -> (Tensor, Tensor)");
  // Which GEMM the compiled passes' float32 CPU matmuls of enough work take here and now (csrc/gemm.h):
  // "onednn" or "aten". No tensor argument: one kernel for every dispatch key.
  m.def("cpu_gemm() -> str", [] { return std::string(unlearn_kernels::onednn_gemm_available() ? "onednn" : "aten"); });
  // Take the oneDNN route on an Intel CPU with AVX-512 too (true) or as the CPU's vendor decides (false).
  m.def("set_onednn_gemm_forced(bool forced) -> ()",
        [](bool forced) { unlearn_kernels::set_onednn_gemm_forced(forced); });
}
