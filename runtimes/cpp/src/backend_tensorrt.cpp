// TensorRT backend (TensorRT 10 / 11 C++ API: named I/O tensors, setInputShape,
// setTensorAddress, enqueueV3; no bindings, no enqueueV2).
//
// STATUS: written against NVIDIA's documented API; NOT compiled against the real SDK and NOT
// run (the development machine has no GPU and no TensorRT headers). See runtimes/cpp/README.md.
//
// The plan's facts come from its `<plan>.json` sidecar (written by `stn-deploy export`
// for a plan): the same flat keys as the ONNX metadata, plus tensorrt_version,
// gpu_name and compute_capability, which are checked against this process's TensorRT and GPU
// before the plan is deserialized.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <sstream>

#include "internal.hpp"

namespace stn::detail {

namespace {

#define STN_CUDA_CHECK(call)                                                                     \
    do {                                                                                         \
        const cudaError_t stn_status_ = (call);                                                  \
        if (stn_status_ != cudaSuccess)                                                          \
            throw Error(std::string("CUDA error in ") + #call + ": " + cudaGetErrorName(stn_status_) + \
                        " (" + cudaGetErrorString(stn_status_) + ")");                          \
    } while (0)

// Keeps the last error TensorRT reported, so a failed call can say why.
class Logger final : public nvinfer1::ILogger {
public:
    void log(Severity severity, const char* msg) noexcept override {
        if (severity > Severity::kWARNING || msg == nullptr) return;
        std::lock_guard<std::mutex> lock(mutex_);
        if (severity <= Severity::kERROR) last_error_ = msg;
    }
    std::string take_last_error() {
        std::lock_guard<std::mutex> lock(mutex_);
        std::string s = last_error_;
        last_error_.clear();
        return s.empty() ? "no message from TensorRT" : s;
    }

private:
    std::mutex mutex_;
    std::string last_error_;
};

Logger& logger() {
    static Logger instance;
    return instance;
}

std::vector<int> parse_version(const std::string& text) {
    std::vector<int> parts;
    std::stringstream ss(text);
    std::string item;
    while (std::getline(ss, item, '.')) {
        try {
            parts.push_back(std::stoi(item));
        } catch (const std::exception&) {
            break;
        }
    }
    return parts;
}

size_t dtype_size(nvinfer1::DataType t) {
    switch (t) {
        case nvinfer1::DataType::kFLOAT: return 4;
        case nvinfer1::DataType::kHALF: return 2;
        case nvinfer1::DataType::kINT32: return 4;
        case nvinfer1::DataType::kUINT8: return 1;
        case nvinfer1::DataType::kINT8: return 1;
        case nvinfer1::DataType::kBOOL: return 1;
        case nvinfer1::DataType::kINT64: return 8;
        default: throw Error("the plan has an I/O tensor of a data type stn_runtime does not handle");
    }
}

std::string dims_str(const nvinfer1::Dims& d) {
    std::string s = "[";
    for (int i = 0; i < d.nbDims; ++i) s += (i ? "," : "") + std::to_string(d.d[i]);
    return s + "]";
}

// Owns a CUDA stream, so a constructor that throws part-way still releases it.
struct Stream {
    cudaStream_t handle = nullptr;
    Stream() = default;
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    ~Stream() {
        if (handle != nullptr) cudaStreamDestroy(handle);
    }
};

struct DeviceBuffer {
    void* ptr = nullptr;
    size_t bytes = 0;
};

class TensorRtClassifier final : public Classifier {
public:
    TensorRtClassifier(ModelInfo info, std::unique_ptr<nvinfer1::IRuntime> runtime,
                       std::unique_ptr<nvinfer1::ICudaEngine> engine)
        : Classifier(std::move(info)), runtime_(std::move(runtime)), engine_(std::move(engine)) {
        const std::string& path = this->info().path;
        context_.reset(engine_->createExecutionContext());
        if (!context_) throw Error(path + ": cannot create a TensorRT execution context: " + logger().take_last_error());
        STN_CUDA_CHECK(cudaStreamCreate(&stream_.handle));

        const int32_t n = engine_->getNbIOTensors();
        for (int32_t i = 0; i < n; ++i) {
            const char* name = engine_->getIOTensorName(i);
            if (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) {
                if (!input_.empty()) throw Error(path + ": the plan has more than one input tensor");
                input_ = name;
            } else {
                outputs_.emplace_back(name);
            }
        }
        if (input_ != "input") throw Error(path + ": the plan's input tensor is '" + input_ + "', expected 'input'");
        if (std::find(outputs_.begin(), outputs_.end(), "logits") == outputs_.end())
            throw Error(path + ": the plan has no 'logits' output");
        const nvinfer1::DataType want = this->info().embedded_preprocess ? nvinfer1::DataType::kUINT8
                                                                         : nvinfer1::DataType::kFLOAT;
        if (engine_->getTensorDataType(input_.c_str()) != want)
            throw Error(path + ": the plan's input data type does not match the sidecar's input_dtype");
        if (engine_->getTensorDataType("logits") != nvinfer1::DataType::kFLOAT)
            throw Error(path + ": the plan's 'logits' output is not float32");
        const nvinfer1::Dims in = engine_->getTensorShape(input_.c_str());
        const std::vector<int64_t> want_dims = this->info().embedded_preprocess
            ? std::vector<int64_t>{height(), width(), channels()}
            : std::vector<int64_t>{channels(), height(), width()};
        bool ok = in.nbDims == 4;
        for (int i = 0; ok && i < 3; ++i) ok = in.d[i + 1] == want_dims[size_t(i)];
        if (!ok) throw Error(path + ": the plan's input shape " + dims_str(in) + " does not match the sidecar's input_shape");
        if (in.d[0] == -1) {  // dynamic batch: the range of optimisation profile 0
            min_batch_ = engine_->getProfileShape(input_.c_str(), 0, nvinfer1::OptProfileSelector::kMIN).d[0];
            max_batch_ = engine_->getProfileShape(input_.c_str(), 0, nvinfer1::OptProfileSelector::kMAX).d[0];
        } else {
            min_batch_ = max_batch_ = in.d[0];
        }
    }

    ~TensorRtClassifier() override {
        // Errors cannot be thrown from here; free what was allocated, in stream order.
        if (stream_.handle != nullptr) {
            for (auto& b : buffers_)
                if (b.ptr != nullptr) cudaFreeAsync(b.ptr, stream_.handle);
            cudaStreamSynchronize(stream_.handle);
        }
    }

protected:
    std::vector<float> run(const void* input, int batch) override {
        const std::string& path = info().path;
        if (batch < min_batch_ || batch > max_batch_)
            throw Error(path + ": batch " + std::to_string(batch) + " is outside the plan's range [" +
                        std::to_string(min_batch_) + ", " + std::to_string(max_batch_) + "]; split the batch");
        nvinfer1::Dims shape = engine_->getTensorShape(input_.c_str());
        shape.d[0] = batch;
        if (!context_->setInputShape(input_.c_str(), shape))
            throw Error(path + ": TensorRT refused input shape " + dims_str(shape) + ": " + logger().take_last_error());

        // Every I/O tensor needs an address, including outputs we do not read (theta).
        std::vector<std::string> names{input_};
        names.insert(names.end(), outputs_.begin(), outputs_.end());
        buffers_.resize(names.size());
        size_t in_bytes = 0, logits_bytes = 0;
        void* logits_ptr = nullptr;
        for (size_t i = 0; i < names.size(); ++i) {
            const char* name = names[i].c_str();
            const nvinfer1::Dims d = context_->getTensorShape(name);
            size_t count = 1;
            for (int k = 0; k < d.nbDims; ++k) {
                if (d.d[k] < 0) throw Error(path + ": tensor '" + names[i] + "' has unresolved shape " + dims_str(d));
                count *= size_t(d.d[k]);
            }
            const size_t bytes = count * dtype_size(engine_->getTensorDataType(name));
            DeviceBuffer& buf = buffers_[i];
            if (buf.bytes < bytes) {  // grow only; reused across calls
                if (buf.ptr != nullptr) STN_CUDA_CHECK(cudaFreeAsync(buf.ptr, stream_.handle));
                buf.ptr = nullptr;
                buf.bytes = 0;
                STN_CUDA_CHECK(cudaMallocAsync(&buf.ptr, std::max<size_t>(bytes, 1), stream_.handle));
                buf.bytes = bytes;
            }
            if (!context_->setTensorAddress(name, buf.ptr))
                throw Error(path + ": TensorRT refused the address of '" + names[i] + "': " + logger().take_last_error());
            if (i == 0) in_bytes = bytes;
            if (names[i] == "logits") {
                logits_bytes = bytes;
                logits_ptr = buf.ptr;
                if (d.nbDims != 2 || d.d[0] != batch || d.d[1] != num_classes())
                    throw Error(path + ": 'logits' has shape " + dims_str(d) + ", expected [" + std::to_string(batch) +
                                "," + std::to_string(num_classes()) + "]");
            }
        }
        std::vector<float> out(logits_bytes / sizeof(float));
        STN_CUDA_CHECK(cudaMemcpyAsync(buffers_[0].ptr, input, in_bytes, cudaMemcpyHostToDevice, stream_.handle));
        if (!context_->enqueueV3(stream_.handle))
            throw Error(path + ": TensorRT enqueueV3 failed: " + logger().take_last_error());
        STN_CUDA_CHECK(cudaMemcpyAsync(out.data(), logits_ptr, logits_bytes, cudaMemcpyDeviceToHost, stream_.handle));
        STN_CUDA_CHECK(cudaStreamSynchronize(stream_.handle));
        STN_CUDA_CHECK(cudaGetLastError());
        return out;
    }

private:
    std::unique_ptr<nvinfer1::IRuntime> runtime_;  // must outlive the engine
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<nvinfer1::IExecutionContext> context_;
    Stream stream_;  // declared after context_: destroyed before it
    std::string input_;
    std::vector<std::string> outputs_;
    std::vector<DeviceBuffer> buffers_;  // same order as {input_, outputs_...}
    int64_t min_batch_ = 1, max_batch_ = 1;
};

// Refuse a plan built for another TensorRT version or GPU before deserializing it: TensorRT
// plans are tied to the exact TensorRT version and (without hardware compatibility) to the
// GPU's compute capability.
void check_plan_matches_host(const std::string& path, const std::map<std::string, std::string>& side) {
    auto it = side.find("tensorrt_version");
    if (it == side.end()) throw Error(path + ".json has no 'tensorrt_version' (was it written by stn-deploy export?)");
    const std::vector<int> plan_v = parse_version(it->second);
    const int here[3] = {getInferLibMajorVersion(), getInferLibMinorVersion(), getInferLibPatchVersion()};
    const std::string here_s = std::to_string(here[0]) + "." + std::to_string(here[1]) + "." + std::to_string(here[2]);
    if (plan_v.size() < 3 || plan_v[0] != here[0] || plan_v[1] != here[1] || plan_v[2] != here[2])
        throw Error(path + " was built with TensorRT " + it->second + " but this program runs TensorRT " + here_s +
                    "; rebuild the plan on this machine with stn-deploy export");
    if (here[0] < 10) throw Error("stn_runtime needs TensorRT 10 or later, found " + here_s);

    int device = 0;
    STN_CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    STN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    const std::string cc_here = std::to_string(prop.major) + "." + std::to_string(prop.minor);
    auto cc = side.find("compute_capability");
    if (cc == side.end()) throw Error(path + ".json has no 'compute_capability'");
    std::string cc_plan = cc->second;  // "8.9", or [8, 9] as raw JSON
    cc_plan.erase(std::remove_if(cc_plan.begin(), cc_plan.end(), [](char c) { return c == '[' || c == ']' || c == ' '; }),
                  cc_plan.end());
    std::replace(cc_plan.begin(), cc_plan.end(), ',', '.');
    if (cc_plan != cc_here) {
        auto gpu = side.find("gpu_name");
        throw Error(path + " was built for compute capability " + cc_plan +
                    (gpu != side.end() ? " (" + gpu->second + ")" : std::string()) + " but this GPU (" + prop.name +
                    ") is " + cc_here + "; rebuild the plan on this machine");
    }
}

}  // namespace

std::unique_ptr<Classifier> open_tensorrt(const std::string& path, const OpenOptions& options) {
    (void)options;
    const std::string sidecar = path + ".json";
    if (!file_exists(sidecar))
        throw Error(path + ": metadata sidecar " + sidecar + " not found (stn-deploy export writes it beside the plan)");
    const auto side = parse_flat_json(read_file(sidecar, "plan sidecar"), sidecar);
    auto lookup = [&](const std::string& key, std::string& value) {
        auto it = side.find(key);
        if (it == side.end()) return false;
        value = it->second;
        return true;
    };
    ModelInfo info = info_from_metadata(sidecar, lookup);
    info.backend = "tensorrt";
    info.path = path;

    int devices = 0;
    const cudaError_t st = cudaGetDeviceCount(&devices);
    if (st != cudaSuccess || devices == 0)
        throw Error("cannot open " + path + ": no usable CUDA device (" +
                    (st != cudaSuccess ? std::string(cudaGetErrorString(st)) : std::string("0 devices")) + ")");
    check_plan_matches_host(path, side);

    const std::string blob = read_file(path, "plan");
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger()));
    if (!runtime) throw Error("cannot create the TensorRT runtime: " + logger().take_last_error());
    std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine)
        throw Error(path + " is not a usable TensorRT plan (corrupt, or built for another version/GPU): " +
                    logger().take_last_error());
    return std::make_unique<TensorRtClassifier>(std::move(info), std::move(runtime), std::move(engine));
}

}  // namespace stn::detail
