// MoE (routed experts) on CUDA: Y[n] = sum_j w[n, j] * Down[e] @ (silu(Gate[e] @ X[n]) * (Up[e] @ X[n])),
// e = ids[n, j] - first_expert, ids outside [0, E) adding nothing. GateUp is [E, 2I, H] (gate rows,
// then up rows), Down [E, H, I]: a row per output, so every dot product runs along contiguous memory.
//
// Three paths read only the routed experts' weights; a fourth (dense) reads them all:
//   pairs    (decode, few rows): a warp per (row, expert, output): gate/up GEMV into h [N*k, I], then
//            Down GEMV that sums each row's k experts in j order and writes Y. Two kernels, no
//            routing pass; pairs that share an expert run in neighbouring blocks, so it comes from L2.
//   grouped  (a few rows: under 16 an expert on average): a routing kernel lists each expert's pairs,
//            then each expert's weight rows are read once and applied to all its rows (GEMV over
//            up to kGroupRows rows at once), per-pair outputs in float, and a combine kernel sums
//            them per row in j order. Four kernels, no host synchronization.
//   gemm     (prefill: many rows per expert): the same routing, the rows gathered by expert, then
//            cuBLAS GEMMs for gate/up and for Down (tensor cores): one strided-batched call each,
//            every expert padded to the busiest one's rows, unless that more than doubles the rows
//            (then one call per expert). It reads the expert counts back to the host (one
//            synchronization), so it is never used while a CUDA graph is being captured.
//   dense    (prefill under CUDA-graph capture): every expert of the block for every row, no
//            routing and no host synchronization: gate/up as one cuBLAS GEMM over all experts'
//            rows, SwiGLU into h [E, N, I], Down as one strided-batched GEMM into float [E, N, H],
//            then a combine kernel picks each row's routed experts. E/k times the routed work, but
//            on tensor cores, where the grouped GEMV runs the routed work on CUDA cores.
// Every path accumulates in float32 (dense rounds where gemm does: gate/up and h in the element
// type; the GEMV paths round h only); per-pair results do not depend on their position in the
// expert's list, and each row's experts are summed in j order: the output is deterministic.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernel_common.cuh"
#include "ort_glue.h"

namespace llm2trt {
namespace {

constexpr int kWarps = 4;  // warps a block; each warp computes one output element (of each of its rows)
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxK = 8;       // experts a row on the pairs path (its down kernel keeps them in registers)
constexpr int kGroupRows = 8;  // rows a grouped warp applies one weight row to in one pass
constexpr int kRouteThreads = 1024;

// VEC elements at p + c * VEC, in float: one 16-byte load where VEC > 1. WEIGHT: streamed past L1
// (load_stream), where the rows of X and h are re-read.
template <typename T, int VEC, bool WEIGHT>
__device__ __forceinline__ void load(const T* __restrict__ p, int c, float (&out)[VEC]) {
  if constexpr (VEC > 1) {
    const uint4* at = reinterpret_cast<const uint4*>(p) + c;
    const uint4 packed = WEIGHT ? load_stream(at) : __ldg(at);
    const T* v = reinterpret_cast<const T*>(&packed);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = to_float(v[e]);
  } else {
    out[0] = to_float(p[c]);
  }
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

__device__ __forceinline__ int64_t local_expert(const int64_t* ids, int64_t p, int64_t first, int64_t experts) {
  const int64_t e = ids[p] - first;
  return e >= 0 && e < experts ? e : -1;
}

struct Dims {
  int k, hidden, inter, experts;
  int64_t first;
};

// ---- pairs -------------------------------------------------------------------------------------

// h[p, i] for pair p = n * k + j: blockIdx.x is the pair (fastest, so pairs sharing an expert read
// the same rows at about the same time), blockIdx.y a range of kWarps outputs i.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) pair_gate_up_kernel(const T* __restrict__ x, const int64_t* __restrict__ ids,
                                                                 const T* __restrict__ gate_up, T* __restrict__ h,
                                                                 Dims d) {
  const int p = blockIdx.x, lane = threadIdx.x % 32;
  const int i = blockIdx.y * kWarps + threadIdx.x / 32;
  const int64_t e = local_expert(ids, p, d.first, d.experts);
  if (i >= d.inter || e < 0) return;  // an expert elsewhere: the down kernel skips the pair
  const T* gate = gate_up + (size_t(e) * 2 * d.inter + i) * d.hidden;
  const T* up = gate + size_t(d.inter) * d.hidden;
  const T* row = x + size_t(p / d.k) * d.hidden;
  float g = 0.f, u = 0.f;
  const int chunks = d.hidden / VEC;
#pragma unroll 4
  for (int c = lane; c < chunks; c += 32) {
    float wg[VEC], wu[VEC], xv[VEC];
    load<T, VEC, true>(gate, c, wg);
    load<T, VEC, true>(up, c, wu);
    load<T, VEC, false>(row, c, xv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      g += wg[v] * xv[v];
      u += wu[v] * xv[v];
    }
  }
  g = warp_sum(g);
  u = warp_sum(u);
  if (lane == 0) h[size_t(p) * d.inter + i] = from_float<T>(silu(g) * u);
}

// Y[n, o] = sum_j w[n, j] * Down[e_j][o] . h[n * k + j]: blockIdx.y is the row, a warp an output.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) pair_down_kernel(const int64_t* __restrict__ ids,
                                                              const float* __restrict__ weights,
                                                              const T* __restrict__ down, const T* __restrict__ h,
                                                              T* __restrict__ y, Dims d) {
  const int n = blockIdx.y, lane = threadIdx.x % 32;
  const int o = blockIdx.x * kWarps + threadIdx.x / 32;
  if (o >= d.hidden) return;
  const T* rows[kMaxK];
  const T* vecs[kMaxK];
  float acc[kMaxK];
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) {
    const int64_t p = int64_t(n) * d.k + j;
    const int64_t e = j < d.k ? local_expert(ids, p, d.first, d.experts) : -1;
    rows[j] = e >= 0 ? down + (size_t(e) * d.hidden + o) * d.inter : nullptr;
    vecs[j] = h + size_t(p) * d.inter;
    acc[j] = 0.f;
  }
  const int chunks = d.inter / VEC;
#pragma unroll 2
  for (int c = lane; c < chunks; c += 32) {
#pragma unroll
    for (int j = 0; j < kMaxK; ++j) {
      if (rows[j] == nullptr) continue;
      float wv[VEC], hv[VEC];
      load<T, VEC, true>(rows[j], c, wv);
      load<T, VEC, false>(vecs[j], c, hv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[j] += wv[v] * hv[v];
    }
  }
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxK; ++j)
    if (rows[j] != nullptr) total += weights[int64_t(n) * d.k + j] * warp_sum(acc[j]);  // j in order
  if (lane == 0) y[size_t(n) * d.hidden + o] = from_float<T>(total);
}

// ---- routing -----------------------------------------------------------------------------------

// Where each expert's rows are. One block: counts per expert, their prefix (offsets[E + 1]), the
// experts with rows (active[0 .. *active_count)), and each held pair's position in its expert's
// range (pair_pos, -1 for an expert elsewhere) with its inverse (sorted_pair).
struct Routing {
  int* offsets;
  int* active;
  int* active_count;
  int* sorted_pair;
  int* pair_pos;
};

__global__ void __launch_bounds__(kRouteThreads) route_kernel(const int64_t* __restrict__ ids, int pairs, Dims d,
                                                              Routing r) {
  extern __shared__ int shared[];
  int* count = shared;              // [E]
  int* cursor = shared + d.experts;  // [E]
  for (int e = threadIdx.x; e < d.experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t e = local_expert(ids, p, d.first, d.experts);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E is at most a few hundred: a serial scan is a few microseconds at worst
    int run = 0, active = 0;
    for (int e = 0; e < d.experts; ++e) {
      r.offsets[e] = cursor[e] = run;
      if (count[e] > 0) r.active[active++] = e;
      run += count[e];
    }
    r.offsets[d.experts] = run;
    *r.active_count = active;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int64_t e = local_expert(ids, p, d.first, d.experts);
    int pos = -1;
    if (e >= 0) {
      pos = atomicAdd(&cursor[e], 1);
      r.sorted_pair[pos] = p;
    }
    r.pair_pos[p] = pos;
  }
}

// ---- grouped -----------------------------------------------------------------------------------

// h[pos, i] for every pair routed to the expert of active slot blockIdx.x: the warp reads gate and
// up row i once per kGroupRows rows (the expert's rows are few when this path runs).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) group_gate_up_kernel(const T* __restrict__ x, const T* __restrict__ gate_up,
                                                                  T* __restrict__ h, Routing r, Dims d) {
  if (int(blockIdx.x) >= *r.active_count) return;
  const int e = r.active[blockIdx.x], lane = threadIdx.x % 32;
  const int i = blockIdx.y * kWarps + threadIdx.x / 32;
  if (i >= d.inter) return;
  const T* gate = gate_up + (size_t(e) * 2 * d.inter + i) * d.hidden;
  const T* up = gate + size_t(d.inter) * d.hidden;
  const int begin = r.offsets[e], end = r.offsets[e + 1], chunks = d.hidden / VEC;
  for (int r0 = begin; r0 < end; r0 += kGroupRows) {
    const int m = min(kGroupRows, end - r0);
    const T* xs[kGroupRows];
    float g[kGroupRows], u[kGroupRows];
#pragma unroll
    for (int q = 0; q < kGroupRows; ++q) {
      xs[q] = x + size_t(r.sorted_pair[r0 + min(q, m - 1)] / d.k) * d.hidden;
      g[q] = u[q] = 0.f;
    }
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
      float wg[VEC], wu[VEC];
      load<T, VEC, true>(gate, c, wg);
      load<T, VEC, true>(up, c, wu);
#pragma unroll
      for (int q = 0; q < kGroupRows; ++q) {
        if (q >= m) break;
        float xv[VEC];
        load<T, VEC, false>(xs[q], c, xv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          g[q] += wg[v] * xv[v];
          u[q] += wu[v] * xv[v];
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kGroupRows; ++q) {
      if (q >= m) break;
      const float gs = warp_sum(g[q]), us = warp_sum(u[q]);
      if (lane == 0) h[size_t(r0 + q) * d.inter + i] = from_float<T>(silu(gs) * us);
    }
  }
}

// out[pos, o] = Down[e][o] . h[pos], in float, for every pair of the expert of slot blockIdx.x.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) group_down_kernel(const T* __restrict__ down, const T* __restrict__ h,
                                                               float* __restrict__ out, Routing r, Dims d) {
  if (int(blockIdx.x) >= *r.active_count) return;
  const int e = r.active[blockIdx.x], lane = threadIdx.x % 32;
  const int o = blockIdx.y * kWarps + threadIdx.x / 32;
  if (o >= d.hidden) return;
  const T* row = down + (size_t(e) * d.hidden + o) * d.inter;
  const int begin = r.offsets[e], end = r.offsets[e + 1], chunks = d.inter / VEC;
  for (int r0 = begin; r0 < end; r0 += kGroupRows) {
    const int m = min(kGroupRows, end - r0);
    float acc[kGroupRows];
#pragma unroll
    for (int q = 0; q < kGroupRows; ++q) acc[q] = 0.f;
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
      float wv[VEC];
      load<T, VEC, true>(row, c, wv);
#pragma unroll
      for (int q = 0; q < kGroupRows; ++q) {
        if (q >= m) break;
        float hv[VEC];
        load<T, VEC, false>(h + size_t(r0 + q) * d.inter, c, hv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[q] += wv[v] * hv[v];
      }
    }
#pragma unroll
    for (int q = 0; q < kGroupRows; ++q) {
      if (q >= m) break;
      const float total = warp_sum(acc[q]);
      if (lane == 0) out[size_t(r0 + q) * d.hidden + o] = total;
    }
  }
}

// Y[n, o] = sum_j w[n, j] * out[pair_pos[n * k + j], o], j in order.
template <typename T>
__global__ void combine_kernel(const float* __restrict__ out, const int* __restrict__ pair_pos,
                               const float* __restrict__ weights, T* __restrict__ y, int64_t rows, Dims d) {
  const int64_t total = rows * d.hidden;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / d.hidden, o = i % d.hidden;
    float sum = 0.f;
    for (int j = 0; j < d.k; ++j) {
      const int pos = pair_pos[n * d.k + j];
      if (pos >= 0) sum += weights[n * d.k + j] * out[size_t(pos) * d.hidden + o];
    }
    y[i] = from_float<T>(sum);
  }
}

// ---- gemm (cuBLAS) -------------------------------------------------------------------------------

// xs[pos] = X[n] for each held pair: the rows gathered by expert.
template <typename T>
__global__ void gather_kernel(const T* __restrict__ x, const int* __restrict__ pair_pos, T* __restrict__ xs,
                              int64_t pairs, Dims d) {
  const int64_t total = pairs * d.hidden;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i / d.hidden, c = i % d.hidden;
    const int pos = pair_pos[p];
    if (pos >= 0) xs[size_t(pos) * d.hidden + c] = x[(p / d.k) * d.hidden + c];
  }
}

// h[pos] = silu(gu[pos, :I]) * gu[pos, I:] for the first `held` positions.
template <typename T>
__global__ void swiglu_kernel(const T* __restrict__ gu, T* __restrict__ h, int64_t held, int inter) {
  const int64_t total = held * inter;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pos = i / inter, j = i % inter;
    const float g = to_float(gu[pos * 2 * inter + j]), u = to_float(gu[pos * 2 * inter + inter + j]);
    h[i] = from_float<T>(silu(g) * u);
  }
}

// Each held pair's position in a layout of `cap` rows per expert (expert e's rows start at e * cap),
// so one strided-batched GEMM covers every expert.
__global__ void pad_kernel(const int64_t* __restrict__ ids, const int* __restrict__ offsets, int* __restrict__ pair_pos,
                           int64_t pairs, int cap, Dims d) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < pairs; p += int64_t(gridDim.x) * blockDim.x) {
    const int pos = pair_pos[p];
    if (pos < 0) continue;
    const int e = int(ids[p] - d.first);
    pair_pos[p] = e * cap + pos - offsets[e];
  }
}

// ---- dense (cuBLAS, capture-safe) --------------------------------------------------------------

// h[e, n, j] = silu(gu[n, e, j]) * gu[n, e, I + j]: gate/up came out of one GEMM as [rows, E, 2I];
// h is laid out by expert for Down's strided-batched GEMM.
template <typename T>
__global__ void dense_swiglu_kernel(const T* __restrict__ gu, T* __restrict__ h, int64_t rows, Dims d) {
  const int64_t total = int64_t(d.experts) * rows * d.inter;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % d.inter, en = i / d.inter, n = en % rows, e = en / rows;
    const T* at = gu + (n * d.experts + e) * 2 * d.inter;
    const float g = to_float(at[j]), u = to_float(at[d.inter + j]);
    h[i] = from_float<T>(silu(g) * u);
  }
}

// Y[n, o] = sum_j w[n, j] * out[e_j, n, o], j in order, experts outside the block adding nothing.
template <typename T>
__global__ void dense_combine_kernel(const float* __restrict__ out, const int64_t* __restrict__ ids,
                                     const float* __restrict__ weights, T* __restrict__ y, int64_t rows, Dims d) {
  const int64_t total = rows * d.hidden;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / d.hidden, o = i % d.hidden;
    float sum = 0.f;
    for (int j = 0; j < d.k; ++j) {
      const int64_t e = local_expert(ids, n * d.k + j, d.first, d.experts);
      if (e >= 0) sum += weights[n * d.k + j] * out[(e * rows + n) * d.hidden + o];
    }
    y[i] = from_float<T>(sum);
  }
}

// ---- launches ----------------------------------------------------------------------------------

enum class Path { kPairs, kGrouped, kGemm, kDense };

size_t rounded(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The scratch a path needs, carved in this order: routing lists, h, the per-pair outputs, then the
// gathered rows and gate/up for cuBLAS.
struct Layout {
  size_t routing = 0, h = 0, out = 0, xs = 0, gu = 0;
  size_t total() const { return routing + h + out + xs + gu; }
};

// The dense path's buffers grow with E * rows; past this it runs the rows in chunks (each row's
// result does not depend on its chunk), so a long prefill over many experts stays bounded.
constexpr size_t kDenseScratch = size_t(512) << 20;

// Rows a dense chunk: as many as fit kDenseScratch, the chunks balanced.
int64_t dense_chunk(const Dims& d, int64_t rows, size_t element) {
  const size_t per_row = size_t(d.experts) * (3 * size_t(d.inter) * element + size_t(d.hidden) * sizeof(float));
  const int64_t most = std::max<int64_t>(1, int64_t(kDenseScratch / std::max<size_t>(per_row, 1)));
  const int64_t chunks = (rows + most - 1) / most;
  return (rows + chunks - 1) / chunks;
}

// The dense path's buffers for `rows` rows: gate/up [rows, E, 2I], h [E, rows, I], out [E, rows, H].
Layout dense_rows(const Dims& d, int64_t rows, size_t element) {
  Layout l;
  l.gu = rounded(size_t(rows) * d.experts * 2 * d.inter * element);
  l.h = rounded(size_t(rows) * d.experts * d.inter * element);
  l.out = rounded(size_t(rows) * d.experts * d.hidden * sizeof(float));
  return l;
}

Layout layout(Path path, const Dims& d, int64_t pairs, size_t element) {
  if (path == Path::kDense) return dense_rows(d, dense_chunk(d, pairs / d.k, element), element);
  Layout l;
  l.routing = path == Path::kPairs ? 0 : rounded((size_t(d.experts) * 2 + 2 + size_t(pairs) * 2) * sizeof(int));
  if (path == Path::kGemm) return l;  // its row buffers are sized once the counts are known
  l.h = rounded(size_t(pairs) * d.inter * element);
  if (path == Path::kPairs) return l;
  l.out = rounded(size_t(pairs) * d.hidden * sizeof(float));
  return l;
}

// The gemm path's row buffers for `rows` rows: gathered X, gate/up, h, and Down's float output.
Layout gemm_rows(const Dims& d, int64_t rows, size_t element) {
  Layout l;
  l.xs = rounded(size_t(rows) * d.hidden * element);
  l.gu = rounded(size_t(rows) * 2 * d.inter * element);
  l.h = rounded(size_t(rows) * d.inter * element);
  l.out = rounded(size_t(rows) * d.hidden * sizeof(float));
  return l;
}

Routing routing_in(char* base, const Dims& d, int64_t pairs) {
  int* ints = reinterpret_cast<int*>(base);
  return Routing{ints, ints + d.experts + 1, ints + 2 * d.experts + 1, ints + 2 * d.experts + 2,
                 ints + 2 * d.experts + 2 + pairs};
}

struct Call {  // one call's tensors, as raw pointers
  const void *x, *gate_up, *down;
  const int64_t* ids;
  const float* weights;
  void* y;
  int64_t rows;
};

unsigned tiles(int outputs) { return unsigned((outputs + kWarps - 1) / kWarps); }

template <typename T, int VEC>
void launch_pairs(const Call& c, const Dims& d, char* scratch, cudaStream_t stream) {
  T* h = reinterpret_cast<T*>(scratch);
  pair_gate_up_kernel<T, VEC><<<dim3(unsigned(c.rows * d.k), tiles(d.inter)), kThreads, 0, stream>>>(
      static_cast<const T*>(c.x), c.ids, static_cast<const T*>(c.gate_up), h, d);
  pair_down_kernel<T, VEC><<<dim3(tiles(d.hidden), unsigned(c.rows)), kThreads, 0, stream>>>(
      c.ids, c.weights, static_cast<const T*>(c.down), h, static_cast<T*>(c.y), d);
}

void launch_route(const Call& c, const Dims& d, const Routing& r, cudaStream_t stream) {
  route_kernel<<<1, kRouteThreads, 2 * size_t(d.experts) * sizeof(int), stream>>>(c.ids, int(c.rows * d.k), d, r);
}

template <typename T, int VEC>
void launch_grouped(const Call& c, const Dims& d, char* scratch, cudaStream_t stream) {
  const int64_t pairs = c.rows * d.k;
  const Layout l = layout(Path::kGrouped, d, pairs, sizeof(T));
  const Routing r = routing_in(scratch, d, pairs);
  T* h = reinterpret_cast<T*>(scratch + l.routing);
  float* out = reinterpret_cast<float*>(scratch + l.routing + l.h);
  const unsigned slots = unsigned(std::min<int64_t>(d.experts, pairs));
  launch_route(c, d, r, stream);
  group_gate_up_kernel<T, VEC><<<dim3(slots, tiles(d.inter)), kThreads, 0, stream>>>(
      static_cast<const T*>(c.x), static_cast<const T*>(c.gate_up), h, r, d);
  group_down_kernel<T, VEC><<<dim3(slots, tiles(d.hidden)), kThreads, 0, stream>>>(static_cast<const T*>(c.down), h,
                                                                                   out, r, d);
  combine_kernel<T><<<stride_blocks(c.rows * d.hidden), 256, 0, stream>>>(out, r.pair_pos, c.weights,
                                                                           static_cast<T*>(c.y), c.rows, d);
}

template <typename T>
constexpr int cuda_type() {
  return sizeof(T) == 4 ? kCudaR32F : std::is_same_v<T, __half> ? kCudaR16F : kCudaR16BF;
}

// cuBLAS calls for the gemm path: row buffers laid out either packed (each expert's rows after the
// previous expert's) or padded (`cap` rows an expert, one strided-batched call for all experts).
struct GemmPlan {
  void* handle;
  std::vector<int> offsets;  // [E + 1], on the host
  int cap = 0;               // rows an expert when padded; 0: packed, one call per expert
};

OrtStatus* cublas_failed(const char* what, int rc) {
  static char message[96];
  std::snprintf(message, sizeof message, "llm2trt MoE: %s failed (status %d)", what, rc);
  return error(message);
}

// out[rows of e] = in[rows of e] @ W[e]^T for every expert: W [E, n, k] row-major, in [rows, k],
// out [rows, n] (column-major: out^T (n x m) = W[e] (k x n)^T . in^T), out_type T or float32.
template <typename T>
OrtStatus* expert_gemms(const GemmPlan& plan, int n, int k, int experts, const T* w, const T* in, void* out,
                        int out_type, size_t out_element) {
  const float one = 1.f, zero = 0.f;
  const int type = cuda_type<T>();
  if (plan.cap > 0) {
    BatchedGemmFn batched = cublas_batched_gemm();
    const int rc = batched(plan.handle, kOpT, kOpN, n, plan.cap, k, &one, w, type, k, (long long)n * k, in, type, k,
                           (long long)plan.cap * k, &zero, out, out_type, n, (long long)plan.cap * n, experts,
                           kComputeF32, kGemmDefault);
    return rc == 0 ? nullptr : cublas_failed("cublasGemmStridedBatchedEx", rc);
  }
  GemmExFn gemm = cublas_gemm();
  for (int e = 0; e < experts; ++e) {
    const int begin = plan.offsets[e], m = plan.offsets[e + 1] - begin;
    if (m == 0) continue;
    const int rc = gemm(plan.handle, kOpT, kOpN, n, m, k, &one, w + size_t(e) * n * k, type, k, in + size_t(begin) * k,
                        type, k, &zero, static_cast<char*>(out) + size_t(begin) * n * out_element, out_type, n,
                        kComputeF32, kGemmDefault);
    if (rc != 0) return cublas_failed("cublasGemmEx", rc);
  }
  return nullptr;
}

// Routing on the GPU, the counts read back (the one synchronization), the rows gathered by expert,
// then gate/up and Down as cuBLAS GEMMs over each expert's rows. Padded to the busiest expert's
// count where that at most doubles the rows: two cuBLAS calls instead of two per expert, whose host
// cost dominates a prefill of many experts.
template <typename T>
OrtStatus* launch_gemm(const Call& c, const Dims& d, char* scratch, OrtKernelContext* context, cudaStream_t stream) {
  const int64_t pairs = c.rows * d.k;
  const Routing r = routing_in(scratch, d, pairs);
  GemmPlan plan;
  ORT_TRY(cublas_handle(context, &plan.handle));
  launch_route(c, d, r, stream);
  ORT_TRY(launched("MoE"));
  plan.offsets.resize(size_t(d.experts) + 1);
  if (cudaMemcpyAsync(plan.offsets.data(), r.offsets, plan.offsets.size() * sizeof(int), cudaMemcpyDeviceToHost,
                      stream) != cudaSuccess ||
      cudaStreamSynchronize(stream) != cudaSuccess)
    return launched("MoE (reading the expert counts)");
  const int64_t held = plan.offsets[d.experts];
  int busiest = 0;
  for (int e = 0; e < d.experts; ++e) busiest = std::max(busiest, plan.offsets[e + 1] - plan.offsets[e]);
  if (cublas_batched_gemm() != nullptr && int64_t(busiest) * d.experts <= 2 * held) plan.cap = busiest;
  const int64_t rows = plan.cap > 0 ? int64_t(plan.cap) * d.experts : held;
  const Layout l = gemm_rows(d, rows, sizeof(T));
  Scratch buffers;
  ORT_TRY(buffers.get(context, std::max<size_t>(l.total(), 256)));
  char* base = static_cast<char*>(buffers.data);
  T* xs = reinterpret_cast<T*>(base);
  T* gu = reinterpret_cast<T*>(base + l.xs);
  T* h = reinterpret_cast<T*>(base + l.xs + l.gu);
  float* out = reinterpret_cast<float*>(base + l.xs + l.gu + l.h);
  if (plan.cap > 0)
    pad_kernel<<<stride_blocks(pairs), 256, 0, stream>>>(c.ids, r.offsets, r.pair_pos, pairs, plan.cap, d);
  if (held > 0) {
    gather_kernel<T><<<stride_blocks(pairs * d.hidden), 256, 0, stream>>>(static_cast<const T*>(c.x), r.pair_pos,
                                                                           xs, pairs, d);
    ORT_TRY(launched("MoE"));
    const int H = d.hidden, I = d.inter;
    ORT_TRY(expert_gemms<T>(plan, 2 * I, H, d.experts, static_cast<const T*>(c.gate_up), xs, gu, cuda_type<T>(),
                            sizeof(T)));
    swiglu_kernel<T><<<stride_blocks(rows * I), 256, 0, stream>>>(gu, h, rows, I);
    ORT_TRY(expert_gemms<T>(plan, H, I, d.experts, static_cast<const T*>(c.down), h, out, kCudaR32F, sizeof(float)));
  }
  combine_kernel<T><<<stride_blocks(c.rows * d.hidden), 256, 0, stream>>>(out, r.pair_pos, c.weights,
                                                                           static_cast<T*>(c.y), c.rows, d);
  return launched("MoE");
}

// Every expert for every row, chunk by chunk: gate/up as one GEMM (GateUp viewed as [E * 2I, H]),
// SwiGLU, Down as one strided-batched GEMM over the experts into float, then the combine. No
// routing pass and nothing read back, so it can be captured in a CUDA graph.
template <typename T>
OrtStatus* launch_dense(const Call& c, const Dims& d, char* scratch, OrtKernelContext* context, cudaStream_t stream) {
  void* handle = nullptr;
  ORT_TRY(cublas_handle(context, &handle));
  GemmExFn gemm = cublas_gemm();
  BatchedGemmFn batched = cublas_batched_gemm();
  const int64_t chunk = dense_chunk(d, c.rows, sizeof(T));
  const Layout l = dense_rows(d, chunk, sizeof(T));
  T* gu = reinterpret_cast<T*>(scratch);
  T* h = reinterpret_cast<T*>(scratch + l.gu);
  float* out = reinterpret_cast<float*>(scratch + l.gu + l.h);
  const int H = d.hidden, I = d.inter, E = d.experts, type = cuda_type<T>();
  const float one = 1.f, zero = 0.f;
  for (int64_t r0 = 0; r0 < c.rows; r0 += chunk) {
    const int m = int(std::min(chunk, c.rows - r0));
    const T* x = static_cast<const T*>(c.x) + size_t(r0) * H;
    // gu (m x E*2I, row-major) = X @ GateUp^T; column-major: gu^T = GateUp (H x E*2I)^T . X^T.
    int rc = gemm(handle, kOpT, kOpN, E * 2 * I, m, H, &one, c.gate_up, type, H, x, type, H, &zero, gu, type, E * 2 * I,
                  kComputeF32, kGemmDefault);
    if (rc != 0) return cublas_failed("cublasGemmEx", rc);
    dense_swiglu_kernel<T><<<stride_blocks(int64_t(E) * m * I), 256, 0, stream>>>(gu, h, m, d);
    ORT_TRY(launched("MoE"));
    // out[e] (m x H) = h[e] @ Down[e]^T for every expert, in float.
    rc = batched(handle, kOpT, kOpN, H, m, I, &one, c.down, type, I, (long long)H * I, h, type, I, (long long)m * I,
                 &zero, out, kCudaR32F, H, (long long)m * H, E, kComputeF32, kGemmDefault);
    if (rc != 0) return cublas_failed("cublasGemmStridedBatchedEx", rc);
    dense_combine_kernel<T><<<stride_blocks(int64_t(m) * H), 256, 0, stream>>>(
        out, c.ids + r0 * d.k, c.weights + r0 * d.k, static_cast<T*>(c.y) + size_t(r0) * H, m, d);
    ORT_TRY(launched("MoE"));
  }
  return nullptr;
}

// $LLM2TRT_MOE_PATH (pairs, grouped, gemm or dense) forces a path: scripts/check_moe_kernel.py checks and
// times each one. Read per call, so one process can compare them.
Path forced_path(Path chosen, bool capturing, bool cublas, int k) {
  const char* name = std::getenv("LLM2TRT_MOE_PATH");
  if (name == nullptr) return chosen;
  if (std::strcmp(name, "pairs") == 0 && k <= kMaxK) return Path::kPairs;
  if (std::strcmp(name, "grouped") == 0) return Path::kGrouped;
  if (std::strcmp(name, "gemm") == 0 && cublas && !capturing) return Path::kGemm;
  if (std::strcmp(name, "dense") == 0 && cublas) return Path::kDense;
  return chosen;
}

// Pairs for one row (two kernels, no routing pass), cuBLAS once an expert has 16 rows on average,
// the grouped GEMV between (and whenever cuBLAS cannot run). Measured on an H100 (H 2048, I 1024):
// from 4 rows the grouped path beats pairs, even when few rows share an expert (64 experts, k 8).
// Those rows under capture go dense (gemm reads counts back): at N 512, 12x (E 8, k 2) and 6x (E 64,
// k 8) faster than grouped; outside capture gemm stays, as fast or faster (199 vs 217, 544 vs 924 µs).
// `cublas`: both cuBLAS entry points and a handle to call them with (TensorRT's face has none).
Path choose(const Dims& d, int64_t rows, bool capturing, bool cublas) {
  const int64_t pairs = rows * d.k;
  Path path = Path::kGrouped;
  if (d.k <= kMaxK && rows == 1) path = Path::kPairs;
  else if (cublas && pairs >= 16 * int64_t(d.experts)) path = capturing ? Path::kDense : Path::kGemm;
  return forced_path(path, capturing, cublas, d.k);
}

template <typename T>
bool vectors_fit(const Call& c, const Dims& d) {
  constexpr int kVec = 16 / sizeof(T);
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return d.hidden % kVec == 0 && d.inter % kVec == 0 && aligned(c.x) && aligned(c.gate_up) && aligned(c.down);
}

template <typename T>
void launch_gemv_path(Path path, const Call& c, const Dims& d, char* scratch, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = vectors_fit<T>(c, d);
  if (path == Path::kPairs)
    vec ? launch_pairs<T, kVec>(c, d, scratch, stream) : launch_pairs<T, 1>(c, d, scratch, stream);
  else
    vec ? launch_grouped<T, kVec>(c, d, scratch, stream) : launch_grouped<T, 1>(c, d, scratch, stream);
}

Dims dims_of(const MoeArgs& a) {
  return Dims{int(a.k), int(a.hidden), int(a.inter), int(a.experts), a.first};
}

}  // namespace

template <typename T>
OrtStatus* cuda_moe(const MoeArgs& a, OrtKernelContext* context) {
  cudaStream_t stream = nullptr;
  ORT_TRY(compute_stream(context, &stream));
  if (a.rows == 0 || a.hidden == 0) return nullptr;
  const Call c{a.x.data, a.gate_up.data, a.down.data, static_cast<const int64_t*>(a.ids.data),
               static_cast<const float*>(a.weights.data), a.y.data, a.rows};
  const Dims d = dims_of(a);
  if (a.k == 0 || a.experts == 0 || a.inter == 0) {  // no expert here: Y is zero
    cudaMemsetAsync(a.y.data, 0, size_t(a.rows * a.hidden) * sizeof(T), stream);
    return launched("MoE");
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(stream, &capture);
  const bool cublas = cublas_gemm() != nullptr && cublas_batched_gemm() != nullptr;
  const Path path = choose(d, a.rows, capture != cudaStreamCaptureStatusNone, cublas);
  size_t bytes = layout(path, d, a.rows * a.k, sizeof(T)).total();
  // ONNX Runtime captures a graph after uncaptured runs of it, and its arena cannot grow while a
  // graph is captured: a gemm run takes the scratch that the same call would need dense.
  if (path == Path::kGemm) bytes = std::max(bytes, layout(Path::kDense, d, a.rows * a.k, sizeof(T)).total());
  Scratch scratch;
  ORT_TRY(scratch.get(context, std::max<size_t>(bytes, 256)));
  char* base = static_cast<char*>(scratch.data);
  if (path == Path::kGemm) return launch_gemm<T>(c, d, base, context, stream);
  if (path == Path::kDense) return launch_dense<T>(c, d, base, context, stream);
  launch_gemv_path<T>(path, c, d, base, stream);
  return launched("MoE");
}

template OrtStatus* cuda_moe<__half>(const MoeArgs&, OrtKernelContext*);
template OrtStatus* cuda_moe<__nv_bfloat16>(const MoeArgs&, OrtKernelContext*);
template OrtStatus* cuda_moe<float>(const MoeArgs&, OrtKernelContext*);

}  // namespace llm2trt

// The MoE op without ONNX Runtime (TensorRT's plugin face, plugins/moe_trt.py): the GEMV paths only
// (no cuBLAS handle, no host synchronization), on `stream`, with `workspace` of at least
// Llm2trtMoEWorkspace(...) bytes. type: ONNX's element type (1 float, 10 float16, 16 bfloat16).
// Returns 0, or -1 for an unknown type, too small a workspace or a failed launch.
extern "C" __attribute__((visibility("default"))) size_t Llm2trtMoEWorkspace(int type, int64_t rows, int64_t k,
                                                                            int64_t experts, int64_t hidden,
                                                                            int64_t inter) {
  using namespace llm2trt;
  const size_t element = type == ORT_ELEMENT_FLOAT ? 4 : 2;
  const Dims d{int(k), int(hidden), int(inter), int(experts), 0};
  return std::max(layout(Path::kGrouped, d, rows * k, element).total(), size_t(256));
}

extern "C" __attribute__((visibility("default"))) int Llm2trtMoE(int type, const void* x, const int64_t* ids,
                                                                const float* weights, const void* gate_up,
                                                                const void* down, void* y, int64_t rows, int64_t k,
                                                                int64_t experts, int64_t hidden, int64_t inter,
                                                                int64_t first_expert, void* workspace,
                                                                size_t workspace_bytes, void* stream) {
  using namespace llm2trt;
  if (workspace_bytes < Llm2trtMoEWorkspace(type, rows, k, experts, hidden, inter)) return -1;
  const Call c{x, gate_up, down, ids, weights, y, rows};
  const Dims d{int(k), int(hidden), int(inter), int(experts), first_expert};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (rows == 0 || hidden == 0) return 0;
  char* base = static_cast<char*>(workspace);
  const size_t element = type == ORT_ELEMENT_FLOAT ? 4 : 2;
  if (k == 0 || experts == 0 || inter == 0) {
    cudaMemsetAsync(y, 0, size_t(rows * hidden) * element, s);
  } else {
    const Path path = choose(d, rows, true, false);
    if (type == ORT_ELEMENT_FLOAT16)
      launch_gemv_path<__half>(path, c, d, base, s);
    else if (type == ORT_ELEMENT_BFLOAT16)
      launch_gemv_path<__nv_bfloat16>(path, c, d, base, s);
    else if (type == ORT_ELEMENT_FLOAT)
      launch_gemv_path<float>(path, c, d, base, s);
    else
      return -1;
  }
  return cudaGetLastError() == cudaSuccess ? 0 : -1;
}
