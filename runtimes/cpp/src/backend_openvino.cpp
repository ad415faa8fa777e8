// OpenVINO backend: reads the exported ONNX (or an OpenVINO IR .xml converted from it) on the
// CPU. OpenVINO's ONNX frontend exposes ONNX metadata_props as rt_info["framework"][key].
#include <openvino/frontend/manager.hpp>
#include <openvino/openvino.hpp>

#include <cctype>
#include <list>

#include "internal.hpp"

namespace stn::detail {

namespace {

// Walk the top level of an ONNX ModelProto (protobuf wire format) so that random bytes and
// truncated files get a clear message before any OpenVINO frontend sees them.
void check_onnx_structure(const std::string& path) {
    const std::string data = read_file(path, "model");
    const auto* p = reinterpret_cast<const unsigned char*>(data.data());
    const size_t n = data.size();
    size_t i = 0;
    auto varint = [&](uint64_t& v) {
        v = 0;
        for (int shift = 0; shift < 64; shift += 7) {
            if (i >= n) return false;
            const unsigned char b = p[i++];
            v |= uint64_t(b & 0x7F) << shift;
            if (!(b & 0x80)) return true;
        }
        return false;
    };
    const std::string bad = path + " is not an ONNX model (corrupt or truncated?): ";
    bool has_ir_version = false, has_graph = false;
    if (n == 0) throw Error(bad + "the file is empty");
    while (i < n) {
        uint64_t tag = 0, v = 0;
        if (!varint(tag)) throw Error(bad + "bad field tag at byte " + std::to_string(i));
        const uint64_t field = tag >> 3, wire = tag & 7;
        if (field == 0) throw Error(bad + "field number 0 at byte " + std::to_string(i));
        switch (wire) {
            case 0:
                if (!varint(v)) throw Error(bad + "truncated varint at byte " + std::to_string(i));
                break;
            case 1:
                if (n - i < 8) throw Error(bad + "truncated at byte " + std::to_string(i));
                i += 8;
                break;
            case 2:
                if (!varint(v) || v > n - i)
                    throw Error(bad + "field " + std::to_string(field) + " runs past the end of the file (truncated?)");
                i += size_t(v);
                break;
            case 5:
                if (n - i < 4) throw Error(bad + "truncated at byte " + std::to_string(i));
                i += 4;
                break;
            default:
                throw Error(bad + "invalid protobuf wire type " + std::to_string(wire) + " at byte " + std::to_string(i));
        }
        has_ir_version |= field == 1 && wire == 0;
        has_graph |= field == 7 && wire == 2;
    }
    if (!has_ir_version || !has_graph) throw Error(bad + "no ir_version or graph field");
}

std::shared_ptr<ov::Model> read_model(ov::Core& core, const std::string& path, bool onnx);

// A file with a dynamic batch axis is compiled once per batch size it runs at, as the Python
// runner does: static shapes ran faster at batch 1 than the dynamic graph side by side. The
// kKeepShapes most recently used sizes stay compiled.
class OpenVinoClassifier final : public Classifier {
public:
    static constexpr size_t kKeepShapes = 4;

    OpenVinoClassifier(ModelInfo info, ov::Core core, std::shared_ptr<ov::Model> model, std::string device,
                       ov::AnyMap config, ov::element::Type in_type, std::string out_name)
        : Classifier(std::move(info)), core_(std::move(core)), model_(std::move(model)), device_(std::move(device)),
          config_(std::move(config)), in_type_(in_type), out_name_(std::move(out_name)),
          dynamic_batch_(model_->input().get_partial_shape()[0].is_dynamic()) {
        compiled_for(1);  // compile errors surface when the model is opened, not at first use
    }

    // OpenVINO messages span several lines and carry source locations; keep the informative
    // lines, joined into one (stn_classify promises a single error line).
    static std::string first_line(const std::string& s) {
        std::string out;
        int kept = 0;
        size_t start = 0;
        while (start < s.size() && kept < 3) {
            size_t end = s.find('\n', start);
            if (end == std::string::npos) end = s.size();
            std::string line = s.substr(start, end - start);
            start = end + 1;
            while (!line.empty() && (line.back() == ' ' || line.back() == '\r')) line.pop_back();
            if (line.empty() || line.rfind("Check '", 0) == 0 || line.find("Exception from") != std::string::npos ||
                line.find("Summary:") != std::string::npos || line.find("FrontEnd API failed") != std::string::npos)
                continue;
            out += (out.empty() ? "" : " ") + line;
            ++kept;
        }
        if (out.empty()) out = s.substr(0, s.find('\n'));
        if (out.size() > 400) out = out.substr(0, 400) + "...";
        return out;
    }

protected:
    std::vector<float> run(const void* input, int batch) override {
        const ov::Shape shape = info().embedded_preprocess
            ? ov::Shape{size_t(batch), size_t(height()), size_t(width()), size_t(channels())}
            : ov::Shape{size_t(batch), size_t(channels()), size_t(height()), size_t(width())};
        try {
            // Wraps the caller's memory: no copy. OpenVINO only reads an input tensor.
            ov::Tensor tensor(in_type_, shape, const_cast<void*>(input));
            ov::InferRequest& request = compiled_for(batch).request;
            request.set_input_tensor(tensor);
            request.infer();
            const ov::Tensor out = request.get_tensor(out_name_);
            if (out.get_element_type() != ov::element::f32)
                throw Error(info().path + ": output '" + out_name_ + "' is " + out.get_element_type().get_type_name() + ", expected f32");
            const ov::Shape os = out.get_shape();
            if (os.size() != 2 || os[0] != size_t(batch) || os[1] != size_t(num_classes()))
                throw Error(info().path + ": output '" + out_name_ + "' has shape " + os.to_string() + ", expected [" +
                            std::to_string(batch) + "," + std::to_string(num_classes()) + "]");
            const float* p = out.data<const float>();
            return std::vector<float>(p, p + out.get_size());
        } catch (const Error&) {
            throw;
        } catch (const std::exception& e) {
            throw Error(info().path + ": OpenVINO inference failed: " + first_line(e.what()));
        }
    }

private:
    struct Compiled {
        int batch;  // 0: the file's batch axis is static, one compiled model serves every call
        ov::CompiledModel model;
        ov::InferRequest request;
    };

    Compiled& compiled_for(int batch) {
        const int key = dynamic_batch_ ? batch : 0;
        for (auto it = compiled_.begin(); it != compiled_.end(); ++it) {
            if (it->batch != key) continue;
            compiled_.splice(compiled_.begin(), compiled_, it);  // most recently used first
            return compiled_.front();
        }
        try {
            std::shared_ptr<ov::Model> model = model_;
            if (dynamic_batch_) {
                model = model_->clone();
                ov::PartialShape shape = model->input().get_partial_shape();
                shape[0] = batch;
                model->reshape(shape);
            }
            ov::CompiledModel compiled = core_.compile_model(model, device_, config_);
            compiled_.push_front(Compiled{key, compiled, compiled.create_infer_request()});
        } catch (const std::exception& e) {
            throw Error(info().path + ": OpenVINO cannot compile the model for " + device_ +
                        (dynamic_batch_ ? " at batch " + std::to_string(batch) : std::string()) + ": " +
                        first_line(e.what()));
        }
        if (compiled_.size() > kKeepShapes) compiled_.pop_back();
        return compiled_.front();
    }

    ov::Core core_;
    std::shared_ptr<ov::Model> model_;
    std::string device_;
    ov::AnyMap config_;
    ov::element::Type in_type_;
    std::string out_name_;
    bool dynamic_batch_;
    std::list<Compiled> compiled_;
};

}  // namespace

namespace {

std::shared_ptr<ov::Model> read_model(ov::Core& core, const std::string& path, bool onnx) {
    try {
        if (!onnx) return core.read_model(path);
        // Only the ONNX frontend: Core::read_model would try every frontend on a bad file.
        check_onnx_structure(path);
        ov::frontend::FrontEndManager manager;
        auto fe = manager.load_by_framework("onnx");
        if (!fe) throw Error("OpenVINO's ONNX frontend is not available");
        auto input_model = fe->load(path);
        if (!input_model) throw Error(path + ": the ONNX frontend could not load it");
        return fe->convert(input_model);
    } catch (const Error&) {
        throw;
    } catch (const std::exception& e) {
        throw Error(path + " is not a readable model (corrupt or truncated?): " +
                    OpenVinoClassifier::first_line(e.what()));
    }
}

}  // namespace

std::unique_ptr<Classifier> open_openvino(const std::string& path, const OpenOptions& options) {
    ov::Core core;
    std::string ext = path.size() >= 5 ? path.substr(path.size() - 5) : path;
    for (auto& ch : ext) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    const bool onnx = ext == ".onnx";
    std::shared_ptr<ov::Model> model = read_model(core, path, onnx);
    auto lookup = [&](const std::string& key, std::string& value) -> bool {
        try {
            if (model->has_rt_info("framework", key)) {
                value = model->get_rt_info<std::string>("framework", key);
                return true;
            }
            if (model->has_rt_info(key)) {  // IR files written by other tools may keep them flat
                value = model->get_rt_info<std::string>(key);
                return true;
            }
        } catch (const std::exception&) {
            return false;
        }
        return false;
    };
    ModelInfo info = info_from_metadata(path, lookup);
    info.backend = "openvino";

    if (model->inputs().size() != 1)
        throw Error(path + ": expected one model input, found " + std::to_string(model->inputs().size()));
    const ov::element::Type want_in = info.embedded_preprocess ? ov::element::u8 : ov::element::f32;
    const ov::Output<ov::Node> in = model->input();
    if (in.get_element_type() != want_in)
        throw Error(path + ": input is " + in.get_element_type().get_type_name() + " but the metadata says " +
                    (info.embedded_preprocess ? "uint8" : "float32"));
    const ov::PartialShape ps = in.get_partial_shape();
    const std::vector<int64_t> want = info.embedded_preprocess
        ? std::vector<int64_t>{info.height, info.width, info.channels}
        : std::vector<int64_t>{info.channels, info.height, info.width};
    bool ok = ps.rank().is_static() && ps.rank().get_length() == 4;
    for (size_t i = 0; ok && i < 3; ++i)
        ok = ps[i + 1].is_static() && ps[i + 1].get_length() == want[i];
    if (!ok)
        throw Error(path + ": input shape " + ps.to_string() + " does not match the metadata's input_shape");

    std::string out_name;
    for (const auto& out : model->outputs())
        if (out.get_names().count("logits")) out_name = "logits";
    if (out_name.empty()) {
        if (model->outputs().empty()) throw Error(path + ": the model has no outputs");
        out_name = model->output(0).get_any_name();
    }

    // f32 explicitly: on CPUs with AVX512_BF16/AMX OpenVINO would otherwise compute in bf16,
    // and the logits would no longer match the ONNX Runtime reference.
    ov::AnyMap config{ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY),
                      ov::hint::inference_precision(ov::element::f32)};
    if (options.num_threads > 0) config.emplace(ov::inference_num_threads(options.num_threads));
    return std::make_unique<OpenVinoClassifier>(std::move(info), std::move(core), std::move(model),
                                                options.device.empty() ? "CPU" : options.device, std::move(config),
                                                want_in, out_name);
}

}  // namespace stn::detail
