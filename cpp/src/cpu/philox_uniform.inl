// Internal: Philox-4x32-10 uniforms on a vector of counters at once, written once for every
// SIMD ISA. The including kernels_<isa>.cpp defines kPhiloxLanes and the vocabulary VI,
// vload_u32, vset1_u32, vxor, mulhilo (32x32 -> 64-bit products split in hi/lo words),
// to_uniform and vstore_f32. Integer arithmetic is exact, so every ISA matches the scalar
// generator bit for bit.

namespace {

void philox_uniform(uint64_t seed, uint64_t stream, uint64_t first, int64_t counters, float lo,
                    float width, float* out) {
  int64_t c = 0;
  alignas(64) uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes];
  alignas(64) float words[4][kPhiloxLanes];
  for (; c + kPhiloxLanes <= counters; c += kPhiloxLanes) {
    for (int i = 0; i < kPhiloxLanes; ++i) {
      const uint64_t index = first + static_cast<uint64_t>(c + i);
      c0[i] = static_cast<uint32_t>(index);
      c1[i] = static_cast<uint32_t>(index >> 32);
    }
    VI x0 = vload_u32(c0), x1 = vload_u32(c1);
    VI x2 = vset1_u32(static_cast<uint32_t>(stream)),
       x3 = vset1_u32(static_cast<uint32_t>(stream >> 32));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    const VI m0 = vset1_u32(0xD2511F53u), m1 = vset1_u32(0xCD9E8D57u);
    for (int round = 0; round < 10; ++round) {
      VI hi0, lo0, hi1, lo1;
      mulhilo(m0, x0, &hi0, &lo0);
      mulhilo(m1, x2, &hi1, &lo1);
      const VI n0 = vxor(vxor(hi1, x1), vset1_u32(k0));
      const VI n2 = vxor(vxor(hi0, x3), vset1_u32(k1));
      x0 = n0;
      x1 = lo1;
      x2 = n2;
      x3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const VI xs[4] = {x0, x1, x2, x3};
    for (int j = 0; j < 4; ++j) vstore_f32(words[j], to_uniform(xs[j], lo, width));
    for (int i = 0; i < kPhiloxLanes; ++i) {
      for (int j = 0; j < 4; ++j) out[4 * (c + i) + j] = words[j][i];
    }
  }
  if (c < counters) {
    scalar::table.philox_uniform(seed, stream, first + static_cast<uint64_t>(c), counters - c, lo,
                                 width, out + 4 * c);
  }
}

}  // namespace
