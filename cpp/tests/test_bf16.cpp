// bf16 conversion tests: every ISA against the scalar reference on all 2^32 float32 bit
// patterns, and the reference itself against hand-checked values.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/kernels.hpp"
#include "harness.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/cpu_isa.hpp"

using namespace pyswitch;

static uint16_t ref_bits(uint32_t f32_bits) {
  float value;
  std::memcpy(&value, &f32_bits, 4);
  return float_to_bf16(value).bits;
}

TEST(bf16_reference_known_values) {
  CHECK_EQ(ref_bits(0x3f800000u), 0x3f80);  // 1.0
  CHECK_EQ(ref_bits(0x3f808000u), 0x3f80);  // tie, even stays
  CHECK_EQ(ref_bits(0x3f818000u), 0x3f82);  // tie, odd rounds up
  CHECK_EQ(ref_bits(0x3f808001u), 0x3f81);  // above tie
  CHECK_EQ(ref_bits(0x7f7fffffu), 0x7f80);  // FLT_MAX rounds to inf
  CHECK_EQ(ref_bits(0x7f7f7fffu), 0x7f7f);  // just below the overflow tie
  CHECK_EQ(ref_bits(0xff800000u), 0xff80);  // -inf
  CHECK_EQ(ref_bits(0x7f800001u), 0x7fc0);  // signalling NaN -> canonical
  CHECK_EQ(ref_bits(0xffffffffu), 0xffc0);  // negative NaN keeps its sign
  CHECK_EQ(ref_bits(0x00000001u), 0x0000);  // smallest subnormal rounds to 0
  CHECK_EQ(ref_bits(0x00008000u), 0x0000);  // subnormal tie to even (0)
  CHECK_EQ(ref_bits(0x00018000u), 0x0002);  // subnormal tie to even (up)
  CHECK_EQ(ref_bits(0x007fffffu), 0x0080);  // largest subnormal -> FLT_MIN
  CHECK_EQ(ref_bits(0x80000000u), 0x8000);  // -0
}

TEST(bf16_every_isa_matches_scalar_on_all_2_32_patterns) {
  constexpr int64_t kChunk = int64_t{1} << 24;
  std::vector<uint32_t> bits(kChunk);
  std::vector<uint16_t> expect(kChunk), got(kChunk);
  for (CpuIsa isa : supported_cpu_isas()) {
    const cpu::KernelTable& k = cpu::kernels_for(isa);
    int64_t mismatches = 0;
    for (int64_t start = 0; start < (int64_t{1} << 32); start += kChunk) {
      for (int64_t i = 0; i < kChunk; ++i) bits[i] = static_cast<uint32_t>(start + i);
      const float* src = reinterpret_cast<const float*>(bits.data());
      if (isa == CpuIsa::scalar) {
        for (int64_t i = 0; i < kChunk; ++i) expect[i] = ref_bits(bits[i]);
      } else {
        cpu::scalar::table.f32_to_bf16(src, expect.data(), kChunk);
      }
      k.f32_to_bf16(src, got.data(), kChunk);
      for (int64_t i = 0; i < kChunk; ++i) mismatches += expect[i] != got[i];
    }
    std::printf("  %s: %lld mismatches over 2^32 patterns\n", cpu_isa_name(isa),
                static_cast<long long>(mismatches));
    CHECK_EQ(mismatches, 0);
  }
}

TEST(bf16_to_f32_every_isa_all_2_16_patterns_and_odd_lengths) {
  std::vector<uint16_t> src(1 << 16);
  for (int i = 0; i < (1 << 16); ++i) src[i] = static_cast<uint16_t>(i);
  for (CpuIsa isa : supported_cpu_isas()) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{15}, int64_t{17}, int64_t{1} << 16}) {
      std::vector<float> out(static_cast<size_t>(n) + 1, -7.0f);
      cpu::kernels_for(isa).bf16_to_f32(src.data(), out.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        uint32_t b;
        std::memcpy(&b, &out[i], 4);
        CHECK_EQ(b, static_cast<uint32_t>(src[i]) << 16);
      }
      CHECK_EQ(out[n], -7.0f);  // nothing written past the end
    }
  }
}

TEST(bf16_bulk_conversion_odd_lengths_do_not_write_past_end) {
  for (CpuIsa isa : supported_cpu_isas()) {
    for (int64_t n : {0, 1, 7, 8, 9, 15, 16, 17, 33, 1000}) {
      std::vector<float> src(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) src[i] = static_cast<float>(i) * 1.37f - 3.0f;
      std::vector<uint16_t> out(static_cast<size_t>(n) + 1, 0xABCD);
      cpu::kernels_for(isa).f32_to_bf16(src.data(), out.data(), n);
      for (int64_t i = 0; i < n; ++i) CHECK_EQ(out[i], float_to_bf16(src[i]).bits);
      CHECK_EQ(out[n], 0xABCD);
    }
  }
}
