// The process-wide log sink of log.hpp.
#include "pyswitch/log.hpp"

#include <atomic>
#include <cstdio>
#include <mutex>

namespace pyswitch {
namespace {

std::mutex& sink_mutex() {
  static std::mutex m;
  return m;
}
LogCallback& sink() {
  static LogCallback callback;
  return callback;
}
std::atomic<int> g_level{static_cast<int>(LogLevel::warning)};

}  // namespace

const char* log_level_name(LogLevel level) {
  switch (level) {
    case LogLevel::debug:
      return "debug";
    case LogLevel::info:
      return "info";
    case LogLevel::warning:
      return "warning";
    case LogLevel::error:
      return "error";
    case LogLevel::off:
      return "off";
  }
  return "unknown";
}

LogCallback set_log_callback(LogCallback callback) {
  std::lock_guard<std::mutex> lock(sink_mutex());
  LogCallback previous = std::move(sink());
  sink() = std::move(callback);
  return previous;
}

void set_log_level(LogLevel level) {
  g_level.store(static_cast<int>(level));
}

LogLevel log_level() {
  return static_cast<LogLevel>(g_level.load());
}

void log_message(LogLevel level, const std::string& message) noexcept {
  if (level == LogLevel::off || static_cast<int>(level) < g_level.load()) return;
  // A sink that logs (directly, or by calling pyswitch code that logs) would deadlock on the
  // mutex; such nested messages are dropped instead.
  thread_local bool in_sink = false;
  if (in_sink) return;
  struct Reentry {
    bool& flag;
    explicit Reentry(bool& f) : flag(f) { flag = true; }
    ~Reentry() { flag = false; }
  } reentry(in_sink);
  try {
    std::lock_guard<std::mutex> lock(sink_mutex());
    if (sink()) {
      sink()(level, message);
    } else {
      std::fprintf(stderr, "pyswitch: %s: %s\n", log_level_name(level), message.c_str());
    }
  } catch (...) {
    // A failing sink must not turn a log line into a failed computation.
  }
}

}  // namespace pyswitch
