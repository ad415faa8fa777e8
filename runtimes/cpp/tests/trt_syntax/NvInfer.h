// TEST-ONLY hand-written declarations of the TensorRT 10 API subset that
// src/backend_tensorrt.cpp uses, to let `g++ -fsyntax-only` catch typos on a machine without
// the SDK. NOT the real header, NOT shipped, NOT linked: passing this check says nothing about
// compiling against the real TensorRT. Signatures follow NVIDIA's TensorRT 10 C++ API docs.
#pragma once
#include <cstddef>
#include <cstdint>
#include "cuda_runtime_api.h"

namespace nvinfer1 {
class Dims64 {
public:
    static constexpr int32_t MAX_DIMS{8};
    int32_t nbDims;
    int64_t d[MAX_DIMS];
};
using Dims = Dims64;
enum class DataType : int32_t { kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3, kBOOL = 4, kUINT8 = 5, kFP8 = 6, kBF16 = 7, kINT64 = 8, kINT4 = 9 };
enum class TensorIOMode : int32_t { kNONE = 0, kINPUT = 1, kOUTPUT = 2 };
enum class OptProfileSelector : int32_t { kMIN = 0, kOPT = 1, kMAX = 2 };

class ILogger {
public:
    enum class Severity : int32_t { kINTERNAL_ERROR = 0, kERROR = 1, kWARNING = 2, kINFO = 3, kVERBOSE = 4 };
    virtual void log(Severity severity, char const* msg) noexcept = 0;
    ILogger() = default;
    virtual ~ILogger() = default;
};

class IExecutionContext {
public:
    virtual ~IExecutionContext() noexcept = default;
    bool setInputShape(char const* tensorName, Dims const& dims) noexcept;
    Dims getTensorShape(char const* tensorName) const noexcept;
    bool setTensorAddress(char const* tensorName, void* data) noexcept;
    bool enqueueV3(cudaStream_t stream) noexcept;
};

class ICudaEngine {
public:
    virtual ~ICudaEngine() noexcept = default;
    Dims getTensorShape(char const* tensorName) const noexcept;
    DataType getTensorDataType(char const* tensorName) const noexcept;
    int32_t getNbIOTensors() const noexcept;
    char const* getIOTensorName(int32_t index) const noexcept;
    TensorIOMode getTensorIOMode(char const* tensorName) const noexcept;
    Dims getProfileShape(char const* tensorName, int32_t profileIndex, OptProfileSelector select) const noexcept;
    IExecutionContext* createExecutionContext() noexcept;
};

class IRuntime {
public:
    virtual ~IRuntime() noexcept = default;
    ICudaEngine* deserializeCudaEngine(void const* blob, std::size_t size) noexcept;
};

IRuntime* createInferRuntime(ILogger& logger) noexcept;
}  // namespace nvinfer1

extern "C" int32_t getInferLibMajorVersion() noexcept;
extern "C" int32_t getInferLibMinorVersion() noexcept;
extern "C" int32_t getInferLibPatchVersion() noexcept;
