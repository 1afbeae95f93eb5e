// GroupQueryAttention on CUDA: the launches around the kernels of llm2trt_attention.cuh. Decode
// (one new token a row) is one kernel; prefill runs RoPE + cache write, then cuBLAS GEMMs around a
// masked softmax, in query chunks that bound the scratch.

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
      static_cast<const T*>(a.sin.data), static_cast<const T*>(a.q_norm.data), static_cast<const T*>(a.k_norm.data), q,
      s);
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
                          static_cast<const T*>(a.q_norm.data), static_cast<const T*>(a.k_norm.data),
                          static_cast<T*>(a.out.data), a.shape, multiprocessors(), compute_capability() >= 90, stream);
  return launched("GroupQueryAttention");
}

using AttentionRun = OrtStatus* (*)(const AttentionArgs&, OrtKernelContext*, cudaStream_t);

// The table's head sizes, each its own instantiation (8 elements a lane, a head's lanes within one
// warp); null for any other size.
template <typename T, int... D>
AttentionRun attention_kernel(int head, std::integer_sequence<int, D...>) {
  AttentionRun run = nullptr;
  ((run = head == D ? &attention_for<T, D> : run), ...);
  return run;
}

}  // namespace

template <typename T>
OrtStatus* cuda_attention(const AttentionArgs& a, OrtKernelContext* context) {
  cudaStream_t stream = nullptr;
  ORT_TRY(compute_stream(context, &stream));
  if (a.shape.batch == 0 || a.shape.seq == 0) return nullptr;
  // Refusals first: nothing is launched for a call that fails.
  const AttentionRun run = attention_kernel<T>(a.shape.head_dim, ops::AttentionHeadSizes{});
  if (run == nullptr)
    return error(("llm2trt GroupQueryAttention: head size " + std::string(ops::kAttentionHeadSizesText) + " only").c_str());
  if (a.shape.group() > attention::kMaxGroup)
    return error(("llm2trt GroupQueryAttention: at most " + std::to_string(attention::kMaxGroup) +
                  " query heads a KV head").c_str());
  for (const Tensor* t : {&a.qkv, &a.present_k, &a.present_v, &a.cos, &a.sin, &a.out, &a.q_norm, &a.k_norm})
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

template OrtStatus* cuda_attention<__half>(const AttentionArgs&, OrtKernelContext*);
template OrtStatus* cuda_attention<float>(const AttentionArgs&, OrtKernelContext*);

}  // namespace llm2trt
