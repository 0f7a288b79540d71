// The process-wide log sink of log.hpp.
#include "pyswitch/log.hpp"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "pyswitch/error.hpp"

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
// The first level: PYSWITCH_LOG_LEVEL when it names one, else warning. An environment variable,
// so that messages logged while a host (or `import pyswitch`) starts can be controlled too.
int initial_level() {
  const char* env = std::getenv("PYSWITCH_LOG_LEVEL");
  try {
    if (env != nullptr) return static_cast<int>(parse_log_level(env));
  } catch (const InvalidArgument&) {
    // An unknown value keeps the default: the environment must not break start-up.
  }
  return static_cast<int>(LogLevel::warning);
}

std::atomic<int>& level_store() {
  static std::atomic<int> level{initial_level()};
  return level;
}

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

LogLevel parse_log_level(const std::string& name) {
  for (LogLevel level :
       {LogLevel::debug, LogLevel::info, LogLevel::warning, LogLevel::error, LogLevel::off}) {
    if (name == log_level_name(level)) return level;
  }
  throw InvalidArgument("log level must be 'debug', 'info', 'warning', 'error' or 'off', got '" +
                        name + "'");
}

LogCallback set_log_callback(LogCallback callback) {
  std::lock_guard<std::mutex> lock(sink_mutex());
  LogCallback previous = std::move(sink());
  sink() = std::move(callback);
  return previous;
}

void set_log_level(LogLevel level) {
  level_store().store(static_cast<int>(level));
}

LogLevel log_level() {
  return static_cast<LogLevel>(level_store().load());
}

void log_message(LogLevel level, const std::string& message) noexcept {
  if (level == LogLevel::off || static_cast<int>(level) < level_store().load()) return;
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
