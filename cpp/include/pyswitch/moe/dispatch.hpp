/// @file moe/dispatch.hpp
/// Expert dispatch (gather tokens into per-expert buffers) and combine (scatter expert outputs
/// back, weighted by their gates), with their backward passes, driven by a RoutingPlan. No
/// one-hot (T, E, C) tensor: extra memory is O(T*k + E*G) indices besides the buffers.
#pragma once

#include <cstdint>
#include <vector>

#include "pyswitch/moe/router.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::moe {

/// Where each kept assignment of a plan lives in a (rows, d_model) expert buffer.
///
/// Padded layout: expert e owns rows [e*G*C, (e+1)*G*C); group g's rows start at e*G*C + g*C,
/// exactly the plan's `slot`; rows nobody was routed to are zero.
/// Packed layout: the same order (expert, then group, then slot) without the empty rows, so
/// expert e owns rows [expert_offset[e], expert_offset[e+1]). Packing changes which buffer rows
/// exist, never their relative order, so both layouts give bit-identical expert outputs.
struct DispatchLayout {
  int64_t num_tokens = 0, num_experts = 0, k = 0, total_rows = 0;
  bool packed = false;
  std::vector<int64_t> expert_offset;   ///< (E + 1,)
  std::vector<int64_t> assignment_row;  ///< (T * k,): buffer row, or -1 when dropped
  std::vector<int32_t> row_token;       ///< (total_rows,): source token, or -1 for an empty row
};

/// Builds the layout of a plan. Thread-safe.
DispatchLayout make_dispatch_layout(const RoutingPlan& plan, bool packed);

/// buffer (total_rows, d_model) = x[row_token] (zero rows where row_token is -1).
/// x: (T, d_model) and buffer share `dtype` (any DType: rows are only copied). Multi-threaded;
/// the caller owns both buffers.
void dispatch(const void* x, DType dtype, int64_t d_model, const DispatchLayout& layout,
              void* buffer);

/// y (T, d_model) = sum over kept j of gate[t, j] * expert_out[row(t, j)], accumulated in float32
/// in j order (0 for a token whose assignments were all dropped). expert_out and y share dtype,
/// float32 or bfloat16 (InvalidArgument otherwise; the same for the two backward calls below).
void combine(const void* expert_out, DType dtype, int64_t d_model, const DispatchLayout& layout,
             const float* gate, void* y);

/// Backward of combine. d_expert_out (total_rows, d_model) = gate * dy[token] (0 on empty
/// rows); d_gate (T, k) float32 = <dy[t], expert_out[row(t, j)]> for kept assignments, else 0.
/// dy, expert_out and d_expert_out share dtype; the dot products accumulate in float32.
void combine_backward(const void* dy, const void* expert_out, DType dtype, int64_t d_model,
                      const DispatchLayout& layout, const float* gate, void* d_expert_out,
                      float* d_gate);

/// Backward of dispatch. dx (T, d_model) = sum over kept j of d_buffer[row(t, j)], in j order,
/// accumulated in float32. d_buffer and dx share dtype.
void dispatch_backward(const void* d_buffer, DType dtype, int64_t d_model,
                       const DispatchLayout& layout, void* dx);

}  // namespace pyswitch::moe
