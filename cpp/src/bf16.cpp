// Bulk float32 <-> bfloat16 conversion: the active ISA's kernel over fixed 64 Ki-element blocks.
#include "pyswitch/bf16.hpp"

#include <algorithm>

#include "cpu/kernels.hpp"
#include "parallel.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch {
namespace {
constexpr int64_t kBlock = 1 << 16;
}

void convert_f32_to_bf16(const float* src, bf16* dst, int64_t n) {
  PYSWITCH_CHECK_ARG(n >= 0, "convert_f32_to_bf16: n must be >= 0, got ", n);
  const auto& k = cpu::active_kernels();
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
    const int64_t start = b * kBlock;
    const int64_t count = std::min(kBlock, n - start);
    k.f32_to_bf16(src + start, reinterpret_cast<uint16_t*>(dst) + start, count);
  });
}

void convert_bf16_to_f32(const bf16* src, float* dst, int64_t n) {
  PYSWITCH_CHECK_ARG(n >= 0, "convert_bf16_to_f32: n must be >= 0, got ", n);
  const auto& k = cpu::active_kernels();
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
    const int64_t start = b * kBlock;
    const int64_t count = std::min(kBlock, n - start);
    k.bf16_to_f32(reinterpret_cast<const uint16_t*>(src) + start, dst + start, count);
  });
}

}  // namespace pyswitch
