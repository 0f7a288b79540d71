/// @file workspace.hpp
/// A layer's arena: the scratch and saved-for-backward buffers of one layer, allocated through
/// its backend table (so they live on the layer's device) and kept between steps, so their pages
/// are touched once, not once per step.
#pragma once

#include <cstdint>
#include <vector>

#include "pyswitch/backend.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch {

/// Buffers by slot: a layer names its slots with an enum and asks for a slot's bytes each step.
/// A slot grows (reallocated, contents dropped) when asked for more than it holds and never
/// shrinks, so a steady-state step allocates nothing. Owns its memory; move-only. Not
/// thread-safe: one layer call at a time, like the layer that owns it.
class Workspace {
 public:
  explicit Workspace(const BackendOps& backend, int slots) : backend_(&backend), slots_(slots) {}
  ~Workspace() { release_all(); }
  Workspace(Workspace&& other) noexcept
      : backend_(other.backend_), slots_(std::move(other.slots_)) {
    other.slots_.clear();
  }
  Workspace& operator=(Workspace&& other) noexcept {
    if (this != &other) {
      release_all();
      backend_ = other.backend_;
      slots_ = std::move(other.slots_);
      other.slots_.clear();
    }
    return *this;
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  /// At least `bytes` of slot `slot` (zero-filled when newly allocated). Throws
  /// InvalidArgument for a slot out of range or negative bytes, Error when out of memory.
  void* bytes(int slot, int64_t bytes);

  /// A C-contiguous view of slot `slot` sized for (rows, cols) of `dtype`.
  TensorView matrix(int slot, DType dtype, int64_t rows, int64_t cols) {
    return TensorView::contiguous(bytes(slot, rows * cols * dtype_size(dtype)), dtype, {rows, cols},
                                  backend_->device);
  }

 private:
  struct Slot {
    void* data = nullptr;
    int64_t capacity = 0;
  };
  void release_all();

  const BackendOps* backend_;
  std::vector<Slot> slots_;
};

}  // namespace pyswitch
