// A tiny test harness for the C++ unit tests (no network fetch, no dependency): TEST cases
// register themselves, CHECK records failures with file:line, main() runs a filter of them.
#pragma once

#include <cstdio>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace harness {

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}
inline int& failures() {
  static int count = 0;
  return count;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> body) {
    registry().push_back({name, std::move(body)});
  }
};

inline int run_all(int argc, char** argv) {
  int ran = 0, failed_cases = 0;
  for (const Case& c : registry()) {
    if (argc > 1 && std::strstr(c.name, argv[1]) == nullptr) continue;
    const int before = failures();
    std::printf("[ RUN  ] %s\n", c.name);
    std::fflush(stdout);
    try {
      c.body();
    } catch (const std::exception& e) {
      std::printf("  unexpected exception: %s\n", e.what());
      ++failures();
    }
    const bool ok = failures() == before;
    std::printf("[ %s ] %s\n", ok ? " OK " : "FAIL", c.name);
    ++ran;
    if (!ok) ++failed_cases;
  }
  std::printf("%d passed, %d failed\n", ran - failed_cases, failed_cases);
  return failed_cases == 0 && ran > 0 ? 0 : 1;
}

}  // namespace harness

#define HARNESS_CAT2(a, b) a##b
#define HARNESS_CAT(a, b) HARNESS_CAT2(a, b)
#define TEST(name)                                                      \
  static void name();                                                   \
  static harness::Registrar HARNESS_CAT(registrar_, name)(#name, name); \
  static void name()

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::printf("  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++harness::failures();                                                 \
    }                                                                        \
  } while (0)

#define CHECK_EQ(a, b)                                                                     \
  do {                                                                                     \
    const auto& check_a_ = (a);                                                            \
    const auto& check_b_ = (b);                                                            \
    if (!(check_a_ == check_b_)) {                                                         \
      std::ostringstream check_out_;                                                       \
      check_out_ << check_a_ << " vs " << check_b_;                                        \
      std::printf("  %s:%d: CHECK_EQ failed: %s == %s (%s)\n", __FILE__, __LINE__, #a, #b, \
                  check_out_.str().c_str());                                               \
      ++harness::failures();                                                               \
    }                                                                                      \
  } while (0)

// Passes when `statement` throws ExceptionType whose message contains `fragment`.
#define CHECK_THROWS(ExceptionType, statement, fragment)                                \
  do {                                                                                  \
    bool check_threw_ = false;                                                          \
    try {                                                                               \
      statement;                                                                        \
    } catch (const ExceptionType& e) {                                                  \
      check_threw_ = std::string(e.what()).find(fragment) != std::string::npos;         \
      if (!check_threw_) std::printf("  message was: %s\n", e.what());                  \
    } catch (const std::exception& e) {                                                 \
      std::printf("  wrong exception type: %s\n", e.what());                            \
    }                                                                                   \
    if (!check_threw_) {                                                                \
      std::printf("  %s:%d: expected %s containing '%s' from %s\n", __FILE__, __LINE__, \
                  #ExceptionType, fragment, #statement);                                \
      ++harness::failures();                                                            \
    }                                                                                   \
  } while (0)
