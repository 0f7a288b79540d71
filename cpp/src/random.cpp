// Philox-4x32-10 counter-based generator and the distributions the core draws from.
#include "pyswitch/random.hpp"

#include <algorithm>
#include <cmath>

#include "cpu/kernels.hpp"
#include "parallel.hpp"

namespace pyswitch {
namespace {

constexpr int64_t kBlock = 1 << 14;

}  // namespace

void truncated_normal(float* out, int64_t n, double std, uint64_t seed, uint64_t stream,
                      int64_t first_index) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
    const int64_t end = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) {
      // Attempt a of element i uses counter i + a * 2^48: disjoint for any n < 2^48.
      for (uint64_t attempt = 0;; ++attempt) {
        uint32_t w[4];
        philox4x32(seed, stream, static_cast<uint64_t>(first_index + i) + (attempt << 48), w);
        const double u1 = (static_cast<double>(w[0] >> 8) + 1.0) / 16777216.0;  // (0, 1]
        const double u2 = static_cast<double>(w[1] >> 8) / 16777216.0;
        const double radius = std::sqrt(-2.0 * std::log(u1));
        const double z0 = radius * std::cos(kTwoPi * u2);
        const double z1 = radius * std::sin(kTwoPi * u2);
        if (std::fabs(z0) <= 2.0) {
          out[i] = static_cast<float>(z0 * std);
          break;
        }
        if (std::fabs(z1) <= 2.0) {
          out[i] = static_cast<float>(z1 * std);
          break;
        }
      }
    }
  });
}

void uniform(float* out, int64_t n, float lo, float hi, uint64_t seed, uint64_t stream,
             int64_t first_index) {
  const float width = hi - lo;
  const cpu::KernelTable& kernels = cpu::active_kernels();
  // One Philox counter yields 4 values; a start inside a counter takes the head from a
  // 4-value scratch so that the body runs on whole counters.
  const int64_t head = std::min<int64_t>(n, (4 - first_index % 4) % 4);
  if (head > 0) {
    float quad[4];
    kernels.philox_uniform(seed, stream, static_cast<uint64_t>(first_index) / 4, 1, lo, width,
                           quad);
    std::copy_n(quad + first_index % 4, head, out);
  }
  out += head;
  n -= head;
  const uint64_t first_counter = static_cast<uint64_t>(first_index + head) / 4;
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
    const int64_t first = b * kBlock, count = std::min(kBlock, n - first);
    const int64_t whole = count / 4;  // kBlock is a multiple of 4: counters never straddle blocks
    const uint64_t counter = first_counter + static_cast<uint64_t>(first) / 4;
    kernels.philox_uniform(seed, stream, counter, whole, lo, width, out + first);
    if (count % 4) {
      float tail[4];
      kernels.philox_uniform(seed, stream, counter + whole, 1, lo, width, tail);
      std::copy_n(tail, count % 4, out + first + 4 * whole);
    }
  });
}

}  // namespace pyswitch
