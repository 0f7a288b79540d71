// Error class tests (error.hpp): the hierarchy the bindings map onto Python exceptions, the
// checking macros' exception types and streamed messages, and that the core's argument errors
// are InvalidArgument (ValueError), never TypeMismatch (TypeError), with the argument's name.
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/nn/ops.hpp"
#include "pyswitch/optim/optim.hpp"
#include "pyswitch/threading.hpp"

using namespace pyswitch;

namespace {

void check_positive(int value) {
  PYSWITCH_CHECK_ARG(value > 0, "f: value must be > 0, got ", value, " (", 1.5, ")");
}
void check_dtype(bool ok) {
  PYSWITCH_CHECK_TYPE(ok, "f: x must be float32, got ", "int8");
}
void check_state(bool ok) {
  PYSWITCH_CHECK_STATE(ok, "f: no forward pass yet");
}

}  // namespace

TEST(error_classes_hierarchy_matches_the_python_mapping) {
  static_assert(std::is_base_of_v<std::invalid_argument, InvalidArgument>);
  static_assert(std::is_base_of_v<std::invalid_argument, TypeMismatch>);
  static_assert(!std::is_base_of_v<InvalidArgument, TypeMismatch>);
  static_assert(!std::is_base_of_v<TypeMismatch, InvalidArgument>);
  static_assert(std::is_base_of_v<std::runtime_error, Error>);
  static_assert(std::is_base_of_v<Error, CommError>);
  static_assert(std::is_base_of_v<CommError, CommTimeout>);
  static_assert(std::is_base_of_v<Error, CheckpointError>);
  static_assert(!std::is_base_of_v<CommError, CheckpointError>);
  // Caught through the base a binding would use.
  bool caught = false;
  try {
    throw CommTimeout("all_reduce: rank 1 timed out");
  } catch (const CommError& e) {
    caught = std::string(e.what()) == "all_reduce: rank 1 timed out";
  }
  CHECK(caught);
}

TEST(error_classes_check_macros_throw_their_class_with_the_streamed_message) {
  check_positive(1);  // passes silently
  CHECK_THROWS(InvalidArgument, check_positive(-3), "f: value must be > 0, got -3 (1.5)");
  check_dtype(true);
  CHECK_THROWS(TypeMismatch, check_dtype(false), "f: x must be float32, got int8");
  check_state(true);
  CHECK_THROWS(Error, check_state(false), "f: no forward pass yet");
  // A TypeMismatch is not an InvalidArgument: a handler for one does not catch the other.
  bool wrong_class = false;
  try {
    try {
      check_dtype(false);
    } catch (const InvalidArgument&) {
      wrong_class = true;
    }
  } catch (const TypeMismatch&) {
  }
  CHECK(!wrong_class);
}

TEST(error_classes_core_argument_errors_are_invalid_argument_naming_it) {
  // A sample across modules: the class is InvalidArgument (not TypeMismatch or a plain
  // std::invalid_argument), and the message names the function and the argument.
  auto is_invalid_argument = [](auto&& call, const std::string& fragment) {
    try {
      call();
    } catch (const TypeMismatch&) {
      return false;
    } catch (const InvalidArgument& e) {
      const bool ok = std::string(e.what()).find(fragment) != std::string::npos;
      if (!ok) std::printf("  message was: %s\n", e.what());
      return ok;
    } catch (...) {
      return false;
    }
    return false;
  };
  CHECK(is_invalid_argument([] { set_num_threads(0); }, "set_num_threads: n must be >= 1, got 0"));
  CHECK(is_invalid_argument([] { nn::Linear(0, 1, DType::float32); }, "Linear: in_features"));
  CHECK(is_invalid_argument([] { optim::learning_rate(0, 1.0, -2, 10, "cosine"); },
                            "learning_rate: step and warmup must be >= 0"));
  CHECK(is_invalid_argument(
      [] {
        std::vector<float> v(2, 1.0f);
        optim::clip_by_global_norm({{v.data(), 2}}, -1.0);
      },
      "clip_by_global_norm: max_norm"));
  CHECK(is_invalid_argument(
      [] {
        std::vector<float> v(2, 1.0f);
        optim::adamw_step(v.data(), v.data(), v.data(), v.data(), 2, -4, 0.1, optim::AdamWOptions{},
                          true);
      },
      "adamw_step: step must be >= 1, got -4"));
}
