// TableBuffer (table_buffer.hpp): flat buffers allocated through a backend table.
#include "pyswitch/table_buffer.hpp"

#include <cstring>
#include <vector>

#include "pyswitch/backend.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch {

TableBuffer::TableBuffer(const BackendOps& ops, DType dtype, int64_t count)
    : ops_(&ops), dtype_(dtype) {
  resize(count);
}

TableBuffer::~TableBuffer() {
  release();
}

TableBuffer::TableBuffer(TableBuffer&& other) noexcept
    : ops_(other.ops_), dtype_(other.dtype_), count_(other.count_), data_(other.data_) {
  other.count_ = 0;
  other.data_ = nullptr;
}

TableBuffer& TableBuffer::operator=(TableBuffer&& other) noexcept {
  if (this != &other) {
    release();
    ops_ = other.ops_;
    dtype_ = other.dtype_;
    count_ = other.count_;
    data_ = other.data_;
    other.count_ = 0;
    other.data_ = nullptr;
  }
  return *this;
}

void TableBuffer::release() {
  if (data_ != nullptr) ops_->release(data_);
  data_ = nullptr;
  count_ = 0;
}

void TableBuffer::resize(int64_t count) {
  PYSWITCH_CHECK_ARG(count >= 0, "TableBuffer: count must be >= 0, got ", count);
  if (count == count_) return;
  PYSWITCH_CHECK_STATE(ops_ != nullptr, "TableBuffer: an empty buffer has no table to allocate in");
  PYSWITCH_CHECK_ARG(count <= (int64_t{1} << 62) / dtype_size(dtype_), "TableBuffer: ", count,
                     " elements of ", dtype_name(dtype_), " is too large");
  release();  // first, so that peak memory stays at one copy
  data_ = ops_->allocate(count * dtype_size(dtype_));
  count_ = count;
}

Device TableBuffer::device() const {
  return ops_ != nullptr ? ops_->device : Device::cpu;
}

TensorView TableBuffer::view(std::initializer_list<int64_t> dims) const {
  const TensorView v = TensorView::contiguous(data_, dtype_, dims, device());
  PYSWITCH_CHECK_ARG(v.is_valid() && v.numel() == count_, "TableBuffer.view: dims hold ", v.numel(),
                     " elements, the buffer ", count_);
  return v;
}

void TableBuffer::fill_zero() {
  if (count_ == 0) return;
  if (device() == Device::cpu) {
    std::memset(data_, 0, static_cast<size_t>(count_ * dtype_size(dtype_)));
    return;
  }
  const std::vector<char> zeros(static_cast<size_t>(count_ * dtype_size(dtype_)), 0);
  upload(zeros.data());
}

void TableBuffer::upload(const void* host) {
  if (count_ == 0) return;
  ops_->copy(TensorView::contiguous(host, dtype_, {count_}), view({count_}));
}

void TableBuffer::download(void* host) const {
  if (count_ == 0) return;
  ops_->copy(view({count_}), TensorView::contiguous(host, dtype_, {count_}));
}

}  // namespace pyswitch
