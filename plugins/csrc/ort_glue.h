// What the library's sources share: ONNX Runtime's API as the kernels call it, the tensors and
// arguments the glue (ort_glue.cu) gathers for them, and each part's entry points. The op table
// comes from llm2trt_ops.h, which plugins/ort_library.py generates from passes/ort_op_table.py at
// build time (it is not in this directory).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "llm2trt_attention.cuh"  // attention::Shape, the attention kernels' parameters
#include "llm2trt_ops.h"
#include "ort_abi.h"

namespace llm2trt {

extern const OrtApi* g_api;  // set by RegisterCustomOps

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

OrtStatus* error(const char* message);

#define ORT_TRY(expr)                       \
  do {                                      \
    OrtStatus* status_ = (expr);            \
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

// ---- the ops' arguments -------------------------------------------------------------------------

using OpKind = ops::Op;  // one row of the generated table: name, inputs, outputs, types, attributes

struct Args {
  Tensor x, skip, gamma, w;
  Tensor y, sum, normed, gate_up;
  int64_t rows = 0, k = 0, n = 0, n_out = 0;  // n: weight rows; n_out: Y's last dim
  float epsilon = 1e-6f;
  // NBits ops: W holds uint8 codes [N, K * bits / 8], Scales T and ZeroPoints uint8 [N, K / block].
  Tensor scales, zeros;
  int bits = 0, block = 0;
};

// Outputs that only the many-row path writes: ask for them only then.
OrtStatus* staging(const OpKind& kind, OrtKernelContext* context, Args* a);

struct AttentionArgs {
  Tensor qkv, past_k, past_v, seqlens, total, cos, sin;
  Tensor q_norm, k_norm;  // GroupQueryAttentionQKNorm: the per-head norms' scales [D]; else empty
  // The Int8KV ops: the caches int8 codes, an entry code * scale with KScale / VScale float32
  // [KVH, D] (per KV head and channel); else empty and the caches T.
  Tensor k_scale, v_scale;
  bool int8_cache = false;
  Tensor out, present_k, present_v;
  attention::Shape shape;
};

// MoE: X [N, H], ExpertIds int64 [N, k], ExpertWeights float32 [N, k], GateUp [E, 2I, H], Down [E, H, I].
struct MoeArgs {
  Tensor x, ids, weights, gate_up, down, y;
  int64_t rows = 0, k = 0, experts = 0, hidden = 0, inter = 0, first = 0;
};

// Device scratch from ONNX Runtime's allocator for the provider's device (arena-backed, so a
// captured CUDA graph sees the same addresses each replay); freed when it goes out of scope.
struct Scratch {
  OrtMemoryInfo* info = nullptr;
  OrtAllocator* allocator = nullptr;
  void* data = nullptr;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch();
  OrtStatus* get(OrtKernelContext* context, size_t bytes);
};

// ---- the CUDA provider's stream, cuBLAS handle and device (ort_glue.cu) ------------------------

OrtStatus* compute_stream(OrtKernelContext* context, cudaStream_t* stream);
OrtStatus* cublas_handle(OrtKernelContext* context, void** handle);
OrtStatus* launched(const char* what);  // the last launch's error as a status
int multiprocessors();
int compute_capability();

// Blocks of 256 threads for a grid-stride loop over `total` elements.
inline unsigned stride_blocks(int64_t total) { return unsigned(std::min<int64_t>((total + 255) / 256, 65535)); }

// ---- cuBLAS, found in the provider's own process image (cublas_paths.cu) -----------------------

using GemmExFn = int (*)(void*, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int,
                         const void*, void*, int, int, int, int);
using BatchedGemmFn = int (*)(void*, int, int, int, int, int, const void*, const void*, int, int, long long,
                              const void*, int, int, long long, const void*, void*, int, int, long long, int, int, int);
void* cublas_symbol(const char* symbol);  // null where the process has no cuBLAS
GemmExFn cublas_gemm();
BatchedGemmFn cublas_batched_gemm();

constexpr int kCudaR16F = 2, kCudaR16BF = 14, kCudaR32F = 0, kComputeF32 = 68, kGemmDefault = -1, kOpN = 0, kOpT = 1;

// ---- each part's entry points, T = __half or float (MoE: __nv_bfloat16 too) --------------------

template <typename T>
void cpu_compute(const OpKind& kind, const Args& a);  // cpu_reference.cu
template <typename T>
void cpu_attention(const AttentionArgs& a);  // cpu_reference.cu
template <typename T>
void one_row(const OpKind& kind, const Args& a, cudaStream_t stream);  // gemv.cu
template <typename T>
OrtStatus* cuda_compute(const OpKind& kind, OrtKernelContext* context, Args& a);  // cublas_paths.cu
// The many-row path without ONNX Runtime: Normed / GateUp staged in `a`, `cublas` a cuBLAS handle,
// `dequantized` (NBits ops) room for W in T. Returns a cuBLAS status or -1 for a failed launch.
template <typename T>
int many_rows(const OpKind& kind, const Args& a, cudaStream_t stream, void* cublas, void* dequantized);
// NBits (qgemv.cu): the one-row kernels, and W dequantized to T [N, K] (for cuBLAS).
template <typename T>
void one_row_nbits(const OpKind& kind, const Args& a, cudaStream_t stream);
template <typename T>
void dequantize_nbits(const Args& a, T* out, cudaStream_t stream);
template <typename T>
OrtStatus* cuda_attention(const AttentionArgs& a, OrtKernelContext* context);  // attention.cu
template <typename T>
void cpu_moe(const MoeArgs& a);  // cpu_reference.cu
template <typename T>
OrtStatus* cuda_moe(const MoeArgs& a, OrtKernelContext* context);  // moe.cu

}  // namespace llm2trt
