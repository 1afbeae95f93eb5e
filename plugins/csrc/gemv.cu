// The one-row path: with one row of X (batch-1 decode) each op is ONE kernel, the norm, the
// activation and the GEMV sharing a launch so the weights stream at close to copy bandwidth.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_common.cuh"
#include "ort_glue.h"

namespace llm2trt {
namespace {

// Tuning, measured on an H200 (scripts/bench_ort_kernels.py --variant sweeps them): a kernel
// whose weights are under PDL_BYTES starts early (programmatic dependent launch), pulls the first
// PREFETCH_BYTES of each row into L2 and keeps 4 loads a lane in flight; a larger one (gate+up,
// lm_head) gains nothing from starting early, competing with the kernel before it, and keeps 8.
#ifndef LLM2TRT_PDL_BYTES
#define LLM2TRT_PDL_BYTES (32 << 20)
#endif
#ifndef LLM2TRT_PREFETCH_BYTES
#define LLM2TRT_PREFETCH_BYTES 512
#endif

constexpr int kWarps = 4;  // warps per block in the one-row kernel
constexpr int kThreads = 32 * kWarps;

// VEC elements from p + c * VEC, in float: 16 bytes in one load where VEC > 1. STREAM: a weight.
template <typename T, int VEC, bool STREAM = false>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, int c, float (&out)[VEC]) {
  if (VEC > 1) {
    const uint4* at = reinterpret_cast<const uint4*>(p) + c;
    uint4 packed = STREAM ? load_stream(at) : __ldg(at);
    const T* v = reinterpret_cast<const T*>(&packed);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = to_float(v[e]);
  } else {
    out[0] = to_float(__ldg(p + c));
  }
}

// One row of X, no shared memory and no block-wide step. RMSNorm scales the row by one number,
// r = rsqrt(mean(s^2) + eps), so W . (s * gamma * r) = r * (W . (s * gamma)): each lane forms
// s * gamma at its own positions from X, Skip and Gamma (L1-resident after the first warp reads
// them), adds s^2 to its share of the sum of squares, and every warp finishes r itself after the
// dot products. Each warp reads R weight rows at once (2R for SwiGLU: gate and up), 16 bytes a
// lane a load. Warp 0 of block 0 writes Sum. Fewer roundings than the reference body: the sum is
// rounded to T (it is the residual stream); the normalized row and gate/up stay in float.
template <typename T, typename Y, int VEC, bool NORM, bool SKIP, bool SWIGLU, int R, bool EARLY>
__global__ void __launch_bounds__(kThreads) one_row_kernel(const T* __restrict__ x, const T* __restrict__ skip,
                                                           const T* __restrict__ gamma, const T* __restrict__ w,
                                                           Y* __restrict__ y, T* __restrict__ sum, int k, int n_out,
                                                           float epsilon) {
  constexpr int P = SWIGLU ? 2 * R : R;  // weight rows this warp reads
  constexpr int IN_FLIGHT = EARLY ? 4 : 8;
  constexpr int UNROLL = IN_FLIGHT / P > 1 ? IN_FLIGHT / P : 1;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int j0 = (blockIdx.x * kWarps + warp) * R;
  const bool writes_sum = SKIP && sum != nullptr && blockIdx.x == 0 && warp == 0;
  const T* rows[P];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int j = min(j0 + r, n_out - 1);  // past the end: read a real row, write nothing
    rows[r] = w + size_t(j) * k;
    if (SWIGLU) rows[R + r] = w + (size_t(n_out) + j) * k;
  }
  float acc[P];
#pragma unroll
  for (int q = 0; q < P; ++q) acc[q] = 0.f;
  float squares = 0.f;
  const int chunks = k / VEC;
  if (EARLY) {
    allow_dependents();
    // The start of this warp's weight rows into L2 while the kernel before (whose output X is) finishes.
    const int row_bytes = min(k * int(sizeof(T)), LLM2TRT_PREFETCH_BYTES);
#pragma unroll
    for (int q = 0; q < P; ++q)
      for (int offset = lane * 128; offset < row_bytes; offset += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const char*>(rows[q]) + offset));
    wait_for_inputs();
  }
#pragma unroll UNROLL
  for (int c = lane; c < chunks; c += 32) {
    float wv[P][VEC];
#pragma unroll
    for (int q = 0; q < P; ++q) load_vec<T, VEC, true>(rows[q], c, wv[q]);
    float u[VEC];
    load_vec<T, VEC>(x, c, u);
    if (SKIP) {
      float sv[VEC];
      load_vec<T, VEC>(skip, c, sv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const T rounded = from_float<T>(u[e] + sv[e]);
        if (writes_sum) sum[c * VEC + e] = rounded;
        u[e] = to_float(rounded);
      }
    }
    if (NORM) {
      float gv[VEC];
      load_vec<T, VEC>(gamma, c, gv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        squares += u[e] * u[e];
        u[e] *= gv[e];
      }
    }
#pragma unroll
    for (int q = 0; q < P; ++q) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[q] += wv[q][e] * u[e];
    }
  }
#pragma unroll
  for (int q = 0; q < P; ++q) acc[q] = warp_sum(acc[q]);
  float scale = 1.f;
  if (NORM) scale = rsqrtf(warp_sum(squares) / k + epsilon);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int j = j0 + r;
      if (j >= n_out) break;
      if (SWIGLU) {
        const float g = acc[r] * scale, u = acc[R + r] * scale;
        y[j] = from_float<Y>(g / (1.f + expf(-g)) * u);
      } else {
        y[j] = from_float<Y>(acc[r] * scale);
      }
    }
  }
}

template <typename T, typename Y, int VEC, bool NORM, bool SKIP, bool SWIGLU, int R, bool EARLY>
void launch_one_row(const Args& a, cudaStream_t stream) {
  const int64_t rows_per_block = int64_t(R) * kWarps;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned((a.n_out + rows_per_block - 1) / rows_per_block));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = EARLY ? 1 : 0;
  cudaLaunchKernelEx(&config, one_row_kernel<T, Y, VEC, NORM, SKIP, SWIGLU, R, EARLY>, static_cast<const T*>(a.x.data),
                     static_cast<const T*>(a.skip.data), static_cast<const T*>(a.gamma.data),
                     static_cast<const T*>(a.w.data), static_cast<Y*>(a.y.data), static_cast<T*>(a.sum.data),
                     int(a.k), int(a.n_out), a.epsilon);
}

// Rows per warp: one while there are few rows for the GPU's warps; more (fewer blocks, each
// paying the prologue once) for wide layers such as lm_head.
template <typename T, typename Y, int VEC, bool NORM, bool SKIP, bool SWIGLU>
void launch_rows(const Args& a, cudaStream_t stream) {
  const int64_t sms = multiprocessors();
  const bool early = compute_capability() >= 90 && a.n * a.k * int64_t(sizeof(T)) < LLM2TRT_PDL_BYTES;
  if (a.n_out >= sms * 64)
    launch_one_row<T, Y, VEC, NORM, SKIP, SWIGLU, 4, false>(a, stream);
  else if (a.n_out >= sms * 32)
    launch_one_row<T, Y, VEC, NORM, SKIP, SWIGLU, 2, false>(a, stream);
  else if (early)
    launch_one_row<T, Y, VEC, NORM, SKIP, SWIGLU, 1, true>(a, stream);
  else
    launch_one_row<T, Y, VEC, NORM, SKIP, SWIGLU, 1, false>(a, stream);
}

template <typename T, typename Y, bool NORM, bool SKIP, bool SWIGLU>
void dispatch_one_row(const Args& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = a.k % kVec == 0 && reinterpret_cast<uintptr_t>(a.w.data) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.x.data) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.skip.data) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.gamma.data) % 16 == 0;
  if (aligned)
    launch_rows<T, Y, kVec, NORM, SKIP, SWIGLU>(a, stream);
  else
    launch_rows<T, Y, 1, NORM, SKIP, SWIGLU>(a, stream);
}

// The one-row kernel for a GEMV op without SwiGLU, Y of type Y.
template <typename T, typename Y>
void one_row_linear(const OpKind& kind, const Args& a, cudaStream_t stream) {
  if (!kind.norm)
    dispatch_one_row<T, Y, false, false, false>(a, stream);
  else if (!kind.skip)
    dispatch_one_row<T, Y, true, false, false>(a, stream);
  else
    dispatch_one_row<T, Y, true, true, false>(a, stream);
}

}  // namespace

// The one-row kernel for the op's kind (SwiGLU has no float-Y twin).
template <typename T>
void one_row(const OpKind& kind, const Args& a, cudaStream_t stream) {
  if (kind.swiglu)
    dispatch_one_row<T, T, true, true, true>(a, stream);
  else if (kind.float_y)
    one_row_linear<T, float>(kind, a, stream);
  else
    one_row_linear<T, T>(kind, a, stream);
}

template void one_row<__half>(const OpKind&, const Args&, cudaStream_t);
template void one_row<float>(const OpKind&, const Args&, cudaStream_t);

}  // namespace llm2trt
