// CUDA kernels for the softmax cross-entropy gradient and Hessian-vector product on logits.
// One fused kernel per op. A group of kTpr threads owns a row (a warp for up to 1024 classes, a
// 512-thread block above, a 1024-thread block for rows of 32 KB and more): pass 1 keeps an online
// max and rescaled sums per thread (one exp per element) and merges them across the group, pass 2
// writes the output. Pass 2 needs the row again: moderate rows come back from cache, but rows of
// 32 KB and more would come back from DRAM (the rows in flight overflow L2), so there the block
// keeps as much of its row in shared memory as the device allows (all of it up to about 29,000
// float32 classes for the hvp, 58,000 for the grad, on an H100) and rereads only the rest: about 3
// units of DRAM traffic per element (read z and u, write out) instead of 5.
// Loads and stores are 16-byte vectors where every row is aligned.
// Errors (non-finite inputs, targets out of range) set a device int flag, read back with one
// synchronisation: always by the grad (targets are always checked, as on CPU), by the hvp only
// when check_finite. The messages are the C++ CPU kernel's, raised as ValueError.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../softmax_ce.h"
#include "../message.h"

namespace unlearn_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kSmallTpr = kWarp;  // threads per row for C <= kSmallMaxC
constexpr int kLargeTpr = 512;    // threads per row (one row per block) above
constexpr int kCachedTpr = 1024;  // threads per row (one row per block) for rows kept in shared memory
constexpr int kSmallMaxC = 1024;
constexpr int64_t kCachedMinRowBytes = 32 * 1024;  // logits rows from this size on are kept in shared memory
constexpr int kBlockThreads = 256;  // block size when a warp owns a row
constexpr int kLoadBatch = 4;       // vectors per array a thread loads before storing them to shared memory

constexpr int block_threads(int tpr) { return tpr == kSmallTpr ? kBlockThreads : tpr; }

// Flag slots: [0] bad logits; [1] a target out of range (grad) or a bad tangent (hvp).
constexpr int kBadLogits = 0;
constexpr int kBadOther = 1;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Online softmax state of a set of columns: max m, sum_j exp(z_j - m), the tangent t at the top class
// (the column at m), sum_j exp(z_j - m) (u_j - t), and whether a NaN was seen (max comparisons silently
// drop NaNs). Relative to the top class, the last sum holds no p_top t term to cancel at a well-fit row
// (p_top ~ 1, where u_top - <p, u> kept 4e-2 of the row's product in float32); when the top class changes,
// the sum so far moves to the new one (it adds s (t_old - t_new)).
// Trivially constructible, so that it can live in __shared__ memory: start from empty().
template <typename acc_t>
struct Stats {
  acc_t m, s, t, d;
  bool nan;

  __device__ static Stats empty() { return {acc_t(-INFINITY), acc_t(0), acc_t(0), acc_t(0), false}; }

  __device__ void add(acc_t x, acc_t u) {
    if (x > m) {
      const acc_t scale = exp(m - x);  // 0 while m = -inf
      d = (d + s * (t - u)) * scale;  // the new top class adds exp(0) (u - u) = 0
      s = s * scale + acc_t(1);
      t = u;
      m = x;
    } else {
      // an all -inf prefix adds nothing to s (and exp(-inf + inf) is NaN), but 0 * u still carries
      // a NaN or Inf tangent into d, as on the CPU: <p, u - t> then reports it
      const acc_t e = m != -INFINITY ? exp(x - m) : acc_t(0);
      s += e;
      d += e * (u - t);
    }
    nan |= x != x;
  }

  __device__ void merge(const Stats& o) {
    const bool mine = m >= o.m;  // whose top class the merged state keeps
    const acc_t m_new = mine ? m : o.m;
    if (m_new != -INFINITY) {
      const acc_t a = exp(m - m_new), b = exp(o.m - m_new);
      if (mine) {
        d = d * a + (o.d + o.s * (o.t - t)) * b;
      } else {
        d = (d + s * (t - o.t)) * a + o.d * b;
        t = o.t;
      }
      s = s * a + o.s * b;
    } else {
      d += o.d;  // both all -inf: s stays 0, d holds only 0 * (u - t) (NaN for a bad tangent)
    }
    m = m_new;
    nan |= o.nan;
  }
};

template <typename acc_t>
__device__ Stats<acc_t> shfl_xor(const Stats<acc_t>& st, int lane_mask) {
  Stats<acc_t> o;
  o.m = __shfl_xor_sync(0xffffffffu, st.m, lane_mask);
  o.s = __shfl_xor_sync(0xffffffffu, st.s, lane_mask);
  o.t = __shfl_xor_sync(0xffffffffu, st.t, lane_mask);
  o.d = __shfl_xor_sync(0xffffffffu, st.d, lane_mask);
  o.nan = __shfl_xor_sync(0xffffffffu, static_cast<int>(st.nan), lane_mask) != 0;
  return o;
}

// Merges the per-thread states of one row's kTpr threads; every thread gets the row's state.
template <int kTpr, typename acc_t>
__device__ Stats<acc_t> merge_row(Stats<acc_t> st) {
  for (int mask = kWarp / 2; mask > 0; mask /= 2) st.merge(shfl_xor(st, mask));
  if constexpr (kTpr > kWarp) {  // one row per block: combine the warps through shared memory
    __shared__ Stats<acc_t> warp_stats[kTpr / kWarp];
    if (threadIdx.x % kWarp == 0) warp_stats[threadIdx.x / kWarp] = st;
    __syncthreads();
    // each warp merges the warps' states by the same butterfly (log2 of the warp count steps, not one
    // step per warp), every group of kTpr / kWarp lanes holding them all
    constexpr int kWarps = kTpr / kWarp;
    st = warp_stats[threadIdx.x % kWarps];
    for (int mask = kWarps / 2; mask > 0; mask /= 2) st.merge(shfl_xor(st, mask));
  }
  return st;
}

// The part of a row kept in shared memory between the passes: its first `vectors` vectors of z
// (and of u, for the hvp). Each thread reads back only the vectors it stored itself, so the cache
// needs no barrier. Only the 1024-thread mode has one: the other modes compile none of its code
// (the loads it batches in registers would lower their occupancy).
template <int kTpr, typename P>
struct RowCache {
  static constexpr bool kUsed = kTpr == kCachedTpr;
  P* z;
  P* u;
  int64_t vectors;

  // Vector k of a row: from its cached copy (z or u) where the cache holds it, else from global memory.
  __device__ P at(const P* cached, const P* row, int64_t k) const {
    if constexpr (kUsed) {
      if (k < vectors) return cached[k];
    }
    return row[k];
  }
};

// The block's dynamic shared memory as a cache of `vectors` vectors of z (and as many of u when
// with_u), in the 1024-thread mode; an empty cache in the others.
template <int kTpr, typename P>
__device__ RowCache<kTpr, P> row_cache(int64_t vectors, bool with_u) {
  if constexpr (RowCache<kTpr, P>::kUsed) {
    extern __shared__ __align__(16) unsigned char cache_bytes[];
    P* z = reinterpret_cast<P*>(cache_bytes);
    return {z, with_u ? z + vectors : nullptr, vectors};
  } else {
    return {nullptr, nullptr, 0};
  }
}

// Pass 1 over a row: the online state of z and of the tangent: u where given, else the indicator of
// column `target` (of no column for target < 0). The cached
// vectors are loaded first, kLoadBatch per array at a time with no arithmetic in between (many
// loads in flight per thread: the cached mode runs one 1024-thread block per SM), then the rest of
// the row is summed from global memory and the cached part from shared memory.
template <int kTpr, int kVec, typename scalar_t, typename acc_t>
__device__ Stats<acc_t> row_stats(const scalar_t* z_row, const scalar_t* u_row, int64_t target, int64_t C, int lane,
                                  const RowCache<kTpr, Pack<scalar_t, kVec>>& cache) {
  using P = Pack<scalar_t, kVec>;
  constexpr bool kCached = RowCache<kTpr, P>::kUsed;
  const P* z = reinterpret_cast<const P*>(z_row);
  const P* u = reinterpret_cast<const P*>(u_row);
  if constexpr (kCached) {
    for (int64_t k0 = lane; k0 < cache.vectors; k0 += kLoadBatch * kTpr) {
      P zb[kLoadBatch], ub[kLoadBatch];
#pragma unroll
      for (int b = 0; b < kLoadBatch; ++b) {
        const int64_t k = k0 + b * kTpr;
        if (k < cache.vectors) {
          zb[b] = z[k];
          if (u != nullptr) ub[b] = u[k];
        }
      }
#pragma unroll
      for (int b = 0; b < kLoadBatch; ++b) {
        const int64_t k = k0 + b * kTpr;
        if (k < cache.vectors) {
          cache.z[k] = zb[b];
          if (u != nullptr) cache.u[k] = ub[b];
        }
      }
    }
  }
  Stats<acc_t> st = Stats<acc_t>::empty();
  // by value: one vector load each, not one per element
  const auto add = [&](int64_t k, const P zv, const P uv) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      st.add(static_cast<acc_t>(zv.v[e]),
             u != nullptr ? static_cast<acc_t>(uv.v[e]) : acc_t(k * kVec + e == target ? 1 : 0));
    }
  };
  const int64_t cached = kCached ? cache.vectors : 0;
  for (int64_t k = cached + lane; k < C / kVec; k += kTpr) add(k, z[k], u != nullptr ? u[k] : P{});
  if constexpr (kCached) {
    for (int64_t k = lane; k < cached; k += kTpr) add(k, cache.z[k], u != nullptr ? cache.u[k] : P{});
  }
  return merge_row<kTpr>(st);
}

// Rows handled by one thread group, and this thread's lane in it.
template <int kTpr>
__device__ int64_t group_row(int* lane) {
  *lane = static_cast<int>(threadIdx.x % kTpr);
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kTpr) + threadIdx.x / kTpr;
}

template <int kTpr, int kVec, typename scalar_t>
__global__ void __launch_bounds__(block_threads(kTpr))
    softmax_ce_grad_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                           scalar_t* __restrict__ out, int* __restrict__ flags, int64_t N, int64_t C, int64_t z_stride,
                           double smoothing, int64_t ignore_index, int64_t cached) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  int lane;
  const int64_t row = group_row<kTpr>(&lane);
  if (row >= N) return;  // only in warp-per-row mode, where no block-wide barrier follows
  const int64_t y = target[row];
  P* o = reinterpret_cast<P*>(out + row * C);
  if (y == ignore_index || y < 0 || y >= C) {
    if (y != ignore_index && lane == 0) flags[kBadOther] = 1;
    for (int64_t k = lane; k < C / kVec; k += kTpr) o[k] = P{};
    return;  // the whole group (in block mode, the whole block) leaves together
  }
  const scalar_t* z = logits + row * z_stride;
  const RowCache<kTpr, P> cache = row_cache<kTpr, P>(cached, false);
  // the target's indicator as the tangent: p_y - 1 = <p, [j == y]> - 1 = (t - 1) + d / s, where the target is
  // the top class (t = 1) minus the other classes' share, with no 1 / s - 1 to cancel at a well-fit row
  const Stats<acc_t> st = row_stats<kTpr, kVec, scalar_t, acc_t>(z, nullptr, y, C, lane, cache);
  if (lane == 0 && (st.nan || !isfinite(st.m))) flags[kBadLogits] = 1;
  const acc_t shift = st.m == -INFINITY ? acc_t(0) : st.m;
  // a NaN logit seen only by a thread still at -inf added nothing to s (its flag remembers it): the row is NaN,
  // as on the CPU, also where the caller (the autograd formulas) asked for no finiteness check
  const acc_t inv_sum = st.nan ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(1) / st.s;
  const acc_t off = static_cast<acc_t>(smoothing / C);  // smoothed target mass on every class
  const acc_t target_entry = (st.t - acc_t(1)) + st.d * inv_sum + static_cast<acc_t>(smoothing - smoothing / C);
  for (int64_t k = lane; k < C / kVec; k += kTpr) {
    const P zv = cache.at(cache.z, reinterpret_cast<const P*>(z), k);
    P g;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const acc_t v = exp(static_cast<acc_t>(zv.v[e]) - shift) * inv_sum - off;
      g.v[e] = static_cast<scalar_t>(k * kVec + e == y ? target_entry : v);
    }
    o[k] = g;
  }
}

template <int kTpr, int kVec, typename scalar_t>
__global__ void __launch_bounds__(block_threads(kTpr))
    softmax_ce_hvp_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ tangent,
                          scalar_t* __restrict__ out, int* __restrict__ flags, int64_t N, int64_t C, int64_t z_stride,
                          int64_t u_stride, int64_t cached) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  int lane;
  const int64_t row = group_row<kTpr>(&lane);
  if (row >= N) return;  // only in warp-per-row mode, where no block-wide barrier follows
  const scalar_t* z = logits + row * z_stride;
  const scalar_t* u = tangent + row * u_stride;
  const RowCache<kTpr, P> cache = row_cache<kTpr, P>(cached, true);
  // p (u - <p, u>) = p ((u - t) - <p, u - t>), as sum_j p_j = 1
  const Stats<acc_t> st = row_stats<kTpr, kVec, scalar_t, acc_t>(z, u, -1, C, lane, cache);
  const acc_t shift = st.m == -INFINITY ? acc_t(0) : st.m;
  // a NaN logit seen only by a thread still at -inf added nothing to s (its flag remembers it): the row is NaN,
  // as on the CPU, also where the caller (the autograd formulas) asked for no finiteness check
  const acc_t inv_sum = st.nan ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(1) / st.s;
  const acc_t mean_r = st.d * inv_sum;  // <p, u - t>
  if (lane == 0) {
    if (st.nan || !isfinite(st.m)) flags[kBadLogits] = 1;
    if (!isfinite(mean_r)) flags[kBadOther] = 1;
  }
  P* o = reinterpret_cast<P*>(out + row * C);
  for (int64_t k = lane; k < C / kVec; k += kTpr) {
    const P zv = cache.at(cache.z, reinterpret_cast<const P*>(z), k);
    const P uv = cache.at(cache.u, reinterpret_cast<const P*>(u), k);
    P h;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const acc_t p = exp(static_cast<acc_t>(zv.v[e]) - shift) * inv_sum;
      h.v[e] = static_cast<scalar_t>(p * ((static_cast<acc_t>(uv.v[e]) - st.t) - mean_r));
    }
    o[k] = h;
  }
}

// --------------------------------------------------------------------------- host side
// 16-byte vectors when every row of every tensor starts 16-byte aligned and C fills whole vectors.
template <typename scalar_t>
int vector_width(int64_t C, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (C % kVec != 0) return 1;
  for (const auto& [ptr, stride] : rows) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || stride % kVec != 0) return 1;
  }
  return kVec;
}

// Launches kernel<kTpr, kVec> for the row-group size that suits the row (kSmallTpr up to
// kSmallMaxC classes, kCachedTpr for rows of kCachedMinRowBytes and more, kLargeTpr between) and
// the vector width that suits the alignment (kVec is either 1 or 16 bytes' worth of scalar_t).
template <typename scalar_t, typename Launch>
void launch_rows(int64_t N, int64_t C, int vec, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto go = [&](auto tpr, auto v) {
    constexpr int kTpr = decltype(tpr)::value;
    const int threads = block_threads(kTpr);
    const int64_t blocks = (N + threads / kTpr - 1) / (threads / kTpr);
    TORCH_CHECK(blocks <= 0x7fffffff, message("softmax_ce: too many rows (", N, ") for one launch").c_str());
    launch(tpr, v, static_cast<unsigned>(blocks), threads);
  };
  using Small = std::integral_constant<int, kSmallTpr>;
  using Large = std::integral_constant<int, kLargeTpr>;
  using Cached = std::integral_constant<int, kCachedTpr>;
  using V1 = std::integral_constant<int, 1>;
  using VN = std::integral_constant<int, kVec>;
  if (C <= kSmallMaxC) {
    vec == 1 ? go(Small{}, V1{}) : go(Small{}, VN{});
  } else if (C * static_cast<int64_t>(sizeof(scalar_t)) >= kCachedMinRowBytes) {
    vec == 1 ? go(Cached{}, V1{}) : go(Cached{}, VN{});
  } else {
    vec == 1 ? go(Large{}, V1{}) : go(Large{}, VN{});
  }
}

// The shared memory row cache of one launch: vectors per array, and the bytes for all arrays.
struct CacheSize {
  int64_t vectors;
  size_t bytes;
};

// In the cached mode, as many vectors of each of `arrays` row arrays (z, and u for the hvp) as one
// block may hold on the current device (its opt-in limit less the kernel's static shared memory),
// up to the whole row; else none. The kernel's dynamic shared memory limit is raised to all that
// room, the same value whatever the row, so that host threads launching other shapes do not race.
template <int kTpr, typename Kernel>
CacheSize cache_size(Kernel* kernel, int64_t row_vectors, size_t vector_bytes, int arrays) {
  if constexpr (kTpr != kCachedTpr) {
    return {0, 0};
  } else {
    int device = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const size_t limit = static_cast<size_t>(optin);
    const size_t room = limit > attributes.sharedSizeBytes ? limit - attributes.sharedSizeBytes : 0;
    const int64_t vectors = std::min<int64_t>(row_vectors, static_cast<int64_t>(room / (arrays * vector_bytes)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(room)));
    return {vectors, static_cast<size_t>(vectors) * arrays * vector_bytes};
  }
}

at::Tensor softmax_ce_hvp_cuda(const at::Tensor& logits_in, const at::Tensor& tangent_in, bool check_finite) {
  softmax_ce::check_hvp_args(logits_in, tangent_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = softmax_ce::rows_dense(logits_in), tangent = softmax_ce::rows_dense(tangent_in);
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({N, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  at::Tensor flags = at::zeros({2}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_ce_hvp_cuda", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* u = tangent.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t zs = logits.stride(0), us = tangent.stride(0);
    const int vec = vector_width<scalar_t>(C, {{z, zs}, {u, us}, {o, C}});
    launch_rows<scalar_t>(N, C, vec, [&](auto tpr, auto v, unsigned blocks, int threads) {
      constexpr int kTpr = decltype(tpr)::value, kV = decltype(v)::value;
      const auto kernel = softmax_ce_hvp_kernel<kTpr, kV, scalar_t>;
      const CacheSize cache = cache_size<kTpr>(kernel, C / kV, sizeof(Pack<scalar_t, kV>), 2);
      kernel<<<blocks, threads, cache.bytes, stream>>>(z, u, o, flags.mutable_data_ptr<int>(), N, C, zs, us,
                                                       cache.vectors);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (check_finite) {
    const at::Tensor f = flags.cpu();  // the one synchronisation
    TORCH_CHECK_VALUE(f[0].item<int>() == 0, message("softmax_ce_hvp: ", softmax_ce::kBadLogits).c_str());
    TORCH_CHECK_VALUE(f[1].item<int>() == 0, message("softmax_ce_hvp: ", softmax_ce::kBadTangent).c_str());
  }
  return out;
}

at::Tensor softmax_ce_grad_cuda(const at::Tensor& logits_in, const at::Tensor& target_in, double label_smoothing,
                                int64_t ignore_index, bool check_finite) {
  softmax_ce::check_grad_args(logits_in, target_in, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = softmax_ce::rows_dense(logits_in), target = target_in.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({N, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  at::Tensor flags = at::zeros({2}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_ce_grad_cuda", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t zs = logits.stride(0);
    const int vec = vector_width<scalar_t>(C, {{z, zs}, {o, C}});
    launch_rows<scalar_t>(N, C, vec, [&](auto tpr, auto v, unsigned blocks, int threads) {
      constexpr int kTpr = decltype(tpr)::value, kV = decltype(v)::value;
      const auto kernel = softmax_ce_grad_kernel<kTpr, kV, scalar_t>;
      const CacheSize cache = cache_size<kTpr>(kernel, C / kV, sizeof(Pack<scalar_t, kV>), 1);
      kernel<<<blocks, threads, cache.bytes, stream>>>(z, target.const_data_ptr<int64_t>(), o,
                                                       flags.mutable_data_ptr<int>(), N, C, zs, label_smoothing,
                                                       ignore_index, cache.vectors);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // Targets are always checked (as on CPU), so this op always synchronises once.
  const at::Tensor f = flags.cpu();
  if (f[1].item<int>() != 0) softmax_ce::check_targets(target.cpu(), C, ignore_index);  // the first bad row
  if (check_finite) {
    TORCH_CHECK_VALUE(f[0].item<int>() == 0, message("softmax_ce_grad: ", softmax_ce::kBadLogits).c_str());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_kernels, CUDA, m) {
  m.impl("softmax_ce_grad", &softmax_ce_grad_cuda);
  m.impl("softmax_ce_hvp", &softmax_ce_hvp_cuda);
}

}  // namespace unlearn_kernels
