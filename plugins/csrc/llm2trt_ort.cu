// llm2trt's kernels for ONNX Runtime's CUDA provider: a custom-op library whose ops are the
// `llm2trt`-domain local functions the `--kv-form gqa` graph carries (passes/ort_ops.py holds
// their reference bodies, which ONNX Runtime inlines where this library is not loaded).
//
//   Linear(X, W) -> Y                                   Y = X @ W^T, W [N, K]
//   RMSNormLinear(X, Gamma, W) -> (Y, Normed)           Normed = RMSNorm(X) * Gamma
//   SkipRMSNormLinear(X, Skip, Gamma, W) -> (Y, Sum, Normed)      Sum = X + Skip, normalized
//   SkipRMSNormSwiGLU(X, Skip, Gamma, W) -> (Y, Sum, Normed, GateUp)
//       GateUp = Normed @ W^T with W = [W_gate; W_up], Y = silu(gate) * up
//   LinearF32, RMSNormLinearF32, SkipRMSNormLinearF32: the same with Y in float32 from float16
//       inputs (the logits: fp16 logits flip greedy near-ties), the accumulator never rounded
//   GroupQueryAttention(QKV, PastKey, PastValue, SeqlensK, TotalSequenceLength, CosCache, SinCache)
//       -> (Output, PresentKey, PresentValue)     com.microsoft.GroupQueryAttention, packed QKV,
//       rotary inside; the cache updated in place (llm2trt_attention.cuh)
//
// Why: a batch-1 decode step is ~10 kernels a layer, and its GEMVs are where the time goes. With
// one row (M = 1) each op is ONE kernel: every block normalizes the row itself (it is a few KB,
// read from L2), then each warp reads its weight rows with 16-byte loads, so the norm, the
// activation and the GEMV share a launch and the weights stream at close to copy bandwidth. With
// more rows (prefill, batched decode) the weights are reused across rows: cuBLAS (the provider's
// own handle and stream) does the GEMM, and Normed / GateUp are where its input and output live.
// Weights are [N, K] (a row per output): a warp's loads run along K, contiguous.
//
// Each op is registered for the CUDA provider and, for tests of this library on machines without a
// GPU, for the CPU provider (plain loops in float).

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "ort_abi.h"

namespace {

const char* const kDomain = "llm2trt";
const OrtApi* g_api = nullptr;

// ---- the API, typed ----------------------------------------------------------------------------

using CreateStatusFn = OrtStatus* (*)(int, const char*);
using GetInputFn = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
using GetOutputFn = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
using CountFn = OrtStatus* (*)(const OrtKernelContext*, size_t*);
using TypeShapeFn = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
using DimsCountFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
using DimsFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
using ElementTypeFn = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*);
using ReleaseInfoFn = void (*)(OrtTensorTypeAndShapeInfo*);
using MutableDataFn = OrtStatus* (*)(OrtValue*, void**);
using AttrFloatFn = OrtStatus* (*)(const OrtKernelInfo*, const char*, float*);
using AttrIntFn = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
using CreateMemoryInfoFn = OrtStatus* (*)(const char*, int, int, int, OrtMemoryInfo**);
using ReleaseMemoryInfoFn = void (*)(OrtMemoryInfo*);
using GetAllocatorFn = OrtStatus* (*)(const OrtKernelContext*, const OrtMemoryInfo*, OrtAllocator**);
using ReleaseAllocatorFn = void (*)(OrtAllocator*);
using StreamFn = OrtStatus* (*)(const OrtKernelContext*, void**);
using ResourceFn = OrtStatus* (*)(const OrtKernelContext*, int, int, void**);

OrtStatus* error(const char* message) {
  return ort_fn<CreateStatusFn>(g_api, ort_index::CreateStatus)(ORT_INVALID_ARGUMENT, message);
}

#define ORT_TRY(expr)                  \
  do {                                 \
    OrtStatus* status_ = (expr);       \
    if (status_ != nullptr) return status_; \
  } while (0)

struct Tensor {
  void* data = nullptr;
  int type = ORT_ELEMENT_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t last() const { return shape.empty() ? 1 : shape.back(); }
  int64_t rows() const {
    int64_t n = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) n *= shape[i];
    return n;
  }
  int64_t size() const { return rows() * last(); }
};

OrtStatus* describe(const OrtValue* value, Tensor* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ORT_TRY(ort_fn<TypeShapeFn>(g_api, ort_index::GetTensorTypeAndShape)(value, &info));
  size_t rank = 0;
  OrtStatus* status = ort_fn<DimsCountFn>(g_api, ort_index::GetDimensionsCount)(info, &rank);
  if (status == nullptr) {
    out->shape.assign(rank, 0);
    status = ort_fn<DimsFn>(g_api, ort_index::GetDimensions)(info, out->shape.data(), rank);
  }
  if (status == nullptr) status = ort_fn<ElementTypeFn>(g_api, ort_index::GetTensorElementType)(info, &out->type);
  ort_fn<ReleaseInfoFn>(g_api, ort_index::ReleaseTensorTypeAndShapeInfo)(info);
  if (status != nullptr) return status;
  return ort_fn<MutableDataFn>(g_api, ort_index::GetTensorMutableData)(const_cast<OrtValue*>(value), &out->data);
}

OrtStatus* input(OrtKernelContext* context, size_t index, Tensor* out) {
  const OrtValue* value = nullptr;
  ORT_TRY(ort_fn<GetInputFn>(g_api, ort_index::KernelContext_GetInput)(context, index, &value));
  if (value == nullptr) return error("llm2trt kernels: a required input is missing");
  return describe(value, out);
}

// Output `index` shaped `shape`; data stays null where the node leaves that output unnamed.
OrtStatus* output(OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape, Tensor* out) {
  size_t count = 0;
  ORT_TRY(ort_fn<CountFn>(g_api, ort_index::KernelContext_GetOutputCount)(context, &count));
  if (index >= count) return nullptr;
  OrtValue* value = nullptr;
  ORT_TRY(ort_fn<GetOutputFn>(g_api, ort_index::KernelContext_GetOutput)(context, index, shape.data(), shape.size(),
                                                                        &value));
  if (value == nullptr) return nullptr;
  out->shape = shape;  // ours: only the buffer needs asking for
  return ort_fn<MutableDataFn>(g_api, ort_index::GetTensorMutableData)(value, &out->data);
}

// ---- the ops' shapes ----------------------------------------------------------------------------

struct OpKind {
  const char* name;
  bool norm;
  bool skip;
  bool swiglu;
  size_t inputs;
  size_t outputs;
  bool attention = false;
  bool float_y = false;  // Y in float32 whatever the inputs' type
};

const OpKind kLinear = {"Linear", false, false, false, 2, 1};
const OpKind kRMSNormLinear = {"RMSNormLinear", true, false, false, 3, 2};
const OpKind kSkipRMSNormLinear = {"SkipRMSNormLinear", true, true, false, 4, 3};
const OpKind kSkipRMSNormSwiGLU = {"SkipRMSNormSwiGLU", true, true, true, 4, 4};
const OpKind kLinearF32 = {"LinearF32", false, false, false, 2, 1, false, true};
const OpKind kRMSNormLinearF32 = {"RMSNormLinearF32", true, false, false, 3, 2, false, true};
const OpKind kSkipRMSNormLinearF32 = {"SkipRMSNormLinearF32", true, true, false, 4, 3, false, true};
const OpKind kGroupQueryAttention = {"GroupQueryAttention", false, false, false, 7, 3, true};
const OpKind* const kKinds[] = {&kLinear,    &kRMSNormLinear,    &kSkipRMSNormLinear,    &kSkipRMSNormSwiGLU,
                                &kLinearF32, &kRMSNormLinearF32, &kSkipRMSNormLinearF32, &kGroupQueryAttention};

struct Args {
  Tensor x, skip, gamma, w;
  Tensor y, sum, normed, gate_up;
  int64_t rows = 0, k = 0, n = 0, n_out = 0;  // n: weight rows; n_out: Y's last dim
  float epsilon = 1e-6f;
};

OrtStatus* gather(const OpKind& kind, float epsilon, OrtKernelContext* context, Args* a) {
  size_t next = 0;
  ORT_TRY(input(context, next++, &a->x));
  if (kind.skip) ORT_TRY(input(context, next++, &a->skip));
  if (kind.norm) ORT_TRY(input(context, next++, &a->gamma));
  ORT_TRY(input(context, next++, &a->w));
  a->epsilon = epsilon;
  a->k = a->x.last();
  a->rows = a->x.rows();
  if (a->w.shape.size() != 2 || a->w.shape[1] != a->k) return error("llm2trt kernels: W must be [N, K] with X's K");
  a->n = a->w.shape[0];
  if (kind.swiglu && a->n % 2 != 0) return error("llm2trt kernels: SwiGLU's W needs an even row count");
  a->n_out = kind.swiglu ? a->n / 2 : a->n;
  if (a->x.type != a->w.type || (kind.norm && a->gamma.type != a->x.type) || (kind.skip && a->skip.type != a->x.type))
    return error("llm2trt kernels: X, Skip, Gamma and W must share one type");
  if (a->x.type != ORT_ELEMENT_FLOAT && a->x.type != ORT_ELEMENT_FLOAT16)
    return error("llm2trt kernels: float and float16 only");
  if (kind.skip && a->skip.shape != a->x.shape) return error("llm2trt kernels: Skip must have X's shape");
  if (kind.norm && (a->gamma.shape.size() != 1 || a->gamma.shape[0] != a->k))
    return error("llm2trt kernels: Gamma must be [K]");
  std::vector<int64_t> y_shape = a->x.shape;
  y_shape.back() = a->n_out;
  size_t out = 0;
  ORT_TRY(output(context, out++, y_shape, &a->y));
  if (a->y.data == nullptr && a->rows * a->n_out != 0) return error("llm2trt kernels: Y has no buffer");
  if (kind.skip) ORT_TRY(output(context, out++, a->x.shape, &a->sum));
  return nullptr;
}

// Outputs that only the many-row path writes: ask for them only then.
OrtStatus* staging(const OpKind& kind, OrtKernelContext* context, Args* a) {
  size_t index = kind.skip ? 2 : 1;
  ORT_TRY(output(context, index, a->x.shape, &a->normed));
  if (a->normed.data == nullptr) return error("llm2trt kernels: Normed needs a name for more than one row");
  if (kind.swiglu) {
    std::vector<int64_t> shape = a->x.shape;
    shape.back() = a->n;
    ORT_TRY(output(context, index + 1, shape, &a->gate_up));
    if (a->gate_up.data == nullptr) return error("llm2trt kernels: GateUp needs a name for more than one row");
  }
  return nullptr;
}

// ---- element conversions, host and device ------------------------------------------------------

template <typename T>
__host__ __device__ __forceinline__ float to_float(T v);
template <>
__host__ __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ---- CPU reference (tests of this library without a GPU) ----------------------------------------

template <typename T>
void cpu_compute(const OpKind& kind, const Args& a) {
  const T* x = static_cast<const T*>(a.x.data);
  const T* skip = static_cast<const T*>(a.skip.data);
  const T* gamma = static_cast<const T*>(a.gamma.data);
  const T* w = static_cast<const T*>(a.w.data);
  std::vector<float> row(a.k), z(a.n);
  for (int64_t r = 0; r < a.rows; ++r) {
    double squares = 0;
    for (int64_t i = 0; i < a.k; ++i) {
      float v = to_float(x[r * a.k + i]);
      if (kind.skip) {
        v = to_float(from_float<T>(v + to_float(skip[r * a.k + i])));
        if (a.sum.data) static_cast<T*>(a.sum.data)[r * a.k + i] = from_float<T>(v);
      }
      row[i] = v;
      squares += double(v) * v;
    }
    if (kind.norm) {
      float scale = 1.0f / std::sqrt(float(squares / a.k) + a.epsilon);
      for (int64_t i = 0; i < a.k; ++i) row[i] = to_float(from_float<T>(row[i] * scale * to_float(gamma[i])));
      if (a.normed.data)
        for (int64_t i = 0; i < a.k; ++i) static_cast<T*>(a.normed.data)[r * a.k + i] = from_float<T>(row[i]);
    }
    for (int64_t j = 0; j < a.n; ++j) {
      float acc = 0;
      for (int64_t i = 0; i < a.k; ++i) acc += row[i] * to_float(w[j * a.k + i]);
      z[j] = kind.float_y ? acc : to_float(from_float<T>(acc));
      if (a.gate_up.data) static_cast<T*>(a.gate_up.data)[r * a.n + j] = from_float<T>(acc);
    }
    if (kind.float_y) {
      std::copy(z.begin(), z.begin() + a.n_out, static_cast<float*>(a.y.data) + r * a.n_out);
      continue;
    }
    T* y = static_cast<T*>(a.y.data) + r * a.n_out;
    for (int64_t j = 0; j < a.n_out; ++j) {
      if (!kind.swiglu) {
        y[j] = from_float<T>(z[j]);
        continue;
      }
      float g = z[j], u = z[a.n_out + j];
      float act = to_float(from_float<T>(g / (1.0f + std::exp(-g))));
      y[j] = from_float<T>(act * u);
    }
  }
}

// ---- CUDA kernels ---------------------------------------------------------------------------

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

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One row of X, no shared memory and no block-wide step. RMSNorm scales the row by one number,
// r = rsqrt(mean(s^2) + eps), so W . (s * gamma * r) = r * (W . (s * gamma)): each lane forms
// s * gamma at its own positions from X, Skip and Gamma (L1-resident after the first warp reads
// them), adds s^2 to its share of the sum of squares, and every warp finishes r itself after the
// dot products. Each warp reads R weight rows at once (2R for SwiGLU: gate and up), 16 bytes a
// lane a load. Warp 0 of block 0 writes Sum. Fewer roundings than the reference body: the sum is
// rounded to T (it is the residual stream); the normalized row and gate/up stay in float.
// Weights are read once a step: keep them out of L1, where X, Skip and Gamma are re-read.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Programmatic dependent launch (sm_90+): the next kernel may start while this one runs; it pulls
// its weights into L2 and only then waits for this grid's results (griddepcontrol.wait).
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

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

#include "llm2trt_attention.cuh"

// Many rows: Sum and Normed, one block per row.
template <typename T, bool SKIP>
__global__ void norm_rows_kernel(const T* __restrict__ x, const T* __restrict__ skip, const T* __restrict__ gamma,
                                 T* __restrict__ sum, T* __restrict__ normed, int k, float epsilon) {
  __shared__ float partial[32];
  const size_t base = size_t(blockIdx.x) * k;
  float squares = 0.f;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    float v = to_float(x[base + i]);
    if (SKIP) {
      T s = from_float<T>(v + to_float(skip[base + i]));
      if (sum != nullptr) sum[base + i] = s;
      v = to_float(s);
    }
    squares += v * v;
  }
  squares = warp_sum(squares);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = squares;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < int(blockDim.x / 32); ++i) total += partial[i];
  const float scale = rsqrtf(total / k + epsilon);
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    float v = SKIP ? to_float(sum != nullptr ? sum[base + i] : from_float<T>(to_float(x[base + i]) + to_float(skip[base + i])))
                   : to_float(x[base + i]);
    normed[base + i] = from_float<T>(v * scale * to_float(gamma[i]));
  }
}

template <typename T>
__global__ void swiglu_rows_kernel(const T* __restrict__ gate_up, T* __restrict__ y, int64_t rows, int n_out) {
  const int64_t total = rows * n_out;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / n_out, j = i % n_out;
    float g = to_float(gate_up[r * 2 * n_out + j]);
    float u = to_float(gate_up[r * 2 * n_out + n_out + j]);
    float act = to_float(from_float<T>(g / (1.f + __expf(-g))));
    y[i] = from_float<T>(act * u);
  }
}

// ---- cuBLAS, found in the provider's own process image -------------------------------------

using GemmExFn = int (*)(void*, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int,
                         const void*, void*, int, int, int, int);

using BatchedGemmFn = int (*)(void*, int, int, int, int, int, const void*, const void*, int, int, long long,
                              const void*, int, int, long long, const void*, void*, int, int, long long, int, int, int);

void* cublas_symbol(const char* symbol) {
  for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
    void* lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen(name, RTLD_NOW);
    if (lib != nullptr) {
      if (void* sym = dlsym(lib, symbol)) return sym;
    }
  }
  return nullptr;
}

GemmExFn cublas_gemm() {
  static GemmExFn fn = reinterpret_cast<GemmExFn>(cublas_symbol("cublasGemmEx"));
  return fn;
}

BatchedGemmFn cublas_batched_gemm() {
  static BatchedGemmFn fn = reinterpret_cast<BatchedGemmFn>(cublas_symbol("cublasGemmStridedBatchedEx"));
  return fn;
}

constexpr int kCudaR16F = 2, kCudaR32F = 0, kComputeF32 = 68, kGemmDefault = -1, kOpN = 0, kOpT = 1;

// The CUDA provider's stream and cuBLAS handle for this run: every kernel and GEMM goes there.
OrtStatus* compute_stream(OrtKernelContext* context, cudaStream_t* stream) {
  void* raw = nullptr;
  ORT_TRY(ort_fn<StreamFn>(g_api, ort_index::KernelContext_GetGPUComputeStream)(context, &raw));
  *stream = static_cast<cudaStream_t>(raw);
  return nullptr;
}

OrtStatus* cublas_handle(OrtKernelContext* context, void** handle) {
  ORT_TRY(ort_fn<ResourceFn>(g_api, ort_index::KernelContext_GetResource)(context, ORT_CUDA_RESOURCE_VERSION,
                                                                          ORT_CUDA_RESOURCE_CUBLAS_HANDLE, handle));
  return *handle != nullptr ? nullptr : error("llm2trt kernels: no cuBLAS handle from the CUDA provider");
}

// Blocks of 256 threads for a grid-stride loop over `total` elements.
unsigned stride_blocks(int64_t total) { return unsigned(std::min<int64_t>((total + 255) / 256, 65535)); }

// out[rows, n] = in[rows, k] @ w[n, k]^T, column-major: out^T (n x rows) = w (k x n)^T . in^T (k x rows).
// `float_out`: out in float32 (cuBLAS takes half inputs with a float output under float compute).
OrtStatus* gemm(OrtKernelContext* context, const Args& a, const void* in, void* out, bool float_out = false) {
  void* handle = nullptr;
  ORT_TRY(cublas_handle(context, &handle));
  GemmExFn fn = cublas_gemm();
  if (fn == nullptr) return error("llm2trt kernels: no cublasGemmEx in the process");
  const float one = 1.f, zero = 0.f;
  const int type = a.x.type == ORT_ELEMENT_FLOAT16 ? kCudaR16F : kCudaR32F;
  const int k = int(a.k), n = int(a.n), rows = int(a.rows);
  int rc = fn(handle, kOpT, kOpN, n, rows, k, &one, a.w.data, type, k, in, type, k, &zero, out,
              float_out ? kCudaR32F : type, n, kComputeF32, kGemmDefault);
  if (rc != 0) {
    static char message[96];
    std::snprintf(message, sizeof message, "llm2trt kernels: cublasGemmEx failed (status %d)", rc);
    return error(message);
  }
  return nullptr;
}

OrtStatus* launched(const char* what) {
  cudaError_t rc = cudaGetLastError();
  if (rc == cudaSuccess) return nullptr;
  static char message[160];
  std::snprintf(message, sizeof message, "llm2trt kernels: %s: %s", what, cudaGetErrorString(rc));
  return error(message);
}

int multiprocessors() {
  static int sms = [] {
    int device = 0, count = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    return count > 0 ? count : 1;
  }();
  return sms;
}

int compute_capability() {
  static int cc = [] {
    int device = 0, major = 0, minor = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return major * 10 + minor;
  }();
  return cc;
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

template <typename T>
OrtStatus* cuda_compute(const OpKind& kind, OrtKernelContext* context, Args& a) {
  cudaStream_t stream = nullptr;
  ORT_TRY(compute_stream(context, &stream));
  if (a.rows == 0) return nullptr;
  if (a.rows == 1) {
    one_row<T>(kind, a, stream);
    return launched(kind.name);
  }
  const void* in = a.x.data;
  if (kind.norm) {
    ORT_TRY(staging(kind, context, &a));
    const int threads = a.k >= 1024 ? 1024 : ((int(a.k) + 31) / 32) * 32;
    if (kind.skip)
      norm_rows_kernel<T, true><<<unsigned(a.rows), threads, 0, stream>>>(
          static_cast<const T*>(a.x.data), static_cast<const T*>(a.skip.data), static_cast<const T*>(a.gamma.data),
          static_cast<T*>(a.sum.data), static_cast<T*>(a.normed.data), int(a.k), a.epsilon);
    else
      norm_rows_kernel<T, false><<<unsigned(a.rows), threads, 0, stream>>>(
          static_cast<const T*>(a.x.data), nullptr, static_cast<const T*>(a.gamma.data), nullptr,
          static_cast<T*>(a.normed.data), int(a.k), a.epsilon);
    ORT_TRY(launched(kind.name));
    in = a.normed.data;
  }
  if (!kind.swiglu) return gemm(context, a, in, a.y.data, kind.float_y);
  ORT_TRY(gemm(context, a, in, a.gate_up.data));
  swiglu_rows_kernel<T><<<stride_blocks(a.rows * a.n_out), 256, 0, stream>>>(static_cast<const T*>(a.gate_up.data), static_cast<T*>(a.y.data),
                                                   a.rows, int(a.n_out));
  return launched(kind.name);
}


// ---- GroupQueryAttention ------------------------------------------------------------------------

struct AttentionArgs {
  Tensor qkv, past_k, past_v, seqlens, total, cos, sin;
  Tensor out, present_k, present_v;
  attention::Shape shape;
};

OrtStatus* gather_attention(int64_t heads, int64_t kv_heads, float scale, OrtKernelContext* context,
                            AttentionArgs* a) {
  Tensor* inputs[] = {&a->qkv, &a->past_k, &a->past_v, &a->seqlens, &a->total, &a->cos, &a->sin};
  for (size_t i = 0; i < 7; ++i) ORT_TRY(input(context, i, inputs[i]));
  const std::vector<int64_t>& q = a->qkv.shape;
  const std::vector<int64_t>& cache = a->past_k.shape;
  if (q.size() != 3 || cache.size() != 4 || a->past_v.shape != cache || cache[0] != q[0] || cache[1] != kv_heads ||
      q[2] != (heads + 2 * kv_heads) * cache[3])
    return error("llm2trt GroupQueryAttention: QKV must be [B, S, (H + 2 KVH) * D], the caches [B, KVH, slots, D]");
  if (a->seqlens.type != ORT_ELEMENT_INT32 || a->seqlens.size() != q[0] || a->total.type != ORT_ELEMENT_INT32 ||
      a->total.size() != 1)
    return error("llm2trt GroupQueryAttention: seqlens_k must be int32 [B] and total_sequence_length an int32");
  if (a->cos.shape.size() != 2 || a->cos.shape[1] * 2 != cache[3] || a->sin.shape != a->cos.shape)
    return error("llm2trt GroupQueryAttention: cos/sin caches must be [positions, D / 2] (rotary over the head)");
  for (const Tensor* t : {&a->past_k, &a->past_v, &a->cos, &a->sin})
    if (t->type != a->qkv.type) return error("llm2trt GroupQueryAttention: QKV, caches and tables must share one type");
  attention::Shape& s = a->shape;
  s.batch = int(q[0]);
  s.seq = int(q[1]);
  s.heads = int(heads);
  s.kv_heads = int(kv_heads);
  s.head_dim = int(cache[3]);
  s.capacity = int(cache[2]);
  s.positions = int(a->cos.shape[0]);
  s.total = *static_cast<const int32_t*>(a->total.data);
  if (s.total < s.seq || s.total > s.capacity)
    return error("llm2trt GroupQueryAttention: total_sequence_length must lie between the new tokens and the slots");
  s.first_prompt = s.seq == s.total;
  s.scale = scale != 0.f ? scale : 1.f / std::sqrt(float(s.head_dim));
  ORT_TRY(output(context, 0, {q[0], q[1], heads * cache[3]}, &a->out));
  ORT_TRY(output(context, 1, cache, &a->present_k));
  ORT_TRY(output(context, 2, cache, &a->present_v));
  if (a->out.data == nullptr || a->present_k.data == nullptr || a->present_v.data == nullptr)
    return error("llm2trt GroupQueryAttention: every output needs a buffer");
  return nullptr;
}

// Plain loops in float, in the reference's order: every new key and value into the cache, then
// each query over the keys up to its own position.
template <typename T>
void cpu_attention(const AttentionArgs& a) {
  const attention::Shape& s = a.shape;
  const int D = s.head_dim, half = D / 2, group = s.group(), slots = s.heads + 2 * s.kv_heads;
  const T* qkv = static_cast<const T*>(a.qkv.data);
  const T* cos = static_cast<const T*>(a.cos.data);
  const T* sin = static_cast<const T*>(a.sin.data);
  const int* seqlens = static_cast<const int*>(a.seqlens.data);
  T* keys = static_cast<T*>(a.present_k.data);
  T* values = static_cast<T*>(a.present_v.data);
  T* out = static_cast<T*>(a.out.data);
  std::vector<float> rotated(D), scores(s.capacity);
  auto rotate = [&](const T* x, int pos) {
    for (int d = 0; d < D; ++d) {
      const float c = to_float(cos[size_t(pos) * half + d % half]), sn = to_float(sin[size_t(pos) * half + d % half]);
      const float v = to_float(x[d]), partner = to_float(x[d < half ? d + half : d - half]);
      rotated[d] = to_float(from_float<T>(d < half ? v * c - partner * sn : v * c + partner * sn));
    }
  };
  auto position = [&](int b, int i) { return attention::past_length(s, seqlens, b) + i; };
  auto in_range = [&](int pos) { return pos >= 0 && pos < s.capacity && pos < s.positions; };
  auto head = [&](int b, int kvh) { return (size_t(b) * s.kv_heads + kvh) * s.capacity * D; };
  for (int b = 0; b < s.batch && keys != a.past_k.data; ++b) {  // a present cache apart from the past:
    const int past = attention::past_length(s, seqlens, b);      // the past rows, then zeros
    for (int kvh = 0; kvh < s.kv_heads; ++kvh)
      for (size_t at = head(b, kvh); at < head(b, kvh) + size_t(s.capacity) * D; ++at) {
        const bool kept = int((at - head(b, kvh)) / D) < past;
        keys[at] = kept ? static_cast<const T*>(a.past_k.data)[at] : from_float<T>(0.f);
        values[at] = kept ? static_cast<const T*>(a.past_v.data)[at] : from_float<T>(0.f);
      }
  }
  for (int b = 0; b < s.batch; ++b)
    for (int i = 0; i < s.seq; ++i) {
      const int pos = position(b, i);
      if (!in_range(pos)) continue;
      const T* x = qkv + (size_t(b) * s.seq + i) * slots * D;
      for (int kvh = 0; kvh < s.kv_heads; ++kvh) {
        rotate(x + size_t(s.heads + kvh) * D, pos);
        for (int d = 0; d < D; ++d) {
          keys[head(b, kvh) + size_t(pos) * D + d] = from_float<T>(rotated[d]);
          values[head(b, kvh) + size_t(pos) * D + d] = x[size_t(s.heads + s.kv_heads + kvh) * D + d];
        }
      }
    }
  for (int b = 0; b < s.batch; ++b)
    for (int i = 0; i < s.seq; ++i) {
      const int pos = position(b, i), limit = std::min(pos + 1, s.total);
      const T* x = qkv + (size_t(b) * s.seq + i) * slots * D;
      for (int h = 0; h < s.heads; ++h) {
        T* y = out + ((size_t(b) * s.seq + i) * s.heads + h) * D;
        if (!in_range(pos)) {
          for (int d = 0; d < D; ++d) y[d] = from_float<T>(0.f);
          continue;
        }
        rotate(x + size_t(h) * D, pos);
        const size_t base = head(b, h / group);
        float top = -INFINITY;
        for (int j = 0; j < limit; ++j) {
          float dot = 0.f;
          for (int d = 0; d < D; ++d) dot += rotated[d] * s.scale * to_float(keys[base + size_t(j) * D + d]);
          scores[j] = dot;
          top = std::max(top, dot);
        }
        float sum = 0.f;
        for (int j = 0; j < limit; ++j) sum += scores[j] = std::exp(scores[j] - top);
        for (int d = 0; d < D; ++d) {
          float acc = 0.f;
          for (int j = 0; j < limit; ++j) acc += scores[j] * to_float(values[base + size_t(j) * D + d]);
          y[d] = from_float<T>(acc / sum);
        }
      }
    }
}

// Device scratch from ONNX Runtime's allocator for the provider's device (arena-backed, so a
// captured CUDA graph sees the same addresses each replay).
struct Scratch {
  OrtMemoryInfo* info = nullptr;
  OrtAllocator* allocator = nullptr;
  void* data = nullptr;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (data != nullptr) allocator->Free(allocator, data);
    if (allocator != nullptr) ort_fn<ReleaseAllocatorFn>(g_api, ort_index::ReleaseAllocator)(allocator);
    if (info != nullptr) ort_fn<ReleaseMemoryInfoFn>(g_api, ort_index::ReleaseMemoryInfo)(info);
  }
  OrtStatus* get(OrtKernelContext* context, size_t bytes) {
    int device = 0;
    cudaGetDevice(&device);
    ORT_TRY(ort_fn<CreateMemoryInfoFn>(g_api, ort_index::CreateMemoryInfo)("Cuda", 0, device, 0, &info));
    ORT_TRY(ort_fn<GetAllocatorFn>(g_api, ort_index::KernelContext_GetAllocator)(context, info, &allocator));
    if (allocator == nullptr) return error("llm2trt GroupQueryAttention: no allocator for the provider's device");
    data = allocator->Alloc(allocator, bytes);
    return data != nullptr ? nullptr : error("llm2trt GroupQueryAttention: out of device memory for its scratch");
  }
};

constexpr int64_t kScoresBudget = int64_t(256) << 20;  // bytes of scores + probabilities a prefill chunk may use

template <typename T, int D>
OrtStatus* prefill_attention(const AttentionArgs& a, OrtKernelContext* context, cudaStream_t stream) {
  const attention::Shape& s = a.shape;
  const int group = s.group(), keys = s.total;
  const int64_t q_elements = int64_t(s.batch) * s.heads * s.seq * D;
  const int64_t per_query = int64_t(s.batch) * s.heads * keys * int64_t(sizeof(float) + sizeof(T));
  const int chunk = int(std::max<int64_t>(1, std::min<int64_t>(s.seq, kScoresBudget / per_query)));
  auto rounded = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t q_bytes = rounded(size_t(q_elements) * sizeof(T)), o_bytes = rounded(size_t(q_elements) * sizeof(float));
  const size_t inverse_bytes = rounded(size_t(q_elements / D) * sizeof(float));
  const size_t score_bytes = rounded(size_t(per_query) * chunk / (sizeof(float) + sizeof(T)) * sizeof(float));
  Scratch scratch;
  ORT_TRY(scratch.get(context, q_bytes + o_bytes + inverse_bytes + score_bytes + size_t(per_query) * chunk));
  char* base = static_cast<char*>(scratch.data);
  T* q = reinterpret_cast<T*>(base);
  float* o = reinterpret_cast<float*>(base + q_bytes);
  float* inverse = reinterpret_cast<float*>(base + q_bytes + o_bytes);
  float* scores = reinterpret_cast<float*>(base + q_bytes + o_bytes + inverse_bytes);
  T* probs = reinterpret_cast<T*>(base + q_bytes + o_bytes + inverse_bytes + score_bytes);
  const int* seqlens = static_cast<const int*>(a.seqlens.data);
  T* cache_k = static_cast<T*>(a.present_k.data);
  T* cache_v = static_cast<T*>(a.present_v.data);
  attention::rope_write_kernel<T, D><<<dim3(unsigned(s.seq), unsigned(s.batch)), attention::kThreads, 0, stream>>>(
      static_cast<const T*>(a.qkv.data), cache_k, cache_v, seqlens, static_cast<const T*>(a.cos.data),
      static_cast<const T*>(a.sin.data), q, s);
  ORT_TRY(launched("GroupQueryAttention"));
  void* handle = nullptr;
  ORT_TRY(cublas_handle(context, &handle));
  BatchedGemmFn gemm_batched = cublas_batched_gemm();
  if (gemm_batched == nullptr) return error("llm2trt GroupQueryAttention: no cublasGemmStridedBatchedEx in the process");
  const int type = sizeof(T) == 2 ? kCudaR16F : kCudaR32F;
  const int batches = s.batch * s.kv_heads;
  const long long cache_stride = (long long)s.capacity * D, q_stride = (long long)s.seq * group * D;
  const float one = 1.f, zero = 0.f;
  for (int s0 = 0; s0 < s.seq; s0 += chunk) {
    const int in_chunk = std::min(chunk, s.seq - s0), rows = in_chunk * group;
    const size_t offset = size_t(s0) * group * D;
    int rc = gemm_batched(handle, kOpT, kOpN, keys, rows, D, &s.scale, cache_k, type, D, cache_stride, q + offset,
                          type, D, q_stride, &zero, scores, kCudaR32F, keys, (long long)rows * keys, batches,
                          kComputeF32, kGemmDefault);
    if (rc != 0) return error("llm2trt GroupQueryAttention: cublasGemmStridedBatchedEx (scores) failed");
    const int64_t all_rows = int64_t(batches) * rows;
    attention::softmax_kernel<T><<<unsigned((all_rows + 3) / 4), 128, 0, stream>>>(scores, probs, inverse, seqlens, s,
                                                                                    s0, in_chunk, keys);
    ORT_TRY(launched("GroupQueryAttention"));
    rc = gemm_batched(handle, kOpN, kOpN, D, rows, keys, &one, cache_v, type, D, cache_stride, probs, type, keys,
                      (long long)rows * keys, &zero, o + offset, kCudaR32F, D, q_stride, batches, kComputeF32,
                      kGemmDefault);
    if (rc != 0) return error("llm2trt GroupQueryAttention: cublasGemmStridedBatchedEx (values) failed");
  }
  attention::heads_out_kernel<T><<<stride_blocks(q_elements), 256, 0, stream>>>(o, inverse, static_cast<T*>(a.out.data), s);
  return launched("GroupQueryAttention");
}

template <typename T, int D>
OrtStatus* attention_for(const AttentionArgs& a, OrtKernelContext* context, cudaStream_t stream) {
  if (a.shape.seq > 1) return prefill_attention<T, D>(a, context, stream);
  attention::decode<T, D>(static_cast<const T*>(a.qkv.data), static_cast<T*>(a.present_k.data),
                          static_cast<T*>(a.present_v.data), static_cast<const int*>(a.seqlens.data),
                          static_cast<const T*>(a.cos.data), static_cast<const T*>(a.sin.data),
                          static_cast<T*>(a.out.data), a.shape, multiprocessors(), compute_capability() >= 90, stream);
  return launched("GroupQueryAttention");
}

template <typename T>
OrtStatus* cuda_attention(const AttentionArgs& a, OrtKernelContext* context) {
  cudaStream_t stream = nullptr;
  ORT_TRY(compute_stream(context, &stream));
  if (a.shape.batch == 0 || a.shape.seq == 0) return nullptr;
  // Refusals first: nothing is launched for a call that fails.
  OrtStatus* (*run)(const AttentionArgs&, OrtKernelContext*, cudaStream_t) = nullptr;
  switch (a.shape.head_dim) {  // 8 elements a lane, a head's lanes within one warp
    case 16: run = attention_for<T, 16>; break;
    case 32: run = attention_for<T, 32>; break;
    case 64: run = attention_for<T, 64>; break;
    case 128: run = attention_for<T, 128>; break;
    case 256: run = attention_for<T, 256>; break;
    default: return error("llm2trt GroupQueryAttention: head size 16, 32, 64, 128 or 256 only");
  }
  if (a.shape.group() > attention::kMaxGroup)
    return error("llm2trt GroupQueryAttention: at most 8 query heads a KV head");
  for (const Tensor* t : {&a.qkv, &a.present_k, &a.present_v, &a.cos, &a.sin, &a.out})
    if (reinterpret_cast<uintptr_t>(t->data) % 16 != 0)  // the kernels move 16 bytes a load
      return error("llm2trt GroupQueryAttention: a tensor not 16-byte aligned");
  if (a.present_k.data != a.past_k.data) {  // not bound in place: the past rows, then zeros
    attention::present_kernel<T><<<stride_blocks(a.past_k.size()), 256, 0, stream>>>(
        static_cast<const T*>(a.past_k.data), static_cast<const T*>(a.past_v.data), static_cast<T*>(a.present_k.data),
        static_cast<T*>(a.present_v.data), static_cast<const int*>(a.seqlens.data), a.shape);
    ORT_TRY(launched("GroupQueryAttention"));
  }
  return run(a, context, stream);
}

// ---- the custom ops ---------------------------------------------------------------------------

struct Kernel {
  const OpKind* kind;
  bool cuda;
  float epsilon;
  int64_t heads = 0, kv_heads = 0;  // GroupQueryAttention's
  float scale = 0.f;
};

struct Op : OrtCustomOp {
  const OpKind* kind;
  bool cuda;
  int type;  // every input and output has this element type
};

const Op& self(const OrtCustomOp* op) { return *static_cast<const Op*>(op); }

OrtStatus* compute(void* opaque, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(opaque);
  if (kernel.kind->attention) {
    AttentionArgs a;
    ORT_TRY(gather_attention(kernel.heads, kernel.kv_heads, kernel.scale, context, &a));
    const bool half = a.qkv.type == ORT_ELEMENT_FLOAT16;
    if (kernel.cuda) return half ? cuda_attention<__half>(a, context) : cuda_attention<float>(a, context);
    if (half)
      cpu_attention<__half>(a);
    else
      cpu_attention<float>(a);
    return nullptr;
  }
  Args a;
  ORT_TRY(gather(*kernel.kind, kernel.epsilon, context, &a));
  if (kernel.cuda)
    return a.x.type == ORT_ELEMENT_FLOAT16 ? cuda_compute<__half>(*kernel.kind, context, a)
                                           : cuda_compute<float>(*kernel.kind, context, a);
  if (kernel.kind->norm && a.rows > 1) ORT_TRY(staging(*kernel.kind, context, &a));
  if (a.x.type == ORT_ELEMENT_FLOAT16)
    cpu_compute<__half>(*kernel.kind, a);
  else
    cpu_compute<float>(*kernel.kind, a);
  return nullptr;
}

OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  float epsilon = 1e-6f;
  if (self(op).kind->norm) {
    ORT_TRY(ort_fn<AttrFloatFn>(api, ort_index::KernelInfoGetAttribute_float)(info, "epsilon", &epsilon));
  }
  Kernel kernel{self(op).kind, self(op).cuda, epsilon};
  if (self(op).kind->attention) {
    auto attr = ort_fn<AttrIntFn>(api, ort_index::KernelInfoGetAttribute_int64);
    int64_t rotary = 0, interleaved = 0, window = 0;
    ORT_TRY(attr(info, "num_heads", &kernel.heads));
    ORT_TRY(attr(info, "kv_num_heads", &kernel.kv_heads));
    ORT_TRY(attr(info, "do_rotary", &rotary));
    ORT_TRY(attr(info, "rotary_interleaved", &interleaved));
    ORT_TRY(attr(info, "local_window_size", &window));
    ORT_TRY(ort_fn<AttrFloatFn>(api, ort_index::KernelInfoGetAttribute_float)(info, "scale", &kernel.scale));
    if (rotary != 1 || interleaved != 0 || window != -1)
      return error("llm2trt GroupQueryAttention: do_rotary=1, rotary_interleaved=0 and local_window_size=-1 only");
    if (kernel.heads <= 0 || kernel.kv_heads <= 0 || kernel.heads % kernel.kv_heads != 0)
      return error("llm2trt GroupQueryAttention: num_heads must be a multiple of kv_num_heads");
  }
  *out = new Kernel(kernel);
  return nullptr;
}

Op make_op(const OpKind* kind, bool cuda, int type) {
  Op op;
  std::memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));
  op.kind = kind;
  op.cuda = cuda;
  op.type = type;
  op.version = ORT_CUSTOM_OP_VERSION;
  op.GetName = [](const OrtCustomOp* o) { return self(o).kind->name; };
  op.GetExecutionProviderType = [](const OrtCustomOp* o) {
    return self(o).cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  };
  // One op per element type (ONNX Runtime merges same-named ops into one schema).
  op.GetInputType = [](const OrtCustomOp* o, size_t index) {
    // GroupQueryAttention's seqlens_k and total_sequence_length are int32.
    return self(o).kind->attention && (index == 3 || index == 4) ? int(ORT_ELEMENT_INT32) : self(o).type;
  };
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return self(o).kind->inputs; };
  op.GetOutputType = [](const OrtCustomOp* o, size_t index) {
    return self(o).kind->float_y && index == 0 ? int(ORT_ELEMENT_FLOAT) : self(o).type;
  };
  op.GetOutputTypeCount = [](const OrtCustomOp* o) { return self(o).kind->outputs; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return int(ORT_IO_REQUIRED); };
  // Y is always written; Sum, Normed and GateUp only where the node names them.
  op.GetOutputCharacteristic = [](const OrtCustomOp* o, size_t index) {
    return int(index == 0 || self(o).kind->attention ? ORT_IO_REQUIRED : ORT_IO_OPTIONAL);
  };
  // total_sequence_length is read on the host (it sizes the launch), as ONNX Runtime's own op does.
  op.GetInputMemoryType = [](const OrtCustomOp* o, size_t index) {
    return int(self(o).kind->attention && index == 4 ? ORT_MEM_CPU_INPUT : ORT_MEM_DEFAULT);
  };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 2147483647; };
  op.GetMayInplace = [](int**, int**) { return size_t(0); };
  op.ReleaseMayInplace = [](int*, int*) {};
  op.GetAliasMap = [](int**, int**) { return size_t(0); };
  op.ReleaseAliasMap = [](int*, int*) {};
  return op;
}

std::vector<Op>& ops() {
  static std::vector<Op> all = [] {
    std::vector<Op> made;
    for (const OpKind* kind : kKinds) {
      for (int type : {int(ORT_ELEMENT_FLOAT16), int(ORT_ELEMENT_FLOAT)}) {
        made.push_back(make_op(kind, true, type));
        made.push_back(make_op(kind, false, type));
      }
    }
    return made;
  }();
  return all;
}

}  // namespace

using CreateDomainFn = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
using DomainAddFn = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*);
using AddDomainFn = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const OrtApiBase* base) {
  g_api = base->GetApi(ORT_API_REQUEST);
  if (g_api == nullptr) return nullptr;  // a runtime older than 1.19: it runs the reference bodies
  OrtCustomOpDomain* domain = nullptr;
  ORT_TRY(ort_fn<CreateDomainFn>(g_api, ort_index::CreateCustomOpDomain)(kDomain, &domain));
  for (Op& op : ops()) ORT_TRY(ort_fn<DomainAddFn>(g_api, ort_index::CustomOpDomain_Add)(domain, &op));
  return ort_fn<AddDomainFn>(g_api, ort_index::AddCustomOpDomain)(options, domain);
}

// One op at one row without ONNX Runtime, on `stream`: what scripts/bench_ort_kernels.py times.
// Returns 0, or -1 for an unknown op or type. Y is float32 for the F32 ops.
extern "C" __attribute__((visibility("default"))) int Llm2trtOneRow(const char* op, int type, const void* x,
                                                                   const void* skip, const void* gamma, const void* w,
                                                                   void* y, void* sum, int64_t k, int64_t n,
                                                                   float epsilon, void* stream) {
  const OpKind* kind = nullptr;
  for (const OpKind* candidate : kKinds)
    if (!candidate->attention && std::strcmp(candidate->name, op) == 0) kind = candidate;
  if (kind == nullptr || (type != ORT_ELEMENT_FLOAT16 && type != ORT_ELEMENT_FLOAT)) return -1;
  Args a;
  a.x.data = const_cast<void*>(x);
  a.skip.data = const_cast<void*>(skip);
  a.gamma.data = const_cast<void*>(gamma);
  a.w.data = const_cast<void*>(w);
  a.y.data = y;
  a.sum.data = sum;
  a.rows = 1;
  a.k = k;
  a.n = n;
  a.n_out = kind->swiglu ? n / 2 : n;
  a.epsilon = epsilon;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (type == ORT_ELEMENT_FLOAT16)
    one_row<__half>(*kind, a, s);
  else
    one_row<float>(*kind, a, s);
  return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

