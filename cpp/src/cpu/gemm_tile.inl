// Internal: the ISA-generic GEMM tile (packing plus a register-blocked micro-kernel), written
// once against the 16-lane vector vocabulary of route_rows.inl; each kernels_<isa>.cpp includes
// it after defining V and picks the register block (kGemmRows x 16 * kGemmVectors).
//
// The arithmetic contract (see GemmTileArgs in kernels.hpp): every element of C is one chain
//   acc = +0; for k = 0, 1, ..., K-1: acc = fma(a[m, k], b[k, n], acc)
//   c = (alpha == 1 ? acc : alpha * acc), then c = c_old + c when beta == 1,
// in float32, with bfloat16 operands widened exactly. Nothing in that chain depends on the
// tile, on the row's place in it, on the register block, on whether an operand was packed or
// read in place, or on the ISA, so a row's result is the same however the rows are split (expert
// parallelism, thread counts) and on every tier. Blocking over K only parks acc in memory
// between blocks, which float32 storage does not round.
//
// Vocabulary used: V load(const float*), V load_tail(const float*, int64_t, float),
// void store(float*, V), void store_tail(float*, V, int64_t), V set1(float), V add(V, V),
// V mul(V, V), V fma(V, V, V).

namespace {

constexpr int64_t kGemmDepth = 256;  // K block: one B micro-panel (256 x NR floats) fits L1
// Rows run against a packed B block in sub-blocks of this many: their A rows (96 x 256 floats)
// stay in L2 beside the block (at most 256 x 256 floats) while each B micro-panel sits in L1.
constexpr int64_t kGemmRowBlock = 96;  // a multiple of every register block (4, 6, 12)
constexpr int64_t kGemmPanelCols = 16 * kGemmVectors;

inline float gemm_operand_value(const GemmOperand& op, int64_t offset) {
  if (op.bf16) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(op.data)[offset])
                          << 16;
    float value;
    __builtin_memcpy(&value, &bits, sizeof value);
    return value;
  }
  return static_cast<const float*>(op.data)[offset];
}

// Widens `count` contiguous operand values starting at `offset` into dst.
inline void gemm_copy_run(const GemmOperand& op, int64_t offset, int64_t count, float* dst) {
  if (op.bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(op.data) + offset;
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      __builtin_memcpy(dst + i, &bits, sizeof(float));
    }
  } else {
    const float* src = static_cast<const float*>(op.data) + offset;
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i];
  }
}

// packed[p][k][c] = b[k0 + k, n0 + p * NR + c], zero beyond `cols` (op(B) is (K, N)).
void gemm_pack_b(const GemmOperand& b, int64_t k0, int64_t kc, int64_t n0, int64_t cols,
                 float* packed) {
  constexpr int64_t NR = kGemmPanelCols;
  const int64_t whole = b.trans || b.bf16 ? 0 : cols / NR;
  // A few source rows at a time across all panels: each row is read once, front to back, and
  // each panel is written in runs of kRowChunk rows. Panel by panel over all k would read with
  // stride ld; row by row over all panels would write with stride kc * NR. Either stride is a
  // power of two for typical sizes, and a power-of-two stride thrashes L1 sets.
  constexpr int64_t kRowChunk = 8;
  for (int64_t k1 = 0; k1 < kc; k1 += kRowChunk) {
    const int64_t k_end = k1 + kRowChunk < kc ? k1 + kRowChunk : kc;
    for (int64_t p = 0; p < whole; ++p) {
      const float* src = static_cast<const float*>(b.data) + (k0 + k1) * b.ld + n0 + p * NR;
      float* dst = packed + p * kc * NR + k1 * NR;
      for (int64_t k = k1; k < k_end; ++k, src += b.ld, dst += NR) {
#pragma GCC unroll 4
        for (int v = 0; v < kGemmVectors; ++v) store(dst + 16 * v, load(src + 16 * v));
      }
    }
  }
  for (int64_t p0 = whole * NR; p0 < cols; p0 += NR) {
    const int64_t width = cols - p0 < NR ? cols - p0 : NR;
    float* panel = packed + (p0 / NR) * kc * NR;
    if (!b.trans) {  // row k of the panel is contiguous in B (K, N)
      for (int64_t k = 0; k < kc; ++k) {
        float* dst = panel + k * NR;
        gemm_copy_run(b, (k0 + k) * b.ld + n0 + p0, width, dst);
        for (int64_t c = width; c < NR; ++c) dst[c] = 0.0f;
      }
    } else {  // B is stored (N, K): column c of the panel is contiguous
      int64_t c = 0;
      if (!b.bf16) {
        // 8 x 8 blocks through registers (transpose8x8, per ISA): element by element, every
        // write of a column would touch its own cache line, and this pack runs once per tile
        // for each K block of the backward's dX = dY W^T products.
        const float* src = static_cast<const float*>(b.data) + (n0 + p0) * b.ld + k0;
        for (; c + 8 <= width; c += 8) {
          int64_t k = 0;
          for (; k + 8 <= kc; k += 8)
            transpose8x8(src + c * b.ld + k, b.ld, panel + k * NR + c, NR);
          for (; k < kc; ++k) {
            for (int64_t j = 0; j < 8; ++j) panel[k * NR + c + j] = src[(c + j) * b.ld + k];
          }
        }
      }
      for (; c < width; ++c) {
        const int64_t base = (n0 + p0 + c) * b.ld + k0;
        for (int64_t k = 0; k < kc; ++k) panel[k * NR + c] = gemm_operand_value(b, base + k);
      }
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t c = width; c < NR; ++c) panel[k * NR + c] = 0.0f;
      }
    }
  }
}

// packed[p][k][r] = a[m0 + p * MR + r, k0 + k], zero beyond `rows` (op(A) is (M, K)).
void gemm_pack_a(const GemmOperand& a, int64_t k0, int64_t kc, int64_t m0, int64_t rows,
                 float* packed) {
  constexpr int64_t MR = kGemmRows;
  for (int64_t p0 = 0; p0 < rows; p0 += MR) {
    const int64_t height = rows - p0 < MR ? rows - p0 : MR;
    float* panel = packed + (p0 / MR) * kc * MR;
    if (a.trans && !a.bf16 && height == MR) {
      // A is stored (K, M) in float32: row k of the panel is MR contiguous floats, a copy of
      // constant length the compiler turns into a few vector moves (this pack runs once per
      // tile for every K block of the weight gradients).
      const float* src = static_cast<const float*>(a.data) + k0 * a.ld + m0 + p0;
      for (int64_t k = 0; k < kc; ++k) {
#pragma GCC unroll 16
        for (int64_t r = 0; r < MR; ++r) panel[k * MR + r] = src[k * a.ld + r];
      }
    } else if (a.trans) {  // A is stored (K, M): row k of the panel is contiguous
      float run[MR];
      for (int64_t k = 0; k < kc; ++k) {
        gemm_copy_run(a, (k0 + k) * a.ld + m0 + p0, height, run);
        for (int64_t r = 0; r < MR; ++r) panel[k * MR + r] = r < height ? run[r] : 0.0f;
      }
    } else {
      for (int64_t r = 0; r < height; ++r) {
        const int64_t base = (m0 + p0 + r) * a.ld + k0;
        for (int64_t k = 0; k < kc; ++k) panel[k * MR + r] = gemm_operand_value(a, base + k);
      }
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t r = height; r < MR; ++r) panel[k * MR + r] = 0.0f;
      }
    }
  }
}

struct GemmMicroOut {
  const float* partial_in;  // acc so far (row stride ld_partial), or null to start from +0
  float* partial_out;       // where acc goes when this is not the last K block
  int64_t ld_partial;
  float* c;  // the final destination (last K block only)
  int64_t ldc;
  float alpha;
  bool beta_one;
  bool last;
};

// acc (rows x cols, at most MR x NR) continues its chains over kc more k. `b` is one packed B
// micro-panel (kc x NR). A is one packed micro-panel (kc x MR, a[k * MR + i]) when kPackedA, or
// else float32 rows read in place (a[i * lda + k]): skipping the pack is what keeps small-K and
// few-column products fast. Rows past `rows` then re-read the last row; they are never stored.
template <bool kPackedA>
void gemm_micro(int64_t kc, const float* a, int64_t lda, const float* b, int64_t rows, int64_t cols,
                const GemmMicroOut& out) {
  constexpr int MR = kGemmRows;
  constexpr int NV = kGemmVectors;
  constexpr int64_t NR = kGemmPanelCols;
  const float* row[MR];
  for (int i = 0; i < MR; ++i) row[i] = a + (i < rows ? i : rows - 1) * lda;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t left = cols - 16 * v;
      if (out.partial_in && i < rows && left > 0) {
        const float* src = out.partial_in + i * out.ld_partial + 16 * v;
        acc[i][v] = left >= 16 ? load(src) : load_tail(src, left, 0.0f);
      } else {
        acc[i][v] = set1(0.0f);
      }
    }
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    V bk[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bk[v] = load(b + k * NR + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V ai = set1(kPackedA ? a[k * MR + i] : row[i][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = fma(ai, bk[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
    for (int v = 0; v < NV; ++v) {
      const int64_t left = cols - 16 * v;
      if (left <= 0) break;
      V r = acc[i][v];
      float* dst;
      if (out.last) {
        dst = out.c + i * out.ldc + 16 * v;
        if (out.alpha != 1.0f) r = mul(r, set1(out.alpha));
        if (out.beta_one) r = add(left >= 16 ? load(dst) : load_tail(dst, left, 0.0f), r);
      } else {
        dst = out.partial_out + i * out.ld_partial + 16 * v;
      }
      if (left >= 16) {
        store(dst, r);
      } else {
        store_tail(dst, r, left);
      }
    }
  }
}

std::vector<float>& gemm_buffer(int which) {
  thread_local std::vector<float> buffers[3];
  return buffers[which];
}

void gemm_tile_impl(const GemmTileArgs& t) {
  constexpr int64_t MR = kGemmRows;
  constexpr int64_t NR = kGemmPanelCols;
  const int64_t col_panels = (t.cols + NR - 1) / NR;
  const int64_t depth = t.K < kGemmDepth ? t.K : kGemmDepth;
  // float32 rows of A are read in place; transposed or bf16 A is packed, a row block at a time.
  const bool pack_a = t.a.trans || t.a.bf16;
  const int64_t row_block = t.rows < kGemmRowBlock ? t.rows : kGemmRowBlock;
  std::vector<float>& packed_a = gemm_buffer(0);
  std::vector<float>& packed_b = gemm_buffer(1);
  std::vector<float>& partial = gemm_buffer(2);
  if (pack_a) packed_a.resize(static_cast<size_t>((row_block + MR - 1) / MR * MR * depth));
  packed_b.resize(static_cast<size_t>(col_panels * NR * depth));
  // Between K blocks acc is parked in C itself, unless C's old values are still needed.
  float* park = t.c;
  int64_t ld_park = t.ldc;
  if (t.K > kGemmDepth && t.beta_one) {
    partial.resize(static_cast<size_t>(t.rows * t.cols));
    park = partial.data();
    ld_park = t.cols;
  }
  for (int64_t k0 = 0; k0 < t.K; k0 += kGemmDepth) {
    const int64_t kc = t.K - k0 < kGemmDepth ? t.K - k0 : kGemmDepth;
    const bool first = k0 == 0, last = k0 + kc >= t.K;
    gemm_pack_b(t.b, k0, kc, t.n0, t.cols, packed_b.data());
    for (int64_t r0 = 0; r0 < t.rows; r0 += kGemmRowBlock) {
      const int64_t block_rows = t.rows - r0 < kGemmRowBlock ? t.rows - r0 : kGemmRowBlock;
      const int64_t row_panels = (block_rows + MR - 1) / MR;
      if (pack_a) gemm_pack_a(t.a, k0, kc, t.m0 + r0, block_rows, packed_a.data());
      const float* a_rows =
          static_cast<const float*>(t.a.data) + (t.m0 + r0) * t.a.ld + k0;  // when !pack_a
      for (int64_t jp = 0; jp < col_panels; ++jp) {
        const int64_t j = jp * NR;
        const int64_t cols = t.cols - j < NR ? t.cols - j : NR;
        const float* b_panel = packed_b.data() + jp * kc * NR;
        for (int64_t ip = 0; ip < row_panels; ++ip) {
          const int64_t i = r0 + ip * MR;
          const int64_t rows = t.rows - i < MR ? t.rows - i : MR;
          GemmMicroOut out;
          out.partial_in = first ? nullptr : park + i * ld_park + j;
          out.partial_out = park + i * ld_park + j;
          out.ld_partial = ld_park;
          out.c = t.c + i * t.ldc + j;
          out.ldc = t.ldc;
          out.alpha = t.alpha;
          out.beta_one = t.beta_one;
          out.last = last;
          if (pack_a) {
            gemm_micro<true>(kc, packed_a.data() + ip * kc * MR, 0, b_panel, rows, cols, out);
          } else {
            gemm_micro<false>(kc, a_rows + ip * MR * t.a.ld, t.a.ld, b_panel, rows, cols, out);
          }
        }
      }
    }
  }
}

}  // namespace
