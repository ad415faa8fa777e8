// Private helpers shared by the backends; not installed.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "stn/classifier.hpp"

namespace stn::detail {

/// Fill a ModelInfo from the flat metadata keys written by `stn-deploy export`
/// (input_shape "C,H,W", mean/std "a,b,c", class_names newline-separated, num_classes,
/// input_layout, input_dtype, preprocess). `lookup` returns false when a key is absent.
/// Throws stn::Error naming the first missing or malformed key.
ModelInfo info_from_metadata(const std::string& path,
                             const std::function<bool(const std::string&, std::string&)>& lookup);

/// Top-level members of a JSON object as strings: string values unescaped, everything else
/// (numbers, true/false/null, nested arrays/objects) as its raw JSON text. Validates the whole
/// document; throws stn::Error with the byte offset on malformed JSON. Limits: \u escapes
/// outside the BMP must come as surrogate pairs; duplicate keys keep the last value.
std::map<std::string, std::string> parse_flat_json(const std::string& text,
                                                   const std::string& what);

std::string read_file(const std::string& path, const std::string& what);
bool file_exists(const std::string& path);

std::unique_ptr<Classifier> open_openvino(const std::string& path, const OpenOptions& options);
std::unique_ptr<Classifier> open_tensorrt(const std::string& path, const OpenOptions& options);

}  // namespace stn::detail
