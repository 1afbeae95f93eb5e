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
//       rotary inside; the cache updated in place (attention.cu, llm2trt_attention.cuh)
//   GroupQueryAttentionInt8KV, GroupQueryAttentionQKNormInt8KV: the same with int8 caches and
//       (KScale, VScale) float32 [KVH, D] inputs last: an entry is code * scale per channel
//   MoE(X, ExpertIds, ExpertWeights, GateUp, Down) -> Y      routed experts (moe.cu); also bfloat16
//   LinearNBits, RMSNormLinearNBits, SkipRMSNormLinearNBits, SkipRMSNormSwiGLUNBits and the F32
//       twins: the GEMV ops with W quantized (INT4 / INT8 codes, Scales, ZeroPoints; attributes
//       bits and block_size): one row in qgemv.cu, more rows dequantize W for cuBLAS
//
// Why: a batch-1 decode step is ~10 kernels a layer, and its GEMVs are where the time goes. With
// one row (M = 1) each op is ONE kernel (gemv.cu): every block normalizes the row itself (it is a
// few KB, read from L2), then each warp reads its weight rows with 16-byte loads, so the norm, the
// activation and the GEMV share a launch and the weights stream at close to copy bandwidth. With
// more rows (prefill, batched decode) the weights are reused across rows: cuBLAS (the provider's
// own handle and stream) does the GEMM (cublas_paths.cu), and Normed / GateUp are where its input
// and output live. Weights are [N, K] (a row per output): a warp's loads run along K, contiguous.
//
// This file is the glue: ONNX Runtime's custom-op ABI, each op's inputs and outputs, and the
// registration, all read from the generated op table (llm2trt_ops.h, passes/ort_op_table.py).
// Each op is registered for the CUDA provider and, for tests of this library on machines without a
// GPU, for the CPU provider (cpu_reference.cu: plain loops in float).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#include "ort_glue.h"

namespace llm2trt {

const OrtApi* g_api = nullptr;

OrtStatus* error(const char* message) {
  return ort_fn<CreateStatusFn>(g_api, ort_index::CreateStatus)(ORT_INVALID_ARGUMENT, message);
}

namespace {

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

// The slot of table name `name` (ops::io::) among the op's inputs or outputs.
size_t input_slot(const OpKind& kind, int name) { return size_t(kind.input_at[name]); }
size_t output_slot(const OpKind& kind, int name) { return size_t(kind.output_at[name]); }

// An NBits op's W, Scales and ZeroPoints against X's K and the attributes.
OrtStatus* gather_nbits(const OpKind& kind, int64_t bits, int64_t block, OrtKernelContext* context, Args* a) {
  ORT_TRY(input(context, input_slot(kind, ops::io::Scales), &a->scales));
  ORT_TRY(input(context, input_slot(kind, ops::io::ZeroPoints), &a->zeros));
  a->bits = int(bits);
  a->block = int(block);
  if (a->k % block != 0 || a->k * bits % 8 != 0)
    return error("llm2trt NBits: block_size must divide K (X's last dim), and 4-bit codes need an even K");
  const int64_t groups = a->k / block;
  if (a->w.type != ORT_ELEMENT_UINT8 || a->w.shape.size() != 2 || a->w.shape[1] != a->k * bits / 8)
    return error("llm2trt NBits: W must be uint8 [N, K * bits / 8]");
  a->n = a->w.shape[0];
  if (a->scales.type != a->x.type || a->scales.shape != std::vector<int64_t>{a->n, groups})
    return error("llm2trt NBits: Scales must be [N, K / block_size] of X's type");
  if (a->zeros.type != ORT_ELEMENT_UINT8 || a->zeros.shape != std::vector<int64_t>{a->n, groups})
    return error("llm2trt NBits: ZeroPoints must be uint8 [N, K / block_size]");
  return nullptr;
}

OrtStatus* gather(const OpKind& kind, float epsilon, int64_t bits, int64_t block, OrtKernelContext* context,
                  Args* a) {
  ORT_TRY(input(context, input_slot(kind, ops::io::X), &a->x));
  if (kind.skip) ORT_TRY(input(context, input_slot(kind, ops::io::Skip), &a->skip));
  if (kind.norm) ORT_TRY(input(context, input_slot(kind, ops::io::Gamma), &a->gamma));
  ORT_TRY(input(context, input_slot(kind, ops::io::W), &a->w));
  a->epsilon = epsilon;
  a->k = a->x.last();
  a->rows = a->x.rows();
  if (kind.nbits) {
    ORT_TRY(gather_nbits(kind, bits, block, context, a));
  } else {
    if (a->w.shape.size() != 2 || a->w.shape[1] != a->k) return error("llm2trt kernels: W must be [N, K] with X's K");
    a->n = a->w.shape[0];
  }
  if (kind.swiglu && a->n % 2 != 0) return error("llm2trt kernels: SwiGLU's W needs an even row count");
  a->n_out = kind.swiglu ? a->n / 2 : a->n;
  if ((!kind.nbits && a->x.type != a->w.type) || (kind.norm && a->gamma.type != a->x.type) ||
      (kind.skip && a->skip.type != a->x.type))
    return error("llm2trt kernels: X, Skip, Gamma and W must share one type");
  if (a->x.type != ORT_ELEMENT_FLOAT && a->x.type != ORT_ELEMENT_FLOAT16)
    return error("llm2trt kernels: float and float16 only");
  if (kind.skip && a->skip.shape != a->x.shape) return error("llm2trt kernels: Skip must have X's shape");
  if (kind.norm && (a->gamma.shape.size() != 1 || a->gamma.shape[0] != a->k))
    return error("llm2trt kernels: Gamma must be [K]");
  std::vector<int64_t> y_shape = a->x.shape;
  y_shape.back() = a->n_out;
  ORT_TRY(output(context, output_slot(kind, ops::io::Y), y_shape, &a->y));
  if (a->y.data == nullptr && a->rows * a->n_out != 0) return error("llm2trt kernels: Y has no buffer");
  if (kind.skip) ORT_TRY(output(context, output_slot(kind, ops::io::Sum), a->x.shape, &a->sum));
  return nullptr;
}

}  // namespace

OrtStatus* staging(const OpKind& kind, OrtKernelContext* context, Args* a) {
  ORT_TRY(output(context, output_slot(kind, ops::io::Normed), a->x.shape, &a->normed));
  if (a->normed.data == nullptr) return error("llm2trt kernels: Normed needs a name for more than one row");
  if (kind.swiglu) {
    std::vector<int64_t> shape = a->x.shape;
    shape.back() = a->n;
    ORT_TRY(output(context, output_slot(kind, ops::io::GateUp), shape, &a->gate_up));
    if (a->gate_up.data == nullptr) return error("llm2trt kernels: GateUp needs a name for more than one row");
  }
  return nullptr;
}

namespace {

OrtStatus* gather_attention(const OpKind& kind, int64_t heads, int64_t kv_heads, float scale,
                            OrtKernelContext* context, AttentionArgs* a) {
  const std::pair<int, Tensor*> inputs[] = {{ops::io::QKV, &a->qkv},
                                            {ops::io::PastKey, &a->past_k},
                                            {ops::io::PastValue, &a->past_v},
                                            {ops::io::SeqlensK, &a->seqlens},
                                            {ops::io::TotalSequenceLength, &a->total},
                                            {ops::io::CosCache, &a->cos},
                                            {ops::io::SinCache, &a->sin}};
  for (const auto& [name, tensor] : inputs) ORT_TRY(input(context, input_slot(kind, name), tensor));
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
  a->int8_cache = kind.input_at[ops::io::KScale] >= 0;
  if (a->int8_cache) {  // int8 codes, and a float32 scale per (KV head, channel) for each cache
    if (a->past_k.type != ORT_ELEMENT_INT8 || a->past_v.type != ORT_ELEMENT_INT8)
      return error("llm2trt GroupQueryAttentionInt8KV: PastKey and PastValue must be int8");
    ORT_TRY(input(context, input_slot(kind, ops::io::KScale), &a->k_scale));
    ORT_TRY(input(context, input_slot(kind, ops::io::VScale), &a->v_scale));
    for (const Tensor* t : {&a->k_scale, &a->v_scale})
      if (t->type != ORT_ELEMENT_FLOAT || t->shape != std::vector<int64_t>{kv_heads, cache[3]})
        return error("llm2trt GroupQueryAttentionInt8KV: KScale and VScale must be float32 [kv_num_heads, head_dim]");
  }
  for (const Tensor* t : {&a->past_k, &a->past_v, &a->cos, &a->sin})
    if (t->type != a->qkv.type && !(a->int8_cache && (t == &a->past_k || t == &a->past_v)))
      return error("llm2trt GroupQueryAttention: QKV, caches and tables must share one type");
  if (kind.qk_norm) {
    ORT_TRY(input(context, input_slot(kind, ops::io::QNorm), &a->q_norm));
    ORT_TRY(input(context, input_slot(kind, ops::io::KNorm), &a->k_norm));
    for (const Tensor* t : {&a->q_norm, &a->k_norm})
      if (t->type != a->qkv.type || t->shape.size() != 1 || t->shape[0] != cache[3])
        return error("llm2trt GroupQueryAttentionQKNorm: QNorm and KNorm must be [D] of QKV's type");
    a->shape.qk_norm = true;
  }
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
  ORT_TRY(output(context, output_slot(kind, ops::io::Output), {q[0], q[1], heads * cache[3]}, &a->out));
  ORT_TRY(output(context, output_slot(kind, ops::io::PresentKey), cache, &a->present_k));
  ORT_TRY(output(context, output_slot(kind, ops::io::PresentValue), cache, &a->present_v));
  if (a->out.data == nullptr || a->present_k.data == nullptr || a->present_v.data == nullptr)
    return error("llm2trt GroupQueryAttention: every output needs a buffer");
  return nullptr;
}

OrtStatus* gather_moe(const OpKind& kind, int64_t first, OrtKernelContext* context, MoeArgs* a) {
  const std::pair<int, Tensor*> inputs[] = {{ops::io::X, &a->x},
                                            {ops::io::ExpertIds, &a->ids},
                                            {ops::io::ExpertWeights, &a->weights},
                                            {ops::io::GateUp, &a->gate_up},
                                            {ops::io::Down, &a->down}};
  for (const auto& [name, tensor] : inputs) ORT_TRY(input(context, input_slot(kind, name), tensor));
  const std::vector<int64_t>& gu = a->gate_up.shape;
  const std::vector<int64_t>& down = a->down.shape;
  if (a->x.shape.size() != 2 || gu.size() != 3 || down.size() != 3 || gu[2] != a->x.shape[1] || gu[1] % 2 != 0 ||
      down[0] != gu[0] || down[1] != gu[2] || down[2] * 2 != gu[1])
    return error("llm2trt MoE: X must be [N, H], GateUp [E, 2I, H] and Down [E, H, I]");
  if (a->ids.shape.size() != 2 || a->ids.shape[0] != a->x.shape[0] || a->weights.shape != a->ids.shape)
    return error("llm2trt MoE: ExpertIds and ExpertWeights must both be [N, k]");
  if (a->gate_up.type != a->x.type || a->down.type != a->x.type)
    return error("llm2trt MoE: X, GateUp and Down must share one type");
  a->rows = a->x.shape[0];
  a->hidden = a->x.shape[1];
  a->k = a->ids.shape[1];
  a->experts = gu[0];
  a->inter = down[2];
  a->first = first;
  if (a->rows * a->k > INT32_MAX || a->experts > INT32_MAX / 2 || a->hidden > INT32_MAX / 2 || a->inter > INT32_MAX / 4)
    return error("llm2trt MoE: too many rows or experts for 32-bit positions");
  ORT_TRY(output(context, output_slot(kind, ops::io::Y), a->x.shape, &a->y));
  if (a->y.data == nullptr && a->rows * a->hidden != 0) return error("llm2trt MoE: Y has no buffer");
  return nullptr;
}

}  // namespace

// ---- scratch -------------------------------------------------------------------------------------

Scratch::~Scratch() {
  if (data != nullptr) allocator->Free(allocator, data);
  if (allocator != nullptr) ort_fn<ReleaseAllocatorFn>(g_api, ort_index::ReleaseAllocator)(allocator);
  if (info != nullptr) ort_fn<ReleaseMemoryInfoFn>(g_api, ort_index::ReleaseMemoryInfo)(info);
}

OrtStatus* Scratch::get(OrtKernelContext* context, size_t bytes) {
  int device = 0;
  cudaGetDevice(&device);
  ORT_TRY(ort_fn<CreateMemoryInfoFn>(g_api, ort_index::CreateMemoryInfo)("Cuda", 0, device, 0, &info));
  ORT_TRY(ort_fn<GetAllocatorFn>(g_api, ort_index::KernelContext_GetAllocator)(context, info, &allocator));
  if (allocator == nullptr) return error("llm2trt kernels: no allocator for the provider's device");
  data = allocator->Alloc(allocator, bytes);
  return data != nullptr ? nullptr : error("llm2trt kernels: out of device memory for a kernel's scratch");
}

// ---- the CUDA provider's stream, cuBLAS handle and device ----------------------------------------

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

// ---- the custom ops ---------------------------------------------------------------------------

namespace {

// One kernel a node: its op's row of the table and its attributes, a value per table name.
struct Kernel {
  const OpKind* kind;
  bool cuda;
  float floats[ops::attr::kCount] = {};
  int64_t ints[ops::attr::kCount] = {};
};

struct Op : OrtCustomOp {
  const OpKind* kind;
  bool cuda;
  int type;  // the element type T this registration takes (ops::kT in the table)
};

const Op& self(const OrtCustomOp* op) { return *static_cast<const Op*>(op); }

// MoE in the registration's element type.
OrtStatus* compute_moe(const Kernel& kernel, OrtKernelContext* context) {
  MoeArgs a;
  ORT_TRY(gather_moe(*kernel.kind, kernel.ints[ops::attr::first_expert], context, &a));
  switch (a.x.type) {
    case ORT_ELEMENT_FLOAT16:
      if (kernel.cuda) return cuda_moe<__half>(a, context);
      cpu_moe<__half>(a);
      return nullptr;
    case ORT_ELEMENT_BFLOAT16:
      if (kernel.cuda) return cuda_moe<__nv_bfloat16>(a, context);
      cpu_moe<__nv_bfloat16>(a);
      return nullptr;
    case ORT_ELEMENT_FLOAT:
      if (kernel.cuda) return cuda_moe<float>(a, context);
      cpu_moe<float>(a);
      return nullptr;
    default:
      return error("llm2trt MoE: float, float16 and bfloat16 only");
  }
}

OrtStatus* compute(void* opaque, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(opaque);
  if (kernel.kind->moe) return compute_moe(kernel, context);
  if (kernel.kind->attention) {
    AttentionArgs a;
    ORT_TRY(gather_attention(*kernel.kind, kernel.ints[ops::attr::num_heads], kernel.ints[ops::attr::kv_num_heads],
                             kernel.floats[ops::attr::scale], context, &a));
    const int64_t window = kernel.ints[ops::attr::local_window_size];
    a.shape.window = window > 0 ? int(window) : 0;
    a.shape.epsilon = kernel.floats[ops::attr::epsilon];  // the QK-norm's (read only where qk_norm)
    const bool half = a.qkv.type == ORT_ELEMENT_FLOAT16;
    if (kernel.cuda) return half ? cuda_attention<__half>(a, context) : cuda_attention<float>(a, context);
    if (half)
      cpu_attention<__half>(a);
    else
      cpu_attention<float>(a);
    return nullptr;
  }
  Args a;
  ORT_TRY(gather(*kernel.kind, kernel.floats[ops::attr::epsilon], kernel.ints[ops::attr::bits],
                 kernel.ints[ops::attr::block_size], context, &a));
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

// Every attribute the table gives the op, read with the table's type.
OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  Kernel kernel{self(op).kind, self(op).cuda};
  const OpKind& kind = *kernel.kind;
  for (size_t i = 0; i < kind.attributes; ++i) {
    const int id = kind.attribute[i];
    if (ops::kAttributeType[id] == ops::kFloat)
      ORT_TRY(ort_fn<AttrFloatFn>(api, ort_index::KernelInfoGetAttribute_float)(info, ops::kAttributeName[id],
                                                                                &kernel.floats[id]));
    else
      ORT_TRY(ort_fn<AttrIntFn>(api, ort_index::KernelInfoGetAttribute_int64)(info, ops::kAttributeName[id],
                                                                              &kernel.ints[id]));
  }
  if (kind.attention) {
    const int64_t heads = kernel.ints[ops::attr::num_heads], kv_heads = kernel.ints[ops::attr::kv_num_heads];
    const int64_t window = kernel.ints[ops::attr::local_window_size];
    if (kernel.ints[ops::attr::do_rotary] != 1 || kernel.ints[ops::attr::rotary_interleaved] != 0 ||
        (window != -1 && (window < 1 || window > INT32_MAX)))
      return error("llm2trt GroupQueryAttention: do_rotary=1, rotary_interleaved=0 and local_window_size -1 or >= 1 only");
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0)
      return error("llm2trt GroupQueryAttention: num_heads must be a multiple of kv_num_heads");
  }
  if (kind.nbits) {
    const int64_t bits = kernel.ints[ops::attr::bits], block = kernel.ints[ops::attr::block_size];
    if ((bits != 4 && bits != 8) || block < 1 || block > INT32_MAX)
      return error("llm2trt NBits: bits must be 4 or 8 and block_size at least 1");
  }
  *out = new Kernel(kernel);
  return nullptr;
}

// ONNX's element type for a table type: T is the registration's own, the others fixed.
int element_type(const Op& op, ops::Type type) {
  switch (type) {
    case ops::kInt32:
      return ORT_ELEMENT_INT32;
    case ops::kInt64:
      return ORT_ELEMENT_INT64;
    case ops::kFloat32:
      return ORT_ELEMENT_FLOAT;
    case ops::kUInt8:
      return ORT_ELEMENT_UINT8;
    case ops::kInt8:
      return ORT_ELEMENT_INT8;
    default:
      return op.type;
  }
}

// One registration of `kind` for a provider and an element type, its types and characteristics
// read from the table.
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
  op.GetInputType = [](const OrtCustomOp* o, size_t index) { return element_type(self(o), self(o).kind->input_type[index]); };
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return self(o).kind->inputs; };
  op.GetOutputType = [](const OrtCustomOp* o, size_t index) {
    return element_type(self(o), self(o).kind->output_type[index]);
  };
  op.GetOutputTypeCount = [](const OrtCustomOp* o) { return self(o).kind->outputs; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return int(ORT_IO_REQUIRED); };
  op.GetOutputCharacteristic = [](const OrtCustomOp* o, size_t index) {
    return int(self(o).kind->output_optional[index] ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED);
  };
  op.GetInputMemoryType = [](const OrtCustomOp* o, size_t index) {
    return int(self(o).kind->input_on_host[index] ? ORT_MEM_CPU_INPUT : ORT_MEM_DEFAULT);
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

std::vector<Op>& ops_registered() {
  static std::vector<Op> all = [] {
    std::vector<Op> made;
    for (const OpKind& kind : ops::kOps) {
      for (int type : {int(ORT_ELEMENT_FLOAT16), int(ORT_ELEMENT_FLOAT), int(ORT_ELEMENT_BFLOAT16)}) {
        if (type == ORT_ELEMENT_BFLOAT16 && !kind.bfloat16) continue;  // only ops with bfloat16 kernels
        made.push_back(make_op(&kind, true, type));
        made.push_back(make_op(&kind, false, type));
      }
    }
    return made;
  }();
  return all;
}

}  // namespace
}  // namespace llm2trt

using llm2trt::g_api;
using CreateDomainFn = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
using DomainAddFn = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*);
using AddDomainFn = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const OrtApiBase* base) {
  g_api = base->GetApi(ORT_API_REQUEST);
  if (g_api == nullptr) return nullptr;  // a runtime older than 1.19: it runs the reference bodies
  OrtCustomOpDomain* domain = nullptr;
  ORT_TRY(ort_fn<CreateDomainFn>(g_api, ort_index::CreateCustomOpDomain)(llm2trt::ops::kDomain, &domain));
  for (llm2trt::Op& op : llm2trt::ops_registered())
    ORT_TRY(ort_fn<DomainAddFn>(g_api, ort_index::CustomOpDomain_Add)(domain, &op));
  return ort_fn<AddDomainFn>(g_api, ort_index::AddCustomOpDomain)(options, domain);
}

// One op at one row without ONNX Runtime, on `stream`: what scripts/bench_ort_kernels.py times.
// Returns 0, or -1 for an unknown op or type. Y is float32 for the F32 ops.
extern "C" __attribute__((visibility("default"))) int Llm2trtOneRow(const char* op, int type, const void* x,
                                                                   const void* skip, const void* gamma, const void* w,
                                                                   void* y, void* sum, int64_t k, int64_t n,
                                                                   float epsilon, void* stream) {
  using llm2trt::OpKind;
  const OpKind* kind = nullptr;
  for (const OpKind& candidate : llm2trt::ops::kOps)
    if (!candidate.attention && !candidate.moe && !candidate.nbits && std::strcmp(candidate.name, op) == 0)
      kind = &candidate;
  if (kind == nullptr || (type != ORT_ELEMENT_FLOAT16 && type != ORT_ELEMENT_FLOAT)) return -1;
  llm2trt::Args a;
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
    llm2trt::one_row<__half>(*kind, a, s);
  else
    llm2trt::one_row<float>(*kind, a, s);
  return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

// One NBits op without ONNX Runtime (scripts/check_nbits_kernel.py), on `stream`: one row takes
// the one-row kernel; more rows dequantize W into `dequantized` (N * K elements of T) and run
// cuBLAS through `cublas` (a handle, bound here to `stream`), Normed and GateUp staged in `normed`
// [rows, K] and `gate_up` [rows, N]. type: ONNX's (1 float, 10 float16); Y float32 for the F32 ops.
// Returns 0, -1 for an unknown op, type or shape or a failed launch, else cuBLAS's status.
extern "C" __attribute__((visibility("default"))) int Llm2trtNBits(
    const char* op, int type, const void* x, const void* skip, const void* gamma, const void* w, const void* scales,
    const void* zeros, void* y, void* sum, void* normed, void* gate_up, int64_t rows, int64_t k, int64_t n, int bits,
    int block, float epsilon, void* dequantized, void* cublas, void* stream) {
  using llm2trt::OpKind;
  const OpKind* kind = nullptr;
  for (const OpKind& candidate : llm2trt::ops::kOps)
    if (candidate.nbits && std::strcmp(candidate.name, op) == 0) kind = &candidate;
  if (kind == nullptr || (type != ORT_ELEMENT_FLOAT16 && type != ORT_ELEMENT_FLOAT) || (bits != 4 && bits != 8) ||
      block < 1 || k % block != 0 || k * bits % 8 != 0 || (kind->swiglu && n % 2 != 0) || rows < 1)
    return -1;
  llm2trt::Args a;
  a.x.data = const_cast<void*>(x);
  a.x.type = type;
  a.skip.data = const_cast<void*>(skip);
  a.gamma.data = const_cast<void*>(gamma);
  a.w.data = const_cast<void*>(w);
  a.scales.data = const_cast<void*>(scales);
  a.zeros.data = const_cast<void*>(zeros);
  a.y.data = y;
  a.sum.data = sum;
  a.normed.data = normed;
  a.gate_up.data = gate_up;
  a.rows = rows;
  a.k = k;
  a.n = n;
  a.n_out = kind->swiglu ? n / 2 : n;
  a.epsilon = epsilon;
  a.bits = bits;
  a.block = block;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool half = type == ORT_ELEMENT_FLOAT16;
  if (rows == 1) {
    if (half)
      llm2trt::one_row_nbits<__half>(*kind, a, s);
    else
      llm2trt::one_row_nbits<float>(*kind, a, s);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
  }
  // Bound to `stream` unless it already is: setting a stream resets the handle's workspace to the
  // default pool, which its owner (torch) may have replaced for graph capture.
  using GetStreamFn = int (*)(void*, cudaStream_t*);
  using SetStreamFn = int (*)(void*, cudaStream_t);
  static GetStreamFn get_stream = reinterpret_cast<GetStreamFn>(llm2trt::cublas_symbol("cublasGetStream_v2"));
  static SetStreamFn set_stream = reinterpret_cast<SetStreamFn>(llm2trt::cublas_symbol("cublasSetStream_v2"));
  cudaStream_t bound = nullptr;
  if (get_stream == nullptr || set_stream == nullptr || get_stream(cublas, &bound) != 0) return -1;
  if (bound != s && set_stream(cublas, s) != 0) return -1;
  return half ? llm2trt::many_rows<__half>(*kind, a, s, cublas, dequantized)
              : llm2trt::many_rows<float>(*kind, a, s, cublas, dequantized);
}
