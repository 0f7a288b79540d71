// The layer arena (workspace.hpp): slots allocated through the layer's backend table.
#include "pyswitch/workspace.hpp"

#include "pyswitch/error.hpp"

namespace pyswitch {

void* Workspace::bytes(int slot, int64_t bytes) {
  PYSWITCH_CHECK_ARG(slot >= 0 && slot < static_cast<int>(slots_.size()),
                     "Workspace: slot must be in [0, ", slots_.size(), "), got ", slot);
  PYSWITCH_CHECK_ARG(bytes >= 0, "Workspace: bytes must be >= 0, got ", bytes);
  Slot& s = slots_[static_cast<size_t>(slot)];
  if (bytes > s.capacity) {
    // Free first: the old contents are not kept, and peak memory stays at one copy.
    backend_->release(s.data);
    s.data = nullptr;
    s.capacity = 0;
    s.data = backend_->allocate(bytes);
    s.capacity = bytes;
  }
  return s.data;
}

void Workspace::release_all() {
  for (Slot& s : slots_) {
    backend_->release(s.data);
    s = Slot{};
  }
}

}  // namespace pyswitch
