// The GEMMs of the compiled passes: out = beta * out + alpha * a b for 2-D tensors on any device. On a non-Intel
// x86 CPU with AVX-512 (AMD's), a float32 GEMM of at least kOneDnnMinWork multiply-adds runs through torch's own
// oneDNN matmul (at::native::mkldnn_matmul, inside libtorch), elsewhere through ATen's GEMM (MKL or OpenBLAS on
// CPU, cuBLAS on GPU). Why: torch's MKL takes its AVX2 path on AMD CPUs, where oneDNN runs AVX-512 at full width
// (2.0-2.3x MKL's speed on the AMD EPYC of docs/benchmarks.md, float32, one thread); on Intel CPUs MKL runs
// AVX-512 too, and on the Intel Xeon of docs/benchmarks.md oneDNN was slower on 12 of the 14 shapes of our passes
// (0.62-0.96x MKL's speed; 1.00x and 1.04x on the other two) and on the MLP products as a whole (1.10-1.60x their
// time), so there the route stays ATen's.
// torch.backends.mkldnn.enabled = False (the Python unlearn_kernels.aten_gemm()) turns the route off (ATen's GEMM
// for every call), as it does torch's own oneDNN paths; set_onednn_gemm_forced(true) (the Python
// unlearn_kernels.onednn_gemm()) takes it on an Intel CPU with AVX-512 too, to test or time it.
#pragma once

#include <ATen/core/Tensor.h>

namespace unlearn_kernels {

// oneDNN's per-call set-up is ~10 us: below about this many multiply-adds (M K N) ATen's GEMM is as fast or
// faster (measured on the AMD EPYC, one thread: 64 x 64 x 128 11 vs 14 us, 96 x 64 x 128 15.6 vs 16.6 us,
// 10 x 128 x 773 28 vs 20 us, 256 x 64 x 128 39 vs 26 us; 1-4 rows: 1-2 vs 11 us).
constexpr int64_t kOneDnnMinWork = int64_t{3} << 18;

// out = beta * out + alpha * a b (out (M, N), a (M, K), b (K, N), one dtype and device; beta 0: out is not read), or
// the same for a batch of products (out (B, M, N), a (B, M, K), b (B, K, N); the route counts B M K N).
void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta = 0.0,
               double alpha = 1.0);

// a b (2-D, or a batch of 3-D) as a new tensor.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);

// bias (N,) added to every row of a b (M, N), as a new tensor (at::addmm(bias, a, b) on ATen's route; on oneDNN's,
// the bias rows copied into a buffer of the result's own that the GEMM adds to).
at::Tensor gemm_bias(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b);

// Whether gemm_into takes the oneDNN route for float32 CPU GEMMs of enough work here and now (this torch
// exports the function and has oneDNN, the CPU has AVX-512 BW/VL/DQ, oneDNN is not turned off, and the CPU is not
// Intel's or the route is forced).
bool onednn_gemm_available();

// Take the oneDNN route where the CPU can run it even if it is Intel's (true), or as the CPU's vendor decides
// (false: the default). Process-wide; the Python onednn_gemm() counts nested and concurrent uses.
void set_onednn_gemm_forced(bool forced);

}  // namespace unlearn_kernels
