// The NBits ops (weight-only INT4 / INT8: W4A16, W8A16): the one-row kernels (batch-1 decode) and
// the dequantization the many-row path runs before cuBLAS (cublas_paths.cu).
//
// W is uint8 codes [N, K * bits / 8] (INT4: two a byte, the even k in the low nibble), Scales T and
// ZeroPoints uint8 [N, K / block]; w[n, k] = (code - zero) * scale of k's block.
//
// One row: as gemv.cu, one kernel an op, the weights streamed with 16-byte loads that skip L1. A
// 16-byte load holds 32 INT4 (16 INT8) codes, so the row of X is the larger read: each block
// stages it once in shared memory, in float, with the skip-add (rounded to T: the residual
// stream) and Gamma applied (the norm's 1 / rms scales the dot products, as in gemv.cu), laid out
// so that a warp's 32 lanes read their chunks' values without bank conflicts; the block then loops
// over its rows. A code becomes a float
// with no conversion instruction: masked into the mantissa of 2^23 (one LOP3 for INT4, one PRMT for
// INT8), the zero point leaves with the 2^23 in one exact subtraction, and the dot of a chunk
// (one block's codes) is scaled once. INT4 nibbles 1 to 4 of a word are masked in place (16^i
// times the code) and their X values staged times 16^-i, so no shifts but one a word.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernel_common.cuh"
#include "ort_glue.h"

namespace llm2trt {
namespace {

#ifndef LLM2TRT_PDL_BYTES
#define LLM2TRT_PDL_BYTES (32 << 20)  // as gemv.cu: weights under this start early (PDL) on sm_90
#endif
#ifndef LLM2TRT_NBITS_IN_FLIGHT
#define LLM2TRT_NBITS_IN_FLIGHT 8  // 16-byte weight loads a lane issues before it computes
#endif
#ifndef LLM2TRT_NBITS_ROWS
#define LLM2TRT_NBITS_ROWS 0  // weight rows a warp (1, 2 or 4); 0: chosen by N (launch_nbits_rows)
#endif

constexpr int kQWarps = 8;
constexpr int kQThreads = 32 * kQWarps;
constexpr int kMaxStaged = 32768;  // floats of X a block stages (128 KB): larger K takes the generic kernel

// The bytes of X a block may stage: kMaxStaged's, or less where the GPU's blocks get less.
int staged_limit() {
  static const int limit = [] {
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return std::min(kMaxStaged * int(sizeof(float)), optin - 1024);  // room for the static shared
  }();
  return limit;
}

// Staged floats for K: whole groups of 32 chunks (E codes a chunk), as staged_at lays them out.
size_t staged_bytes(int64_t k, int bits) {
  const int64_t per = 32 * (128 / bits);
  return size_t((k + per - 1) / per * per) * sizeof(float);
}
constexpr uint32_t kMagic = 0x4B000000u;  // 2^23 as a float: a code OR-ed into it is 2^23 + code
constexpr float kMagicF = 8388608.f;

__device__ __forceinline__ float magic(uint32_t bits) { return __uint_as_float(bits | kMagic); }

// A chunk's 16 bytes (32 INT4 codes) times the staged X: sum of (code - zero) * x. m[i] = 2^23 +
// zero * 16^i; x[q * 32] is the lane's q-th float4 of the chunk (staged times 16^-i at nibble i).
__device__ __forceinline__ float dot_int4(const uint4& v, const float4* x, const float (&m)[5]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  float even = 0.f, odd = 0.f;  // two chains: the FMAs' latency hides behind each other
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t w = words[j], h = w >> 12;  // nibbles 5-7 to bits 8-19, inside the mantissa
    const float4 a = x[(2 * j) * 32], b = x[(2 * j + 1) * 32];
    even = fmaf(magic(w & 0xFu) - m[0], a.x, even);
    odd = fmaf(magic(w & 0xF0u) - m[1], a.y, odd);
    even = fmaf(magic(w & 0xF00u) - m[2], a.z, even);
    odd = fmaf(magic(w & 0xF000u) - m[3], a.w, odd);
    even = fmaf(magic(w & 0xF0000u) - m[4], b.x, even);
    odd = fmaf(magic(h & 0xF00u) - m[2], b.y, odd);
    even = fmaf(magic(h & 0xF000u) - m[3], b.z, even);
    odd = fmaf(magic(h & 0xF0000u) - m[4], b.w, odd);
  }
  return even + odd;
}

// 16 INT8 codes: each byte placed under 2^23's exponent by one byte permute; m = 2^23 + zero.
__device__ __forceinline__ float dot_int8(const uint4& v, const float4* x, float m) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  float even = 0.f, odd = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float4 a = x[j * 32];
    even = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7540)) - m, a.x, even);
    odd = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7541)) - m, a.y, odd);
    even = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7542)) - m, a.z, even);
    odd = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7543)) - m, a.w, odd);
  }
  return even + odd;
}

// Where X's element i is staged: chunk c = i / E (E codes a 16-byte chunk) is read by lane c % 32,
// so float4 q of chunks 32t..32t+31 sit side by side: a warp's float4 reads cover all banks.
template <int E>
__device__ __forceinline__ int staged_at(int i) {
  const int c = i / E, e = i % E;
  return (((c >> 5) * (E / 4) + e / 4) * 32 + (c & 31)) * 4 + e % 4;
}

// The power of two X's element i is staged times (INT4: 16^-i for nibble i of its word; nibbles
// 5-7 were shifted down by 12 bits).
template <int BITS>
__device__ __forceinline__ float staged_scale(int i) {
  if (BITS == 8) return 1.f;
  const int nibble = i % 8, power = 4 * (nibble < 5 ? nibble : nibble - 3);
  return __int_as_float((127 - power) << 23);  // 2^-power, exactly
}

// One row of X, R weight rows a warp at a time (2R for SwiGLU: gate and up), each block looping
// over groups of kQWarps * R rows. Needs K a multiple of the chunk's codes, the block size a
// multiple of them too (a chunk lies in one block), 16-byte aligned W, X, Skip and Gamma.
template <typename T, typename Y, int BITS, bool NORM, bool SKIP, bool SWIGLU, int R>
__global__ void __launch_bounds__(kQThreads) nbits_row_kernel(const T* __restrict__ x, const T* __restrict__ skip,
                                                              const T* __restrict__ gamma,
                                                              const uint8_t* __restrict__ w,
                                                              const T* __restrict__ scales,
                                                              const uint8_t* __restrict__ zeros, Y* __restrict__ y,
                                                              T* __restrict__ sum, int k, int n_out, int block,
                                                              float epsilon, bool early) {
  constexpr int E = 128 / BITS;  // codes a 16-byte chunk
  constexpr int P = SWIGLU ? 2 * R : R;
  constexpr int U = LLM2TRT_NBITS_IN_FLIGHT / P > 1 ? LLM2TRT_NBITS_IN_FLIGHT / P : 1;
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ float4 staged[];
  __shared__ float partial[kQWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int chunks = k / E, groups = k / block, chunks_per_group = block / E;
  const size_t row_bytes = size_t(k) * BITS / 8;
  const int row_groups = (n_out + kQWarps * R - 1) / (kQWarps * R);
  auto row_of = [&](int group, int q) {  // weight row q of this warp (past the end: a real row, unwritten)
    const int j = min((group * kQWarps + warp) * R + q % R, n_out - 1);
    return SWIGLU && q >= R ? j + n_out : j;
  };

  // The first chunks of this warp's rows into L2 before X is read (X is the kernel before's output).
  if (early) allow_dependents();  // launched with PDL: the next kernel may start its own prefetch
#pragma unroll
  for (int q = 0; q < P; ++q)
    for (int u = 0; u < U && lane + 32 * u < chunks; ++u)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(w + size_t(row_of(blockIdx.x, q)) * row_bytes +
                                                     size_t(lane + 32 * u) * 16));
  if (early) wait_for_inputs();

  // Stage the row: Sum (rounded to T, written by block 0), times Gamma, squares for the norm.
  float* xs = reinterpret_cast<float*>(staged);
  float squares = 0.f;
  for (int c = threadIdx.x; c < k / VEC; c += kQThreads) {
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x) + c);
    const T* xe = reinterpret_cast<const T*>(&xv);
    uint4 sv, gv, out;
    if (SKIP) sv = __ldg(reinterpret_cast<const uint4*>(skip) + c);
    if (NORM) gv = __ldg(reinterpret_cast<const uint4*>(gamma) + c);
    const T* se = reinterpret_cast<const T*>(&sv);
    const T* ge = reinterpret_cast<const T*>(&gv);
    T* oe = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float v = to_float(xe[e]);
      if (SKIP) {
        oe[e] = from_float<T>(v + to_float(se[e]));
        v = to_float(oe[e]);
      }
      if (NORM) {
        squares += v * v;
        v *= to_float(ge[e]);
      }
      const int i = c * VEC + e;
      xs[staged_at<E>(i)] = v * staged_scale<BITS>(i);
    }
    if (SKIP && sum != nullptr && blockIdx.x == 0) reinterpret_cast<uint4*>(sum)[c] = out;
  }
  float scale = 1.f;
  if (NORM) {
    squares = warp_sum(squares);
    if (lane == 0) partial[warp] = squares;
  }
  __syncthreads();
  if (NORM) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kQWarps; ++i) total += partial[i];
    scale = rsqrtf(total / k + epsilon);
  }

  for (int group = blockIdx.x; group < row_groups; group += gridDim.x) {
    const int j0 = (group * kQWarps + warp) * R;
    if (j0 >= n_out) break;  // the warp's rows and every later group's are past the end
    int rows[P];
#pragma unroll
    for (int q = 0; q < P; ++q) rows[q] = row_of(group, q);
    float acc[P];
#pragma unroll
    for (int q = 0; q < P; ++q) acc[q] = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
      uint4 v[U][P];
      float s[U][P];
      uint32_t z[U][P];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u, g = c / chunks_per_group;
        if (c >= chunks) break;
#pragma unroll
        for (int q = 0; q < P; ++q) {
          v[u][q] = load_stream(w + size_t(rows[q]) * row_bytes + size_t(c) * 16);
          s[u][q] = to_float(__ldg(scales + size_t(rows[q]) * groups + g));
          z[u][q] = __ldg(zeros + size_t(rows[q]) * groups + g);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (c >= chunks) break;
        const float4* xc = staged + (c >> 5) * (E / 4) * 32 + (c & 31);
#pragma unroll
        for (int q = 0; q < P; ++q) {
          float dot;
          if (BITS == 4) {
            const float zf = float(z[u][q]);
            const float m[5] = {kMagicF + zf, fmaf(zf, 16.f, kMagicF), fmaf(zf, 256.f, kMagicF),
                                fmaf(zf, 4096.f, kMagicF), fmaf(zf, 65536.f, kMagicF)};
            dot = dot_int4(v[u][q], xc, m);
          } else {
            dot = dot_int8(v[u][q], xc, kMagicF + float(z[u][q]));
          }
          acc[q] = fmaf(s[u][q], dot, acc[q]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < P; ++q) acc[q] = warp_sum(acc[q]);
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
}

// Any shape the fast kernel refuses: a warp a row, a code a lane at a time, the norm as gemv.cu's
// (each lane forms s * gamma and its squares; the scale after the dot products).
template <typename T, typename Y, bool NORM, bool SKIP, bool SWIGLU>
__global__ void __launch_bounds__(kQThreads) nbits_row_generic(const T* __restrict__ x, const T* __restrict__ skip,
                                                               const T* __restrict__ gamma,
                                                               const uint8_t* __restrict__ w,
                                                               const T* __restrict__ scales,
                                                               const uint8_t* __restrict__ zeros, Y* __restrict__ y,
                                                               T* __restrict__ sum, int k, int n_out, int bits,
                                                               int block, float epsilon) {
  constexpr int P = SWIGLU ? 2 : 1;
  const int lane = threadIdx.x % 32, j = blockIdx.x * kQWarps + threadIdx.x / 32;
  if (j >= n_out) return;
  const int groups = k / block;
  const size_t row_bytes = size_t(k) * bits / 8;
  const bool writes_sum = SKIP && sum != nullptr && j == 0;
  float acc[P] = {}, squares = 0.f;
  for (int i = lane; i < k; i += 32) {
    float u = to_float(x[i]);
    if (SKIP) {
      const T rounded = from_float<T>(u + to_float(skip[i]));
      if (writes_sum) sum[i] = rounded;
      u = to_float(rounded);
    }
    if (NORM) {
      squares += u * u;
      u *= to_float(gamma[i]);
    }
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const size_t row = q == 0 ? size_t(j) : size_t(j) + n_out;
      const uint32_t byte = w[row * row_bytes + (bits == 4 ? i / 2 : i)];
      const uint32_t code = bits == 4 ? (byte >> (4 * (i & 1))) & 15u : byte;
      const size_t at = row * groups + i / block;
      acc[q] += (float(code) - float(zeros[at])) * to_float(scales[at]) * u;
    }
  }
#pragma unroll
  for (int q = 0; q < P; ++q) acc[q] = warp_sum(acc[q]);
  const float scale = NORM ? rsqrtf(warp_sum(squares) / k + epsilon) : 1.f;
  if (lane == 0) {
    if (SWIGLU) {
      const float g = acc[0] * scale, u = acc[1] * scale;
      y[j] = from_float<Y>(g / (1.f + expf(-g)) * u);
    } else {
      y[j] = from_float<Y>(acc[0] * scale);
    }
  }
}

template <typename T, typename Y, int BITS, bool NORM, bool SKIP, bool SWIGLU, int R>
void launch_nbits(const Args& a, bool early, cudaStream_t stream) {
  auto kernel = nbits_row_kernel<T, Y, BITS, NORM, SKIP, SWIGLU, R>;
  const size_t shared = staged_bytes(a.k, BITS);
  // Above 48 KB a kernel must opt in; the blocks an SM holds at this size bound the grid (each
  // block stages X once, so no more blocks than run at once).
  static const bool opted = [&] {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, staged_limit());
    return true;
  }();
  (void)opted;
  thread_local size_t last_shared = 0;
  thread_local int last_blocks = 1;
  if (shared != last_shared) {
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kQThreads, shared);
    last_shared = shared;
    last_blocks = blocks > 0 ? blocks : 1;
  }
  const int64_t row_groups = (a.n_out + int64_t(kQWarps) * R - 1) / (int64_t(kQWarps) * R);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(std::min<int64_t>(row_groups, int64_t(multiprocessors()) * last_blocks)));
  config.blockDim = dim3(kQThreads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = early ? 1 : 0;
  cudaLaunchKernelEx(&config, kernel, static_cast<const T*>(a.x.data), static_cast<const T*>(a.skip.data),
                     static_cast<const T*>(a.gamma.data), static_cast<const uint8_t*>(a.w.data),
                     static_cast<const T*>(a.scales.data), static_cast<const uint8_t*>(a.zeros.data),
                     static_cast<Y*>(a.y.data), static_cast<T*>(a.sum.data), int(a.k), int(a.n_out), a.block,
                     a.epsilon, early);
}

// Rows a warp by width: about one block an SM once there are two rows a warp (each block stages X
// once, and a warp's loads of all its rows are in flight together); wide layers (gate+up,
// lm_head) take four, each staged X value feeding more codes.
template <typename T, typename Y, int BITS, bool NORM, bool SKIP, bool SWIGLU>
void launch_nbits_rows(const Args& a, cudaStream_t stream) {
  const int64_t warps = int64_t(multiprocessors()) * kQWarps;  // one block an SM
  const bool early = compute_capability() >= 90 && a.n * a.k * BITS / 8 < LLM2TRT_PDL_BYTES;
  if (LLM2TRT_NBITS_ROWS == 4 || (LLM2TRT_NBITS_ROWS == 0 && a.n_out * 2 >= warps * 6))
    launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 4>(a, early, stream);
  else if (LLM2TRT_NBITS_ROWS == 2 || (LLM2TRT_NBITS_ROWS == 0 && a.n_out * 2 >= warps * 3))
    launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 2>(a, early, stream);
  else
    launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 1>(a, early, stream);
}

template <typename T, typename Y, bool NORM, bool SKIP, bool SWIGLU>
void dispatch_nbits(const Args& a, cudaStream_t stream) {
  const int codes = a.bits == 4 ? 32 : 16;  // a 16-byte chunk's
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool fast = a.k % codes == 0 && a.block % codes == 0 &&
                    staged_bytes(a.k, a.bits) <= size_t(staged_limit()) && aligned(a.w.data) &&
                    aligned(a.x.data) && aligned(a.skip.data) && aligned(a.gamma.data) && aligned(a.sum.data);
  if (!fast) {
    nbits_row_generic<T, Y, NORM, SKIP, SWIGLU><<<unsigned((a.n_out + kQWarps - 1) / kQWarps), kQThreads, 0, stream>>>(
        static_cast<const T*>(a.x.data), static_cast<const T*>(a.skip.data), static_cast<const T*>(a.gamma.data),
        static_cast<const uint8_t*>(a.w.data), static_cast<const T*>(a.scales.data),
        static_cast<const uint8_t*>(a.zeros.data), static_cast<Y*>(a.y.data), static_cast<T*>(a.sum.data), int(a.k),
        int(a.n_out), a.bits, a.block, a.epsilon);
  } else if (a.bits == 4) {
    launch_nbits_rows<T, Y, 4, NORM, SKIP, SWIGLU>(a, stream);
  } else {
    launch_nbits_rows<T, Y, 8, NORM, SKIP, SWIGLU>(a, stream);
  }
}

template <typename T, typename Y>
void nbits_linear(const OpKind& kind, const Args& a, cudaStream_t stream) {
  if (!kind.norm)
    dispatch_nbits<T, Y, false, false, false>(a, stream);
  else if (!kind.skip)
    dispatch_nbits<T, Y, true, false, false>(a, stream);
  else
    dispatch_nbits<T, Y, true, true, false>(a, stream);
}

// W to T [N, K], a thread a byte of codes: (code - zero) * scale, rounded to T as cuBLAS reads it.
template <typename T, int BITS>
__global__ void dequantize_kernel(const uint8_t* __restrict__ w, const T* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, T* __restrict__ out, int64_t n, int k,
                                  int block) {
  const int row_bytes = k * BITS / 8, groups = k / block;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    for (int b = blockIdx.x * blockDim.x + threadIdx.x; b < row_bytes; b += gridDim.x * blockDim.x) {
      const uint32_t byte = w[row * row_bytes + b];
#pragma unroll
      for (int e = 0; e < 8 / BITS; ++e) {
        const int i = b * (8 / BITS) + e;
        const uint32_t code = BITS == 4 ? (byte >> (4 * e)) & 15u : byte;
        const int64_t at = row * groups + i / block;
        out[row * k + i] = from_float<T>((float(code) - float(zeros[at])) * to_float(scales[at]));
      }
    }
  }
}

}  // namespace

// The one-row kernel for the NBits op's kind (SwiGLU has no float-Y twin).
template <typename T>
void one_row_nbits(const OpKind& kind, const Args& a, cudaStream_t stream) {
  if (a.n_out == 0) return;  // no rows: no grid to launch
  if (kind.swiglu)
    dispatch_nbits<T, T, true, true, true>(a, stream);
  else if (kind.float_y)
    nbits_linear<T, float>(kind, a, stream);
  else
    nbits_linear<T, T>(kind, a, stream);
}

template <typename T>
void dequantize_nbits(const Args& a, T* out, cudaStream_t stream) {
  if (a.n == 0 || a.k == 0) return;
  const int row_bytes = int(a.k * a.bits / 8);
  const dim3 grid(unsigned((row_bytes + 255) / 256), unsigned(std::min<int64_t>(a.n, 65535)));
  const auto* w = static_cast<const uint8_t*>(a.w.data);
  const auto* scales = static_cast<const T*>(a.scales.data);
  const auto* zeros = static_cast<const uint8_t*>(a.zeros.data);
  if (a.bits == 4)
    dequantize_kernel<T, 4><<<grid, 256, 0, stream>>>(w, scales, zeros, out, a.n, int(a.k), a.block);
  else
    dequantize_kernel<T, 8><<<grid, 256, 0, stream>>>(w, scales, zeros, out, a.n, int(a.k), a.block);
}

template void one_row_nbits<__half>(const OpKind&, const Args&, cudaStream_t);
template void one_row_nbits<float>(const OpKind&, const Args&, cudaStream_t);
template void dequantize_nbits<__half>(const Args&, __half*, cudaStream_t);
template void dequantize_nbits<float>(const Args&, float*, cudaStream_t);

}  // namespace llm2trt
