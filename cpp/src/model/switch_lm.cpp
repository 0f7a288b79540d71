// The Switch Transformer language model: blocks of RMSNorm, causal attention and a Switch or
// dense FFN, forward and backward, orchestrating the ops of nn/ops.hpp and the MoE layers.
#include "pyswitch/model/switch_lm.hpp"

#include <algorithm>
#include <cmath>

#include "pyswitch/error.hpp"
#include "pyswitch/random.hpp"

namespace pyswitch::model {
namespace {

// The model's float32 buffers as views for the backend table.
TensorView f32(const std::vector<float>& v, std::initializer_list<int64_t> dims) {
  return TensorView::contiguous(v.data(), DType::float32, dims);
}
TensorView i32(const int32_t* data, int64_t n) {
  return TensorView::contiguous(data, DType::int32, {n});
}

// Parameter streams of the model's own tensors (the FFN layers draw from their own seeds).
constexpr uint64_t kStreamModel = kStreamInit + 1000;

void validate(const SwitchLMConfig& c, const comm::Communicator* comm) {
  PYSWITCH_CHECK_ARG(
      c.vocab_size >= 2 && c.d_model >= 2 && c.num_layers >= 1 && c.num_heads >= 1 && c.d_ff >= 1,
      "SwitchLM: vocab_size, d_model, num_layers, num_heads and d_ff must be "
      "positive, got ",
      c.vocab_size, ", ", c.d_model, ", ", c.num_layers, ", ", c.num_heads, ", ", c.d_ff);
  PYSWITCH_CHECK_ARG(c.d_model % c.num_heads == 0 && (c.d_model / c.num_heads) % 2 == 0,
                     "SwitchLM: d_model must split into num_heads heads of even size (rotary "
                     "positions rotate pairs), got d_model=",
                     c.d_model, " and num_heads=", c.num_heads);
  PYSWITCH_CHECK_ARG(c.num_experts >= 0, "SwitchLM: num_experts must be >= 0 (0 = dense), got ",
                     c.num_experts);
  PYSWITCH_CHECK_ARG(c.expert_every >= 1, "SwitchLM: expert_every must be >= 1, got ",
                     c.expert_every);
  PYSWITCH_CHECK_ARG(std::isfinite(c.rope_base) && c.rope_base > 1.0,
                     "SwitchLM: rope_base must be finite and > 1, got ", c.rope_base);
  PYSWITCH_CHECK_ARG(std::isfinite(c.norm_eps) && c.norm_eps > 0,
                     "SwitchLM: norm_eps must be finite and > 0, got ", c.norm_eps);
  PYSWITCH_CHECK_ARG(std::isfinite(c.aux_loss_coef) && c.aux_loss_coef >= 0 &&
                         std::isfinite(c.z_loss_coef) && c.z_loss_coef >= 0,
                     "SwitchLM: aux_loss_coef and z_loss_coef must be finite and >= 0, got ",
                     c.aux_loss_coef, " and ", c.z_loss_coef);
  PYSWITCH_CHECK_ARG(c.num_experts == 0 || c.num_layers >= c.expert_every,
                     "SwitchLM: with expert_every=", c.expert_every,
                     " and num_layers=", c.num_layers, " no layer would be a Switch layer");
  check_floating(c.dtype, "SwitchLM", "config.dtype");
  if (comm && c.num_experts > 0) {
    PYSWITCH_CHECK_ARG(c.num_experts % comm->size() == 0, "SwitchLM: num_experts=", c.num_experts,
                       " must be divisible by the number of ranks ", comm->size());
  }
}

}  // namespace

struct SwitchLM::Block {
  Block(int64_t d, DType dtype) : qkv_proj(d, 3 * d, dtype), out_proj(d, d, dtype) {}
  std::vector<float> attn_norm, attn_norm_grad, w_qkv, w_qkv_grad, w_o, w_o_grad;
  std::vector<float> ffn_norm, ffn_norm_grad;
  nn::Linear qkv_proj, out_proj;
  std::unique_ptr<moe::SwitchFFN> switch_ffn;
  std::unique_ptr<moe::DenseFFN> dense_ffn;
  // Forward state.
  std::vector<float> h_in, a, a_inv, qkv, probs, attn, h_mid, f, f_inv, ffn_out;
};

namespace {

// The model keeps its own weights and activations in host vectors, so it runs on the CPU only
// for now; its FFN layers run on cuda alone (SwitchFFN / DenseFFN).
const BackendOps& model_backend(Device device) {
  const BackendOps& table = layer_backend("SwitchLM", device);
  if (table.device != Device::cpu) {
    throw DeviceError(
        "SwitchLM: device 'cuda' is not supported by the model in this version (SwitchFFN and "
        "DenseFFN run on cuda alone); use device='cpu'");
  }
  return table;
}

}  // namespace

SwitchLM::SwitchLM(const SwitchLMConfig& c, comm::Communicator* comm)
    : config_((validate(c, comm), c)), comm_(comm), ops_(&model_backend(c.device)) {
  const int64_t d = c.d_model, V = c.vocab_size;
  auto init = [&](std::vector<float>& w, int64_t n, int64_t fan_in, uint64_t stream) {
    w.resize(static_cast<size_t>(n));
    truncated_normal(w.data(), n, std::sqrt(c.init_scale / static_cast<double>(fan_in)), c.seed,
                     kStreamModel + stream);
  };
  init(embed_, V * d, d, 0);
  embed_grad_.assign(embed_.size(), 0.0f);
  final_norm_.assign(static_cast<size_t>(d), 1.0f);
  final_norm_grad_.assign(static_cast<size_t>(d), 0.0f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    auto block = std::make_unique<Block>(d, c.dtype);
    block->attn_norm.assign(static_cast<size_t>(d), 1.0f);
    block->ffn_norm.assign(static_cast<size_t>(d), 1.0f);
    init(block->w_qkv, d * 3 * d, d, 1 + 2 * static_cast<uint64_t>(l));
    init(block->w_o, d * d, d, 2 + 2 * static_cast<uint64_t>(l));
    block->attn_norm_grad.assign(static_cast<size_t>(d), 0.0f);
    block->ffn_norm_grad.assign(static_cast<size_t>(d), 0.0f);
    block->w_qkv_grad.assign(block->w_qkv.size(), 0.0f);
    block->w_o_grad.assign(block->w_o.size(), 0.0f);
    // Each FFN layer has its own seed, derived from the model's (Philox keys, so any value
    // is as good as any other).
    const uint64_t layer_seed = c.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(l) + 1;
    if (is_switch_layer(l)) {
      moe::SwitchFFNOptions o;
      o.router.route.k = c.k;
      o.router.route.capacity_factor = c.capacity_factor;
      o.router.eval_capacity_factor = c.eval_capacity_factor;
      o.router.jitter_eps = c.jitter_eps;
      o.router.init_scale = c.init_scale;
      o.router.seed = layer_seed;
      o.dtype = c.dtype;
      o.aux_loss_coef = c.aux_loss_coef;
      o.z_loss_coef = c.z_loss_coef;
      block->switch_ffn = std::make_unique<moe::SwitchFFN>(d, c.d_ff, c.num_experts, o, comm);
    } else {
      moe::DenseFFNOptions o;
      o.dtype = c.dtype;
      o.init_scale = c.init_scale;
      o.seed = layer_seed;
      block->dense_ffn = std::make_unique<moe::DenseFFN>(d, c.d_ff, o);
    }
    blocks_.push_back(std::move(block));
  }
}

SwitchLM::~SwitchLM() = default;

bool SwitchLM::is_switch_layer(int64_t layer) const {
  return config_.num_experts > 0 && (layer + 1) % config_.expert_every == 0;
}

namespace {
moe::ExpertWeights* copy_owner(moe::ExpertWeights& w) {
  return w.has_compute_copy() ? &w : nullptr;
}
}  // namespace

void SwitchLM::mark_params_changed() {
  for (auto& bp : blocks_) {
    if (bp->switch_ffn) bp->switch_ffn->weights().mark_params_changed();
    if (bp->dense_ffn) bp->dense_ffn->weights().mark_params_changed();
  }
}

int64_t SwitchLM::copy_refreshes() const {
  int64_t total = 0;
  for (const auto& bp : blocks_) {
    if (bp->switch_ffn) total += bp->switch_ffn->weights().copy_refreshes();
    if (bp->dense_ffn) total += bp->dense_ffn->weights().copy_refreshes();
  }
  return total;
}

std::vector<ParamRef> SwitchLM::parameters() {
  const int64_t d = config_.d_model, V = config_.vocab_size, f = config_.d_ff;
  std::vector<ParamRef> out;
  out.push_back({"embed", embed_.data(), embed_grad_.data(), {V, d}, false, true});
  // An FFN's w_in and w_out, with their bf16 compute copies (null in float32).
  auto ffn_matrices = [&out](const std::string& prefix, moe::ExpertWeights& w,
                             std::vector<int64_t> in_shape, std::vector<int64_t> out_shape,
                             bool expert) {
    out.push_back({prefix + "ffn.w_in", w.w_in(), w.w_in_grad(), std::move(in_shape), expert, true,
                   copy_owner(w), w.w_in_bf16()});
    out.push_back({prefix + "ffn.w_out", w.w_out(), w.w_out_grad(), std::move(out_shape), expert,
                   true, copy_owner(w), w.w_out_bf16()});
  };
  for (size_t l = 0; l < blocks_.size(); ++l) {
    Block& b = *blocks_[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    out.push_back(
        {p + "attn_norm", b.attn_norm.data(), b.attn_norm_grad.data(), {d}, false, false});
    out.push_back({p + "w_qkv", b.w_qkv.data(), b.w_qkv_grad.data(), {d, 3 * d}, false, true});
    out.push_back({p + "w_o", b.w_o.data(), b.w_o_grad.data(), {d, d}, false, true});
    out.push_back({p + "ffn_norm", b.ffn_norm.data(), b.ffn_norm_grad.data(), {d}, false, false});
    if (b.switch_ffn) {
      moe::SwitchFFN& s = *b.switch_ffn;
      const int64_t E = s.local_experts();
      out.push_back({p + "ffn.router",
                     s.router_weight(),
                     s.router_weight_grad(),
                     {d, config_.num_experts},
                     false,
                     true});
      ffn_matrices(p, s.weights(), {E, d, f}, {E, f, d}, /*expert=*/true);
    } else {
      ffn_matrices(p, b.dense_ffn->weights(), {d, f}, {f, d}, /*expert=*/false);
    }
  }
  out.push_back({"final_norm", final_norm_.data(), final_norm_grad_.data(), {d}, false, false});
  return out;
}

int64_t SwitchLM::num_parameters() const {
  int64_t total = 0;
  for (const ParamRef& p : const_cast<SwitchLM*>(this)->parameters()) {
    int64_t n = 1;
    for (int64_t s : p.shape) n *= s;
    total += n;
  }
  return total;
}

void SwitchLM::set_training_steps(uint64_t steps) {
  training_steps_ = steps;
  for (auto& bp : blocks_) {
    if (bp->switch_ffn) bp->switch_ffn->set_training_steps(steps);
    if (bp->dense_ffn) bp->dense_ffn->set_training_steps(steps);
  }
}

void SwitchLM::forward(const int32_t* inputs, int64_t B, int64_t S, bool training) {
  const SwitchLMConfig& c = config_;
  if (training) {
    // Every layer draws from its own counter; keep them at the model's (see set_training_steps).
    set_training_steps(training_steps_);
    ++training_steps_;
  }
  const int64_t d = c.d_model, T = B * S, H = c.num_heads, V = c.vocab_size;
  B_ = B;
  S_ = S;
  inputs_.assign(inputs, inputs + T);
  h0_.resize(static_cast<size_t>(T * d));
  ops_->embedding_forward(f32(embed_, {V, d}), i32(inputs, T), f32(h0_, {T, d}));
  const std::vector<float>* h = &h0_;
  std::vector<float>& projected = work_projected_;
  projected.resize(static_cast<size_t>(T * d));
  for (auto& bp : blocks_) {
    Block& b = *bp;
    b.h_in = *h;
    b.a.resize(b.h_in.size());
    b.a_inv.resize(static_cast<size_t>(T));
    ops_->rmsnorm_forward(f32(b.h_in, {T, d}), f32(b.attn_norm, {d}),
                          static_cast<float>(c.norm_eps), f32(b.a, {T, d}), f32(b.a_inv, {T}));
    b.qkv.resize(static_cast<size_t>(T * 3 * d));
    b.qkv_proj.forward(b.w_qkv.data(), b.a.data(), T, b.qkv.data());
    ops_->rope_apply(f32(b.qkv, {T, 3 * d}), B, H, c.rope_base, /*inverse=*/false);
    b.probs.resize(static_cast<size_t>(B * H * S * S));
    b.attn.resize(static_cast<size_t>(T * d));
    ops_->attention_forward(f32(b.qkv, {T, 3 * d}), B, H, f32(b.attn, {T, d}),
                            f32(b.probs, {B, H, S, S}));
    b.out_proj.forward(b.w_o.data(), b.attn.data(), T, projected.data());
    b.h_mid.resize(b.h_in.size());
    ops_->add(f32(b.h_in, {T, d}), f32(projected, {T, d}), f32(b.h_mid, {T, d}));
    b.f.resize(b.h_in.size());
    b.f_inv.resize(static_cast<size_t>(T));
    ops_->rmsnorm_forward(f32(b.h_mid, {T, d}), f32(b.ffn_norm, {d}),
                          static_cast<float>(c.norm_eps), f32(b.f, {T, d}), f32(b.f_inv, {T}));
    b.ffn_out.resize(b.h_in.size());
    if (b.switch_ffn) {
      b.switch_ffn->forward(b.f.data(), DType::float32, T, training, b.ffn_out.data());
    } else {
      b.dense_ffn->forward(b.f.data(), DType::float32, T, training, b.ffn_out.data());
    }
    // The next block's input; the last one's is h_final_.
    h_final_.resize(b.h_in.size());
    ops_->add(f32(b.h_mid, {T, d}), f32(b.ffn_out, {T, d}), f32(h_final_, {T, d}));
    h = &h_final_;
  }
  z_.resize(static_cast<size_t>(T * d));
  z_inv_rms_.resize(static_cast<size_t>(T));
  ops_->rmsnorm_forward(f32(h_final_, {T, d}), f32(final_norm_, {d}),
                        static_cast<float>(c.norm_eps), f32(z_, {T, d}), f32(z_inv_rms_, {T}));
  logits_.resize(static_cast<size_t>(T * V));
  // The tied output head: logits = z @ embed^T, in float32 (the loss is float32).
  ops_->gemm(f32(z_, {T, d}), false, f32(embed_, {V, d}), true, f32(logits_, {T, V}), 1.0f, 0.0f);
}

LossParts SwitchLM::step(const int32_t* tokens, int64_t B, int64_t S, bool training, bool backward,
                         int64_t loss_tokens) {
  const SwitchLMConfig& c = config_;
  PYSWITCH_CHECK_ARG(B >= 1 && S >= 1, "SwitchLM.step: tokens must have shape (B, S + 1) with ",
                     "B, S >= 1, got B=", B, " S=", S);
  PYSWITCH_CHECK_ARG(loss_tokens >= 1, "SwitchLM.step: loss_tokens must be >= 1, got ",
                     loss_tokens);
  const int64_t d = c.d_model, T = B * S, H = c.num_heads, V = c.vocab_size;
  std::vector<int32_t> inputs(static_cast<size_t>(T)), targets(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b) {
    std::copy_n(tokens + b * (S + 1), S, inputs.data() + b * S);
    std::copy_n(tokens + b * (S + 1) + 1, S, targets.data() + b * S);
  }
  // Every token is checked before anything changes (the random state advances per forward).
  for (int64_t i = 0; i < B * (S + 1); ++i) {
    PYSWITCH_CHECK_ARG(tokens[i] >= 0 && tokens[i] < V, "SwitchLM.step: token ", tokens[i],
                       " (row ", i / (S + 1), ", position ", i % (S + 1),
                       ") is outside the vocabulary [0, ", V, ")");
  }
  forward(inputs.data(), B, S, training);
  const float scale = static_cast<float>(1.0 / static_cast<double>(loss_tokens));
  d_logits_.resize(backward ? logits_.size() : 0);
  const TensorView d_logits = backward ? f32(d_logits_, {T, V}) : TensorView{};
  const double ce_sum =
      ops_->cross_entropy(f32(logits_, {T, V}), i32(targets.data(), T), scale, d_logits);
  LossParts loss;
  loss.tokens = T;
  loss.ce = ce_sum / static_cast<double>(loss_tokens);
  for (auto& bp : blocks_) {
    if (bp->switch_ffn) {
      loss.aux += bp->switch_ffn->aux_loss();
      loss.z += bp->switch_ffn->z_loss();
    }
  }
  loss.total = loss.ce + loss.aux + loss.z;
  if (!backward) return loss;

  // Output head and final norm.
  // Workspaces live in the model: fresh multi-megabyte buffers every step cost page faults.
  std::vector<float>&dz = work_dz_, &dh = work_dh_, &d_branch = work_branch_, &d_norm = work_norm_,
  &d_qkv = work_qkv_;
  dz.resize(static_cast<size_t>(T * d));
  dh.resize(static_cast<size_t>(T * d));
  d_branch.resize(static_cast<size_t>(T * d));
  d_norm.resize(static_cast<size_t>(T * d));
  d_qkv.resize(static_cast<size_t>(T * 3 * d));
  ops_->gemm(d_logits, false, f32(embed_, {V, d}), false, f32(dz, {T, d}), 1.0f, 0.0f);
  ops_->gemm(d_logits, true, f32(z_, {T, d}), false, f32(embed_grad_, {V, d}), 1.0f, 0.0f);
  ops_->rmsnorm_backward(f32(dz, {T, d}), f32(h_final_, {T, d}), f32(final_norm_, {d}),
                         f32(z_inv_rms_, {T}), f32(dh, {T, d}), f32(final_norm_grad_, {d}));
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& b = **it;
    // h_out = h_mid + ffn(norm(h_mid))
    if (b.switch_ffn) {
      b.switch_ffn->backward(dh.data(), d_branch.data());
    } else {
      b.dense_ffn->backward(dh.data(), d_branch.data());
    }
    ops_->rmsnorm_backward(f32(d_branch, {T, d}), f32(b.h_mid, {T, d}), f32(b.ffn_norm, {d}),
                           f32(b.f_inv, {T}), f32(d_norm, {T, d}), f32(b.ffn_norm_grad, {d}));
    ops_->add(f32(dh, {T, d}), f32(d_norm, {T, d}), f32(dh, {T, d}));  // dh is now d(h_mid)
    // h_mid = h_in + attention(rope(norm(h_in) W_qkv)) W_o
    b.out_proj.backward(b.w_o.data(), b.attn.data(), dh.data(), T, d_branch.data(),
                        b.w_o_grad.data());
    ops_->attention_backward(f32(d_branch, {T, d}), f32(b.qkv, {T, 3 * d}),
                             f32(b.probs, {B, H, S, S}), B, H, f32(d_qkv, {T, 3 * d}));
    ops_->rope_apply(f32(d_qkv, {T, 3 * d}), B, H, c.rope_base, /*inverse=*/true);
    b.qkv_proj.backward(b.w_qkv.data(), b.a.data(), d_qkv.data(), T, d_branch.data(),
                        b.w_qkv_grad.data());
    ops_->rmsnorm_backward(f32(d_branch, {T, d}), f32(b.h_in, {T, d}), f32(b.attn_norm, {d}),
                           f32(b.a_inv, {T}), f32(d_norm, {T, d}), f32(b.attn_norm_grad, {d}));
    ops_->add(f32(dh, {T, d}), f32(d_norm, {T, d}), f32(dh, {T, d}));  // d(h_in)
  }
  ops_->embedding_backward(f32(dh, {T, d}), i32(inputs.data(), T), f32(embed_grad_, {V, d}));
  return loss;
}

void SwitchLM::logits(const int32_t* tokens, int64_t B, int64_t S, float* out) {
  PYSWITCH_CHECK_ARG(B >= 1 && S >= 1, "SwitchLM.logits: tokens must have shape (B, S) with B, ",
                     "S >= 1, got B=", B, " S=", S);
  forward(tokens, B, S, /*training=*/false);
  std::copy(logits_.begin(), logits_.end(), out);
}

std::vector<moe::SwitchStats> SwitchLM::switch_stats() const {
  std::vector<moe::SwitchStats> out;
  for (const auto& bp : blocks_) {
    if (bp->switch_ffn && bp->switch_ffn->has_forward()) out.push_back(bp->switch_ffn->stats());
  }
  return out;
}

}  // namespace pyswitch::model
