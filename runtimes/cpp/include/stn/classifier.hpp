// stn_runtime: run a classifier written by `stn-deploy export` from C++, without Python.
//
// Everything the caller needs (input size, channels, mean/std, class names, whether the
// preprocessing is baked into the graph) is read from the model's own metadata: the ONNX
// metadata_props, or the `<plan>.json` sidecar of a TensorRT plan. Failures of any kind
// (missing file, corrupt model, missing metadata, wrong image size) throw stn::Error with a
// one-line message; nothing here aborts the process.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace stn {

/// Every failure this library reports. what() is one line, fit to show to a user.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// An 8-bit image, interleaved HWC (channels = 1 for grey, 3 for RGB), rows top to bottom.
struct Image {
    int width = 0;
    int height = 0;
    int channels = 0;
    std::vector<uint8_t> pixels;  // height * width * channels bytes
};

/// Read a binary PGM (P5) or PPM (P6) file with maxval <= 255 (values are rescaled to 0..255).
/// Throws stn::Error on a missing, truncated or unsupported file.
Image read_pnm(const std::string& path);

/// One image's result: raw logits, and the top-k (class index, softmax probability), best first.
struct Prediction {
    std::vector<float> logits;
    std::vector<std::pair<int, float>> top_k;
};

/// What the model's metadata says about its input. Filled in by Classifier::open.
struct ModelInfo {
    int channels = 0;
    int height = 0;
    int width = 0;
    std::vector<float> mean;  // one per channel, applied to x / 255
    std::vector<float> std;
    std::vector<std::string> class_names;
    // true: the graph takes raw uint8 NHWC pixels and normalises itself ("preprocess" =
    // "embedded"); false: it takes float32 NCHW, normalised here as (x / 255 - mean) / std.
    bool embedded_preprocess = false;
    std::string backend;  // "openvino" or "tensorrt"
    std::string path;
};

/// Options for Classifier::open; "none means default" (values <= 0 / empty leave the
/// backend's own default).
struct OpenOptions {
    std::string device = "CPU";  // OpenVINO device name; ignored by TensorRT
    int num_threads = 0;         // OpenVINO inference threads; 0: OpenVINO's default
};

class Classifier {
public:
    /// Open a model by its extension: .onnx / .xml -> OpenVINO, .plan / .engine -> TensorRT.
    /// Throws stn::Error if the file is missing or corrupt, its metadata is missing or
    /// inconsistent, or the backend was not compiled into this build.
    static std::unique_ptr<Classifier> open(const std::string& path,
                                            const OpenOptions& options = OpenOptions());

    virtual ~Classifier() = default;
    Classifier(const Classifier&) = delete;
    Classifier& operator=(const Classifier&) = delete;

    /// Classify a batch. Each image must have exactly the model's width, height and channels
    /// (no silent resizing: resize beforehand, e.g. bilinear as `stn-deploy predict` does).
    /// top_k is clamped to the number of classes. Throws stn::Error.
    std::vector<Prediction> classify(const std::vector<Image>& images, int top_k = 5);

    /// Logits (batch x num_classes, row-major) for input already in the model's own layout:
    /// float32 NCHW normalised, or uint8 NHWC when info().embedded_preprocess. For callers that
    /// preprocess themselves, and to time inference alone.
    std::vector<float> infer_raw(const void* input, int batch);

    const ModelInfo& info() const { return info_; }
    int width() const { return info_.width; }
    int height() const { return info_.height; }
    int channels() const { return info_.channels; }
    int num_classes() const { return static_cast<int>(info_.class_names.size()); }
    const std::vector<std::string>& class_names() const { return info_.class_names; }
    const std::vector<float>& mean() const { return info_.mean; }
    const std::vector<float>& stddev() const { return info_.std; }

protected:
    explicit Classifier(ModelInfo info);
    /// Backend hook: run `batch` inputs (layout as for infer_raw), return batch x num_classes.
    virtual std::vector<float> run(const void* input, int batch) = 0;

private:
    ModelInfo info_;
    std::vector<float> lut_;       // channels x 256: (v / 255 - mean[c]) / std[c]
    std::vector<float> scratch_;   // float NCHW batch
    std::vector<uint8_t> raw_;     // uint8 NHWC batch
};

}  // namespace stn
