// Backend-independent part of the classifier: validation, preprocessing, softmax, top-k, and
// choosing the backend from the file's extension.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "internal.hpp"

namespace stn {

namespace {

std::string lower_extension(const std::string& path) {
    auto slash = path.find_last_of('/');
    auto dot = path.find_last_of('.');
    if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return "";
    std::string ext = path.substr(dot);
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    return ext;
}

}  // namespace

std::unique_ptr<Classifier> Classifier::open(const std::string& path, const OpenOptions& options) {
    const std::string ext = lower_extension(path);
    if (ext == ".onnx" || ext == ".xml") {
        if (!detail::file_exists(path)) throw Error("model not found: " + path);
#ifdef STN_WITH_OPENVINO
        return detail::open_openvino(path, options);
#else
        throw Error("cannot open " + path + ": this stn_runtime was built without OpenVINO "
                    "(configure with -DSTN_WITH_OPENVINO=ON and -DOpenVINO_DIR=...)");
#endif
    }
    if (ext == ".plan" || ext == ".engine") {
        if (!detail::file_exists(path)) throw Error("model not found: " + path);
#ifdef STN_WITH_TENSORRT
        return detail::open_tensorrt(path, options);
#else
        throw Error("cannot open " + path + ": this stn_runtime was built without TensorRT "
                    "(configure with -DSTN_WITH_TENSORRT=ON on a host with the TensorRT SDK and CUDA)");
#endif
    }
    (void)options;
    throw Error("cannot open " + path + ": unknown model extension '" + ext +
                "' (expected .onnx or .xml for OpenVINO, .plan or .engine for TensorRT)");
}

Classifier::Classifier(ModelInfo info) : info_(std::move(info)) {
    const int c = info_.channels;
    lut_.resize(size_t(c) * 256);
    // Same float32 operations, in the same order, as stn_deploy.data.normalize.
    for (int ch = 0; ch < c; ++ch)
        for (int v = 0; v < 256; ++v)
            lut_[size_t(ch) * 256 + size_t(v)] = (float(v) / 255.0f - info_.mean[size_t(ch)]) / info_.std[size_t(ch)];
}

std::vector<float> Classifier::infer_raw(const void* input, int batch) {
    if (batch < 1) throw Error("batch must be at least 1, got " + std::to_string(batch));
    if (input == nullptr) throw Error("infer_raw: input is null");
    std::vector<float> logits = run(input, batch);
    if (logits.size() != size_t(batch) * size_t(num_classes()))
        throw Error("the model returned " + std::to_string(logits.size()) + " logits for " + std::to_string(batch) +
                    " images of " + std::to_string(num_classes()) + " classes");
    return logits;
}

std::vector<Prediction> Classifier::classify(const std::vector<Image>& images, int top_k) {
    if (images.empty()) return {};
    const int c = info_.channels, h = info_.height, w = info_.width;
    const size_t plane = size_t(h) * size_t(w);
    const size_t per_image = plane * size_t(c);
    for (size_t i = 0; i < images.size(); ++i) {
        const Image& im = images[i];
        if (im.width != w || im.height != h || im.channels != c) {
            throw Error("image " + std::to_string(i) + " is " + std::to_string(im.width) + "x" + std::to_string(im.height) +
                        " with " + std::to_string(im.channels) + " channel(s); the model takes " + std::to_string(w) + "x" +
                        std::to_string(h) + " with " + std::to_string(c) + " (resize or convert it first)");
        }
        if (im.pixels.size() != per_image)
            throw Error("image " + std::to_string(i) + " has " + std::to_string(im.pixels.size()) + " bytes, expected " +
                        std::to_string(per_image) + " for " + std::to_string(w) + "x" + std::to_string(h) + "x" +
                        std::to_string(c));
    }
    const int batch = static_cast<int>(images.size());
    const void* input = nullptr;
    if (info_.embedded_preprocess) {
        raw_.resize(per_image * images.size());
        for (size_t i = 0; i < images.size(); ++i)
            std::copy(images[i].pixels.begin(), images[i].pixels.end(), raw_.begin() + long(i * per_image));
        input = raw_.data();
    } else {
        scratch_.resize(per_image * images.size());
        for (size_t i = 0; i < images.size(); ++i) {
            const uint8_t* src = images[i].pixels.data();
            float* dst = scratch_.data() + i * per_image;
            for (int ch = 0; ch < c; ++ch) {  // HWC uint8 -> CHW float, normalised by lookup
                const float* lut = lut_.data() + size_t(ch) * 256;
                float* out = dst + size_t(ch) * plane;
                for (size_t p = 0; p < plane; ++p) out[p] = lut[src[p * size_t(c) + size_t(ch)]];
            }
        }
        input = scratch_.data();
    }
    const std::vector<float> logits = infer_raw(input, batch);

    const int k_classes = num_classes();
    const int k = std::max(0, std::min(top_k, k_classes));
    std::vector<Prediction> out(images.size());
    std::vector<int> order(static_cast<size_t>(k_classes));
    for (int i = 0; i < batch; ++i) {
        Prediction& p = out[size_t(i)];
        p.logits.assign(logits.begin() + long(i) * k_classes, logits.begin() + long(i + 1) * k_classes);
        const float mx = *std::max_element(p.logits.begin(), p.logits.end());
        double sum = 0.0;
        for (float l : p.logits) sum += std::exp(double(l) - double(mx));
        std::iota(order.begin(), order.end(), 0);
        // Ties go to the lower class index, as numpy's argmax does.
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
            return p.logits[size_t(a)] > p.logits[size_t(b)] || (p.logits[size_t(a)] == p.logits[size_t(b)] && a < b);
        });
        for (int j = 0; j < k; ++j) {
            const int idx = order[size_t(j)];
            p.top_k.emplace_back(idx, float(std::exp(double(p.logits[size_t(idx)]) - double(mx)) / sum));
        }
    }
    return out;
}

}  // namespace stn
