// GroupQueryAttention with RoPE and an in-place KV cache: the kernels behind llm2trt's
// `GroupQueryAttention` op (ONNX Runtime's com.microsoft.GroupQueryAttention semantics for packed
// QKV, half-split rotary over the whole head, an optional local window; its body is that node).
//
// Why: ONNX Runtime's op spends four kernels a decode step (sequence lengths, a memset, RoPE +
// cache append, flash decode), ~13 us a layer on an H200 with the gaps between them. Here decode is
// ONE kernel: a cluster of blocks per (row, KV head) splits the row's tokens, each block rotates
// its q heads and the new key itself (the new key and value are used from registers and written
// to the cache by one block, so no block waits for another's write), and the cluster's blocks
// combine their partial softmaxes through distributed shared memory. Prefill (more than one
// token) runs RoPE + cache write as one kernel, then the attention as cuBLAS GEMMs around a
// masked softmax, in query chunks that bound the scratch.
//
// The Int8KV twins keep the cache in int8 codes with a float32 scale per (KV head, channel): an
// entry stands for code * scale. Every kernel below takes the cache element type C (T, or int8_t)
// as a template argument, so the float instances compile to what they were before; the int8 one of
// the decode kernel reads twice the tokens per 16-byte load (see decode_kernel), the prefill path
// dequantizes the cache into a T copy for cuBLAS.
//
// Included by attention.cu (the launches) and, through ort_glue.h, by the rest for Shape.
#pragma once
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernel_common.cuh"

namespace llm2trt {
namespace attention {

constexpr int kThreads = 128;
constexpr int kMaxGroup = 8;  // query heads per KV head the decode kernel keeps in registers

struct Shape {
  int batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int capacity = 0;    // cache slots (past_key's dim 2)
  int total = 0;       // total_sequence_length: keys a query may see, at most
  int positions = 0;   // rows of the cos/sin tables
  float scale = 0.f;
  int window = 0;             // local_window_size: keys a query sees, its own included (0: all of them)
  bool qk_norm = false;       // a per-head RMSNorm on q and k before the rotation (QNorm, KNorm scales)
  float epsilon = 0.f;        // that norm's
  bool first_prompt = false;  // seq == total: no past, rows may be padded on the right
  __host__ __device__ int group() const { return heads / kv_heads; }
};

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Each row's past length: 0 on a first prompt, else seqlens_k + 1 - seq (the new tokens end the row).
__host__ __device__ __forceinline__ int past_length(const Shape& s, const int* seqlens, int b) {
  return s.first_prompt ? 0 : seqlens[b] + 1 - s.seq;
}

// The first key a query at `pos` sees: all from 0, or its `window` latest (itself included).
__host__ __device__ __forceinline__ int first_key(const Shape& s, int pos) {
  return s.window > 0 ? (pos + 1 > s.window ? pos + 1 - s.window : 0) : 0;
}

// 8 consecutive elements as float (one 16-byte load for half, two for float) and back.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
#pragma unroll
  for (int part = 0; part < int(sizeof(T)) / 2; ++part) {
    const uint4 packed = *(reinterpret_cast<const uint4*>(p) + part);
    const T* v = reinterpret_cast<const T*>(&packed);
#pragma unroll
    for (int e = 0; e < 8 / (int(sizeof(T)) / 2); ++e) out[part * (8 / (int(sizeof(T)) / 2)) + e] = to_float(v[e]);
  }
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&in)[8]) {
#pragma unroll
  for (int part = 0; part < int(sizeof(T)) / 2; ++part) {
    uint4 packed;
    T* v = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int e = 0; e < 8 / (int(sizeof(T)) / 2); ++e) v[e] = from_float<T>(in[part * (8 / (int(sizeof(T)) / 2)) + e]);
    *(reinterpret_cast<uint4*>(p) + part) = packed;
  }
}

// ---- INT8 cache entries: code * scale[kv head, channel] ------------------------------------

template <typename C>
constexpr bool kInt8Cache = std::is_same<C, int8_t>::value;

// 8 float32 scales (two 16-byte loads).
__device__ __forceinline__ void load_scales8(const float* p, float (&out)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(p), hi = *(reinterpret_cast<const float4*>(p) + 1);
  out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
  out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
}

// 8 int8 codes (two words) as floats, exactly: each byte biased by 128 (xor 0x80) is permuted into
// the low mantissa byte of 2^23, so (2^23 + code + 128) - (2^23 + 128) = code; a PRMT and an FADD a
// code, cheaper than an I2F conversion each.
__device__ __forceinline__ void codes8(uint2 packed, float (&out)[8]) {
  const unsigned words[2] = {packed.x ^ 0x80808080u, packed.y ^ 0x80808080u};
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      out[4 * i + j] = __uint_as_float(__byte_perm(words[i], 0x4B000000u, 0x7650 + j)) - 8388736.f;
}

// value / scale rounded half to even (rintf: ONNX Round's rule) and clipped to +-127, as the body
// quantizes; `quotient` gets value / scale unrounded (0 for a zero scale, whose channel holds 0).
__host__ __device__ __forceinline__ int8_t quantize(float value, float scale, float* quotient) {
  *quotient = scale != 0.f ? value / scale : 0.f;
  return int8_t(fminf(fmaxf(rintf(*quotient), -127.f), 127.f));
}

// 8 values quantized with their 8 scales into one 8-byte word; `quotient` as quantize's.
__device__ __forceinline__ uint2 quantize8(const float (&v)[8], const float (&scale)[8], float (&quotient)[8]) {
  unsigned words[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < 8; ++e)
    words[e / 4] |= unsigned(uint8_t(quantize(v[e], scale[e], &quotient[e]))) << (8 * (e % 4));
  return make_uint2(words[0], words[1]);
}

// An empty cache slot: zero.
template <typename C>
__host__ __device__ __forceinline__ C zero_entry() {
  if constexpr (kInt8Cache<C>)
    return C(0);
  else
    return from_float<C>(0.f);
}

// Half-split RoPE on the 8 elements at dims [d0, d0 + 8) of a head whose other half sits LANES/2
// lanes away (the lanes of one head are consecutive); rounded to T as the reference stores it.
template <typename T, int LANES>
__device__ __forceinline__ void rotate(float (&v)[8], const float (&c)[8], const float (&s)[8], bool low) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float partner = __shfl_xor_sync(0xffffffffu, v[e], LANES / 2);
    v[e] = to_float(from_float<T>(low ? v[e] * c[e] - partner * s[e] : v[e] * c[e] + partner * s[e]));
  }
}

// RMSNorm over one head's D elements, 8 a lane on LANES consecutive lanes (every lane of the warp
// calls it: shuffles), times the scale's 8 at d0, rounded to T as the reference's norm output is.
template <typename T, int LANES>
__device__ __forceinline__ void head_norm(float (&v)[8], const T* gamma, float epsilon) {
  float squares = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) squares += v[e] * v[e];
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
  const float inverse = rsqrtf(squares / float(LANES * 8) + epsilon);
  float g[8];
  load8(gamma, g);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = to_float(from_float<T>(v[e] * inverse * g[e]));
}

// ---- decode: one new token a row -----------------------------------------------------------

// Two partial softmaxes (max, sum, weighted values) -> their union, in place in the first.
__device__ __forceinline__ void merge_weights(float m1, float m2, float* w1, float* w2, float* top) {
  *top = fmaxf(m1, m2);
  *w1 = m1 == -INFINITY ? 0.f : __expf(m1 - *top);
  *w2 = m2 == -INFINITY ? 0.f : __expf(m2 - *top);
}

// The INT8 cache's lanes: each sub takes two tokens a round. A lane's one 16-byte load is 16
// channels of one token (even lanes the pair's first token, odd lanes its second), and one shuffle
// with its neighbour leaves each lane its own 8 channels of both, as the float layout has them; so
// a round covers twice the tokens with the loads of the fp16 path.
__device__ __forceinline__ void int8_pair(uint4 loaded, bool odd, float (&first)[8], float (&second)[8]) {
  const uint2 own = odd ? make_uint2(loaded.z, loaded.w) : make_uint2(loaded.x, loaded.y);
  const uint2 give = odd ? make_uint2(loaded.x, loaded.y) : make_uint2(loaded.z, loaded.w);
  const uint2 got = make_uint2(__shfl_xor_sync(0xffffffffu, give.x, 1), __shfl_xor_sync(0xffffffffu, give.y, 1));
  codes8(odd ? got : own, first);
  codes8(odd ? own : got, second);
}

// C: the cache's element type, T or int8_t (the Int8KV ops: k_scale / v_scale [KVH, D] float32,
// null otherwise). With int8 the dot products run on the codes: q is scaled by KScale once, the
// values accumulate as codes and VScale multiplies the sums, and the new token (kept unquantized,
// as the body attends over it) enters as value / scale.
template <typename T, typename C, int D, int CLUSTER>
__global__ void __launch_bounds__(kThreads) decode_kernel(const T* __restrict__ qkv, C* __restrict__ cache_k,
                                                          C* __restrict__ cache_v, const int* __restrict__ seqlens,
                                                          const T* __restrict__ cos, const T* __restrict__ sin,
                                                          const T* __restrict__ q_norm, const T* __restrict__ k_norm,
                                                          const float* __restrict__ k_scale,
                                                          const float* __restrict__ v_scale, T* __restrict__ out,
                                                          Shape shape) {
  constexpr bool INT8 = kInt8Cache<C>;
  constexpr int LANES = D / 8;             // lanes of one token, 8 elements each
  constexpr int SUBS = kThreads / LANES;   // lane groups of a block; each takes a token a round (int8: two)
  constexpr int ROUND = INT8 ? 2 * SUBS : SUBS;  // tokens a block works on at once
  constexpr int WARPS = kThreads / 32;
  __shared__ float warp_m[WARPS][kMaxGroup], warp_l[WARPS][kMaxGroup], warp_acc[WARPS][kMaxGroup][D];
  __shared__ float blk_m[kMaxGroup], blk_l[kMaxGroup], blk_acc[kMaxGroup][D];
  const int rank = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int group = shape.group(), entries = group * D;
  const int sub = threadIdx.x / LANES, li = threadIdx.x % LANES, d0 = li * 8, warp = threadIdx.x / 32;
  const bool low = d0 < D / 2, odd = li % 2 == 1;
  allow_dependents();
  // The row's length, the tables and the cached rows come from before this graph ran (graph
  // inputs and initializers): read them while the kernel before (the QKV projection) finishes.
  const int p = past_length(shape, seqlens, b);  // the new token's slot and position
  if (p < 0 || p >= shape.capacity || p >= shape.positions) return;  // a whole cluster (one row) at once
  float c[8], s[8];
  load8(cos + size_t(p) * (D / 2) + d0 % (D / 2), c);
  load8(sin + size_t(p) * (D / 2) + d0 % (D / 2), s);
  const size_t head = (size_t(b) * shape.kv_heads + kvh) * shape.capacity * D;
  const int lo = first_key(shape, p), n = p + 1 - lo, chunk = (n + CLUSTER - 1) / CLUSTER;
  const int begin = lo + rank * chunk, end = min(p + 1, begin + chunk);
  float kv[8], vv[8];       // float cache: this sub's next cached row, loaded one round ahead
  uint4 rk = {}, rv = {};   // int8 cache: this lane's 16 codes of the next round, loaded ahead
  float ks[8], vs[8];       // int8 cache: the scales of this lane's channels
  // int8: the token whose 16 channels [16 * (li / 2), +16) this lane loads in the round at `base`
  const int pair_offset = 2 * sub + (odd ? 1 : 0), chunk_d = d0 - (odd ? 8 : 0);
  if constexpr (INT8) {
    load_scales8(k_scale + size_t(kvh) * D + d0, ks);
    load_scales8(v_scale + size_t(kvh) * D + d0, vs);
    const int t = begin + pair_offset;
    if (t < end && t != p) {
      rk = *reinterpret_cast<const uint4*>(cache_k + head + size_t(t) * D + chunk_d);
      rv = *reinterpret_cast<const uint4*>(cache_v + head + size_t(t) * D + chunk_d);
    }
  } else {
    if (begin + sub < end && begin + sub != p) {
      load8(cache_k + head + size_t(begin + sub) * D + d0, kv);
      load8(cache_v + head + size_t(begin + sub) * D + d0, vv);
    }
  }
  wait_for_inputs();
  const T* x = qkv + size_t(b) * (shape.heads + 2 * shape.kv_heads) * D;
  float q[kMaxGroup][8];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= group) break;
    load8(x + size_t(kvh * group + g) * D + d0, q[g]);
    if (shape.qk_norm) head_norm<T, LANES>(q[g], q_norm + d0, shape.epsilon);
#pragma unroll
    for (int e = 0; e < 8; ++e) {  // rotated in float and kept there (no rounding to T)
      const float partner = __shfl_xor_sync(0xffffffffu, q[g][e], LANES / 2);
      q[g][e] = (low ? q[g][e] * c[e] - partner * s[e] : q[g][e] * c[e] + partner * s[e]) * shape.scale;
      if constexpr (INT8) q[g][e] *= ks[e];  // q . (code * scale) = (q * scale) . code
    }
  }
  float kn[8], vn[8];
  load8(x + size_t(shape.heads + kvh) * D + d0, kn);
  if (shape.qk_norm) head_norm<T, LANES>(kn, k_norm + d0, shape.epsilon);
  rotate<T, LANES>(kn, c, s, low);  // rounded: the cache keeps it as T
  load8(x + size_t(shape.heads + shape.kv_heads + kvh) * D + d0, vn);
  if constexpr (INT8) {  // quantized into the cache; kept here as value / scale (code units, unrounded)
    const uint2 kcodes = quantize8(kn, ks, kn), vcodes = quantize8(vn, vs, vn);
    if (rank == 0 && sub == 0) {
      *reinterpret_cast<uint2*>(cache_k + head + size_t(p) * D + d0) = kcodes;
      *reinterpret_cast<uint2*>(cache_v + head + size_t(p) * D + d0) = vcodes;
    }
  } else if (rank == 0 && sub == 0) {  // the only write of slot p; every block takes the new key from registers
    store8(cache_k + head + size_t(p) * D + d0, kn);
    store8(cache_v + head + size_t(p) * D + d0, vn);
  }
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  if constexpr (INT8) {
    for (int base = begin; base < end; base += ROUND) {  // the same trip count for every lane (shuffles)
      const int ta = base + 2 * sub, tb = ta + 1;
      const uint4 ck = rk, cv = rv;
      const int next = base + ROUND + pair_offset;
      if (next < end && next != p) {
        rk = *reinterpret_cast<const uint4*>(cache_k + head + size_t(next) * D + chunk_d);
        rv = *reinterpret_cast<const uint4*>(cache_v + head + size_t(next) * D + chunk_d);
      }
      float ka[8], kb[8], va[8], vb[8];
      int8_pair(ck, odd, ka, kb);
      int8_pair(cv, odd, va, vb);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        ka[e] = ta == p ? kn[e] : ka[e];
        va[e] = ta == p ? vn[e] : va[e];
        kb[e] = tb == p ? kn[e] : kb[e];
        vb[e] = tb == p ? vn[e] : vb[e];
      }
      const bool valid_b = tb < end;
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) break;
        float da = 0.f, db = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) da += q[g][e] * ka[e], db += q[g][e] * kb[e];
#pragma unroll
        for (int o = LANES / 2; o > 0; o >>= 1) {
          da += __shfl_xor_sync(0xffffffffu, da, o);
          db += __shfl_xor_sync(0xffffffffu, db, o);
        }
        if (ta >= end) continue;
        db = valid_b ? db : -INFINITY;
        const float top = fmaxf(m[g], fmaxf(da, db)), fade = __expf(m[g] - top);
        const float wa = __expf(da - top), wb = valid_b ? __expf(db - top) : 0.f;
        l[g] = l[g] * fade + wa + wb;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = acc[g][e] * fade + wa * va[e] + wb * vb[e];
        m[g] = top;
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)  // code units to values (the merges below are linear in them)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= vs[e];
  } else {
    for (int base = begin; base < end; base += SUBS) {  // the same trip count for every lane (shuffles)
      const int t = base + sub;
      const bool valid = t < end;
      float k_now[8], v_now[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        k_now[e] = t == p ? kn[e] : kv[e];
        v_now[e] = t == p ? vn[e] : vv[e];
      }
      const int next = t + SUBS;
      if (next < end && next != p) {
        load8(cache_k + head + size_t(next) * D + d0, kv);
        load8(cache_v + head + size_t(next) * D + d0, vv);
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) break;
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += q[g][e] * k_now[e];
#pragma unroll
        for (int o = LANES / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (!valid) continue;
        const float top = fmaxf(m[g], dot), fade = __expf(m[g] - top), w = __expf(dot - top);
        l[g] = l[g] * fade + w;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = acc[g][e] * fade + w * v_now[e];
        m[g] = top;
      }
    }
  }
  // The warp's subs, then the block's warps, then the cluster's blocks: partial softmaxes merged.
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= group) break;
#pragma unroll
    for (int o = LANES; o < 32; o <<= 1) {
      float top, w1, w2;
      merge_weights(m[g], __shfl_xor_sync(0xffffffffu, m[g], o), &w1, &w2, &top);
      l[g] = l[g] * w1 + __shfl_xor_sync(0xffffffffu, l[g], o) * w2;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] = acc[g][e] * w1 + __shfl_xor_sync(0xffffffffu, acc[g][e], o) * w2;
      m[g] = top;
    }
    if (threadIdx.x % 32 < LANES) {
      if (li == 0) warp_m[warp][g] = m[g], warp_l[warp][g] = l[g];
#pragma unroll
      for (int e = 0; e < 8; ++e) warp_acc[warp][g][d0 + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < entries; i += kThreads) {
    const int g = i / D, d = i % D;
    float top = -INFINITY, sum = 0.f, value = 0.f;
#pragma unroll
    for (int r = 0; r < WARPS; ++r) {
      float w1, w2;
      merge_weights(top, warp_m[r][g], &w1, &w2, &top);
      sum = sum * w1 + warp_l[r][g] * w2;
      value = value * w1 + warp_acc[r][g][d] * w2;
    }
    blk_acc[g][d] = value;
    if (d == 0) blk_m[g] = top, blk_l[g] = sum;
  }
  T* y = out + (size_t(b) * shape.heads + size_t(kvh) * group) * D;
  __syncthreads();
  if (CLUSTER == 1) {
    for (int i = threadIdx.x; i < entries; i += kThreads) y[i] = from_float<T>(blk_acc[i / D][i % D] / blk_l[i / D]);
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Each block of the cluster finishes its share of the outputs from every block's shared memory.
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int share = (entries + CLUSTER - 1) / CLUSTER;
  for (int i = rank * share + threadIdx.x; i < min(entries, (rank + 1) * share); i += kThreads) {
    const int g = i / D, d = i % D;
    float top = -INFINITY, sum = 0.f, value = 0.f;
#pragma unroll
    for (int r = 0; r < CLUSTER; ++r) {
      float w1, w2;
      merge_weights(top, *cluster.map_shared_rank(&blk_m[g], r), &w1, &w2, &top);
      sum = sum * w1 + *cluster.map_shared_rank(&blk_l[g], r) * w2;
      value = value * w1 + *cluster.map_shared_rank(&blk_acc[g][d], r) * w2;
    }
    y[i] = from_float<T>(value / sum);
  }
  cluster.sync();  // keep every block's shared memory alive until the others have read it
#endif
}

template <typename T, typename C, int D, int CLUSTER>
cudaError_t launch_decode(const T* qkv, C* cache_k, C* cache_v, const int* seqlens, const T* cos, const T* sin,
                          const T* q_norm, const T* k_norm, const float* k_scale, const float* v_scale, T* out,
                          const Shape& shape, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(CLUSTER, unsigned(shape.kv_heads), unsigned(shape.batch));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = CLUSTER;
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attributes;
  config.numAttrs = CLUSTER > 1 ? 2 : 0;  // sm_90+: a cluster, and an early start (dependent launch)
  return cudaLaunchKernelEx(&config, decode_kernel<T, C, D, CLUSTER>, qkv, cache_k, cache_v, seqlens, cos, sin,
                            q_norm, k_norm, k_scale, v_scale, out, shape);
}

// Blocks splitting a row's tokens: up to MAX_CLUSTER (8; a cluster, sm_90+) while the grid keeps
// under one block every SMS_PER_BLOCK (2) SMs; one block a (row, KV head) before sm_90. Measured on
// an H200, 1.1B shape (scripts/sweep_decode_attention.sh): at batch 1 a cluster of 8 (32 blocks)
// beats 2 or 1 (0.956 ms a step against 1.011 and 1.088); at batch 16 (64 rows x KV heads) one
// block a row beats clusters of 2 and 4 (11,872 tok/s against 11,614 and 10,539), the merges
// costing more than the split saves on rows of 16 to 144 tokens.
#ifndef LLM2TRT_DECODE_SMS_PER_BLOCK
#define LLM2TRT_DECODE_SMS_PER_BLOCK 2
#endif
#ifndef LLM2TRT_DECODE_MAX_CLUSTER
#define LLM2TRT_DECODE_MAX_CLUSTER 8
#endif
// Whether this build targets an arch with clusters (nvcc's __CUDA_ARCH_LIST__, the same in the host
// and device passes): a library built for sm_80 runs on 8.x only, where one block a row is all
// decode launches, so its cluster instances are not compiled (a quarter of the decode kernels).
#ifdef __CUDA_ARCH_LIST__
constexpr int kBuiltArchs[] = {__CUDA_ARCH_LIST__};
constexpr bool builds_clusters() {
  for (int arch : kBuiltArchs)
    if (arch >= 900) return true;
  return false;
}
#else
constexpr bool builds_clusters() { return true; }
#endif
template <typename T, typename C, int D>
cudaError_t decode(const T* qkv, C* cache_k, C* cache_v, const int* seqlens, const T* cos, const T* sin,
                   const T* q_norm, const T* k_norm, const float* k_scale, const float* v_scale, T* out,
                   const Shape& shape, int sms, bool clusters, cudaStream_t stream) {
  if constexpr (builds_clusters()) {
    const int64_t heads = std::max<int64_t>(int64_t(shape.batch) * shape.kv_heads, 1);
    const int64_t fits =
        clusters ? std::min<int64_t>(LLM2TRT_DECODE_MAX_CLUSTER, sms / (LLM2TRT_DECODE_SMS_PER_BLOCK * heads)) : 1;
    if (fits >= 8 && shape.capacity > 64)
      return launch_decode<T, C, D, 8>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, k_scale, v_scale,
                                       out, shape, stream);
    if (fits >= 4)
      return launch_decode<T, C, D, 4>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, k_scale, v_scale,
                                       out, shape, stream);
    if (fits >= 2)
      return launch_decode<T, C, D, 2>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, k_scale, v_scale,
                                       out, shape, stream);
  }
  return launch_decode<T, C, D, 1>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, k_scale, v_scale, out,
                                   shape, stream);
}

// ---- prefill: RoPE + cache write, then GEMM, softmax, GEMM ----------------------------------

// One (token, row) a block: q rotated into Q [B, KVH, S, G, D]; k rotated and v into the cache.
// An int8 cache (C = int8_t) gets their codes, and the T copy the GEMMs read (stage_k / stage_v
// [B, KVH, total, D], dequantize_kernel's) their values unquantized, as the body attends over them.
template <typename T, typename C, int D>
__global__ void __launch_bounds__(kThreads) rope_write_kernel(const T* __restrict__ qkv, C* __restrict__ cache_k,
                                                              C* __restrict__ cache_v, const int* __restrict__ seqlens,
                                                              const T* __restrict__ cos, const T* __restrict__ sin,
                                                              const T* __restrict__ q_norm,
                                                              const T* __restrict__ k_norm,
                                                              const float* __restrict__ k_scale,
                                                              const float* __restrict__ v_scale,
                                                              T* __restrict__ stage_k, T* __restrict__ stage_v,
                                                              T* __restrict__ q_out,
                                                              Shape shape) {
  constexpr int LANES = D / 8;
  const int s_index = blockIdx.x, b = blockIdx.y, group = shape.group();
  const int pos = past_length(shape, seqlens, b) + s_index;
  if (pos < 0 || pos >= shape.capacity || pos >= shape.positions) return;  // the whole block: no shuffles left
  const int slots = shape.heads + 2 * shape.kv_heads;
  const T* x = qkv + (size_t(b) * shape.seq + s_index) * slots * D;
  const int li = threadIdx.x % LANES, d0 = li * 8;
  float c[8], s[8];
  load8(cos + size_t(pos) * (D / 2) + d0 % (D / 2), c);
  load8(sin + size_t(pos) * (D / 2) + d0 % (D / 2), s);
  for (int base = 0; base < slots * LANES; base += kThreads) {  // whole warps each round (shuffles)
    const int item = base + threadIdx.x, slot = min(item / LANES, slots - 1);
    float v[8], r[8];
    load8(x + size_t(slot) * D + d0, v);
    if (shape.qk_norm) {  // q and k normalized before the rotation; every lane (shuffles), v left as it is
      float normed[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) normed[e] = v[e];
      head_norm<T, LANES>(normed, (slot < shape.heads ? q_norm : k_norm) + d0, shape.epsilon);
      if (slot < shape.heads + shape.kv_heads) {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = normed[e];
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) r[e] = v[e];
    rotate<T, LANES>(r, c, s, d0 < D / 2);  // every lane: the shuffles need the whole warp
    if (item >= slots * LANES) continue;
    if (slot < shape.heads + shape.kv_heads) {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = r[e];
    }
    if (slot < shape.heads) {
      const int kvh = slot / group, g = slot % group;
      store8(q_out + ((((size_t(b) * shape.kv_heads + kvh) * shape.seq + s_index) * group + g) * D + d0), v);
    } else {
      const bool key = slot < shape.heads + shape.kv_heads;
      const int kvh = key ? slot - shape.heads : slot - shape.heads - shape.kv_heads;
      C* cache = key ? cache_k : cache_v;
      const size_t row = size_t(b) * shape.kv_heads + kvh;
      if constexpr (kInt8Cache<C>) {
        float scale[8], unused[8];
        load_scales8((key ? k_scale : v_scale) + size_t(kvh) * D + d0, scale);
        *reinterpret_cast<uint2*>(cache + (row * shape.capacity + pos) * D + d0) = quantize8(v, scale, unused);
        if (pos < shape.total) store8((key ? stage_k : stage_v) + (row * shape.total + pos) * D + d0, v);
      } else {
        store8(cache + (row * shape.capacity + pos) * D + d0, v);
      }
    }
  }
}

// Rows of scores [B * KVH, rows_in_chunk = chunk * G, keys] -> exp(score - row max) as T, causal
// and bounded by the row's length, and 1 / their sum in float at [B * KVH, S, G]; one warp a row.
// As flash attention does: the largest term is exactly 1 and the division waits for the float
// output, so a peaked row (an attention sink) loses nothing to T's rounding.
template <typename T>
__global__ void softmax_kernel(const float* __restrict__ scores, T* __restrict__ probs, float* __restrict__ inverse,
                               const int* __restrict__ seqlens, Shape shape, int s0, int chunk, int keys) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * warps + threadIdx.x / 32;
  const int group = shape.group();
  const int64_t per_head = int64_t(chunk) * group;
  if (row >= int64_t(shape.batch) * shape.kv_heads * per_head) return;
  const int64_t bk = row / per_head;
  const int b = int(bk / shape.kv_heads);
  const int s_index = s0 + int(row % per_head) / group;
  const int pos = past_length(shape, seqlens, b) + s_index;
  const int limit = min(keys, pos + 1), low = first_key(shape, pos);  // keys [low, limit): causal, windowed
  const float* in = scores + row * keys;
  T* p = probs + row * keys;
  float top = -INFINITY;
  for (int j = low + lane; j < limit; j += 32) top = fmaxf(top, in[j]);
  top = warp_max(top);
  float sum = 0.f;
  for (int j = low + lane; j < limit; j += 32) sum += __expf(in[j] - top);
  sum = warp_sum(sum);
  for (int j = lane; j < keys; j += 32) p[j] = from_float<T>(j >= low && j < limit ? __expf(in[j] - top) : 0.f);
  if (lane == 0) inverse[(bk * shape.seq + s_index) * group + int(row % per_head) % group] = limit > low ? 1.f / sum : 0.f;
}

// O [B, KVH, S, G, D] (float, unnormalized) / the row's sum -> output [B, S, H * D] (h = kvh * G + g).
template <typename T>
__global__ void heads_out_kernel(const float* __restrict__ o, const float* __restrict__ inverse, T* __restrict__ out,
                                 Shape shape) {
  const int D = shape.head_dim, group = shape.group();
  const int64_t total = int64_t(shape.batch) * shape.seq * shape.heads * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int d = int(i % D);
    const int h = int(i / D % shape.heads);
    const int s_index = int(i / D / shape.heads % shape.seq);
    const int b = int(i / D / shape.heads / shape.seq);
    const int kvh = h / group, g = h % group;
    const size_t row = ((size_t(b) * shape.kv_heads + kvh) * shape.seq + s_index) * group + g;
    out[i] = from_float<T>(o[row * D + d] * inverse[row]);
  }
}

// An int8 cache's first `total` slots as T [B, KVH, total, D] for the prefill GEMMs: code * scale,
// 8 channels a thread. Run before rope_write_kernel, which overwrites the new tokens' slots.
template <typename T>
__global__ void dequantize_kernel(const int8_t* __restrict__ cache_k, const int8_t* __restrict__ cache_v,
                                  const float* __restrict__ k_scale, const float* __restrict__ v_scale,
                                  T* __restrict__ stage_k, T* __restrict__ stage_v, Shape shape) {
  const int D = shape.head_dim, octets = D / 8;
  const int64_t total = int64_t(shape.batch) * shape.kv_heads * shape.total * octets;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int d0 = int(i % octets) * 8, t = int(i / octets % shape.total);
    const int64_t row = i / octets / shape.total;  // b * KVH + kv head
    const int kvh = int(row % shape.kv_heads);
    const size_t from = (size_t(row) * shape.capacity + t) * D + d0, to = (size_t(row) * shape.total + t) * D + d0;
    float codes[8], scale[8];
    codes8(*reinterpret_cast<const uint2*>(cache_k + from), codes);
    load_scales8(k_scale + size_t(kvh) * D + d0, scale);
#pragma unroll
    for (int e = 0; e < 8; ++e) codes[e] *= scale[e];
    store8(stage_k + to, codes);
    codes8(*reinterpret_cast<const uint2*>(cache_v + from), codes);
    load_scales8(v_scale + size_t(kvh) * D + d0, scale);
#pragma unroll
    for (int e = 0; e < 8; ++e) codes[e] *= scale[e];
    store8(stage_v + to, codes);
  }
}

// A present cache apart from the past (not bound in place): each row's past, zeros after it.
template <typename C>
__global__ void present_kernel(const C* __restrict__ past_k, const C* __restrict__ past_v, C* __restrict__ present_k,
                               C* __restrict__ present_v, const int* __restrict__ seqlens, Shape shape) {
  const int64_t total = int64_t(shape.batch) * shape.kv_heads * shape.capacity * shape.head_dim;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int t = int(i / shape.head_dim % shape.capacity);
    const int b = int(i / shape.head_dim / shape.capacity / shape.kv_heads);
    const bool kept = t < past_length(shape, seqlens, b);
    present_k[i] = kept ? past_k[i] : zero_entry<C>();
    present_v[i] = kept ? past_v[i] : zero_entry<C>();
  }
}

}  // namespace attention
}  // namespace llm2trt
