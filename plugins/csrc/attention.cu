// GroupQueryAttention on CUDA: the launches around the kernels of llm2trt_attention.cuh. Decode
// (one new token a row) is one kernel; prefill runs RoPE + cache write, then cuBLAS GEMMs around a
// masked softmax, in query chunks that bound the scratch. The Int8KV ops' caches (C = int8_t) take
// the same kernels instantiated for int8; their prefill first dequantizes the cache's first `total`
// slots into a T copy (scratch) for the GEMMs.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "llm2trt_attention.cuh"
#include "ort_glue.h"

namespace llm2trt {
namespace {

// The pass refuses larger groups by the table's limit; the decode kernel's is what it can hold.
static_assert(attention::kMaxGroup == ops::kAttentionMaxGroup, "the table's group limit is the decode kernel's");

constexpr int64_t kScoresBudget = int64_t(256) << 20;  // bytes of scores + probabilities a prefill chunk may use

template <typename T, typename C, int D>
OrtStatus* prefill_attention(const AttentionArgs& a, OrtKernelContext* context, cudaStream_t stream) {
  constexpr bool INT8 = attention::kInt8Cache<C>;
  const attention::Shape& s = a.shape;
  const int group = s.group(), keys = s.total;
  const int64_t q_elements = int64_t(s.batch) * s.heads * s.seq * D;
  const int64_t per_query = int64_t(s.batch) * s.heads * keys * int64_t(sizeof(float) + sizeof(T));
  const int chunk = int(std::max<int64_t>(1, std::min<int64_t>(s.seq, kScoresBudget / per_query)));
  auto rounded = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t q_bytes = rounded(size_t(q_elements) * sizeof(T)), o_bytes = rounded(size_t(q_elements) * sizeof(float));
  const size_t inverse_bytes = rounded(size_t(q_elements / D) * sizeof(float));
  const size_t score_bytes = rounded(size_t(per_query) * chunk / (sizeof(float) + sizeof(T)) * sizeof(float));
  // int8: the caches' first `total` slots as T, what the GEMMs read
  const size_t stage_bytes = INT8 ? rounded(size_t(s.batch) * s.kv_heads * keys * D * sizeof(T)) : 0;
  Scratch scratch;
  ORT_TRY(scratch.get(context, 2 * stage_bytes + q_bytes + o_bytes + inverse_bytes + score_bytes +
                                   size_t(per_query) * chunk));
  T* stage_k = reinterpret_cast<T*>(scratch.data);
  T* stage_v = reinterpret_cast<T*>(static_cast<char*>(scratch.data) + stage_bytes);
  char* base = static_cast<char*>(scratch.data) + 2 * stage_bytes;
  T* q = reinterpret_cast<T*>(base);
  float* o = reinterpret_cast<float*>(base + q_bytes);
  float* inverse = reinterpret_cast<float*>(base + q_bytes + o_bytes);
  float* scores = reinterpret_cast<float*>(base + q_bytes + o_bytes + inverse_bytes);
  T* probs = reinterpret_cast<T*>(base + q_bytes + o_bytes + inverse_bytes + score_bytes);
  const int* seqlens = static_cast<const int*>(a.seqlens.data);
  C* cache_k = static_cast<C*>(a.present_k.data);
  C* cache_v = static_cast<C*>(a.present_v.data);
  const float* k_scale = static_cast<const float*>(a.k_scale.data);
  const float* v_scale = static_cast<const float*>(a.v_scale.data);
  if constexpr (INT8) {
    attention::dequantize_kernel<T><<<stride_blocks(int64_t(s.batch) * s.kv_heads * keys * (D / 8)), 256, 0, stream>>>(
        cache_k, cache_v, k_scale, v_scale, stage_k, stage_v, s);
    ORT_TRY(launched("GroupQueryAttentionInt8KV"));
  }
  attention::rope_write_kernel<T, C, D><<<dim3(unsigned(s.seq), unsigned(s.batch)), attention::kThreads, 0, stream>>>(
      static_cast<const T*>(a.qkv.data), cache_k, cache_v, seqlens, static_cast<const T*>(a.cos.data),
      static_cast<const T*>(a.sin.data), static_cast<const T*>(a.q_norm.data), static_cast<const T*>(a.k_norm.data),
      k_scale, v_scale, stage_k, stage_v, q, s);
  ORT_TRY(launched("GroupQueryAttention"));
  // What the GEMMs read: the cache itself, or (int8) its T copy of `keys` slots a (row, KV head).
  const T* gemm_k = INT8 ? stage_k : reinterpret_cast<const T*>(cache_k);
  const T* gemm_v = INT8 ? stage_v : reinterpret_cast<const T*>(cache_v);
  void* handle = nullptr;
  ORT_TRY(cublas_handle(context, &handle));
  BatchedGemmFn gemm_batched = cublas_batched_gemm();
  if (gemm_batched == nullptr) return error("llm2trt GroupQueryAttention: no cublasGemmStridedBatchedEx in the process");
  const int type = sizeof(T) == 2 ? kCudaR16F : kCudaR32F;
  const int batches = s.batch * s.kv_heads;
  const long long cache_stride = (long long)(INT8 ? keys : s.capacity) * D, q_stride = (long long)s.seq * group * D;
  const float one = 1.f, zero = 0.f;
  for (int s0 = 0; s0 < s.seq; s0 += chunk) {
    const int in_chunk = std::min(chunk, s.seq - s0), rows = in_chunk * group;
    const size_t offset = size_t(s0) * group * D;
    int rc = gemm_batched(handle, kOpT, kOpN, keys, rows, D, &s.scale, gemm_k, type, D, cache_stride, q + offset,
                          type, D, q_stride, &zero, scores, kCudaR32F, keys, (long long)rows * keys, batches,
                          kComputeF32, kGemmDefault);
    if (rc != 0) return error("llm2trt GroupQueryAttention: cublasGemmStridedBatchedEx (scores) failed");
    const int64_t all_rows = int64_t(batches) * rows;
    attention::softmax_kernel<T><<<unsigned((all_rows + 3) / 4), 128, 0, stream>>>(scores, probs, inverse, seqlens, s,
                                                                                    s0, in_chunk, keys);
    ORT_TRY(launched("GroupQueryAttention"));
    rc = gemm_batched(handle, kOpN, kOpN, D, rows, keys, &one, gemm_v, type, D, cache_stride, probs, type, keys,
                      (long long)rows * keys, &zero, o + offset, kCudaR32F, D, q_stride, batches, kComputeF32,
                      kGemmDefault);
    if (rc != 0) return error("llm2trt GroupQueryAttention: cublasGemmStridedBatchedEx (values) failed");
  }
  attention::heads_out_kernel<T><<<stride_blocks(q_elements), 256, 0, stream>>>(o, inverse, static_cast<T*>(a.out.data), s);
  return launched("GroupQueryAttention");
}

template <typename T, typename C, int D>
OrtStatus* attention_for(const AttentionArgs& a, OrtKernelContext* context, cudaStream_t stream) {
  if (a.shape.seq > 1) return prefill_attention<T, C, D>(a, context, stream);
  attention::decode<T, C, D>(static_cast<const T*>(a.qkv.data), static_cast<C*>(a.present_k.data),
                             static_cast<C*>(a.present_v.data), static_cast<const int*>(a.seqlens.data),
                             static_cast<const T*>(a.cos.data), static_cast<const T*>(a.sin.data),
                             static_cast<const T*>(a.q_norm.data), static_cast<const T*>(a.k_norm.data),
                             static_cast<const float*>(a.k_scale.data), static_cast<const float*>(a.v_scale.data),
                             static_cast<T*>(a.out.data), a.shape, multiprocessors(), compute_capability() >= 90,
                             stream);
  return launched("GroupQueryAttention");
}

using AttentionRun = OrtStatus* (*)(const AttentionArgs&, OrtKernelContext*, cudaStream_t);

// The table's head sizes, each its own instantiation (8 elements a lane, a head's lanes within one
// warp); null for any other size.
template <typename T, typename C, int... D>
AttentionRun attention_kernel(int head, std::integer_sequence<int, D...>) {
  AttentionRun run = nullptr;
  ((run = head == D ? &attention_for<T, C, D> : run), ...);
  return run;
}

// The cache element type C: T, or int8_t (Int8KV).
template <typename T, typename C>
OrtStatus* attention_with(const AttentionArgs& a, OrtKernelContext* context, cudaStream_t stream) {
  const AttentionRun run = attention_kernel<T, C>(a.shape.head_dim, ops::AttentionHeadSizes{});
  if (run == nullptr)
    return error(("llm2trt GroupQueryAttention: head size " + std::string(ops::kAttentionHeadSizesText) + " only").c_str());
  if (a.present_k.data != a.past_k.data) {  // not bound in place: the past rows, then zeros
    attention::present_kernel<C><<<stride_blocks(a.past_k.size()), 256, 0, stream>>>(
        static_cast<const C*>(a.past_k.data), static_cast<const C*>(a.past_v.data), static_cast<C*>(a.present_k.data),
        static_cast<C*>(a.present_v.data), static_cast<const int*>(a.seqlens.data), a.shape);
    ORT_TRY(launched("GroupQueryAttention"));
  }
  return run(a, context, stream);
}

}  // namespace

template <typename T>
OrtStatus* cuda_attention(const AttentionArgs& a, OrtKernelContext* context) {
  cudaStream_t stream = nullptr;
  ORT_TRY(compute_stream(context, &stream));
  if (a.shape.batch == 0 || a.shape.seq == 0) return nullptr;
  // Refusals first (the head size's in attention_with): nothing is launched for a call that fails.
  if (a.shape.group() > attention::kMaxGroup)
    return error(("llm2trt GroupQueryAttention: at most " + std::to_string(attention::kMaxGroup) +
                  " query heads a KV head").c_str());
  for (const Tensor* t : {&a.qkv, &a.present_k, &a.present_v, &a.cos, &a.sin, &a.out, &a.q_norm, &a.k_norm,
                          &a.k_scale, &a.v_scale})
    if (reinterpret_cast<uintptr_t>(t->data) % 16 != 0)  // the kernels move 16 bytes a load
      return error("llm2trt GroupQueryAttention: a tensor not 16-byte aligned");
  return a.int8_cache ? attention_with<T, int8_t>(a, context, stream) : attention_with<T, T>(a, context, stream);
}

template OrtStatus* cuda_attention<__half>(const AttentionArgs&, OrtKernelContext*);
template OrtStatus* cuda_attention<float>(const AttentionArgs&, OrtKernelContext*);

}  // namespace llm2trt
