// Metadata readers: the flat keys of `stn-deploy export`, and a small JSON reader for the
// TensorRT plan's sidecar (no JSON library needed).
#include <charconv>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

#include "internal.hpp"

namespace stn::detail {

bool file_exists(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_file(const std::string& path, const std::string& what) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw Error(what + " not found: " + path);
    if (!S_ISREG(st.st_mode)) throw Error(what + " is not a regular file: " + path);
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error("cannot open " + what + ": " + path);
    std::ostringstream ss;
    ss << f.rdbuf();
    if (f.bad()) throw Error("cannot read " + what + ": " + path);
    return ss.str();
}

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out;
    std::string::size_type start = 0;
    while (true) {
        auto pos = s.find(sep, start);
        out.push_back(s.substr(start, pos == std::string::npos ? std::string::npos : pos - start));
        if (pos == std::string::npos) break;
        start = pos + 1;
    }
    return out;
}

std::string trim(const std::string& s) {
    const char* ws = " \t\r\n";
    auto b = s.find_first_not_of(ws);
    if (b == std::string::npos) return "";
    return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

bool parse_int(const std::string& text, long long& out) {
    std::string t = trim(text);
    auto r = std::from_chars(t.data(), t.data() + t.size(), out);
    return !t.empty() && r.ec == std::errc() && r.ptr == t.data() + t.size();
}

bool parse_float(const std::string& text, float& out) {
    std::string t = trim(text);
    auto r = std::from_chars(t.data(), t.data() + t.size(), out);
    return !t.empty() && r.ec == std::errc() && r.ptr == t.data() + t.size() && std::isfinite(out);
}

}  // namespace

ModelInfo info_from_metadata(const std::string& path,
                             const std::function<bool(const std::string&, std::string&)>& lookup) {
    auto need = [&](const std::string& key) {
        std::string v;
        if (!lookup(key, v))
            throw Error(path + " has no '" + key + "' metadata (was it written by stn-deploy export?)");
        return v;
    };
    auto bad = [&](const std::string& key, const std::string& value, const std::string& why) {
        return Error(path + ": malformed '" + key + "' metadata \"" + value + "\": " + why);
    };

    ModelInfo info;
    info.path = path;
    const std::string shape = need("input_shape");
    auto dims = split(shape, ',');
    long long d[3] = {0, 0, 0};
    if (dims.size() != 3) throw bad("input_shape", shape, "expected C,H,W");
    for (int i = 0; i < 3; ++i)
        if (!parse_int(dims[i], d[i]) || d[i] < 1 || d[i] > 65536)
            throw bad("input_shape", shape, "expected three positive integers C,H,W");
    info.channels = static_cast<int>(d[0]);
    info.height = static_cast<int>(d[1]);
    info.width = static_cast<int>(d[2]);

    for (const char* key : {"mean", "std"}) {
        const std::string text = need(key);
        std::vector<float> values;
        for (const auto& part : split(text, ',')) {
            float v = 0;
            if (!parse_float(part, v)) throw bad(key, text, "expected comma-separated numbers");
            values.push_back(v);
        }
        if (static_cast<int>(values.size()) != info.channels)
            throw bad(key, text, "expected " + std::to_string(info.channels) + " values, one per channel");
        if (std::string(key) == "std") {
            for (float v : values)
                if (!(v > 0)) throw bad(key, text, "std values must be positive");
            info.std = values;
        } else {
            info.mean = values;
        }
    }

    info.class_names = split(need("class_names"), '\n');
    std::string n;
    if (lookup("num_classes", n)) {
        long long k = 0;
        if (!parse_int(n, k) || k != static_cast<long long>(info.class_names.size()))
            throw bad("num_classes", n, std::to_string(info.class_names.size()) + " class names given");
    }
    if (info.class_names.size() < 2) throw Error(path + ": the metadata names fewer than 2 classes");

    const std::string dtype = need("input_dtype");
    if (dtype != "float32" && dtype != "uint8") throw bad("input_dtype", dtype, "expected float32 or uint8");
    info.embedded_preprocess = dtype == "uint8";
    std::string layout;
    if (lookup("input_layout", layout)) {
        const char* want = info.embedded_preprocess ? "NHWC" : "NCHW";
        if (layout != want) throw bad("input_layout", layout, std::string("input_dtype ") + dtype + " needs " + want);
    }
    std::string pre;
    if (lookup("preprocess", pre)) {
        const char* want = info.embedded_preprocess ? "embedded" : "none";
        if (pre != want) throw bad("preprocess", pre, std::string("input_dtype ") + dtype + " needs " + want);
    }
    return info;
}

// ------------------------------------------------------------------------------ JSON

namespace {

class JsonReader {
public:
    JsonReader(const std::string& text, const std::string& what) : s_(text), what_(what) {}

    std::map<std::string, std::string> top_level() {
        std::map<std::string, std::string> out;
        ws();
        expect('{');
        ws();
        if (peek() == '}') {
            ++i_;
        } else {
            while (true) {
                ws();
                std::string key = string();
                ws();
                expect(':');
                ws();
                if (peek() == '"') {
                    out[key] = string();
                } else {
                    size_t start = i_;
                    value();
                    out[key] = s_.substr(start, i_ - start);
                }
                ws();
                if (peek() == ',') { ++i_; continue; }
                expect('}');
                break;
            }
        }
        ws();
        if (i_ != s_.size()) fail("trailing characters after the JSON object");
        return out;
    }

private:
    [[noreturn]] void fail(const std::string& why) const {
        throw Error(what_ + " is not valid JSON (byte " + std::to_string(i_) + "): " + why);
    }
    char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "'");
        ++i_;
    }
    void ws() {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
    }
    void literal(const char* word) {
        for (const char* p = word; *p; ++p) expect(*p);
    }
    unsigned hex4() {
        if (i_ + 4 > s_.size()) fail("truncated \\u escape");
        unsigned v = 0;
        for (int k = 0; k < 4; ++k) {
            char c = s_[i_++];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= unsigned(c - '0');
            else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
            else fail("bad \\u escape");
        }
        return v;
    }
    static void utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += char(cp);
        } else if (cp < 0x800) {
            out += char(0xC0 | (cp >> 6));
            out += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += char(0xE0 | (cp >> 12));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        } else {
            out += char(0xF0 | (cp >> 18));
            out += char(0x80 | ((cp >> 12) & 0x3F));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        }
    }
    std::string string() {
        expect('"');
        std::string out;
        while (true) {
            if (i_ >= s_.size()) fail("unterminated string");
            char c = s_[i_++];
            if (c == '"') break;
            if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
            if (c != '\\') { out += c; continue; }
            if (i_ >= s_.size()) fail("unterminated escape");
            char e = s_[i_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00) {
                        if (peek() != '\\') fail("unpaired surrogate");
                        ++i_;
                        expect('u');
                        unsigned lo = hex4();
                        if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired surrogate");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                        fail("unpaired surrogate");
                    }
                    utf8(out, cp);
                    break;
                }
                default: fail("bad escape");
            }
        }
        return out;
    }
    void number() {
        size_t start = i_;
        if (peek() == '-') ++i_;
        if (peek() == '0') {
            ++i_;
        } else if (peek() >= '1' && peek() <= '9') {
            while (peek() >= '0' && peek() <= '9') ++i_;
        } else {
            fail("bad number");
        }
        if (peek() == '.') {
            ++i_;
            if (!(peek() >= '0' && peek() <= '9')) fail("bad number");
            while (peek() >= '0' && peek() <= '9') ++i_;
        }
        if (peek() == 'e' || peek() == 'E') {
            ++i_;
            if (peek() == '+' || peek() == '-') ++i_;
            if (!(peek() >= '0' && peek() <= '9')) fail("bad number");
            while (peek() >= '0' && peek() <= '9') ++i_;
        }
        if (i_ == start) fail("bad number");
    }
    void value(int depth = 0) {
        if (depth > 64) fail("nested too deeply");
        char c = peek();
        if (c == '"') { string(); return; }
        if (c == 't') { literal("true"); return; }
        if (c == 'f') { literal("false"); return; }
        if (c == 'n') { literal("null"); return; }
        if (c == '[' || c == '{') {
            const char close = c == '[' ? ']' : '}';
            ++i_;
            ws();
            if (peek() == close) { ++i_; return; }
            while (true) {
                ws();
                if (close == '}') {
                    string();
                    ws();
                    expect(':');
                    ws();
                }
                value(depth + 1);
                ws();
                if (peek() == ',') { ++i_; continue; }
                expect(close);
                return;
            }
        }
        number();
    }

    const std::string& s_;
    std::string what_;
    size_t i_ = 0;
};

}  // namespace

std::map<std::string, std::string> parse_flat_json(const std::string& text, const std::string& what) {
    return JsonReader(text, what).top_level();
}

}  // namespace stn::detail
