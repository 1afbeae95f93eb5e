// The NBits ops (weight-only INT4 / INT8: W4A16, W8A16): the one-row kernels (batch-1 decode) and
// the dequantization the many-row path runs before cuBLAS (cublas_paths.cu).
//
// W is uint8 codes [N, K * bits / 8] (INT4: two a byte, the even k in the low nibble), Scales T and
// ZeroPoints uint8 [N, K / block]; w[n, k] = (code - zero) * scale of k's block.
//
// One row (nbits_row_kernel): one kernel an op, as gemv.cu. A 1-3 MB layer streams in about a
// microsecond, so the kernel is built around what happens outside the weight stream:
//  - Weights first. Each thread issues its 16-byte weight loads (streaming, into registers) with
//    their scales and zero points before anything else, and before waiting for the kernel before
//    (PDL: weights do not depend on it, X does), so the DRAM round trip overlaps that kernel's tail
//    and this kernel's own staging of X.
//  - X staged once a block, then one barrier: 16-byte vectors of X (+ Skip, rounded to T: the
//    residual stream, block 0 writing Sum), times Gamma, into shared memory in the order the dot
//    products read it (a warp's 32 threads read 512 contiguous bytes); the norm's sum of squares
//    per warp, its 1 / rms scaling the dot products (as in gemv.cu). Reading X straight from
//    global memory per thread instead costs a block its slots times the L2 traffic (each slot
//    re-reads X: 4x for INT4 at K 2048), which made the norm layers the slowest.
//  - LLM2TRT_NBITS_DIRECT=1 chooses the X path per op: an op with neither norm nor skip (o_proj,
//    down_proj) reads its own chunks of X into registers right after the wait and keeps them for
//    every tile (DIRECT: no staging, no shared memory for X, no barrier before the first dot
//    products); the norm ops stage X as above (their sum of squares needs the whole row anyway).
//    Off by default until it is checked and timed on a GPU (scripts/gpu_nbits.sh).
//  - A block is `cols` threads across K (a power of two covering the row's 16-byte chunks once, or
//    twice: CI) by slots; each slot reads RJ rows a tile (2 RJ for SwiGLU), so a thread has RJ * CI
//    loads in flight (twice that for SwiGLU); RJ is the most (up to LOADS) that leaves a tile for every
//    SM, so small layers have all their loads in flight at once across the GPU. The grid is at
//    most the blocks that fit at once, each with the same count of tiles (or one less).
//  - A tile: dot products, the next tile's loads issued, a warp sum per row, the column warps'
//    partials added through shared memory (double-buffered: one barrier a tile).
//  - Dequantization without conversions. float16 X: codes to half2 two at a time, INT4 by one LOP3
//    into the mantissa of 1024 (nibbles 1 and 5 of a word land times 16; one HFMA2 divides and
//    takes off the zero point), INT8 by one byte permute; (code - zero) is exact in half2, the
//    products are summed in half2 over one chunk (8 or 4 terms a lane, X staged times 2^-4 or
//    2^-8 so that large activations stay in range) and in float across chunks: about half the
//    instructions of float math. float32 X: a code masked into the mantissa of 2^23 (one LOP3 or
//    PRMT), 2^23 and the zero point off in one exact subtraction, FMAs in float.
// Tried and measured slower on an H100 (scripts/check_nbits_kernel.py): the next tile's loads in a
// second set of registers (more registers: fewer blocks of this kernel and the next fit an SM, and
// the wide layers lose more than they gain), dequantizing the first tile before the PDL wait (same),
// blocks of 512 threads. Shapes the kernel refuses (K or the block not a whole count of chunks,
// unaligned pointers, X larger than the shared memory a block may stage) take nbits_row_generic.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernel_common.cuh"
#include "ort_glue.h"

namespace llm2trt {
namespace {

#ifndef LLM2TRT_PDL_BYTES
#define LLM2TRT_PDL_BYTES (32 << 20)  // as gemv.cu: weights under this start early (PDL) on sm_90
#endif
#ifndef LLM2TRT_NBITS_ROWS
#define LLM2TRT_NBITS_ROWS 0  // weight rows a thread reads a tile (1, 2 or 4); 0: chosen by N
#endif
#ifndef LLM2TRT_NBITS_TILES
#define LLM2TRT_NBITS_TILES 1  // ROWS 0: the most rows a thread that still leave this many tiles an SM
#endif
#ifndef LLM2TRT_NBITS_LOADS
#define LLM2TRT_NBITS_LOADS 4  // ROWS 0: at most this many 16-byte weight loads a thread a tile
#endif
#ifndef LLM2TRT_NBITS_BLOCKS
#define LLM2TRT_NBITS_BLOCKS 0  // resident blocks an SM the grid counts on; 0: as many as fit
#endif
#ifndef LLM2TRT_NBITS_THREADS
#define LLM2TRT_NBITS_THREADS 256  // the one-row kernel's block (up to 2 * THREADS chunks a row)
#endif
#ifndef LLM2TRT_NBITS_HALF
#define LLM2TRT_NBITS_HALF 3  // float16 X: the dot products in half2 for INT4 (bit 0), INT8 (bit 1)
#endif
#ifndef LLM2TRT_NBITS_DIRECT
#define LLM2TRT_NBITS_DIRECT 0  // 1: ops without norm or skip read X into registers, unstaged; 0: all stage X
#endif
#ifndef LLM2TRT_NBITS_GRID
#define LLM2TRT_NBITS_GRID 0  // 0: the fewest blocks with an equal count of tiles; 1: every resident block
#endif

constexpr int kQWarps = 8;
constexpr int kQThreads = 32 * kQWarps;  // the generic kernel's block
constexpr int kRowThreads = LLM2TRT_NBITS_THREADS;  // the one-row kernel's
constexpr int kWideThreads = 1024;  // its block where a row has more than 2 * kRowThreads chunks
constexpr int kMaxStaged = 128 << 10;  // bytes of staged X at most (larger K: the generic kernel)

template <typename T, int BITS>
struct HalfMath {  // float16 X: codes to half2 and half2 FMAs over a chunk, float across chunks
  static constexpr bool value = std::is_same<T, __half>::value && ((LLM2TRT_NBITS_HALF >> (BITS / 8)) & 1) != 0;
};

__device__ __forceinline__ __half2 h2(uint32_t bits) { return *reinterpret_cast<const __half2*>(&bits); }
__device__ __forceinline__ uint32_t h2_bits(__half2 v) { return *reinterpret_cast<const uint32_t*>(&v); }

constexpr uint32_t kMagic = 0x4B000000u;  // 2^23 as a float: a code OR-ed into it is 2^23 + code
constexpr float kMagicF = 8388608.f;

__device__ __forceinline__ float magic(uint32_t bits) { return __uint_as_float(bits | kMagic); }

// The power of two X's element e of a chunk is held times in the float INT4 dot: 16^-i for nibble
// i of its word (nibbles 5-7 are read after a shift of 12 bits), so that no nibble needs a shift.
__host__ __device__ constexpr float nibble_scale(int e) {
  return e % 8 == 0 ? 1.f
         : e % 8 == 1 ? 1.f / 16
         : e % 8 == 2 || e % 8 == 5 ? 1.f / 256
         : e % 8 == 3 || e % 8 == 6 ? 1.f / 4096
                                    : 1.f / 65536;
}

// A chunk's 16 bytes (32 INT4 codes) times X in float (x[e] held times nibble_scale(e)): sum of
// (code - zero) * x. A code becomes a float with no conversion: masked in place into the mantissa
// of 2^23 (one LOP3), the 2^23 and the zero point (times 16^i) leave in one exact subtraction.
__device__ __forceinline__ float dot_int4(const uint4& v, const uint32_t (&x)[32], uint32_t zero) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  const float zf = float(zero);
  const float m[5] = {kMagicF + zf, fmaf(zf, 16.f, kMagicF), fmaf(zf, 256.f, kMagicF), fmaf(zf, 4096.f, kMagicF),
                      fmaf(zf, 65536.f, kMagicF)};
  float even = 0.f, odd = 0.f;  // two chains: the FMAs' latency hides behind each other
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t w = words[j], h = w >> 12;  // nibbles 5-7 to bits 8-19, inside the mantissa
    const uint32_t* xj = x + 8 * j;
    even = fmaf(magic(w & 0xFu) - m[0], __uint_as_float(xj[0]), even);
    odd = fmaf(magic(w & 0xF0u) - m[1], __uint_as_float(xj[1]), odd);
    even = fmaf(magic(w & 0xF00u) - m[2], __uint_as_float(xj[2]), even);
    odd = fmaf(magic(w & 0xF000u) - m[3], __uint_as_float(xj[3]), odd);
    even = fmaf(magic(w & 0xF0000u) - m[4], __uint_as_float(xj[4]), even);
    odd = fmaf(magic(h & 0xF00u) - m[2], __uint_as_float(xj[5]), odd);
    even = fmaf(magic(h & 0xF000u) - m[3], __uint_as_float(xj[6]), even);
    odd = fmaf(magic(h & 0xF0000u) - m[4], __uint_as_float(xj[7]), odd);
  }
  return even + odd;
}

// 16 INT8 codes times X in float: each byte placed under 2^23's exponent by one byte permute.
__device__ __forceinline__ float dot_int8(const uint4& v, const uint32_t (&x)[16], uint32_t zero) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  const float m = kMagicF + float(zero);
  float even = 0.f, odd = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t* xj = x + 4 * j;
    even = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7540)) - m, __uint_as_float(xj[0]), even);
    odd = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7541)) - m, __uint_as_float(xj[1]), odd);
    even = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7542)) - m, __uint_as_float(xj[2]), even);
    odd = fmaf(__uint_as_float(__byte_perm(words[j], kMagic, 0x7543)) - m, __uint_as_float(xj[3]), odd);
  }
  return even + odd;
}

// 32 INT4 codes as (code - zero) in half2, exact, in the order X is staged for them (register 4j + p:
// codes 8j + p and 8j + p + 4): two codes a LOP3, masked into the mantissa of 1024 (nibbles 0 and 4
// of a word as 1024 + code, nibbles 1 and 5 as 1024 + 16 code), the zero point off in one HSUB2, or
// in one HFMA2 that also divides by 16.
__device__ __forceinline__ void dequantize_int4_half(const uint4& v, uint32_t zero, uint32_t (&d)[16]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  const __half2 low_zero = h2((0x6400u | zero) * 0x10001u);  // 1024 + zero, both halves
  const __half2 high_zero = __hsub2(h2(0x63806380u), low_zero);  // 960 - (1024 + zero) = -(64 + zero)
  const __half2 sixteenth = h2(0x2C002C00u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t lo = words[j], hi = words[j] >> 8;  // nibbles 2, 3, 6, 7 down to 0, 1, 4, 5
    d[4 * j] = h2_bits(__hsub2(h2((lo & 0x000F000Fu) | 0x64006400u), low_zero));
    d[4 * j + 1] = h2_bits(__hfma2(h2((lo & 0x00F000F0u) | 0x64006400u), sixteenth, high_zero));
    d[4 * j + 2] = h2_bits(__hsub2(h2((hi & 0x000F000Fu) | 0x64006400u), low_zero));
    d[4 * j + 3] = h2_bits(__hfma2(h2((hi & 0x00F000F0u) | 0x64006400u), sixteenth, high_zero));
  }
}

// (code - zero) in half2 times X in half2 (staged / 16), summed in half2 over the chunk (8 terms a
// lane of two chains), then in float.
__device__ __forceinline__ float dot_half(const uint32_t (&d)[16], const uint32_t (&x)[16]) {
  __half2 even = h2(0u), odd = h2(0u);
#pragma unroll
  for (int p = 0; p < 16; p += 2) {
    even = __hfma2(h2(d[p]), h2(x[p]), even);
    odd = __hfma2(h2(d[p + 1]), h2(x[p + 1]), odd);
  }
  const float2 e = __half22float2(even), o = __half22float2(odd);
  return (e.x + e.y) + (o.x + o.y);
}

// A chunk's 32 INT4 codes times X in half2: sum of (code - zero) * x, in float.
__device__ __forceinline__ float dot_int4_half(const uint4& v, const uint32_t (&x)[16], uint32_t zero) {
  uint32_t d[16];
  dequantize_int4_half(v, zero, d);
  return dot_half(d, x);
}

// 16 INT8 codes times X in half2 (x[p] = (x[2p], x[2p + 1]) / 256): two codes a byte permute into
// the mantissa of 1024, the zero point off in one exact HSUB2, 4 terms a lane of two chains.
__device__ __forceinline__ float dot_int8_half(const uint4& v, const uint32_t (&x)[8], uint32_t zero) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  const __half2 z = h2((0x6400u | zero) * 0x10001u);
  __half2 even = h2(0u), odd = h2(0u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    even = __hfma2(__hsub2(h2(__byte_perm(words[j], 0x64646464u, 0x4140)), z), h2(x[2 * j]), even);
    odd = __hfma2(__hsub2(h2(__byte_perm(words[j], 0x64646464u, 0x4342)), z), h2(x[2 * j + 1]), odd);
  }
  const float2 e = __half22float2(even), o = __half22float2(odd);
  return (e.x + e.y) + (o.x + o.y);
}

// A 16-byte vector of X (VEC values, skip-added and times Gamma, in float) as the dot products read
// it, at element e0 of its chunk: float16 math, pairs in half2 times 1 / kUnscale (INT4: elements p
// and p + 4 of a word, INT8: 2p and 2p + 1); float math, each value (INT4: times nibble_scale).
template <int BITS, bool HALF, int VEC>
__device__ __forceinline__ void x_registers(const float (&v)[VEC], int e0, uint32_t (&r)[HALF ? VEC / 2 : VEC]) {
  constexpr float kUnscale = HALF ? (BITS == 4 ? 16.f : 256.f) : 1.f;
  if constexpr (HALF && BITS == 4) {
#pragma unroll
    for (int p = 0; p < 4; ++p)  // pair p: elements p and p + 4 of the word
      r[p] = h2_bits(__floats2half2_rn(v[p] * (1.f / kUnscale), v[p + 4] * (1.f / kUnscale)));
  } else if constexpr (HALF) {
#pragma unroll
    for (int p = 0; p < 4; ++p)
      r[p] = h2_bits(__floats2half2_rn(v[2 * p] * (1.f / kUnscale), v[2 * p + 1] * (1.f / kUnscale)));
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) r[e] = __float_as_uint(BITS == 4 ? v[e] * nibble_scale(e0 + e) : v[e]);
  }
}

// The staged X a thread's chunk i reads: XR registers a chunk in 16-byte groups, [CI][XR / 4][cols],
// so that a warp's 32 columns read 512 contiguous bytes.
template <int XR>
__device__ __forceinline__ int staged_at(int ci, int group, int col, int cols) {
  return (ci * (XR / 4) + group) * cols + col;
}

// One row of X (see the top of the file). Thread layout: the thread in column c (of `cols`) reads
// chunks c, c + cols, ... (CI of them; E codes a 16-byte chunk) of every row it reads, and slot s
// (of blockDim / cols) rows tile * tile_rows + r * slots + s for r < RJ (and their up rows, n_out
// later, for SwiGLU); thread t < tile_rows adds the partials of row r = t / slots, s = t % slots.
// Needs K a multiple of E, the block size a multiple of E (a chunk lies in one block), 16-byte
// aligned W, X, Skip, Gamma and Sum, and cols * CI >= K / E.
// DIRECT (no norm, no skip): no staging; each thread reads its own chunks of X into registers once,
// after the wait (a block's slots read the same X: L1 serves the repeats), and keeps them for every
// tile. No shared memory for X and no barrier before the first dot products.
template <typename T, typename Y, int BITS, bool NORM, bool SKIP, bool SWIGLU, int RJ, int CI, int NT, bool DIRECT>
__global__ void __launch_bounds__(NT)
    nbits_row_kernel(const T* __restrict__ x, const T* __restrict__ skip, const T* __restrict__ gamma,
                     const uint8_t* __restrict__ w, const T* __restrict__ scales, const uint8_t* __restrict__ zeros,
                     Y* __restrict__ y, T* __restrict__ sum, int k, int n_out, int block, float epsilon, int cols,
                     bool early) {
  constexpr int E = 128 / BITS;  // codes a 16-byte chunk
  constexpr bool HALF = HalfMath<T, BITS>::value;
  constexpr int XR = HALF ? E / 2 : E;  // 32-bit registers of X a chunk
  constexpr int P = SWIGLU ? 2 * RJ : RJ;  // weight rows a thread reads a tile
  constexpr int VEC = 16 / sizeof(T);
  constexpr int VR = HALF ? VEC / 2 : VEC;  // registers a 16-byte vector of X becomes
  constexpr float kUnscale = HALF ? (BITS == 4 ? 16.f : 256.f) : 1.f;  // X is staged times 1 / kUnscale
  static_assert(!DIRECT || (!NORM && !SKIP), "X in registers: ops without norm or skip");
  extern __shared__ uint4 staged[];
  __shared__ float partial[2][NT / 32][P];
  __shared__ float squares_of[NT / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int col_bits = __ffs(cols) - 1;  // cols is a power of two
  const int col = threadIdx.x & (cols - 1), slot = threadIdx.x >> col_bits, slots = blockDim.x >> col_bits;
  const int chunks = k / E, groups = k / block, chunks_per_group = block / E;
  const size_t row_bytes = size_t(k) * BITS / 8;
  const int tile_rows = slots * RJ;
  const int tiles = (n_out + tile_rows - 1) / tile_rows;
  int group_of[CI];  // the scale group of the thread's chunk i
#pragma unroll
  for (int i = 0; i < CI; ++i) group_of[i] = (col + cols * i) / chunks_per_group;

  struct Loads {  // a tile's weights of this thread, in flight
    uint4 w[CI][P];
    T s[CI][P];
    uint32_t z[CI][P];
  };
  auto issue = [&](Loads& l, int tile) {
#pragma unroll
    for (int i = 0; i < CI; ++i) {
      const int c = col + cols * i;
#pragma unroll
      for (int q = 0; q < P; ++q) {
        const int j = min(tile * tile_rows + (q % RJ) * slots + slot, n_out - 1);  // past the end: a real row
        const size_t row = SWIGLU && q >= RJ ? size_t(j) + n_out : size_t(j);
        if (c < chunks) {
          l.w[i][q] = load_stream(w + row * row_bytes + size_t(c) * 16);
          l.s[i][q] = __ldg(scales + row * groups + group_of[i]);
          l.z[i][q] = __ldg(zeros + row * groups + group_of[i]);
        }
      }
    }
  };
  uint32_t xd[DIRECT ? CI : 1][DIRECT ? XR : 1];  // DIRECT: the thread's chunks of X
  auto dots = [&](const Loads& l, float (&acc)[P]) {
#pragma unroll
    for (int q = 0; q < P; ++q) acc[q] = 0.f;
#pragma unroll
    for (int i = 0; i < CI; ++i) {
      if (col + cols * i >= chunks) continue;  // the columns past K (uniform but for one warp)
      uint32_t xr[XR];
      if constexpr (DIRECT) {
#pragma unroll
        for (int e = 0; e < XR; ++e) xr[e] = xd[i][e];
      } else {
#pragma unroll
        for (int g = 0; g < XR / 4; ++g) {
          const uint4 v = staged[staged_at<XR>(i, g, col, cols)];
          xr[4 * g] = v.x, xr[4 * g + 1] = v.y, xr[4 * g + 2] = v.z, xr[4 * g + 3] = v.w;
        }
      }
#pragma unroll
      for (int q = 0; q < P; ++q) {
        float dot;
        if constexpr (HALF && BITS == 4)
          dot = dot_int4_half(l.w[i][q], xr, l.z[i][q]);
        else if constexpr (HALF)
          dot = dot_int8_half(l.w[i][q], xr, l.z[i][q]);
        else if constexpr (BITS == 4)
          dot = dot_int4(l.w[i][q], xr, l.z[i][q]);
        else
          dot = dot_int8(l.w[i][q], xr, l.z[i][q]);
        acc[q] = fmaf(to_float(l.s[i][q]), dot, acc[q]);
      }
    }
  };
  auto finish = [&](float (&acc)[P], int tile, int buffer) {  // rows of the tile: sums to Y
#pragma unroll
    for (int q = 0; q < P; ++q) acc[q] = warp_sum(acc[q]);
    if (lane == 0) {
#pragma unroll
      for (int q = 0; q < P; ++q) partial[buffer][warp][q] = acc[q];
    }
    __syncthreads();
    if (int(threadIdx.x) < tile_rows) {
      const int r = threadIdx.x >> (__ffs(slots) - 1), s = threadIdx.x & (slots - 1);
      const int j = tile * tile_rows + r * slots + s;
      if (j < n_out) {
        float scale = kUnscale;
        if (NORM) {
          float total = 0.f;
          for (int u = 0; u < warps; ++u) total += squares_of[u];
          scale *= rsqrtf(total / k + epsilon);
        }
        const int per_row = cols / 32;  // warps a row
        float g = 0.f, up = 0.f;
        for (int u = s * per_row; u < (s + 1) * per_row; ++u) {
          g += partial[buffer][u][r];
          if (SWIGLU) up += partial[buffer][u][RJ + r];
        }
        if (SWIGLU) {
          g *= scale;
          y[j] = from_float<Y>(g / (1.f + expf(-g)) * (up * scale));
        } else {
          y[j] = from_float<Y>(g * scale);
        }
      }
    }
  };

  int tile = blockIdx.x;
  Loads a;
  if (early) allow_dependents();  // launched with PDL: the next kernel may start its own loads
  issue(a, tile);                 // the weights do not depend on the kernel before; X does
  if (early) wait_for_inputs();

  if constexpr (DIRECT) {  // the thread's chunks: E / VEC vectors each, all loads in flight first
    uint4 xv[CI][E / VEC];
#pragma unroll
    for (int i = 0; i < CI; ++i) {
      const int c = col + cols * i;
#pragma unroll
      for (int u = 0; u < E / VEC; ++u)
        if (c < chunks) xv[i][u] = __ldg(reinterpret_cast<const uint4*>(x) + size_t(c) * (E / VEC) + u);
    }
#pragma unroll
    for (int i = 0; i < CI; ++i) {
#pragma unroll
      for (int u = 0; u < E / VEC; ++u) {
        if (col + cols * i >= chunks) continue;
        const T* xe = reinterpret_cast<const T*>(&xv[i][u]);
        float v[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = to_float(xe[e]);
        uint32_t r[VR];
        x_registers<BITS, HALF, VEC>(v, u * VEC, r);
#pragma unroll
        for (int t = 0; t < VR; ++t) xd[i][u * VR + t] = r[t];  // group u of the chunk's XR registers
      }
    }
  } else {
  // Stage X: 16-byte vectors, SV of them (of X, Skip and Gamma) a thread in flight at once.
  constexpr int SV = SKIP || NORM ? 2 : 4;
  const int vectors = k / VEC;
  const bool writes_sum = SKIP && sum != nullptr && blockIdx.x == 0;
  float squares = 0.f;
  for (int q0 = threadIdx.x; q0 < vectors; q0 += SV * blockDim.x) {
    uint4 xv[SV], sv[SV], gv[SV];
#pragma unroll
    for (int s = 0; s < SV; ++s) {
      const int q = q0 + s * blockDim.x;
      if (q < vectors) {
        xv[s] = __ldg(reinterpret_cast<const uint4*>(x) + q);
        if (SKIP) sv[s] = __ldg(reinterpret_cast<const uint4*>(skip) + q);
        if (NORM) gv[s] = __ldg(reinterpret_cast<const uint4*>(gamma) + q);
      }
    }
#pragma unroll
    for (int s = 0; s < SV; ++s) {
      const int q = q0 + s * blockDim.x;
      if (q >= vectors) break;
      const T* xe = reinterpret_cast<const T*>(&xv[s]);
      const T* se = reinterpret_cast<const T*>(&sv[s]);
      const T* ge = reinterpret_cast<const T*>(&gv[s]);
      uint4 out;
      T* oe = reinterpret_cast<T*>(&out);
      float v[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float f = to_float(xe[e]);
        if (SKIP) {
          oe[e] = from_float<T>(f + to_float(se[e]));  // the residual stream, rounded to T
          f = to_float(oe[e]);
        }
        if (NORM) {
          squares += f * f;
          f *= to_float(ge[e]);
        }
        v[e] = f;
      }
      if (writes_sum) reinterpret_cast<uint4*>(sum)[q] = out;
      const int c = q / (E / VEC), e0 = (q % (E / VEC)) * VEC;  // the vector's chunk and offset in it
      uint32_t r[VR];
      x_registers<BITS, HALF, VEC>(v, e0, r);
      const int first = (HALF ? e0 / 2 : e0) / 4;  // the vector's first 16-byte group in its chunk
#pragma unroll
      for (int g = 0; g < VR / 4; ++g)
        staged[staged_at<XR>(c >> col_bits, first + g, c & (cols - 1), cols)] =
            make_uint4(r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
    }
  }
  if (NORM) {
    squares = warp_sum(squares);
    if (lane == 0) squares_of[warp] = squares;
  }
  __syncthreads();
  }

  float acc[P];
  int next = tile + int(gridDim.x);
  dots(a, acc);
  if (next < tiles) issue(a, next);  // in flight while this tile is reduced
  finish(acc, tile, 0);
  tile = next;
  for (int buffer = 1; tile < tiles; buffer ^= 1) {  // the block's other tiles, if any
    next = tile + int(gridDim.x);
    dots(a, acc);
    if (next < tiles) issue(a, next);
    finish(acc, tile, buffer);
    tile = next;
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

// The bytes of shared memory a block may stage X in: the opt-in limit less the static arrays.
int staged_limit() {
  static const int limit = [] {
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return std::min(kMaxStaged, optin - 8192);
  }();
  return limit;
}

// The block's columns for K: the fewest (a power of two, at least a warp) whose CI chunks each
// cover a row; CI = 1 up to kRowThreads chunks, 2 up to twice that, then the wide block.
struct Shape {
  int cols, ci, threads;
};
Shape row_shape(int64_t k, int bits) {
  const int64_t chunks = k / (128 / bits);
  const int ci = chunks > kRowThreads ? 2 : 1;
  int cols = 32;
  while (cols * ci < chunks) cols *= 2;
  return {cols, ci, std::max(cols, kRowThreads)};
}
size_t staged_bytes(const Shape& s, int bits, bool half) {
  const int registers = (128 / bits) / (half ? 2 : 1);  // a chunk's
  return size_t(s.ci) * registers * 4 * s.cols;
}

// X read directly (no staging) where the op has neither norm nor skip (LLM2TRT_NBITS_DIRECT).
template <bool NORM, bool SKIP>
constexpr bool kDirect = LLM2TRT_NBITS_DIRECT != 0 && !NORM && !SKIP;

template <typename T, typename Y, int BITS, bool NORM, bool SKIP, bool SWIGLU, int RJ, int CI, int NT>
void launch_nbits(const Args& a, const Shape& s, bool early, cudaStream_t stream) {
  constexpr bool direct = kDirect<NORM, SKIP>;
  auto kernel = nbits_row_kernel<T, Y, BITS, NORM, SKIP, SWIGLU, RJ, CI, NT, direct>;
  const size_t shared = direct ? 0 : staged_bytes(s, BITS, HalfMath<T, BITS>::value);
  static const bool opted = [&] {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, staged_limit());
    return true;
  }();
  (void)opted;
  thread_local int last_threads = 0;
  thread_local size_t last_shared = 0;
  thread_local int last_blocks = 1;
  if (s.threads != last_threads || shared != last_shared) {
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, s.threads, shared);
    last_threads = s.threads;
    last_shared = shared;
    last_blocks = blocks > 0 ? blocks : 1;
  }
  const int per_sm = LLM2TRT_NBITS_BLOCKS > 0 ? std::min(LLM2TRT_NBITS_BLOCKS, last_blocks) : last_blocks;
  const int64_t tile_rows = int64_t(s.threads / s.cols) * RJ;
  const int64_t tiles = (a.n_out + tile_rows - 1) / tile_rows;
  // As many blocks as run at once at most, each with the same count of tiles (or one less); GRID 1:
  // every block that runs at once (the same where a block has one tile: all but the widest layers).
  const int64_t resident = int64_t(multiprocessors()) * per_sm;
  const int64_t rounds = (tiles + resident - 1) / resident;
  const int64_t grid = LLM2TRT_NBITS_GRID == 1 ? std::min(tiles, resident) : (tiles + rounds - 1) / rounds;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(grid));
  config.blockDim = dim3(unsigned(s.threads));
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
                     a.epsilon, s.cols, early);
}

// Rows a thread (RJ): the most that still leave TILES tiles an SM, so that small layers have every
// load of the kernel in flight at once over all SMs and wide ones read more rows for each X.
template <typename T, typename Y, int BITS, bool NORM, bool SKIP, bool SWIGLU>
void launch_nbits_rows(const Args& a, cudaStream_t stream) {
  const Shape s = row_shape(a.k, BITS);
  const bool early = compute_capability() >= 90 && a.n * a.k * BITS / 8 < LLM2TRT_PDL_BYTES;
  if (s.threads > kRowThreads) {  // one slot of up to kWideThreads columns, a row a tile
    launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 1, 2, kWideThreads>(a, s, early, stream);
    return;
  }
  const int64_t slots = s.threads / s.cols;
  int rj = LLM2TRT_NBITS_ROWS;
  if (rj == 0) {
    const int64_t want = int64_t(multiprocessors()) * LLM2TRT_NBITS_TILES;
    auto tiles = [&](int r) { return (a.n_out + slots * r - 1) / (slots * r); };
    auto fits = [&](int r) { return r * (SWIGLU ? 2 : 1) * s.ci <= LLM2TRT_NBITS_LOADS; };
    rj = fits(4) && tiles(4) >= want ? 4 : fits(2) && tiles(2) >= want ? 2 : 1;
  }
  if (s.ci == 2)
    rj >= 4 ? launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 4, 2, kRowThreads>(a, s, early, stream)
            : launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 2, 2, kRowThreads>(a, s, early, stream);
  else if (rj >= 4)
    launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 4, 1, kRowThreads>(a, s, early, stream);
  else if (rj == 2)
    launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 2, 1, kRowThreads>(a, s, early, stream);
  else
    launch_nbits<T, Y, BITS, NORM, SKIP, SWIGLU, 1, 1, kRowThreads>(a, s, early, stream);
}

template <typename T, typename Y, bool NORM, bool SKIP, bool SWIGLU>
void dispatch_nbits(const Args& a, cudaStream_t stream) {
  const int codes = a.bits == 4 ? 32 : 16;  // a 16-byte chunk's
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool half = a.bits == 4 ? HalfMath<T, 4>::value : HalfMath<T, 8>::value;
  const bool fast = a.k % codes == 0 && a.block % codes == 0 && a.k / codes <= 2 * kWideThreads &&
                    staged_bytes(row_shape(a.k, a.bits), a.bits, half) <= size_t(staged_limit()) &&
                    aligned(a.w.data) && aligned(a.x.data) && aligned(a.skip.data) && aligned(a.gamma.data) &&
                    aligned(a.sum.data);
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
