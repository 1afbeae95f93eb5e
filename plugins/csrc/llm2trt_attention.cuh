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
// Included by attention.cu (the launches) and, through ort_glue.h, by the rest for Shape.
#pragma once
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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

template <typename T, int D, int CLUSTER>
__global__ void __launch_bounds__(kThreads) decode_kernel(const T* __restrict__ qkv, T* __restrict__ cache_k,
                                                          T* __restrict__ cache_v, const int* __restrict__ seqlens,
                                                          const T* __restrict__ cos, const T* __restrict__ sin,
                                                          const T* __restrict__ q_norm, const T* __restrict__ k_norm,
                                                          T* __restrict__ out, Shape shape) {
  constexpr int LANES = D / 8;             // lanes of one token, 8 elements each
  constexpr int SUBS = kThreads / LANES;   // tokens a block works on at once
  constexpr int WARPS = kThreads / 32;
  __shared__ float warp_m[WARPS][kMaxGroup], warp_l[WARPS][kMaxGroup], warp_acc[WARPS][kMaxGroup][D];
  __shared__ float blk_m[kMaxGroup], blk_l[kMaxGroup], blk_acc[kMaxGroup][D];
  const int rank = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int group = shape.group(), entries = group * D;
  const int sub = threadIdx.x / LANES, li = threadIdx.x % LANES, d0 = li * 8, warp = threadIdx.x / 32;
  const bool low = d0 < D / 2;
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
  float kv[8], vv[8];  // this sub's next cached row, loaded one round ahead
  if (begin + sub < end && begin + sub != p) {
    load8(cache_k + head + size_t(begin + sub) * D + d0, kv);
    load8(cache_v + head + size_t(begin + sub) * D + d0, vv);
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
    }
  }
  float kn[8], vn[8];
  load8(x + size_t(shape.heads + kvh) * D + d0, kn);
  if (shape.qk_norm) head_norm<T, LANES>(kn, k_norm + d0, shape.epsilon);
  rotate<T, LANES>(kn, c, s, low);  // rounded: the cache keeps it as T
  load8(x + size_t(shape.heads + shape.kv_heads + kvh) * D + d0, vn);
  if (rank == 0 && sub == 0) {  // the only write of slot p; every block takes the new key from registers
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

template <typename T, int D, int CLUSTER>
cudaError_t launch_decode(const T* qkv, T* cache_k, T* cache_v, const int* seqlens, const T* cos, const T* sin,
                          const T* q_norm, const T* k_norm, T* out, const Shape& shape, cudaStream_t stream) {
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
  return cudaLaunchKernelEx(&config, decode_kernel<T, D, CLUSTER>, qkv, cache_k, cache_v, seqlens, cos, sin, q_norm,
                            k_norm, out, shape);
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
template <typename T, int D>
cudaError_t decode(const T* qkv, T* cache_k, T* cache_v, const int* seqlens, const T* cos, const T* sin,
                   const T* q_norm, const T* k_norm, T* out, const Shape& shape, int sms, bool clusters,
                   cudaStream_t stream) {
  const int64_t heads = std::max<int64_t>(int64_t(shape.batch) * shape.kv_heads, 1);
  const int64_t fits =
      clusters ? std::min<int64_t>(LLM2TRT_DECODE_MAX_CLUSTER, sms / (LLM2TRT_DECODE_SMS_PER_BLOCK * heads)) : 1;
  if (fits >= 8 && shape.capacity > 64)
    return launch_decode<T, D, 8>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, out, shape, stream);
  if (fits >= 4)
    return launch_decode<T, D, 4>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, out, shape, stream);
  if (fits >= 2)
    return launch_decode<T, D, 2>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, out, shape, stream);
  return launch_decode<T, D, 1>(qkv, cache_k, cache_v, seqlens, cos, sin, q_norm, k_norm, out, shape, stream);
}

// ---- prefill: RoPE + cache write, then GEMM, softmax, GEMM ----------------------------------

// One (token, row) a block: q rotated into Q [B, KVH, S, G, D]; k rotated and v into the cache.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) rope_write_kernel(const T* __restrict__ qkv, T* __restrict__ cache_k,
                                                              T* __restrict__ cache_v, const int* __restrict__ seqlens,
                                                              const T* __restrict__ cos, const T* __restrict__ sin,
                                                              const T* __restrict__ q_norm,
                                                              const T* __restrict__ k_norm, T* __restrict__ q_out,
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
      T* cache = key ? cache_k : cache_v;
      store8(cache + ((size_t(b) * shape.kv_heads + kvh) * shape.capacity + pos) * D + d0, v);
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

// A present cache apart from the past (not bound in place): each row's past, zeros after it.
template <typename T>
__global__ void present_kernel(const T* __restrict__ past_k, const T* __restrict__ past_v, T* __restrict__ present_k,
                               T* __restrict__ present_v, const int* __restrict__ seqlens, Shape shape) {
  const int64_t total = int64_t(shape.batch) * shape.kv_heads * shape.capacity * shape.head_dim;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int t = int(i / shape.head_dim % shape.capacity);
    const int b = int(i / shape.head_dim / shape.capacity / shape.kv_heads);
    const bool kept = t < past_length(shape, seqlens, b);
    present_k[i] = kept ? past_k[i] : from_float<T>(0.f);
    present_v[i] = kept ? past_v[i] : from_float<T>(0.f);
  }
}

}  // namespace attention
}  // namespace llm2trt
