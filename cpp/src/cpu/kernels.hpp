// Internal: the table of per-ISA CPU kernels and the arguments they take. Not installed.
// Each ISA's table lives in its own translation unit and namespace (kernels_<isa>.cpp).
#pragma once

#include <cstdint>

#include "pyswitch/cpu_isa.hpp"

namespace pyswitch::cpu {

// Arguments of route_rows: one block of `rows` token rows of the (T, E) logits.
struct RouteRowsArgs {
  const float* logits = nullptr;  // (rows, E)
  int64_t rows = 0;
  int64_t num_experts = 0;
  int64_t k = 1;
  int32_t* expert_index = nullptr;  // (rows, k) written: top-k by logit, ties to lower index
  float* gate = nullptr;            // (rows, k) written: raw softmax probabilities
  float* top1_prob = nullptr;       // (rows,) written when not null
  double* prob_sum = nullptr;       // (E,) accumulated: sum over rows of probs
  double* z_sum = nullptr;          // accumulated: sum over rows of logsumexp^2
  float* scratch = nullptr;         // 2 * E + 32 floats
  int64_t first_bad_row = -1;       // set to the first row holding a non-finite logit
};

// One GEMM operand as stored: op(A) is (M, K), op(B) is (K, N). Element (i, j) of op(X) is
// data[i * ld + j], or data[j * ld + i] when trans. float32, or bfloat16 bits when bf16.
struct GemmOperand {
  const void* data = nullptr;
  int64_t ld = 0;
  bool trans = false;
  bool bf16 = false;
};

// One tile of C = alpha * op(A) op(B) + beta * C over the whole K: rows [m0, m0 + rows) and
// columns [n0, n0 + cols) of C; `c` points at the tile's (m0, n0) element. The tile packs each K
// block of its columns of op(B) once and runs all its rows against it, so a tile with many rows
// (the whole M, in a serial call) packs op(B) once. Every element is the chain documented in
// gemm_tile.inl, identical on every ISA and for any tiling.
struct GemmTileArgs {
  GemmOperand a, b;
  int64_t K = 0;
  int64_t m0 = 0, rows = 0, n0 = 0, cols = 0;
  float alpha = 1.0f;
  bool beta_one = false;
  float* c = nullptr;
  int64_t ldc = 0;
};

struct KernelTable {
  CpuIsa isa;
  void (*f32_to_bf16)(const float* src, uint16_t* dst, int64_t n);
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  // Stops at the first non-finite row, leaving later rows unwritten.
  void (*route_rows)(RouteRowsArgs& args);
  // out[4 * c + j] = lo + width * u_j(first + c) for c in [0, counters), j in [0, 4), where
  // u_j(i) is word j of Philox-4x32-10 at (seed, stream, i) turned into [0, 1) as
  // uniform_from_bits does. Bit-identical on every ISA.
  void (*philox_uniform)(uint64_t seed, uint64_t stream, uint64_t first, int64_t counters, float lo,
                         float width, float* out);
  // probs (rows, E) = softmax with the numerics of route_rows; scratch: E + 32 floats.
  void (*softmax_rows)(const float* logits, int64_t rows, int64_t num_experts, float* probs,
                       float* scratch);
  // Causal attention softmax, in place: row r of `scores` (row stride `stride`) has
  // first_valid + r live scores, which become their softmax; the row is zeroed from there up
  // to `width`. A row holding a non-finite score becomes NaN.
  void (*causal_softmax_rows)(float* scores, int64_t rows, int64_t stride, int64_t first_valid,
                              int64_t width);
  // Its backward, in place on grads (dP in, dS out) over the same causal prefixes.
  void (*causal_softmax_backward_rows)(const float* probs, int64_t probs_stride, float* grads,
                                       int64_t grads_stride, int64_t rows, int64_t first_valid,
                                       int64_t width);
  // One GEMM tile (gemm.cpp splits C into tiles and runs them on the pool). Uses thread-local
  // packing buffers.
  void (*gemm_tile)(const GemmTileArgs& tile);
};

// Each kernels_<isa>.cpp defines kernels of these names (route_rows.inl supplies the row
// kernels) and builds its table with this, so the tables cannot list them in different orders.
#define PYSWITCH_KERNEL_TABLE(isa)    \
  {isa,                               \
   f32_to_bf16,                       \
   bf16_to_f32,                       \
   route_rows_impl,                   \
   philox_uniform,                    \
   softmax_rows_impl,                 \
   causal_softmax_rows_impl,          \
   causal_softmax_backward_rows_impl, \
   gemm_tile_impl}

namespace scalar {
extern const KernelTable table;
}
namespace avx2 {
extern const KernelTable table;
}
namespace avx512_bf16 {
extern const KernelTable table;
}

// The table of the active ISA (cpu_isa.cpp).
const KernelTable& active_kernels();
const KernelTable& kernels_for(CpuIsa isa);

}  // namespace pyswitch::cpu
