// The part of ONNX Runtime's C ABI (onnxruntime_c_api.h) a custom-op library needs, declared here
// so the library builds without ONNX Runtime's headers (its wheels ship none). The API is a table
// of function pointers that only ever grows: an entry's index is fixed from the version that added
// it, so the indices below hold for every runtime at or above that version (1.16+ here).
#pragma once
#include <stddef.h>
#include <stdint.h>

extern "C" {

typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtMemoryInfo OrtMemoryInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;

// The head of ONNX Runtime's allocator (onnxruntime_c_api.h): what a kernel's scratch needs.
struct OrtAllocator {
  uint32_t version;
  void* (*Alloc)(OrtAllocator* self, size_t size);
  void (*Free)(OrtAllocator* self, void* p);
};
typedef void OrtApi;  // used only through ort_fn()

typedef enum {
  ORT_ELEMENT_UNDEFINED = 0,
  ORT_ELEMENT_FLOAT = 1,
  ORT_ELEMENT_UINT8 = 2,
  ORT_ELEMENT_INT8 = 3,
  ORT_ELEMENT_INT32 = 6,
  ORT_ELEMENT_INT64 = 7,
  ORT_ELEMENT_FLOAT16 = 10,
  ORT_ELEMENT_BFLOAT16 = 16,
} OrtElementType;

typedef enum { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 } OrtErrorCodeValue;
typedef enum { ORT_MEM_CPU_INPUT = -2, ORT_MEM_DEFAULT = 0 } OrtMemTypeValue;
typedef enum { ORT_DEVICE_ALLOCATOR = 0 } OrtAllocatorTypeValue;
typedef enum { ORT_IO_REQUIRED = 0, ORT_IO_OPTIONAL = 1 } OrtIOCharacteristic;

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
};

// OrtCustomOp as of API version 19; `version` tells the runtime how many fields it may read.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  int (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  int (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  int (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  int (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

#define ORT_CUSTOM_OP_VERSION 19
#define ORT_API_REQUEST 19  // the API version asked of the runtime (1.19)

// Indices into the OrtApi table (their order in onnxruntime_c_api.h).
namespace ort_index {
enum : int {
  CreateStatus = 0,
  GetErrorMessage = 2,
  CreateCustomOpDomain = 26,
  CustomOpDomain_Add = 27,
  AddCustomOpDomain = 28,
  GetTensorMutableData = 51,
  GetTensorElementType = 60,
  GetDimensionsCount = 61,
  GetDimensions = 62,
  GetTensorTypeAndShape = 65,
  CreateMemoryInfo = 68,
  KernelInfoGetAttribute_float = 85,
  KernelInfoGetAttribute_int64 = 86,
  KernelContext_GetInputCount = 88,
  KernelContext_GetOutputCount = 89,
  KernelContext_GetInput = 90,
  KernelContext_GetOutput = 91,
  ReleaseMemoryInfo = 94,
  ReleaseTensorTypeAndShapeInfo = 99,
  ReleaseAllocator = 132,
  KernelContext_GetGPUComputeStream = 193,
  KernelContext_GetAllocator = 253,
  KernelContext_GetResource = 265,
};
}

// The CUDA provider's resources (KernelContext_GetResource), ONNX Runtime's cuda_resource.h.
#define ORT_CUDA_RESOURCE_VERSION 3
#define ORT_CUDA_RESOURCE_CUBLAS_HANDLE 10002

template <typename Fn>
inline Fn ort_fn(const OrtApi* api, int index) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[index]);
}
