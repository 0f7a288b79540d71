/// @file log.hpp
/// Where the library's log messages go. pyswitch never writes to stdout and never exits; the
/// few things worth telling a host application (the CPU kernels chosen, a communicator group
/// poisoned, a checkpoint loaded without a hash check, buffers deliberately leaked after an
/// abandoned MPI call) go through one process-wide sink that the host can replace.
///
/// Default sink: messages at `warning` and above are written to stderr as
/// "pyswitch: <level>: <message>\n"; `debug` and `info` are dropped.
///
/// Thread-safety: every function here may be called from any thread. Messages can come from
/// any thread that runs pyswitch code (thread ranks, OpenMP workers); calls into the sink are
/// serialised by one mutex, so a callback sees one message at a time. Messages logged while the
/// callback runs on the same thread (it logs, or calls pyswitch code that does) are dropped. A
/// callback must not call set_log_callback (it would deadlock) and should not throw: an
/// exception it throws is caught and dropped, because logging must never change what a
/// computation does.
#pragma once

#include <functional>
#include <string>

namespace pyswitch {

enum class LogLevel : int { debug = 10, info = 20, warning = 30, error = 40, off = 100 };

/// "debug", "info", "warning", "error" or "off".
const char* log_level_name(LogLevel level);

/// The level named `name` (as log_level_name spells it). Throws InvalidArgument otherwise.
LogLevel parse_log_level(const std::string& name);

/// Receives one complete message (no trailing newline) at a level >= log_level().
using LogCallback = std::function<void(LogLevel level, const std::string& message)>;

/// Replaces the sink; an empty callback restores the default (stderr). Returns the previous
/// callback (empty when it was the default), so a host can chain or restore it.
LogCallback set_log_callback(LogCallback callback);

/// Messages below `level` are dropped before they are formatted. The initial level is the
/// environment variable PYSWITCH_LOG_LEVEL when it names a level ("debug" ... "off"), else
/// warning; set_log_callback does not change it (set info or debug to see more).
void set_log_level(LogLevel level);
LogLevel log_level();

/// Sends a message to the sink if `level` >= log_level(). For library code; hosts may use it
/// too. Never throws.
void log_message(LogLevel level, const std::string& message) noexcept;

}  // namespace pyswitch
