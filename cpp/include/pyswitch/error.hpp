/// @file error.hpp
/// pyswitch error classes and the argument-checking macros the core uses. No Python here: the
/// bindings map these classes onto Python exceptions (see the table below).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace pyswitch {

/// A bad argument value or shape. Python: ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// An argument of the wrong type or dtype. Python: TypeError.
class TypeMismatch : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A fault at run time (a call out of order, a failed library call). Python: pyswitch.Error,
/// which derives from RuntimeError.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A collective failed: a peer raised, left, or disagreed on the call. Python: pyswitch.CommError.
class CommError : public Error {
 public:
  using Error::Error;
};

/// A collective waited longer than its timeout. Python: pyswitch.CommTimeout (a CommError).
class CommTimeout : public CommError {
 public:
  using CommError::CommError;
};

/// A checkpoint could not be written or read back intact. Python: pyswitch.CheckpointError.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// A device was asked for that this build or machine does not have (a CUDA op with no CUDA
/// backend loaded, or no GPU). Python: pyswitch.DeviceError.
class DeviceError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

}  // namespace pyswitch

/// Throws ExceptionType with the streamed message parts unless cond holds. Messages say where,
/// what was expected and what was received: "route: k must be in [1, 8], got 9".
#define PYSWITCH_CHECK_AS(ExceptionType, cond, ...)                            \
  do {                                                                         \
    if (!(cond)) throw ExceptionType(::pyswitch::detail::concat(__VA_ARGS__)); \
  } while (0)

#define PYSWITCH_CHECK_ARG(cond, ...) \
  PYSWITCH_CHECK_AS(::pyswitch::InvalidArgument, cond, __VA_ARGS__)
#define PYSWITCH_CHECK_TYPE(cond, ...) \
  PYSWITCH_CHECK_AS(::pyswitch::TypeMismatch, cond, __VA_ARGS__)
#define PYSWITCH_CHECK_STATE(cond, ...) PYSWITCH_CHECK_AS(::pyswitch::Error, cond, __VA_ARGS__)
