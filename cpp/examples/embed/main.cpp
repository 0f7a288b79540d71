// pyswitch_embed: the C++ SDK used the way a host application would, with no Python anywhere.
// 1. builds a SwitchFFN, routes a batch, runs forward and backward;
// 2. runs the same step expert-parallel on 2 thread ranks and checks it equals step 1 bit for bit;
// 3. trains a small SwitchLM for a few steps with the Trainer (one call per step);
// 4. with --run, loads the newest checkpoint of a `pyswitch train` run, computes the validation
//    loss over a byte file (--val) and generates bytes greedily.
// Output is "key value" lines; tests/test_embed_example.py recomputes every value with the Python
// API and requires equality.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "pyswitch/build_info.hpp"
#include "pyswitch/comm/local.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/log.hpp"
#include "pyswitch/model/checkpoint.hpp"
#include "pyswitch/model/inference.hpp"
#include "pyswitch/model/trainer.hpp"
#include "pyswitch/moe/switch_layer.hpp"

namespace {

constexpr int64_t kDModel = 16, kDff = 32, kExperts = 4, kTokens = 64, kRanks = 2;

// Inputs any language can rebuild exactly: small integers over a power of two.
float input_value(int64_t i) {
  return float((i * 37) % 101 - 50) / 64.0f;
}
float grad_value(int64_t i) {
  return float((i * 13) % 17 - 8) / 16.0f;
}

pyswitch::moe::SwitchFFNOptions layer_options() {
  pyswitch::moe::SwitchFFNOptions o;
  o.router.route.k = 1;
  o.router.route.capacity_factor = 1.0;  // tight, so that some tokens are dropped
  o.router.route.min_capacity = 1;
  o.router.route.group_size = kTokens / kRanks;  // one group per rank: the EP invariant's setting
  o.router.jitter_eps = 0.1;
  o.router.seed = 7;
  return o;
}

// Sums in a fixed order (index order, in double), so Python can reproduce them exactly.
double sum(const float* v, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(v[i]);
  return s;
}

void print(const char* key, double value) {
  std::printf("%s %.17g\n", key, value);
}
void print(const char* key, int64_t value) {
  std::printf("%s %lld\n", key, (long long)value);
}

struct Step {
  std::vector<float> y, dx, router_grad, w_in_grad, w_out_grad;
  double aux = 0, z = 0;
};

// One training step of `layer` on tokens [first, first + count) of the batch.
Step run_step(pyswitch::moe::SwitchFFN& layer, int64_t first, int64_t count) {
  std::vector<float> x(size_t(count * kDModel)), dy(x.size());
  for (int64_t i = 0; i < count * kDModel; ++i) {
    x[size_t(i)] = input_value(first * kDModel + i);
    dy[size_t(i)] = grad_value(first * kDModel + i);
  }
  Step s;
  s.y.resize(x.size());
  s.dx.resize(x.size());
  layer.forward(x.data(), pyswitch::DType::float32, count, /*training=*/true, s.y.data());
  layer.backward(dy.data(), s.dx.data());
  s.aux = layer.aux_loss();
  s.z = layer.z_loss();
  const int64_t local = layer.local_experts();
  s.router_grad.assign(layer.router_weight_grad(), layer.router_weight_grad() + kDModel * kExperts);
  s.w_in_grad.assign(layer.weights().w_in_grad(),
                     layer.weights().w_in_grad() + local * kDModel * kDff);
  s.w_out_grad.assign(layer.weights().w_out_grad(),
                      layer.weights().w_out_grad() + local * kDff * kDModel);
  return s;
}

double max_abs_diff(const float* a, const float* b, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs(double(a[i]) - double(b[i])));
  return m;
}

Step layer_demo() {
  pyswitch::moe::SwitchFFN layer(kDModel, kDff, kExperts, layer_options());
  Step s = run_step(layer, 0, kTokens);
  const auto stats = layer.stats();
  std::string counts;
  for (int64_t c : stats.tokens_per_expert)
    counts += (counts.empty() ? "" : ",") + std::to_string(c);
  std::printf("route.tokens_per_expert %s\n", counts.c_str());
  print("route.dropped", layer.plan().dropped);
  print("ffn.y_sum", sum(s.y.data(), int64_t(s.y.size())));
  print("ffn.dx_sum", sum(s.dx.data(), int64_t(s.dx.size())));
  print("ffn.aux_loss", s.aux);
  print("ffn.z_loss", s.z);
  print("ffn.router_grad_sum", sum(s.router_grad.data(), int64_t(s.router_grad.size())));
  print("ffn.w_in_grad_sum", sum(s.w_in_grad.data(), int64_t(s.w_in_grad.size())));
  print("ffn.w_out_grad_sum", sum(s.w_out_grad.data(), int64_t(s.w_out_grad.size())));
  return s;
}

// The same step with the experts split over 2 thread ranks, each holding half of the tokens.
void expert_parallel_demo(const Step& one_rank) {
  pyswitch::comm::LocalGroup group(kRanks, /*timeout_seconds=*/30.0);
  std::vector<Step> steps(kRanks);
  std::vector<std::exception_ptr> errors(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      try {
        pyswitch::moe::SwitchFFN layer(kDModel, kDff, kExperts, layer_options(), &group.comm(r));
        const int64_t per_rank = kTokens / kRanks;
        steps[size_t(r)] = run_step(layer, r * per_rank, per_rank);
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
        group.poison("rank " + std::to_string(r) + " failed");  // peers stop waiting at once
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);

  double y_diff = 0, dx_diff = 0, expert_diff = 0, router_diff = 0, loss_diff = 0;
  const int64_t rows = kTokens / kRanks * kDModel;
  const int64_t experts_per_rank = kExperts / kRanks;
  std::vector<float> router_total(size_t(kDModel * kExperts), 0.0f);
  for (int r = 0; r < kRanks; ++r) {
    const Step& s = steps[size_t(r)];
    y_diff = std::fmax(y_diff, max_abs_diff(s.y.data(), one_rank.y.data() + r * rows, rows));
    dx_diff = std::fmax(dx_diff, max_abs_diff(s.dx.data(), one_rank.dx.data() + r * rows, rows));
    const int64_t w_in = experts_per_rank * kDModel * kDff;
    expert_diff = std::fmax(
        expert_diff, max_abs_diff(s.w_in_grad.data(), one_rank.w_in_grad.data() + r * w_in, w_in));
    expert_diff = std::fmax(expert_diff, max_abs_diff(s.w_out_grad.data(),
                                                      one_rank.w_out_grad.data() + r * w_in, w_in));
    loss_diff = std::fmax(loss_diff, std::fabs(s.aux - one_rank.aux) + std::fabs(s.z - one_rank.z));
    for (size_t i = 0; i < router_total.size(); ++i) router_total[i] += s.router_grad[i];
  }
  // The router gradient is each rank's share: their sum is the one-rank gradient up to the
  // order of float additions.
  router_diff =
      max_abs_diff(router_total.data(), one_rank.router_grad.data(), int64_t(router_total.size()));
  print("ep.ranks", int64_t(kRanks));
  print("ep.y_max_abs_diff", y_diff);
  print("ep.dx_max_abs_diff", dx_diff);
  print("ep.expert_grad_max_abs_diff", expert_diff);
  print("ep.loss_abs_diff", loss_diff);
  print("ep.router_grad_sum_max_abs_diff", router_diff);
  if (y_diff != 0 || dx_diff != 0 || expert_diff != 0 || loss_diff != 0 || router_diff > 1e-6)
    throw pyswitch::Error("expert-parallel step differs from the one-rank step");
}

// A few training steps of a small language model: the loop `pyswitch train` runs, minus data
// files and checkpoints. Batch `step` is (kTrainRows, kTrainSeq + 1) bytes any language can
// rebuild: ((step * 1009 + row * 97 + t * 31) mod 251).
constexpr int64_t kTrainSteps = 4, kTrainRows = 4, kTrainSeq = 16;

pyswitch::model::SwitchLMConfig train_config() {
  pyswitch::model::SwitchLMConfig c;
  c.d_model = 32;
  c.num_layers = 2;
  c.num_heads = 2;
  c.d_ff = 64;
  c.num_experts = 4;
  c.seed = 5;
  return c;
}

pyswitch::model::TrainerOptions train_options() {
  pyswitch::model::TrainerOptions o;
  o.warmup_steps = 2;
  o.clip = 0.5;  // small enough that clipping happens
  return o;
}

void train_demo() {
  pyswitch::model::SwitchLM model(train_config());
  pyswitch::model::Trainer trainer(model, train_options());
  std::vector<int32_t> tokens(size_t(kTrainRows * (kTrainSeq + 1)));
  for (int64_t step = 0; step < kTrainSteps; ++step) {
    for (int64_t row = 0; row < kTrainRows; ++row) {
      for (int64_t t = 0; t <= kTrainSeq; ++t) {
        tokens[size_t(row * (kTrainSeq + 1) + t)] =
            int32_t((step * 1009 + row * 97 + t * 31) % 251);
      }
    }
    const pyswitch::model::StepStats stats = trainer.step(
        tokens.data(), kTrainRows, kTrainSeq, step, kTrainSteps, kTrainRows * kTrainSeq);
    const std::string key = "train.step" + std::to_string(step);
    print((key + ".ce").c_str(), stats.ce);
    print((key + ".grad_norm").c_str(), stats.grad_norm);
    print((key + ".lr").c_str(), stats.lr);
  }
  double params = 0;
  for (const pyswitch::model::ParamRef& p : model.parameters()) {
    int64_t n = 1;
    for (int64_t s : p.shape) n *= s;
    params += sum(p.data, n);
  }
  double state = 0;
  for (const pyswitch::model::StateRef& s : trainer.state()) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    state += sum(s.data, n);
  }
  print("train.param_sum", params);
  print("train.optimizer_state_sum", state);
  print("train.optimizer_steps", trainer.optimizer_steps());
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw pyswitch::InvalidArgument("--val: cannot open '" + path + "'");
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

void checkpoint_demo(const std::string& run_dir, const std::string& val_path, int64_t batches,
                     const std::string& prompt, int64_t new_tokens) {
  const pyswitch::model::RunConfig config = pyswitch::model::read_run_config(run_dir);
  pyswitch::model::SwitchLM model(config.model);
  const std::string ckpt = pyswitch::model::latest_checkpoint(run_dir);
  const pyswitch::model::CheckpointInfo info = pyswitch::model::load_checkpoint(model, ckpt);
  print("checkpoint.step", info.step);
  print("checkpoint.tensors", info.tensors_loaded);
  print("checkpoint.hashes_verified", int64_t(info.hashes_verified));
  if (!val_path.empty()) {
    const std::vector<uint8_t> val = read_bytes(val_path);
    const auto result = pyswitch::model::evaluate_bytes(model, val.data(), int64_t(val.size()),
                                                        config.batch_size, config.seq_len, batches);
    print("eval.val_loss", result.loss);
    print("eval.bits_per_byte", result.bits_per_byte);
    print("eval.tokens", result.tokens);
  }
  const std::vector<uint8_t> out = pyswitch::model::generate_greedy(
      model, std::vector<uint8_t>(prompt.begin(), prompt.end()), new_tokens);
  std::string hex;
  for (uint8_t b : out) {
    char buf[3];
    std::snprintf(buf, sizeof buf, "%02x", b);
    hex += buf;
  }
  std::printf("generate.hex %s\n", hex.c_str());
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--run RUN_DIR [--val FILE] [--batches N] [--prompt TEXT] "
               "[--new-tokens N]] [--verbose]\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string run_dir, val_path, prompt = "def ";
  int64_t batches = 2, new_tokens = 32;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--run" && has_value)
      run_dir = argv[++i];
    else if (arg == "--val" && has_value)
      val_path = argv[++i];
    else if (arg == "--prompt" && has_value)
      prompt = argv[++i];
    else if (arg == "--batches" && has_value)
      batches = std::atoll(argv[++i]);
    else if (arg == "--new-tokens" && has_value)
      new_tokens = std::atoll(argv[++i]);
    else if (arg == "--verbose")
      pyswitch::set_log_level(pyswitch::LogLevel::debug);
    else
      return usage(argv[0]);
  }
  // The host decides where library messages go: here, stderr with a prefix of our own.
  pyswitch::set_log_callback([](pyswitch::LogLevel level, const std::string& message) {
    std::fprintf(stderr, "[embed %s] %s\n", pyswitch::log_level_name(level), message.c_str());
  });
  try {
    std::printf("pyswitch %s (%s)\n", pyswitch::build_info().version.c_str(),
                pyswitch::build_info().blas.c_str());
    const Step one_rank = layer_demo();
    expert_parallel_demo(one_rank);
    train_demo();
    if (!run_dir.empty()) checkpoint_demo(run_dir, val_path, batches, prompt, new_tokens);
  } catch (const pyswitch::CheckpointError& e) {
    std::fprintf(stderr, "checkpoint error: %s\n", e.what());
    return 1;
  } catch (const std::invalid_argument& e) {  // InvalidArgument, TypeMismatch
    std::fprintf(stderr, "invalid argument: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
