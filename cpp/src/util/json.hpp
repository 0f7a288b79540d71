// A small strict JSON reader (RFC 8259) for the two JSON documents the C++ side reads: a run's
// config.json / manifest.json and a safetensors header. Private to the core. Why not a library:
// nlohmann/json and friends are not installable from PyPI, and making every source build of the
// wheel depend on a system package for two small documents costs users more than ~200 lines.
// Numbers are kept as their text and converted on request, so 64-bit offsets stay exact.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pyswitch::json {

class Value {
 public:
  enum class Kind { null, boolean, number, string, array, object };

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::null; }
  bool is_object() const { return kind_ == Kind::object; }
  bool is_array() const { return kind_ == Kind::array; }
  bool is_string() const { return kind_ == Kind::string; }
  bool is_number() const { return kind_ == Kind::number; }
  bool is_bool() const { return kind_ == Kind::boolean; }

  // Accessors throw std::runtime_error naming `what` when the kind or the range is wrong; the
  // callers turn that into their own error class with the file name.
  bool as_bool(const std::string& what) const;
  double as_double(const std::string& what) const;
  int64_t as_int(const std::string& what) const;  ///< an integer literal within int64
  uint64_t as_uint(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  const std::vector<Value>& as_array(const std::string& what) const;
  const std::map<std::string, Value>& as_object(const std::string& what) const;

  /// The member `key` of an object, or nullptr when absent (throws when not an object).
  const Value* find(const std::string& key, const std::string& what) const;
  /// The member `key`, which must exist.
  const Value& at(const std::string& key, const std::string& what) const;

 private:
  friend class Parser;
  Kind kind_ = Kind::null;
  bool boolean_ = false;
  std::string text_;  // string contents, or a number's literal
  std::vector<Value> array_;
  std::map<std::string, Value> object_;
};

/// Parses a complete document (nothing but whitespace after it). Throws std::runtime_error
/// with the byte offset on malformed input, duplicate object keys, or nesting deeper than 64.
Value parse(const char* text, size_t size);
inline Value parse(const std::string& text) {
  return parse(text.data(), text.size());
}

}  // namespace pyswitch::json
