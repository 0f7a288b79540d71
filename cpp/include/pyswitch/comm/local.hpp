/// @file comm/local.hpp
/// Thread ranks: N ranks as threads of one process, exchanging through shared memory. Needs
/// nothing installed; the default backend for embedding and tests.
#pragma once

#include <memory>
#include <string>

#include "pyswitch/comm/communicator.hpp"

namespace pyswitch::comm {

class LocalGroupState;
struct LocalGroupComms;

/// A group of `world_size` thread ranks. comm(r) is rank r's communicator; each must be used by
/// one thread at a time (its rank's thread), and the group must outlive them. Thread-safe.
class LocalGroup {
 public:
  /// Throws InvalidArgument for world_size < 1 or a timeout that is not finite and positive.
  LocalGroup(int world_size, double timeout_seconds = 30.0);
  ~LocalGroup();
  LocalGroup(const LocalGroup&) = delete;
  LocalGroup& operator=(const LocalGroup&) = delete;

  int size() const;
  Communicator& comm(int rank);

  /// Marks the group failed: ranks waiting in, or later entering, a collective throw CommError
  /// whose message includes `reason`. The first reason is kept. Use it when a rank's work fails
  /// outside a collective, so that its peers do not wait for the timeout.
  void poison(const std::string& reason);
  bool poisoned() const;

 private:
  std::shared_ptr<LocalGroupState> state_;
  std::unique_ptr<LocalGroupComms> comms_;
};

}  // namespace pyswitch::comm
