// The C++ checkpoint reader (model/checkpoint.hpp), the inference helpers (model/inference.hpp),
// the private JSON reader and the log sink (log.hpp). Checkpoints are written here in the format
// of pyswitch/checkpoint.py and read back bit for bit; damaged files (random byte flips and
// truncations, re-hashed so that the parser itself sees them) must give CheckpointError or load
// correctly, never anything else; evaluation is checked against step()'s own losses.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "harness.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/log.hpp"
#include "pyswitch/model/checkpoint.hpp"
#include "pyswitch/model/inference.hpp"
#include "util/json.hpp"

#ifdef PYSWITCH_HAVE_OPENSSL
#include <openssl/evp.h>
#endif

using namespace pyswitch;
using namespace pyswitch::model;
namespace fs = std::filesystem;

namespace {

SwitchLMConfig tiny_config(uint64_t seed) {
  SwitchLMConfig c;
  c.vocab_size = 256;
  c.d_model = 8;
  c.num_layers = 2;
  c.num_heads = 2;
  c.d_ff = 16;
  c.num_experts = 4;
  c.seed = seed;
  return c;
}

std::string sha256_hex(const std::string& bytes) {
#ifdef PYSWITCH_HAVE_OPENSSL
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &n, EVP_sha256(), nullptr);
  std::string out;
  char buf[3];
  for (unsigned int i = 0; i < n; ++i) {
    std::snprintf(buf, sizeof buf, "%02x", digest[i]);
    out += buf;
  }
  return out;
#else
  (void)bytes;
  return std::string(64, '0');  // not checked by a reader built without OpenSSL
#endif
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A safetensors file of every parameter (F32), plus an optimizer tensor that must be ignored.
std::string safetensors_of(SwitchLM& model) {
  std::vector<ParamRef> params = model.parameters();
  std::sort(params.begin(), params.end(),
            [](const ParamRef& a, const ParamRef& b) { return a.name < b.name; });
  std::ostringstream header;
  std::string payload;
  header << "{\"__metadata__\":{\"format\":\"pyswitch-checkpoint\",\"step\":\"3\"}";
  auto add = [&](const std::string& name, const std::vector<int64_t>& shape, const float* data) {
    int64_t count = 1;
    std::string dims;
    for (int64_t n : shape) {
      count *= n;
      dims += (dims.empty() ? "" : ",") + std::to_string(n);
    }
    const size_t begin = payload.size();
    payload.append(reinterpret_cast<const char*>(data), size_t(count) * 4);
    header << ",\"" << name << "\":{\"dtype\":\"F32\",\"shape\":[" << dims << "],\"data_offsets\":["
           << begin << "," << payload.size() << "]}";
  };
  for (const ParamRef& p : params) add(p.name, p.shape, p.data);
  const std::vector<float> moment(5, 0.25f);
  add("optim.m.embed", {5}, moment.data());
  header << "}";
  std::string h = header.str();
  while ((h.size() + 8) % 8 != 0) h += ' ';  // safetensors pads the header with spaces
  std::string out(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((n >> (8 * i)) & 0xff);
  return out + h + payload;
}

void write_manifest(const fs::path& dir, int64_t step) {
  std::ostringstream m;
  m << "{\"format\": \"pyswitch-checkpoint\", \"version\": 1, \"step\": " << step
    << ", \"files\": {";
  bool first = true;
  for (const char* name : {"model.safetensors", "state.json"}) {
    const std::string bytes = read_file(dir / name);
    m << (first ? "" : ", ") << "\"" << name << "\": {\"sha256\": \"" << sha256_hex(bytes)
      << "\", \"bytes\": " << bytes.size() << "}";
    first = false;
  }
  m << "}}";
  write_file(dir / "manifest.json", m.str());
}

fs::path write_checkpoint(const fs::path& run, SwitchLM& model, int64_t step) {
  const fs::path dir =
      run / "ckpt" /
      ("step_" + std::string(8 - std::to_string(step).size(), '0') + std::to_string(step));
  fs::create_directories(dir);
  write_file(dir / "model.safetensors", safetensors_of(model));
  write_file(dir / "state.json", "{\"step\": " + std::to_string(step) + "}");
  write_manifest(dir, step);
  return dir;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() /
                       ("pyswitch-test-" + name + "-" + std::to_string(std::random_device{}()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_config(const fs::path& run, const std::string& model_json) {
  write_file(run / "config.json", "{\"model\": " + model_json +
                                      ", \"train\": {\"batch_size\": 2, \"seq_len\": 8, "
                                      "\"data\": null}}");
}

template <typename Exception, typename F>
bool throws(F&& f, const char* fragment = "") {
  try {
    f();
  } catch (const Exception& e) {
    return std::strstr(e.what(), fragment) != nullptr;
  } catch (...) {
    return false;
  }
  return false;
}

}  // namespace

TEST(checkpoint_round_trip_is_bit_exact) {
  const fs::path run = fresh_dir("roundtrip");
  SwitchLM source(tiny_config(1));
  write_checkpoint(run, source, 3);
  SwitchLM target(tiny_config(2));  // different initial values
  const CheckpointInfo info = load_checkpoint(target, latest_checkpoint(run.string()));
  CHECK_EQ(info.step, 3);
  CHECK_EQ(info.tensors_loaded, int64_t(source.parameters().size()));
  std::vector<ParamRef> a = source.parameters(), b = target.parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : a[i].shape) n *= d;
    CHECK(std::memcmp(a[i].data, b[i].data, size_t(n) * 4) == 0);
  }
  fs::remove_all(run);
}

TEST(checkpoint_latest_picks_the_highest_complete_step) {
  const fs::path run = fresh_dir("latest");
  SwitchLM model(tiny_config(1));
  CHECK(throws<CheckpointError>([&] { latest_checkpoint(run.string()); }, "no complete"));
  write_checkpoint(run, model, 2);
  const fs::path five = write_checkpoint(run, model, 5);
  CHECK(fs::path(latest_checkpoint(run.string())).filename() == "step_00000005");
  // An incomplete newer one (a file shorter than the manifest says) is ignored.
  const fs::path seven = write_checkpoint(run, model, 7);
  write_file(seven / "state.json", "{}");
  CHECK(fs::path(latest_checkpoint(run.string())).filename() == "step_00000005");
  // A checkpoint set aside by an interrupted re-save counts when its step_N is missing.
  fs::rename(five, run / "ckpt" / ".replaced-step_00000005-123");
  CHECK(fs::path(latest_checkpoint(run.string())).filename() == ".replaced-step_00000005-123");
  fs::remove_all(run);
}

TEST(checkpoint_damage_gives_checkpoint_error_or_a_correct_load) {
  const fs::path run = fresh_dir("damage");
  SwitchLM source(tiny_config(1));
  const fs::path dir = write_checkpoint(run, source, 1);
  const std::string good = read_file(dir / "model.safetensors");
  const uint64_t header = uint64_t(uint8_t(good[0])) | uint64_t(uint8_t(good[1])) << 8;
  std::mt19937_64 gen(11);
  int errors = 0, loads = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string bad = good;
    const int kind = trial % 3;
    if (kind == 0) {  // flip a byte in the length prefix or the JSON header
      bad[size_t(gen() % (8 + header))] ^= char(1 + gen() % 255);
    } else if (kind == 1) {  // truncate anywhere
      bad.resize(size_t(gen() % good.size()));
    } else {  // overwrite a header byte with JSON punctuation
      bad[8 + size_t(gen() % header)] = "{}[],:\"0-e "[gen() % 11];
    }
    write_file(dir / "model.safetensors", bad);
    write_manifest(dir, 1);  // re-hashed, so the parser sees the damage
    SwitchLM target(tiny_config(2));
    try {
      load_checkpoint(target, dir.string());
      ++loads;  // harmless damage (e.g. inside padding): the values must be the source's
      std::vector<ParamRef> a = source.parameters(), b = target.parameters();
      for (size_t i = 0; i < a.size(); ++i) {
        int64_t n = 1;
        for (int64_t d : a[i].shape) n *= d;
        CHECK(std::memcmp(a[i].data, b[i].data, size_t(n) * 4) == 0);
      }
    } catch (const CheckpointError&) {
      ++errors;
    } catch (const std::exception& e) {
      std::printf("  trial %d: unexpected %s\n", trial, e.what());
      CHECK(false);
    }
  }
  CHECK(errors > 250);
  std::printf("  %d CheckpointError, %d harmless\n", errors, loads);
  fs::remove_all(run);
}

TEST(checkpoint_hash_mismatch_and_wrong_model) {
  const fs::path run = fresh_dir("hash");
  SwitchLM source(tiny_config(1));
  const fs::path dir = write_checkpoint(run, source, 1);
  std::string bytes = read_file(dir / "model.safetensors");
  bytes[bytes.size() - 3] ^= 0x40;  // inside a tensor: only the hash can tell
  write_file(dir / "model.safetensors", bytes);
  SwitchLM target(tiny_config(2));
#ifdef PYSWITCH_HAVE_OPENSSL
  CHECK(throws<CheckpointError>([&] { load_checkpoint(target, dir.string()); }, "SHA-256"));
#endif
  write_checkpoint(run, source, 1);  // intact again
  SwitchLMConfig other = tiny_config(1);
  other.d_ff = 32;
  SwitchLM wrong(other);
  CHECK(throws<CheckpointError>([&] { load_checkpoint(wrong, dir.string()); }, "shape"));
  other = tiny_config(1);
  other.num_layers = 4;
  SwitchLM deeper(other);
  CHECK(throws<CheckpointError>([&] { load_checkpoint(deeper, dir.string()); }, "has no tensor"));
  other = tiny_config(1);
  other.num_experts = 0;  // dense: the stored routers are foreign to it
  SwitchLM dense(other);
  CHECK(throws<CheckpointError>([&] { load_checkpoint(dense, dir.string()); }, "does not have"));
  CHECK(throws<CheckpointError>([&] { load_checkpoint(target, (run / "nope").string()); },
                                "manifest"));
  fs::remove_all(run);
}

TEST(checkpoint_huge_shape_cannot_wrap_the_byte_count) {
  // 2^61 float64 elements are 2^64 bytes: a byte count that wraps to 0 must not pass as an
  // empty tensor (an "optim." name would otherwise be skipped without a word).
  const fs::path run = fresh_dir("huge");
  SwitchLM source(tiny_config(1));
  const fs::path dir = write_checkpoint(run, source, 1);
  std::string bytes = read_file(dir / "model.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  std::string header = bytes.substr(8, size_t(n));
  const std::string payload = bytes.substr(8 + size_t(n));
  header.insert(1,
                "\"optim.huge\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],"
                "\"data_offsets\":[0,0]},");
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((uint64_t(header.size()) >> (8 * i)) & 0xff);
  write_file(dir / "model.safetensors", out + header + payload);
  write_manifest(dir, 1);
  SwitchLM target(tiny_config(2));
  CHECK(throws<CheckpointError>([&] { load_checkpoint(target, dir.string()); }, "optim.huge"));
  fs::remove_all(run);
}

TEST(checkpoint_run_config) {
  const fs::path run = fresh_dir("config");
  CHECK(throws<CheckpointError>([&] { read_run_config(run.string()); }, "no config.json"));
  write_config(run,
               "{\"d_model\": 8, \"num_layers\": 2, \"num_heads\": 2, \"d_ff\": 16, "
               "\"num_experts\": 4, \"capacity_factor\": null, \"dtype\": \"bfloat16\", "
               "\"seed\": 18446744073709551615}");
  const RunConfig c = read_run_config(run.string());
  CHECK_EQ(c.model.d_model, 8);
  CHECK(!c.model.capacity_factor.has_value());
  CHECK(c.model.eval_capacity_factor.has_value() && *c.model.eval_capacity_factor == 2.0);
  CHECK(c.model.dtype == DType::bfloat16);
  CHECK_EQ(c.model.seed, uint64_t(18446744073709551615ull));
  CHECK_EQ(c.batch_size, 2);
  CHECK_EQ(c.seq_len, 8);
  CHECK(c.data.empty());
  write_config(run, "{\"d_model\": 8, \"mystery\": 1}");
  CHECK(throws<CheckpointError>([&] { read_run_config(run.string()); }, "mystery"));
  write_config(run, "{\"d_model\": 8.5}");
  CHECK(throws<CheckpointError>([&] { read_run_config(run.string()); }, "model.d_model"));
  write_config(run, "{\"dtype\": \"float16\"}");
  CHECK(throws<InvalidArgument>([&] { read_run_config(run.string()); }, "dtype"));
  write_file(run / "config.json", "{\"model\": {}");
  CHECK(throws<CheckpointError>([&] { read_run_config(run.string()); }, "invalid JSON"));
  fs::remove_all(run);
}

TEST(checkpoint_evaluate_bytes_matches_step) {
  SwitchLMConfig config = tiny_config(3);
  config.eval_capacity_factor = std::nullopt;  // dropless: a window's loss is then independent
  SwitchLM model(config);                      // of the windows batched with it
  std::vector<uint8_t> data(100);
  for (size_t i = 0; i < data.size(); ++i) data[i] = uint8_t("def f(x):\n    return x\n"[i % 23]);
  // seq_len 8: (100 - 1) / 8 = 12 windows, batches of 5: 5 + 5 + 2 rows.
  const EvalResult r = evaluate_bytes(model, data.data(), int64_t(data.size()), 5, 8);
  CHECK_EQ(r.batches, 3);
  CHECK_EQ(r.tokens, 12 * 8);
  double total = 0;
  for (int64_t w = 0; w < 12; ++w) {  // one window at a time: same mean, other grouping
    std::vector<int32_t> tokens(data.begin() + w * 8, data.begin() + w * 8 + 9);
    total += model.step(tokens.data(), 1, 8, false, false, 8).ce * 8;
  }
  CHECK(std::fabs(r.loss - total / 96) < 1e-6);
  CHECK(std::fabs(r.bits_per_byte - r.loss / std::log(2.0)) < 1e-12);
  const EvalResult two = evaluate_bytes(model, data.data(), int64_t(data.size()), 5, 8, 2);
  CHECK_EQ(two.tokens, 10 * 8);
  CHECK(throws<InvalidArgument>([&] { evaluate_bytes(model, data.data(), 8, 5, 8); }, "seq_len"));
  CHECK(throws<InvalidArgument>([&] { evaluate_bytes(model, data.data(), 100, 0, 8); }, "batch"));
}

TEST(checkpoint_generate_greedy_is_the_argmax) {
  SwitchLM model(tiny_config(4));
  const std::vector<uint8_t> prompt = {'a', 'b'};
  const std::vector<uint8_t> out = generate_greedy(model, prompt, 4, 3);
  CHECK_EQ(out.size(), size_t(4));
  std::vector<uint8_t> text = prompt;
  for (uint8_t next : out) {
    const int64_t S = std::min<int64_t>(3, int64_t(text.size()));
    std::vector<int32_t> window(text.end() - S, text.end());
    std::vector<float> logits(size_t(S * 256));
    model.logits(window.data(), 1, S, logits.data());
    const float* last = logits.data() + (S - 1) * 256;
    int best = 0;
    for (int v = 1; v < 256; ++v)
      if (last[v] > last[best]) best = v;
    CHECK_EQ(int(next), best);
    text.push_back(next);
  }
  CHECK(generate_greedy(model, {}, 0).empty());
  CHECK(throws<InvalidArgument>([&] { generate_greedy(model, prompt, -1); }, "max_new_tokens"));
  CHECK(throws<InvalidArgument>([&] { generate_greedy(model, prompt, 1, 0); }, "context"));
}

TEST(checkpoint_json_reader) {
  const json::Value v = json::parse(
      " {\"a\": [1, -2.5e3, true, false, null], \"s\": \"q\\\"\\u00e9\\ud83d\\ude00\\n\", "
      "\"big\": 18446744073709551615, \"o\": {}} ");
  CHECK_EQ(v.at("a", "").as_array("").size(), size_t(5));
  CHECK_EQ(v.at("a", "").as_array("")[0].as_int(""), 1);
  CHECK(v.at("a", "").as_array("")[1].as_double("") == -2500.0);
  CHECK(v.at("a", "").as_array("")[2].as_bool(""));
  CHECK(v.at("a", "").as_array("")[4].is_null());
  CHECK(v.at("s", "").as_string("") == "q\"\xc3\xa9\xf0\x9f\x98\x80\n");
  CHECK_EQ(v.at("big", "").as_uint(""), uint64_t(18446744073709551615ull));
  CHECK(throws<std::runtime_error>([&] { v.at("big", "").as_int("big"); }, "big"));
  CHECK(throws<std::runtime_error>([&] { v.at("a", "").as_int("a"); }, "a"));
  for (const char* bad :
       {"", "{", "{\"a\":}", "[1,]", "{\"a\":1,}", "01", "1.", "-", "tru", "\"abc", "\"\\x\"",
        "\"\\ud800\"", "{\"a\":1,\"a\":2}", "[1] 2", "\"tab\there\"", "{1:2}", "nul"}) {
    if (!throws<std::runtime_error>([&] { json::parse(std::string(bad)); }, "invalid JSON")) {
      std::printf("  accepted: %s\n", bad);
      CHECK(false);
    }
  }
  std::string deep(100, '[');
  deep += std::string(100, ']');
  CHECK(throws<std::runtime_error>([&] { json::parse(deep); }, "deeper"));
}

TEST(log_callback_levels_and_reentry) {
  struct Restore {
    LogCallback previous;
    LogLevel level = log_level();
    ~Restore() {
      set_log_callback(previous);
      set_log_level(level);
    }
  } restore;
  std::vector<std::string> seen;
  restore.previous = set_log_callback([&](LogLevel level, const std::string& message) {
    seen.push_back(std::string(log_level_name(level)) + ":" + message);
    log_message(LogLevel::error, "nested");  // dropped, no deadlock
  });
  set_log_level(LogLevel::info);
  log_message(LogLevel::debug, "hidden");
  log_message(LogLevel::info, "shown");
  log_message(LogLevel::warning, "also");
  CHECK_EQ(seen.size(), size_t(2));
  CHECK(seen.size() == 2 && seen[0] == "info:shown" && seen[1] == "warning:also");
  set_log_callback([](LogLevel, const std::string&) { throw std::runtime_error("sink down"); });
  log_message(LogLevel::error, "swallowed");  // must not throw
  const LogCallback mine = set_log_callback(nullptr);
  CHECK(static_cast<bool>(mine));
  set_log_level(LogLevel::off);
  log_message(LogLevel::error, "off drops everything");
  CHECK(parse_log_level("info") == LogLevel::info && parse_log_level("off") == LogLevel::off);
  CHECK(throws<InvalidArgument>([] { parse_log_level("loud"); }, "got 'loud'"));
}
