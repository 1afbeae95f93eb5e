// The many-row path (prefill, batched decode): the weights are reused across rows, so cuBLAS (the
// CUDA provider's own handle and stream) does the GEMM, with a norm kernel before it and a SwiGLU
// kernel after; Normed and GateUp are where its input and output live. An NBits op's W is first
// dequantized to T in scratch (qgemv.cu), one pass over the codes. cuBLAS is found in the
// provider's own process image, so the library links no CUDA library but the runtime.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>

#include "kernel_common.cuh"
#include "ort_glue.h"

namespace llm2trt {
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

namespace {

// out[rows, n] = in[rows, k] @ w[n, k]^T, column-major: out^T (n x rows) = w (k x n)^T . in^T (k x rows).
// `float_out`: out in float32 (cuBLAS takes half inputs with a float output under float compute).
// Returns cuBLAS's status, or -2 where the process has no cublasGemmEx.
int gemm(void* handle, const Args& a, const void* w, const void* in, void* out, bool float_out = false) {
  GemmExFn fn = cublas_gemm();
  if (fn == nullptr) return -2;
  const float one = 1.f, zero = 0.f;
  const int type = a.x.type == ORT_ELEMENT_FLOAT16 ? kCudaR16F : kCudaR32F;
  const int k = int(a.k), n = int(a.n), rows = int(a.rows);
  return fn(handle, kOpT, kOpN, n, rows, k, &one, w, type, k, in, type, k, &zero, out, float_out ? kCudaR32F : type,
            n, kComputeF32, kGemmDefault);
}

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

}  // namespace

template <typename T>
int many_rows(const OpKind& kind, const Args& a, cudaStream_t stream, void* cublas, void* dequantized) {
  const void* w = a.w.data;
  if (kind.nbits) {  // W to T once, then the float path: the GEMM reuses each weight across the rows
    dequantize_nbits<T>(a, static_cast<T*>(dequantized), stream);
    w = dequantized;
  }
  const void* in = a.x.data;
  if (kind.norm) {
    const int threads = a.k >= 1024 ? 1024 : ((int(a.k) + 31) / 32) * 32;
    if (kind.skip)
      norm_rows_kernel<T, true><<<unsigned(a.rows), threads, 0, stream>>>(
          static_cast<const T*>(a.x.data), static_cast<const T*>(a.skip.data), static_cast<const T*>(a.gamma.data),
          static_cast<T*>(a.sum.data), static_cast<T*>(a.normed.data), int(a.k), a.epsilon);
    else
      norm_rows_kernel<T, false><<<unsigned(a.rows), threads, 0, stream>>>(
          static_cast<const T*>(a.x.data), nullptr, static_cast<const T*>(a.gamma.data), nullptr,
          static_cast<T*>(a.normed.data), int(a.k), a.epsilon);
    in = a.normed.data;
  }
  if (cudaGetLastError() != cudaSuccess) return -1;
  if (!kind.swiglu) return gemm(cublas, a, w, in, a.y.data, kind.float_y);
  if (int rc = gemm(cublas, a, w, in, a.gate_up.data)) return rc;
  swiglu_rows_kernel<T><<<stride_blocks(a.rows * a.n_out), 256, 0, stream>>>(static_cast<const T*>(a.gate_up.data),
                                                                           static_cast<T*>(a.y.data), a.rows,
                                                                           int(a.n_out));
  return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

template <typename T>
OrtStatus* cuda_compute(const OpKind& kind, OrtKernelContext* context, Args& a) {
  cudaStream_t stream = nullptr;
  ORT_TRY(compute_stream(context, &stream));
  if (a.rows == 0) return nullptr;
  if (a.rows == 1) {
    if (kind.nbits)
      one_row_nbits<T>(kind, a, stream);
    else
      one_row<T>(kind, a, stream);
    return launched(kind.name);
  }
  if (kind.norm) ORT_TRY(staging(kind, context, &a));
  void* handle = nullptr;
  ORT_TRY(cublas_handle(context, &handle));
  Scratch dequantized;  // the arena's: stream-ordered, and the same address each captured replay
  if (kind.nbits) ORT_TRY(dequantized.get(context, size_t(a.n * a.k) * sizeof(T)));
  const int rc = many_rows<T>(kind, a, stream, handle, dequantized.data);
  if (rc == -1) return launched(kind.name);
  if (rc == -2) return error("llm2trt kernels: no cublasGemmEx in the process");
  if (rc != 0) {
    static char message[96];
    std::snprintf(message, sizeof message, "llm2trt kernels: cublasGemmEx failed (status %d)", rc);
    return error(message);
  }
  return nullptr;
}

template int many_rows<__half>(const OpKind&, const Args&, cudaStream_t, void*, void*);
template int many_rows<float>(const OpKind&, const Args&, cudaStream_t, void*, void*);
template OrtStatus* cuda_compute<__half>(const OpKind&, OrtKernelContext*, Args&);
template OrtStatus* cuda_compute<float>(const OpKind&, OrtKernelContext*, Args&);

}  // namespace llm2trt
