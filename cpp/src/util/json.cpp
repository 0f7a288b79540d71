// The strict JSON reader of util/json.hpp.
#include "util/json.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace pyswitch::json {
namespace {

[[noreturn]] void kind_error(const std::string& what, const char* expected) {
  throw std::runtime_error(what + " must be " + expected);
}

}  // namespace

class Parser {
 public:
  Parser(const char* text, size_t size) : p_(text), begin_(text), end_(text + size) {}

  Value document() {
    Value v = value(0);
    skip_space();
    if (p_ != end_) fail("unexpected data after the JSON document");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(p_ - begin_) + ": " + why);
  }
  void skip_space() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  void expect_literal(const char* word) {
    for (const char* w = word; *w; ++w, ++p_)
      if (p_ == end_ || *p_ != *w) fail(std::string("expected '") + word + "'");
  }

  Value value(int depth) {
    if (depth > 64) fail("nesting deeper than 64");
    skip_space();
    if (p_ == end_) fail("unexpected end of input");
    Value v;
    switch (*p_) {
      case '{': {
        v.kind_ = Value::Kind::object;
        ++p_;
        skip_space();
        if (p_ != end_ && *p_ == '}') {
          ++p_;
          return v;
        }
        for (;;) {
          skip_space();
          if (p_ == end_ || *p_ != '"') fail("expected a string key");
          std::string key = string();
          skip_space();
          if (p_ == end_ || *p_ != ':') fail("expected ':'");
          ++p_;
          if (!v.object_.emplace(key, value(depth + 1)).second)
            fail("duplicate key \"" + key + "\"");
          skip_space();
          if (p_ != end_ && *p_ == ',') {
            ++p_;
            continue;
          }
          if (p_ != end_ && *p_ == '}') {
            ++p_;
            return v;
          }
          fail("expected ',' or '}'");
        }
      }
      case '[': {
        v.kind_ = Value::Kind::array;
        ++p_;
        skip_space();
        if (p_ != end_ && *p_ == ']') {
          ++p_;
          return v;
        }
        for (;;) {
          v.array_.push_back(value(depth + 1));
          skip_space();
          if (p_ != end_ && *p_ == ',') {
            ++p_;
            continue;
          }
          if (p_ != end_ && *p_ == ']') {
            ++p_;
            return v;
          }
          fail("expected ',' or ']'");
        }
      }
      case '"':
        v.kind_ = Value::Kind::string;
        v.text_ = string();
        return v;
      case 't':
        expect_literal("true");
        v.kind_ = Value::Kind::boolean;
        v.boolean_ = true;
        return v;
      case 'f':
        expect_literal("false");
        v.kind_ = Value::Kind::boolean;
        return v;
      case 'n':
        expect_literal("null");
        return v;
      default:
        v.kind_ = Value::Kind::number;
        v.text_ = number();
        return v;
    }
  }

  std::string number() {
    const char* start = p_;
    auto digits = [&] {
      const char* d = p_;
      while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
      return p_ - d;
    };
    if (p_ != end_ && *p_ == '-') ++p_;
    if (p_ != end_ && *p_ == '0') {
      ++p_;
    } else if (digits() == 0) {
      fail("expected a value");
    }
    if (p_ != end_ && *p_ == '.') {
      ++p_;
      if (digits() == 0) fail("expected digits after '.'");
    }
    if (p_ != end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ != end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (digits() == 0) fail("expected exponent digits");
    }
    return std::string(start, p_);
  }

  unsigned hex4() {
    unsigned code = 0;
    for (int i = 0; i < 4; ++i, ++p_) {
      if (p_ == end_) fail("truncated \\u escape");
      const char c = *p_;
      code <<= 4;
      if (c >= '0' && c <= '9')
        code |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f')
        code |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        code |= unsigned(c - 'A' + 10);
      else
        fail("bad \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned cp) {
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
    ++p_;  // the opening quote
    std::string out;
    for (;;) {
      if (p_ == end_) fail("unterminated string");
      const char c = *p_++;
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (p_ == end_) fail("unterminated escape");
      const char e = *p_++;
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') fail("unpaired surrogate");
            p_ += 2;
            const unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            fail("unpaired surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default:
          fail("bad escape");
      }
    }
  }

  const char* p_;
  const char* begin_;
  const char* end_;
};

Value parse(const char* text, size_t size) {
  return Parser(text, size).document();
}

bool Value::as_bool(const std::string& what) const {
  if (kind_ != Kind::boolean) kind_error(what, "true or false");
  return boolean_;
}

double Value::as_double(const std::string& what) const {
  if (kind_ != Kind::number) kind_error(what, "a number");
  errno = 0;
  const double v = std::strtod(text_.c_str(), nullptr);
  if (errno == ERANGE || !std::isfinite(v)) kind_error(what, "a finite number");
  return v;
}

int64_t Value::as_int(const std::string& what) const {
  if (kind_ != Kind::number || text_.find_first_of(".eE") != std::string::npos)
    kind_error(what, "an integer");
  errno = 0;
  const long long v = std::strtoll(text_.c_str(), nullptr, 10);
  if (errno == ERANGE) kind_error(what, "an integer within int64");
  return v;
}

uint64_t Value::as_uint(const std::string& what) const {
  if (kind_ != Kind::number || text_.find_first_of(".eE-") != std::string::npos)
    kind_error(what, "a non-negative integer");
  errno = 0;
  const unsigned long long v = std::strtoull(text_.c_str(), nullptr, 10);
  if (errno == ERANGE) kind_error(what, "an integer within uint64");
  return v;
}

const std::string& Value::as_string(const std::string& what) const {
  if (kind_ != Kind::string) kind_error(what, "a string");
  return text_;
}

const std::vector<Value>& Value::as_array(const std::string& what) const {
  if (kind_ != Kind::array) kind_error(what, "an array");
  return array_;
}

const std::map<std::string, Value>& Value::as_object(const std::string& what) const {
  if (kind_ != Kind::object) kind_error(what, "an object");
  return object_;
}

const Value* Value::find(const std::string& key, const std::string& what) const {
  const auto& members = as_object(what);
  const auto it = members.find(key);
  return it == members.end() ? nullptr : &it->second;
}

const Value& Value::at(const std::string& key, const std::string& what) const {
  const Value* v = find(key, what);
  if (v == nullptr) throw std::runtime_error(what + " has no \"" + key + "\"");
  return *v;
}

}  // namespace pyswitch::json
