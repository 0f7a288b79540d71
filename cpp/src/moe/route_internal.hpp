// Internal: the pieces of token-choice routing shared by the CPU route() (router.cpp) and the
// CUDA route op (cuda/routing.cu). A backend computes the per-row pass (top-k, raw gates, the
// top-1 probabilities and the per-unit loss sums) its own way, bit-identical to the CPU's row
// kernels; finish_route then does everything after it (z sum, gate normalisation, capacity
// slots in priority order, drops, aux loss) once, on the host, for every backend.
#pragma once

#include <cstdint>
#include <vector>

#include "pyswitch/moe/router.hpp"

namespace pyswitch::moe::route_detail {

/// Rows per unit of the row pass; a unit never crosses a group boundary. The loss sums are
/// kept per unit and added in unit order, so the unit size is part of the numerics.
constexpr int64_t kRouteRowBlock = 256;

/// Throws InvalidArgument for the argument errors route() documents.
void validate_route(const char* where, int64_t num_tokens, int64_t num_experts,
                    const RouteOptions& options);

/// Throws InvalidArgument naming row `row` (whose E values are `values`) as non-finite.
[[noreturn]] void throw_nonfinite_row(const char* where, const float* values, int64_t num_experts,
                                      int64_t row);

/// A plan with its sizes set and its arrays allocated, for the row pass to fill.
RoutingPlan start_plan(int64_t num_tokens, int64_t num_experts, const RouteOptions& options);

/// unit_z from the row pass's per-row max and exp sum (T,): lse = max + log(sum), then each
/// unit's sum of lse^2 in row order: the CPU row kernel's z sums, addition for addition, for a
/// backend whose row pass kept the two statistics. Multi-threaded over units.
std::vector<double> unit_z_from_rows(const std::vector<float>& row_max,
                                     const std::vector<double>& row_sum, int64_t group_size,
                                     int64_t num_groups);

/// Completes a plan whose expert_index and (raw) gate the row pass wrote. top1: (T,) top-1
/// probabilities (batch-prioritized routing only, else empty); unit_prob: (units, E) sums of
/// probabilities per unit of kRouteRowBlock rows (units_per_group = ceil(S / kRouteRowBlock)
/// per group); unit_z: (units,) sums of lse^2.
void finish_route(RoutingPlan& plan, const RouteOptions& options, const std::vector<float>& top1,
                  const std::vector<double>& unit_prob, const std::vector<double>& unit_z);

}  // namespace pyswitch::moe::route_detail
