// CUDA kernel of weights_fingerprint (see unlearn_kernels/ops/weights_fingerprint.py and the CPU kernel,
// csrc/cpu/weights_fingerprint.cpp): per tensor its float64 sum and position checksum
// sum_i t_i r(i mod L) (1 + i div L), r(j) = 1 + frac(j * golden ratio), L = 65521.
// The curvature operators fingerprint every parameter and buffer before each product. On a GPU the pure-PyTorch
// reference costs about 37 ATen ops per tensor (221 for a three-layer MLP's six tensors), each a kernel launch,
// beside products of about a millisecond. Here: one block per (tensor, ramp chunk of L values) writes that
// chunk's two partial sums, one launch per dtype present; then one thread per tensor adds its chunks' partials
// in order. Every sum runs in a fixed order, so the same values give the same fingerprint at every call.
#include <ATen/Dispatch_v2.h>
#include <ATen/Functions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <map>
#include <vector>

#include "../message.h"

namespace unlearn_kernels {
namespace {

constexpr int64_t kRampLength = 65521;  // as the CPU kernel: a prime, so rows of a weight fall on other positions
constexpr int kThreads = 256;
constexpr int kTableColumns = 5;  // per block: data pointer, first index, length, chunk number, partial slot
constexpr int kFinalThreads = 128;

// One block per chunk: partials[slot] = (sum of the chunk's values, (chunk + 1) * sum of value * r(position)).
template <typename T>
__global__ void chunk_kernel(const int64_t* __restrict__ table, double golden, double* __restrict__ partials) {
  const int64_t* row = table + kTableColumns * static_cast<int64_t>(blockIdx.x);
  const T* values = reinterpret_cast<const T*>(row[0]) + row[1];
  const int64_t length = row[2];
  double sum = 0.0, checksum = 0.0;
  for (int64_t j = threadIdx.x; j < length; j += kThreads) {
    const double v = static_cast<double>(values[j]);
    // r(j) as the CPU kernel computes it: the product rounded on its own, not fused into the subtraction
    const double x = __dmul_rn(static_cast<double>(j), golden);
    sum += v;
    checksum += v * ((x - trunc(x)) + 1.0);
  }
  using Reduce = cub::BlockReduce<double, kThreads>;  // a fixed tree for a fixed block size: deterministic
  __shared__ typename Reduce::TempStorage scratch;
  sum = Reduce(scratch).Sum(sum);
  __syncthreads();  // the scratch is reused
  checksum = Reduce(scratch).Sum(checksum);
  if (threadIdx.x == 0) {
    partials[2 * row[4]] = sum;
    partials[2 * row[4] + 1] = checksum * static_cast<double>(row[3] + 1);
  }
}

// out[i] = the partials of tensor i's chunks, slots first[i] .. first[i + 1] - 1, added in order.
__global__ void final_kernel(const int64_t* __restrict__ first, int64_t n, const double* __restrict__ partials,
                             double* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kFinalThreads) + threadIdx.x;
  if (i >= n) return;
  double sum = 0.0, checksum = 0.0;
  for (int64_t slot = first[i]; slot < first[i + 1]; ++slot) {
    sum += partials[2 * slot];
    checksum += partials[2 * slot + 1];
  }
  out[2 * i] = sum;
  out[2 * i + 1] = checksum;
}

at::Tensor weights_fingerprint_cuda(at::TensorList tensors) {
  const auto n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(n > 0, "weights_fingerprint: the CUDA kernel needs at least one tensor");
  const c10::Device device = tensors[0].device();  // the dispatcher sent a CUDA tensor here
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device && t.layout() == at::kStrided,
                message("weights_fingerprint: the CUDA kernel needs strided tensors on one CUDA device, got ",
                        t.device(), " ", t.layout(), " for tensor ", i, " (tensor 0 is on ", device, ")")
                    .c_str());
  }
  const c10::cuda::CUDAGuard guard(device);
  // row-major order, as the reference's reshape(-1); the copies are freed at the return, before the kernels may
  // have run: safe, as the caching allocator hands their memory out again only in this stream's order
  std::vector<at::Tensor> flats;
  flats.reserve(n);
  std::map<at::ScalarType, std::vector<int64_t>> tables;  // the blocks of each dtype, kTableColumns per block
  std::vector<int64_t> first(n + 1, 0);
  int64_t slots = 0;
  for (int64_t i = 0; i < n; ++i) {
    flats.push_back(tensors[i].contiguous());
    const at::Tensor& flat = flats.back();
    first[i] = slots;
    std::vector<int64_t>& table = tables[flat.scalar_type()];
    const auto data = reinterpret_cast<int64_t>(flat.const_data_ptr());
    for (int64_t begin = 0, chunk = 0; begin < flat.numel(); begin += kRampLength, ++chunk) {
      table.insert(table.end(), {data, begin, std::min(kRampLength, flat.numel() - begin), chunk, slots++});
    }
  }
  first[n] = slots;
  // One upload: first, then every dtype's table.
  std::vector<int64_t> host(first);
  std::vector<std::pair<at::ScalarType, int64_t>> launches;  // dtype, offset of its table in `host`
  for (const auto& [dtype, table] : tables) {
    if (table.empty()) continue;
    launches.emplace_back(dtype, static_cast<int64_t>(host.size()));
    host.insert(host.end(), table.begin(), table.end());
  }
  // from pinned memory, asynchronously: no synchronisation before the launches (the caching host allocator keeps
  // the staging block until the copy has run); the caller's read-back of the result is the call's only one
  at::Tensor staged = at::empty({static_cast<int64_t>(host.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(host.begin(), host.end(), staged.mutable_data_ptr<int64_t>());
  const at::Tensor uploaded = staged.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  const at::Tensor partials = at::empty({std::max<int64_t>(slots, 1), 2}, f64);
  at::Tensor out = at::empty({n, 2}, f64);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double golden = (std::sqrt(5.0) - 1.0) / 2.0;  // the CPU kernel's and the reference's value
  const int64_t* table_base = uploaded.const_data_ptr<int64_t>();
  for (const auto& [dtype, offset] : launches) {
    const auto blocks = static_cast<unsigned>((static_cast<int64_t>(tables[dtype].size())) / kTableColumns);
    // every real dtype a parameter or buffer may have, as the CPU kernel
    AT_DISPATCH_V2(dtype, "weights_fingerprint_cuda", AT_WRAP([&] {
      chunk_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(table_base + offset, golden,
                                                              partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }), AT_EXPAND(AT_ALL_TYPES), AT_EXPAND(AT_BAREBONES_UNSIGNED_TYPES), AT_EXPAND(AT_FLOAT8_TYPES), at::kHalf,
                   at::kBFloat16, at::kBool);
  }
  const auto grid = static_cast<unsigned>((n + kFinalThreads - 1) / kFinalThreads);
  final_kernel<<<grid, kFinalThreads, 0, stream>>>(table_base, n, partials.const_data_ptr<double>(),
                                                   out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) { m.impl("weights_fingerprint", &weights_fingerprint_cuda); }

}  // namespace unlearn_kernels
