// Internal to the CUDA backend: the op implementations that make up its BackendOps table
// (backend_cuda.cu). Each has the signature and contract of its BackendOps slot
// (pyswitch/backend.hpp); views are checked with common.cuh's require().
#pragma once

#include "pyswitch/backend.hpp"

namespace pyswitch::cuda::ops {

// elementwise.cu
void convert(const TensorView& src, const TensorView& dst);
void add(const TensorView& a, const TensorView& b, const TensorView& out);
void multiply(const TensorView& x, const TensorView& factor);
double sum_of_squares(const TensorView& x);
void scale(const TensorView& x, float factor);

// routing.cu
void route(const TensorView& logits, const moe::RouteOptions& options, moe::RoutingPlan& plan);
void route_backward(const TensorView& logits, const moe::RoutingPlan& plan,
                    const TensorView& d_gate, double aux_coef, double z_coef,
                    const TensorView& d_logits);
void softmax_rows(const TensorView& logits, const TensorView& probs);

// dispatch.cu
void dispatch(const TensorView& x, const moe::DispatchLayout& layout, const TensorView& buffer);
void combine(const TensorView& expert_out, const moe::DispatchLayout& layout,
             const TensorView& gate, const TensorView& y);
void combine_backward(const TensorView& dy, const TensorView& expert_out,
                      const moe::DispatchLayout& layout, const TensorView& gate,
                      const TensorView& d_expert_out, const TensorView& d_gate);
void dispatch_backward(const TensorView& d_buffer, const moe::DispatchLayout& layout,
                       const TensorView& dx);

// experts.cu
void experts_forward(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                     const int64_t* offsets, const TensorView& x, const TensorView& y,
                     moe::ExpertCache* cache, const moe::DropoutSpec& dropout);
void experts_backward(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                      const int64_t* offsets, const TensorView& x, moe::ExpertCache& cache,
                      const TensorView& dy, const TensorView& dx, const moe::ExpertGrads& grads);

// gemm.cu
void gemm(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b, const TensorView& c,
          float alpha, float beta);

// nn.cu
void rmsnorm_forward(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                     const TensorView& inv_rms);
void rmsnorm_backward(const TensorView& dy, const TensorView& x, const TensorView& weight,
                      const TensorView& inv_rms, const TensorView& dx, const TensorView& d_weight);
void rope_apply(const TensorView& qkv, int64_t batch, int64_t heads, double base, bool inverse);
void attention_forward(const TensorView& qkv, int64_t batch, int64_t heads, const TensorView& out,
                       const TensorView& probs);
void attention_backward(const TensorView& d_out, const TensorView& qkv, const TensorView& probs,
                        int64_t batch, int64_t heads, const TensorView& d_qkv);
void embedding_forward(const TensorView& table, const TensorView& tokens, const TensorView& out);
void embedding_backward(const TensorView& d_out, const TensorView& tokens,
                        const TensorView& d_table);
double cross_entropy(const TensorView& logits, const TensorView& targets, float grad_scale,
                     const TensorView& d_logits);

// optim.cu
void adamw_update(const TensorView& param, const TensorView& grad, const TensorView& m,
                  const TensorView& v, int64_t step, double lr, const optim::AdamWOptions& options,
                  bool decay, const TensorView& compute_copy);
void adafactor_update(const TensorView& param, const TensorView& grad, const TensorView& row_state,
                      const TensorView& col_state, const TensorView& full_state,
                      const optim::AdafactorShape& shape, int64_t step, double lr,
                      const optim::AdafactorOptions& options, const TensorView& compute_copy);

}  // namespace pyswitch::cuda::ops
