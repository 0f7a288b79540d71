/// @file table_buffer.hpp
/// An owned, typed, flat buffer in a backend's memory: host memory for the CPU table, device
/// memory for a CUDA table (backend.hpp). The layers keep their parameters, gradients and
/// saved activations in these, so a layer constructed for a device keeps its state there.
///
/// Allocation goes through the table's `allocate` (zero-filled); the table must outlive the
/// buffer (tables are process-lifetime statics). Move-only; not thread-safe (like the layers
/// that own them). Errors: InvalidArgument for bad sizes, Error when out of memory, and the
/// table's own errors (DeviceError) from copies.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "pyswitch/tensor.hpp"

namespace pyswitch {

struct BackendOps;

class TableBuffer {
 public:
  /// An empty buffer (null data, size 0), e.g. an absent optional tensor.
  TableBuffer() = default;
  /// `count` zero-filled elements of `dtype` in `ops`'s memory.
  TableBuffer(const BackendOps& ops, DType dtype, int64_t count);
  ~TableBuffer();
  TableBuffer(TableBuffer&& other) noexcept;
  TableBuffer& operator=(TableBuffer&& other) noexcept;
  TableBuffer(const TableBuffer&) = delete;
  TableBuffer& operator=(const TableBuffer&) = delete;

  /// Makes the buffer `count` elements; reallocates (zero-filled, contents lost) only when the
  /// size changes. Needs a table (a buffer made with one).
  void resize(int64_t count);
  /// Sets every element to zero.
  void fill_zero();
  /// Copies size() elements from host memory into the buffer, or out of it.
  void upload(const void* host);
  void download(void* host) const;
  /// Fills the buffer on the host: fill(float* or void*) writes size() elements, in place on the
  /// CPU and into a staging copy that is then uploaded on a device. What is drawn on the host
  /// (initial weights, jitter) is thus the same on every device.
  template <class Fill>
  void fill_on_host(Fill&& fill) {
    if (device() == Device::cpu) {
      fill(data_);
      return;
    }
    std::vector<char> staging(static_cast<size_t>(count_ * dtype_size(dtype_)));
    fill(static_cast<void*>(staging.data()));
    upload(staging.data());
  }

  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  int64_t size() const { return count_; }
  bool empty() const { return count_ == 0; }
  DType dtype() const { return dtype_; }
  Device device() const;
  /// A C-contiguous view of the buffer with these dims (their product must be size()).
  TensorView view(std::initializer_list<int64_t> dims) const;

 private:
  void release();
  const BackendOps* ops_ = nullptr;
  DType dtype_ = DType::float32;
  int64_t count_ = 0;
  void* data_ = nullptr;
};

}  // namespace pyswitch
