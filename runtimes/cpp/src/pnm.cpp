// Binary PGM/PPM reader: images need no image library. Mirrors stn_deploy/pnm.py's read_pnm.
#include <cctype>
#include <string>

#include "internal.hpp"

namespace stn {

namespace {

constexpr long kMaxSide = 1 << 15;

// Next header token, skipping whitespace and '#' comments; `pos` ends just after the token.
std::string token(const std::string& data, size_t& pos, const std::string& path) {
    while (pos < data.size()) {
        unsigned char c = static_cast<unsigned char>(data[pos]);
        if (c == '#') {
            while (pos < data.size() && data[pos] != '\n' && data[pos] != '\r') ++pos;
        } else if (std::isspace(c)) {
            ++pos;
        } else {
            break;
        }
    }
    size_t start = pos;
    while (pos < data.size() && !std::isspace(static_cast<unsigned char>(data[pos])) && data[pos] != '#') ++pos;
    if (start == pos) throw Error(path + ": truncated PGM/PPM header");
    return data.substr(start, pos - start);
}

long number(const std::string& tok, const std::string& path, const char* what, long lo, long hi) {
    if (tok.empty() || tok.size() > 9) throw Error(path + ": bad " + what + " '" + tok + "' in PGM/PPM header");
    long v = 0;
    for (char c : tok) {
        if (c < '0' || c > '9') throw Error(path + ": bad " + what + " '" + tok + "' in PGM/PPM header");
        v = v * 10 + (c - '0');
    }
    if (v < lo || v > hi)
        throw Error(path + ": " + what + " " + tok + " out of range [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v;
}

}  // namespace

Image read_pnm(const std::string& path) {
    const std::string data = detail::read_file(path, "image");
    if (data.size() < 2 || data[0] != 'P' || (data[1] != '5' && data[1] != '6')) {
        if (data.size() >= 2 && data[0] == 'P' && data[1] >= '1' && data[1] <= '4')
            throw Error(path + ": ASCII or 1-bit PNM (P" + std::string(1, data[1]) +
                        ") is not supported; write binary P5/P6");
        throw Error(path + " is not a binary PGM/PPM image (P5/P6)");
    }
    size_t pos = 2;
    Image img;
    img.channels = data[1] == '5' ? 1 : 3;
    img.width = static_cast<int>(number(token(data, pos, path), path, "width", 1, kMaxSide));
    img.height = static_cast<int>(number(token(data, pos, path), path, "height", 1, kMaxSide));
    const long maxval = number(token(data, pos, path), path, "maxval", 1, 65535);
    if (maxval > 255) throw Error(path + ": 16-bit PGM/PPM (maxval " + std::to_string(maxval) + ") is not supported");
    if (pos >= data.size() || !std::isspace(static_cast<unsigned char>(data[pos])))
        throw Error(path + ": truncated PGM/PPM header");
    ++pos;  // exactly one whitespace byte separates the header from the raster
    const size_t n = size_t(img.width) * size_t(img.height) * size_t(img.channels);
    if (data.size() - pos < n)
        throw Error(path + ": truncated image data (" + std::to_string(data.size() - pos) + " of " +
                    std::to_string(n) + " bytes)");
    if (data.size() - pos > n)
        throw Error(path + ": " + std::to_string(data.size() - pos - n) + " unexpected bytes after the image data");
    img.pixels.assign(data.begin() + long(pos), data.begin() + long(pos + n));
    if (maxval != 255) {
        for (auto& p : img.pixels) {
            if (p > maxval) throw Error(path + ": pixel value " + std::to_string(p) + " exceeds maxval");
            p = static_cast<uint8_t>((p * 255 + maxval / 2) / maxval);
        }
    }
    return img;
}

}  // namespace stn
