// Dispatch and combine over a routing plan: index-driven row copies and weighted row sums.
#include "pyswitch/moe/dispatch.hpp"

#include <algorithm>
#include <cstring>

#include "parallel.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::moe {
namespace {

constexpr int64_t kRowsPerBlock = 64;

// Row access in either dtype, widened to float32 for arithmetic.
struct RowIo {
  DType dtype;
  int64_t d;
  void load(const void* base, int64_t row, float* out) const {
    if (dtype == DType::float32) {
      std::memcpy(out, static_cast<const float*>(base) + row * d, static_cast<size_t>(d) * 4);
    } else {
      convert_bf16_to_f32(static_cast<const bf16*>(base) + row * d, out, d);
    }
  }
  void store(void* base, int64_t row, const float* in) const {
    if (dtype == DType::float32) {
      std::memcpy(static_cast<float*>(base) + row * d, in, static_cast<size_t>(d) * 4);
    } else {
      convert_f32_to_bf16(in, static_cast<bf16*>(base) + row * d, d);
    }
  }
};

void check_d_model(const char* where, int64_t d_model) {
  PYSWITCH_CHECK_ARG(d_model >= 1, where, ": d_model must be >= 1, got ", d_model);
}

}  // namespace

DispatchLayout make_dispatch_layout(const RoutingPlan& plan, bool packed) {
  const int64_t T = plan.num_tokens, E = plan.num_experts, k = plan.k;
  const int64_t G = plan.num_groups, S = plan.group_size, C = plan.capacity;
  DispatchLayout layout;
  layout.num_tokens = T;
  layout.num_experts = E;
  layout.k = k;
  layout.packed = packed;
  layout.expert_offset.assign(static_cast<size_t>(E + 1), 0);
  // kept_before[g * E + e]: rows of expert e used by groups before g.
  std::vector<int64_t> kept_before(static_cast<size_t>(G * E), 0);
  for (int64_t e = 0; e < E; ++e) {
    int64_t rows = 0;
    for (int64_t g = 0; g < G; ++g) {
      kept_before[static_cast<size_t>(g * E + e)] = rows;
      rows += packed ? std::min(plan.group_expert_count[static_cast<size_t>(g * E + e)], C) : C;
    }
    layout.expert_offset[static_cast<size_t>(e + 1)] =
        layout.expert_offset[static_cast<size_t>(e)] + rows;
  }
  layout.total_rows = layout.expert_offset[static_cast<size_t>(E)];
  layout.assignment_row.assign(static_cast<size_t>(T * k), -1);
  layout.row_token.assign(static_cast<size_t>(layout.total_rows), -1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t g = t / S;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t a = t * k + j;
      const int32_t slot = plan.slot[static_cast<size_t>(a)];
      if (slot < 0) continue;
      const int64_t e = plan.expert_index[static_cast<size_t>(a)];
      const int64_t row = layout.expert_offset[static_cast<size_t>(e)] +
                          kept_before[static_cast<size_t>(g * E + e)] + (slot - g * C);
      layout.assignment_row[static_cast<size_t>(a)] = row;
      layout.row_token[static_cast<size_t>(row)] = static_cast<int32_t>(t);
    }
  }
  return layout;
}

void dispatch(const void* x, DType dtype, int64_t d, const DispatchLayout& layout, void* buffer) {
  check_d_model("dispatch", d);
  const int64_t bytes = d * dtype_size(dtype);
  detail::parallel_for(detail::ceil_div(layout.total_rows, kRowsPerBlock), [&](int64_t b) {
    const int64_t end = std::min(layout.total_rows, (b + 1) * kRowsPerBlock);
    for (int64_t row = b * kRowsPerBlock; row < end; ++row) {
      char* dst = static_cast<char*>(buffer) + row * bytes;
      const int32_t token = layout.row_token[static_cast<size_t>(row)];
      if (token < 0) {
        std::memset(dst, 0, static_cast<size_t>(bytes));
      } else {
        std::memcpy(dst, static_cast<const char*>(x) + token * bytes, static_cast<size_t>(bytes));
      }
    }
  });
}

namespace {

// out[t] = sum over kept j of weight(t, j) * rows[row(t, j)], in j order; weight 1 when
// gate is null. Shared by combine (gated) and dispatch_backward (plain sum).
void gather_weighted_sum(const void* rows, DType dtype, int64_t d, const DispatchLayout& layout,
                         const float* gate, void* out) {
  const RowIo io{dtype, d};
  const int64_t T = layout.num_tokens, k = layout.k;
  detail::parallel_for(detail::ceil_div(T, kRowsPerBlock), [&](int64_t b) {
    std::vector<float> acc(static_cast<size_t>(d)), row(static_cast<size_t>(d));
    const int64_t end = std::min(T, (b + 1) * kRowsPerBlock);
    for (int64_t t = b * kRowsPerBlock; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = layout.assignment_row[static_cast<size_t>(t * k + j)];
        if (r < 0) continue;
        io.load(rows, r, row.data());
        const float weight = gate ? gate[t * k + j] : 1.0f;
        for (int64_t c = 0; c < d; ++c) acc[c] += weight * row[c];
      }
      io.store(out, t, acc.data());
    }
  });
}

}  // namespace

void combine(const void* expert_out, DType dtype, int64_t d, const DispatchLayout& layout,
             const float* gate, void* y) {
  check_d_model("combine", d);
  check_floating(dtype, "combine");
  gather_weighted_sum(expert_out, dtype, d, layout, gate, y);
}

void combine_backward(const void* dy, const void* expert_out, DType dtype, int64_t d,
                      const DispatchLayout& layout, const float* gate, void* d_expert_out,
                      float* d_gate) {
  check_d_model("combine_backward", d);
  check_floating(dtype, "combine_backward");
  const RowIo io{dtype, d};
  const int64_t T = layout.num_tokens, k = layout.k;
  // d_expert_out by rows (each row has one source token), d_gate by tokens.
  detail::parallel_for(detail::ceil_div(layout.total_rows, kRowsPerBlock), [&](int64_t b) {
    std::vector<float> grad(static_cast<size_t>(d));
    const int64_t end = std::min(layout.total_rows, (b + 1) * kRowsPerBlock);
    for (int64_t r = b * kRowsPerBlock; r < end; ++r) {
      const int32_t t = layout.row_token[static_cast<size_t>(r)];
      if (t < 0) {
        std::fill(grad.begin(), grad.end(), 0.0f);
      } else {
        int64_t j = 0;
        while (layout.assignment_row[static_cast<size_t>(t * k + j)] != r) ++j;
        io.load(dy, t, grad.data());
        const float g = gate[t * k + j];
        for (float& v : grad) v *= g;
      }
      io.store(d_expert_out, r, grad.data());
    }
  });
  detail::parallel_for(detail::ceil_div(T, kRowsPerBlock), [&](int64_t b) {
    std::vector<float> upstream(static_cast<size_t>(d)), out(static_cast<size_t>(d));
    const int64_t end = std::min(T, (b + 1) * kRowsPerBlock);
    for (int64_t t = b * kRowsPerBlock; t < end; ++t) {
      io.load(dy, t, upstream.data());
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = layout.assignment_row[static_cast<size_t>(t * k + j)];
        float dot = 0.0f;
        if (r >= 0) {
          io.load(expert_out, r, out.data());
          for (int64_t c = 0; c < d; ++c) dot += upstream[c] * out[c];
        }
        d_gate[t * k + j] = dot;
      }
    }
  });
}

void dispatch_backward(const void* d_buffer, DType dtype, int64_t d, const DispatchLayout& layout,
                       void* dx) {
  check_d_model("dispatch_backward", d);
  check_floating(dtype, "dispatch_backward");
  gather_weighted_sum(d_buffer, dtype, d, layout, nullptr, dx);
}

}  // namespace pyswitch::moe
