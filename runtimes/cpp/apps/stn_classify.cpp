// stn_classify: classify PGM/PPM images with a model written by `stn-deploy export`.
//
//   stn_classify MODEL IMAGE.ppm... [--top-k K] [--batch B] [--bench N] [--threads T] [--json]
//
// Exit codes: 0 success, 1 an error (one line "Error: ..." on stderr), 2 a usage error.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "stn/classifier.hpp"

namespace {

const char* kUsage =
    "Usage: stn_classify MODEL IMAGE.ppm... [--top-k K] [--batch B] [--bench N] [--threads T] [--json]\n"
    "\n"
    "  MODEL        .onnx/.xml (OpenVINO) or .plan/.engine (TensorRT, reads <plan>.json)\n"
    "  IMAGE        binary PGM (P5) or PPM (P6), exactly the model's input size\n"
    "  --top-k K    classes to print per image (default 5)\n"
    "  --batch B    images per inference call (default 32)\n"
    "  --bench N    after classifying, time N batch-1 runs on the first image (after warm-up)\n"
    "               and print p50/p99 latency: end-to-end (preprocess + inference + softmax)\n"
    "               and inference only\n"
    "  --threads T  OpenVINO inference threads (default: OpenVINO's choice)\n"
    "  --json       print one JSON document (logits at full float precision) instead of text\n";

struct UsageError {
    std::string message;
};

struct Args {
    std::string model;
    std::vector<std::string> images;
    int top_k = 5;
    int batch = 32;
    int bench = 0;
    int threads = 0;
    bool json = false;
};

int parse_positive(const std::string& flag, const char* text) {
    char* end = nullptr;
    long v = std::strtol(text, &end, 10);
    if (end == text || *end != '\0' || v < 1 || v > 100000000)
        throw UsageError{flag + " needs a positive integer, got '" + text + "'"};
    return static_cast<int>(v);
}

Args parse(int argc, char** argv) {
    Args a;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> const char* {
            if (i + 1 >= argc) throw UsageError{arg + " needs a value"};
            return argv[++i];
        };
        if (arg == "-h" || arg == "--help") {
            std::cout << kUsage;
            std::exit(0);
        } else if (arg == "--top-k") {
            a.top_k = parse_positive(arg, value());
        } else if (arg == "--batch") {
            a.batch = parse_positive(arg, value());
        } else if (arg == "--bench") {
            a.bench = parse_positive(arg, value());
        } else if (arg == "--threads") {
            a.threads = parse_positive(arg, value());
        } else if (arg == "--json") {
            a.json = true;
        } else if (arg.size() > 1 && arg[0] == '-') {
            throw UsageError{"unknown option " + arg};
        } else {
            positional.push_back(arg);
        }
    }
    if (positional.empty()) throw UsageError{"missing MODEL"};
    if (positional.size() < 2) throw UsageError{"missing IMAGE (at least one PGM/PPM file)"};
    a.model = positional[0];
    a.images.assign(positional.begin() + 1, positional.end());
    return a;
}

std::string json_string(const std::string& s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += char(c);
                }
        }
    }
    return out + "\"";
}

std::string json_float(double v) {
    if (!std::isfinite(v)) return "null";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", v);  // 9 significant digits round-trip a float
    return buf;
}

// Nearest-rank percentile of sorted samples (benchmarks/cpp_vs_python.py uses the same rule).
double percentile(const std::vector<double>& sorted, double p) {
    size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * double(sorted.size())));
    return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

struct Timing {
    double p50 = 0, p99 = 0, mean = 0;
};

template <class F>
Timing time_runs(int n, F&& f) {
    using clock = std::chrono::steady_clock;
    const int warmup = std::max(5, n / 10);
    for (int i = 0; i < warmup; ++i) f();
    std::vector<double> ms;
    ms.reserve(size_t(n));
    for (int i = 0; i < n; ++i) {
        auto t0 = clock::now();
        f();
        ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    Timing t;
    t.p50 = percentile(ms, 50);
    t.p99 = percentile(ms, 99);
    for (double v : ms) t.mean += v;
    t.mean /= double(ms.size());
    return t;
}

int run(const Args& args) {
    stn::OpenOptions options;
    options.num_threads = args.threads;
    auto clf = stn::Classifier::open(args.model, options);

    std::vector<stn::Image> images;
    images.reserve(args.images.size());
    for (const auto& path : args.images) images.push_back(stn::read_pnm(path));

    std::vector<stn::Prediction> preds;
    for (size_t start = 0; start < images.size(); start += size_t(args.batch)) {
        size_t end = std::min(images.size(), start + size_t(args.batch));
        std::vector<stn::Image> chunk(images.begin() + long(start), images.begin() + long(end));
        try {
            auto part = clf->classify(chunk, args.top_k);
            preds.insert(preds.end(), part.begin(), part.end());
        } catch (const stn::Error& e) {
            // Name the file rather than its index in the batch.
            const std::string msg = e.what();
            const std::string prefix = "image ";
            if (msg.rfind(prefix, 0) == 0) {
                size_t idx = std::strtoul(msg.c_str() + prefix.size(), nullptr, 10);
                size_t space = msg.find(' ', prefix.size());
                if (start + idx < args.images.size() && space != std::string::npos)
                    throw stn::Error(args.images[start + idx] + msg.substr(space));
            }
            throw;
        }
    }

    Timing e2e, infer;
    if (args.bench > 0) {
        const std::vector<stn::Image> one{images[0]};
        e2e = time_runs(args.bench, [&] { clf->classify(one, args.top_k); });
        // Inference only: the same image, preprocessed once outside the timed loop.
        const stn::ModelInfo& info = clf->info();
        const stn::Image& im = images[0];
        std::vector<float> nchw(im.pixels.size());
        const size_t plane = size_t(im.width) * size_t(im.height);
        for (int c = 0; c < im.channels; ++c)
            for (size_t p = 0; p < plane; ++p)
                nchw[size_t(c) * plane + p] =
                    (float(im.pixels[p * size_t(im.channels) + size_t(c)]) / 255.0f - info.mean[size_t(c)]) / info.std[size_t(c)];
        const void* raw = info.embedded_preprocess ? static_cast<const void*>(im.pixels.data())
                                                   : static_cast<const void*>(nchw.data());
        infer = time_runs(args.bench, [&] { clf->infer_raw(raw, 1); });
    }

    const auto& names = clf->class_names();
    if (args.json) {
        std::string out = "{\"model\": " + json_string(args.model) + ", \"backend\": " + json_string(clf->info().backend) +
                          ", \"input\": [" + std::to_string(clf->channels()) + ", " + std::to_string(clf->height()) + ", " +
                          std::to_string(clf->width()) + "], \"embedded_preprocess\": " +
                          (clf->info().embedded_preprocess ? "true" : "false") + ", \"class_names\": [";
        for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + json_string(names[i]);
        out += "], \"results\": [";
        for (size_t i = 0; i < preds.size(); ++i) {
            out += std::string(i ? ", " : "") + "{\"image\": " + json_string(args.images[i]) + ", \"logits\": [";
            for (size_t j = 0; j < preds[i].logits.size(); ++j) out += (j ? ", " : "") + json_float(preds[i].logits[j]);
            out += "], \"top_k\": [";
            for (size_t j = 0; j < preds[i].top_k.size(); ++j) {
                const auto& [idx, score] = preds[i].top_k[j];
                out += std::string(j ? ", " : "") + "{\"index\": " + std::to_string(idx) + ", \"name\": " +
                       json_string(names[size_t(idx)]) + ", \"score\": " + json_float(score) + "}";
            }
            out += "]}";
        }
        out += "]";
        if (args.bench > 0) {
            out += ", \"bench\": {\"runs\": " + std::to_string(args.bench) + ", \"batch\": 1, \"end_to_end_ms\": {\"p50\": " +
                   json_float(e2e.p50) + ", \"p99\": " + json_float(e2e.p99) + ", \"mean\": " + json_float(e2e.mean) +
                   "}, \"inference_ms\": {\"p50\": " + json_float(infer.p50) + ", \"p99\": " + json_float(infer.p99) +
                   ", \"mean\": " + json_float(infer.mean) + "}}";
        }
        out += "}\n";
        std::cout << out;
    } else {
        for (size_t i = 0; i < preds.size(); ++i) {
            std::cout << args.images[i] << ":";
            for (const auto& [idx, score] : preds[i].top_k) {
                char buf[32];
                std::snprintf(buf, sizeof buf, "%.4f", double(score));
                std::cout << "  " << names[size_t(idx)] << " " << buf;
            }
            std::cout << "\n";
        }
        if (args.bench > 0) {
            char buf[256];
            std::snprintf(buf, sizeof buf,
                          "bench (%s, batch 1, %d runs): end-to-end p50 %.4f ms p99 %.4f ms; inference only p50 %.4f ms "
                          "p99 %.4f ms\n",
                          clf->info().backend.c_str(), args.bench, e2e.p50, e2e.p99, infer.p50, infer.p99);
            std::cout << buf;
        }
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const UsageError& e) {
        std::cerr << "Usage: stn_classify MODEL IMAGE.ppm... [options] (see --help)\nError: " << e.message << "\n";
        return 2;
    } catch (const stn::Error& e) {
        std::string msg = e.what();  // keep the promise of one line
        std::replace(msg.begin(), msg.end(), '\n', ' ');
        std::cerr << "Error: " << msg << "\n";
        return 1;
    } catch (const std::bad_alloc&) {
        std::cerr << "Error: out of memory\n";
        return 1;
    } catch (const std::exception& e) {
        // Not expected: the library wraps backend exceptions in stn::Error.
        std::cerr << "Error: unexpected failure: " << e.what() << "\n";
        return 1;
    }
}
