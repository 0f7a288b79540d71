// Reading `pyswitch train` run directories: config.json, the newest complete checkpoint, and
// its safetensors tensors, with every size, offset and (with OpenSSL) hash checked.
#include "pyswitch/model/checkpoint.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>

#include "pyswitch/bf16.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/log.hpp"
#include "util/json.hpp"

#ifdef PYSWITCH_HAVE_OPENSSL
#include <openssl/evp.h>
#endif

namespace pyswitch::model {
namespace fs = std::filesystem;
namespace {

constexpr const char* kFormat = "pyswitch-checkpoint";
constexpr int64_t kMaxHeaderBytes = int64_t{100} << 20;  // safetensors' own limit

[[noreturn]] void damaged(const fs::path& file, const std::string& what) {
  throw CheckpointError(detail::concat(file.string(), ": ", what));
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) damaged(path, "cannot be opened");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) damaged(path, "read failed");
  return bytes;
}

json::Value read_json(const fs::path& path) {
  const std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const std::runtime_error& e) {
    damaged(path, e.what());
  }
}

#ifdef PYSWITCH_HAVE_OPENSSL
std::string sha256_hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr) != 1)
    throw Error("load_checkpoint: OpenSSL EVP_Digest(sha256) failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}
#endif

// The manifest's file table, checked against the files on disk (sizes, and hashes when we
// can). Returns the step and the verified contents of model.safetensors.
struct VerifiedCheckpoint {
  int64_t step = 0;
  std::string tensors;
  bool hashed = false;
};

VerifiedCheckpoint verify(const fs::path& dir) {
  const fs::path manifest_path = dir / "manifest.json";
  if (!fs::is_regular_file(manifest_path))
    damaged(dir, "not a complete checkpoint (no manifest.json)");
  const json::Value manifest = read_json(manifest_path);
  VerifiedCheckpoint out;
  try {
    if (manifest.at("format", "manifest").as_string("manifest.format") != kFormat)
      damaged(manifest_path, std::string("format is not \"") + kFormat + "\"");
    if (manifest.at("version", "manifest").as_int("manifest.version") != 1)
      damaged(manifest_path, "unsupported version (this library reads version 1)");
    out.step = manifest.at("step", "manifest").as_int("manifest.step");
    const auto& files = manifest.at("files", "manifest").as_object("manifest.files");
    if (files.find("model.safetensors") == files.end())
      damaged(manifest_path, "does not list model.safetensors");
#ifdef PYSWITCH_HAVE_OPENSSL
    out.hashed = true;
#endif
    for (const auto& [name, entry] : files) {
      if (name.find('/') != std::string::npos || name == "." || name == "..")
        damaged(manifest_path, "lists a file outside the checkpoint: " + name);
      const uint64_t size = entry.at("bytes", "files." + name).as_uint("files." + name + ".bytes");
      const std::string& hash =
          entry.at("sha256", "files." + name).as_string("files." + name + ".sha256");
      const fs::path file = dir / name;
      std::error_code ec;
      const auto actual = fs::file_size(file, ec);
      if (ec) damaged(file, "missing (listed in the manifest)");
      if (actual != size)
        damaged(file, detail::concat("has ", actual, " bytes, the manifest says ", size,
                                     " (truncated or replaced)"));
      if (name != "model.safetensors" && !out.hashed) continue;
      std::string bytes = read_file(file);
      if (bytes.size() != size) damaged(file, "changed while being read");
#ifdef PYSWITCH_HAVE_OPENSSL
      if (sha256_hex(bytes) != hash)
        damaged(file, "SHA-256 does not match the manifest (corrupted)");
#else
      (void)hash;
#endif
      if (name == "model.safetensors") out.tensors = std::move(bytes);
    }
  } catch (const CheckpointError&) {
    throw;
  } catch (const std::runtime_error& e) {  // a JSON value of the wrong kind
    damaged(manifest_path, e.what());
  }
#ifndef PYSWITCH_HAVE_OPENSSL
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    log_message(LogLevel::warning,
                "load_checkpoint: built without OpenSSL, so checkpoint SHA-256 hashes are not "
                "checked (sizes and the safetensors layout still are)");
#endif
  return out;
}

struct StoredTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// Parses and checks a safetensors file held in memory: the header length, the JSON header, and
// that the tensors' byte ranges exactly tile the payload (no gaps, overlaps or overruns).
std::map<std::string, StoredTensor> parse_safetensors(const std::string& bytes,
                                                      const fs::path& file, const char** payload) {
  if (bytes.size() < 8) damaged(file, "shorter than a safetensors header");
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | uint8_t(bytes[size_t(i)]);
  if (header_size > uint64_t(kMaxHeaderBytes) || header_size > bytes.size() - 8)
    damaged(file, detail::concat("safetensors header size ", header_size, " exceeds the file"));
  json::Value header;
  try {
    header = json::parse(bytes.data() + 8, size_t(header_size));
  } catch (const std::runtime_error& e) {
    damaged(file, std::string("safetensors header: ") + e.what());
  }
  const uint64_t payload_size = bytes.size() - 8 - header_size;
  *payload = bytes.data() + 8 + header_size;
  std::map<std::string, StoredTensor> tensors;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  try {
    for (const auto& [name, entry] : header.as_object("safetensors header")) {
      if (name == "__metadata__") {
        const json::Value* format = entry.find("format", "__metadata__");
        if (format == nullptr || format->as_string("__metadata__.format") != kFormat)
          damaged(file, "not a pyswitch checkpoint (__metadata__.format)");
        continue;
      }
      StoredTensor t;
      t.dtype = entry.at("dtype", name).as_string(name + ".dtype");
      uint64_t count = 1;
      for (const json::Value& dim : entry.at("shape", name).as_array(name + ".shape")) {
        const uint64_t n = dim.as_uint(name + ".shape");
        if (n != 0 && count > (uint64_t(1) << 62) / n) damaged(file, name + ": shape overflows");
        count *= n;
        t.shape.push_back(int64_t(n));
      }
      const auto& offsets = entry.at("data_offsets", name).as_array(name + ".data_offsets");
      if (offsets.size() != 2) damaged(file, name + ": data_offsets must hold 2 numbers");
      t.begin = offsets[0].as_uint(name + ".data_offsets");
      t.end = offsets[1].as_uint(name + ".data_offsets");
      const uint64_t item = t.dtype == "F32"                        ? 4
                            : t.dtype == "BF16" || t.dtype == "F16" ? 2
                            : t.dtype == "F64" || t.dtype == "I64"  ? 8
                            : t.dtype == "I32"                      ? 4
                                                                    : 0;
      if (item == 0) damaged(file, name + ": unsupported dtype " + t.dtype);
      // count <= payload_size / item first, so that count * item cannot overflow.
      if (t.end < t.begin || t.end > payload_size || count > payload_size / item ||
          t.end - t.begin != count * item)
        damaged(file, detail::concat(name, ": data_offsets [", t.begin, ", ", t.end,
                                     ") do not match its shape and dtype within a payload of ",
                                     payload_size, " bytes"));
      ranges.emplace_back(t.begin, t.end);
      tensors.emplace(name, std::move(t));
    }
  } catch (const CheckpointError&) {
    throw;
  } catch (const std::runtime_error& e) {
    damaged(file, std::string("safetensors header: ") + e.what());
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t next = 0;
  for (const auto& [begin, end] : ranges) {
    if (begin != next) damaged(file, "tensor data overlaps or leaves a gap");
    next = end;
  }
  if (next != payload_size) damaged(file, "bytes after the last tensor");
  return tensors;
}

bool complete_step_dir(const fs::path& dir) {
  // The rule of pyswitch.checkpoint._is_complete: a readable manifest whose files are present
  // at their recorded sizes. Contents are verified by load_checkpoint.
  try {
    const json::Value manifest = read_json(dir / "manifest.json");
    for (const auto& [name, entry] : manifest.at("files", "manifest").as_object("files")) {
      std::error_code ec;
      const auto size = fs::file_size(dir / name, ec);
      if (ec || size != entry.at("bytes", name).as_uint(name)) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

// The step of a directory named "step_N" or ".replaced-step_N-PID" (both as Python names them),
// or -1 for any other name.
int64_t step_of(const std::string& name, bool* is_replaced) {
  auto digits = [](const std::string& s, size_t begin, size_t end) {
    if (begin >= end || end - begin > 18) return false;
    for (size_t i = begin; i < end; ++i)
      if (s[i] < '0' || s[i] > '9') return false;
    return true;
  };
  const std::string step = "step_", replaced = ".replaced-step_";
  if (name.rfind(step, 0) == 0 && digits(name, step.size(), name.size())) {
    *is_replaced = false;
    return std::stoll(name.substr(step.size()));
  }
  if (name.rfind(replaced, 0) == 0) {
    const size_t dash = name.find('-', replaced.size());
    if (dash != std::string::npos && digits(name, replaced.size(), dash) &&
        digits(name, dash + 1, name.size())) {
      *is_replaced = true;
      return std::stoll(name.substr(replaced.size(), dash - replaced.size()));
    }
  }
  return -1;
}

}  // namespace

RunConfig read_run_config(const std::string& run_dir) {
  const fs::path path = fs::path(run_dir) / "config.json";
  if (!fs::is_regular_file(path))
    throw CheckpointError(
        detail::concat("read_run_config: '", run_dir, "' is not a run directory (no config.json)"));
  const json::Value root = read_json(path);
  RunConfig out;
  try {
    const json::Value& m = root.at("model", "config.json");
    SwitchLMConfig& c = out.model;
    std::set<std::string> read;  // the keys the getters below consumed; any other is unknown
    auto find = [&](const char* key) {
      read.insert(key);
      return m.find(key, "model");
    };
    auto get_int = [&](const char* key, int64_t& field) {
      if (const json::Value* v = find(key)) field = v->as_int(std::string("model.") + key);
    };
    auto get_double = [&](const char* key, double& field) {
      if (const json::Value* v = find(key)) field = v->as_double(std::string("model.") + key);
    };
    auto get_factor = [&](const char* key, std::optional<double>& field) {
      if (const json::Value* v = find(key))
        field = v->is_null() ? std::nullopt
                             : std::optional<double>(v->as_double(std::string("model.") + key));
    };
    get_int("vocab_size", c.vocab_size);
    get_int("d_model", c.d_model);
    get_int("num_layers", c.num_layers);
    get_int("num_heads", c.num_heads);
    get_int("d_ff", c.d_ff);
    get_int("num_experts", c.num_experts);
    get_int("k", c.k);
    get_factor("capacity_factor", c.capacity_factor);
    get_factor("eval_capacity_factor", c.eval_capacity_factor);
    get_int("expert_every", c.expert_every);
    if (const json::Value* v = find("dtype")) {
      const std::string& name = v->as_string("model.dtype");
      if (name == "float32") {
        c.dtype = DType::float32;
      } else if (name == "bfloat16") {
        c.dtype = DType::bfloat16;
      } else {
        throw InvalidArgument(
            "read_run_config: model.dtype must be 'float32' or 'bfloat16', got '" + name + "'");
      }
    }
    get_double("aux_loss_coef", c.aux_loss_coef);
    get_double("z_loss_coef", c.z_loss_coef);
    get_double("jitter_eps", c.jitter_eps);
    get_double("init_scale", c.init_scale);
    get_double("rope_base", c.rope_base);
    get_double("norm_eps", c.norm_eps);
    if (const json::Value* v = find("seed")) c.seed = v->as_uint("model.seed");
    for (const auto& [key, value] : m.as_object("model")) {
      (void)value;
      if (read.count(key) == 0)
        damaged(path, "model has an unknown key \"" + key + "\" (written by a newer version?)");
    }
    if (const json::Value* train = root.find("train", "config.json")) {
      if (const json::Value* v = train->find("batch_size", "train"))
        out.batch_size = v->as_int("train.batch_size");
      if (const json::Value* v = train->find("seq_len", "train"))
        out.seq_len = v->as_int("train.seq_len");
      if (const json::Value* v = train->find("data", "train"))
        out.data = v->is_null() ? "" : v->as_string("train.data");
    }
  } catch (const CheckpointError&) {
    throw;
  } catch (const InvalidArgument&) {
    throw;
  } catch (const std::runtime_error& e) {
    damaged(path, e.what());
  }
  PYSWITCH_CHECK_ARG(out.batch_size >= 1 && out.seq_len >= 1, "read_run_config: ", path.string(),
                     ": train.batch_size and train.seq_len must be >= 1, got ", out.batch_size,
                     " and ", out.seq_len);
  return out;
}

std::string latest_checkpoint(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "ckpt";
  std::map<int64_t, fs::path> steps, replaced;
  std::error_code ec;
  std::vector<fs::path> entries;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec))
    entries.push_back(it->path());
  std::sort(entries.begin(), entries.end());
  for (const fs::path& entry : entries) {
    bool is_replaced = false;
    const int64_t step = step_of(entry.filename().string(), &is_replaced);
    if (step < 0 || !fs::is_directory(entry) || !complete_step_dir(entry)) continue;
    (is_replaced ? replaced : steps).emplace(step, entry);
  }
  for (const auto& [step, path] : replaced) steps.emplace(step, path);
  if (steps.empty())
    throw CheckpointError(detail::concat("latest_checkpoint: '", run_dir,
                                         "' has no complete checkpoint under ckpt/"));
  return steps.rbegin()->second.string();
}

CheckpointInfo load_checkpoint(SwitchLM& model, const std::string& checkpoint_dir) {
  const fs::path dir(checkpoint_dir);
  const VerifiedCheckpoint verified = verify(dir);
  const fs::path file = dir / "model.safetensors";
  const char* payload = nullptr;
  const auto stored = parse_safetensors(verified.tensors, file, &payload);

  CheckpointInfo info;
  info.step = verified.step;
  info.hashes_verified = verified.hashed;
  std::vector<ParamRef> params = model.parameters();
  for (const auto& [name, tensor] : stored) {
    if (name.rfind("optim.", 0) == 0) continue;
    const bool known = std::any_of(params.begin(), params.end(),
                                   [&](const ParamRef& p) { return p.name == name; });
    if (!known) damaged(file, "holds tensor '" + name + "' that this model does not have");
  }
  for (const ParamRef& p : params) {
    const auto it = stored.find(p.name);
    if (it == stored.end()) damaged(file, "has no tensor '" + p.name + "' (a different model?)");
    const StoredTensor& t = it->second;
    if (t.shape != p.shape) {
      std::string want, got;
      for (int64_t n : p.shape) want += (want.empty() ? "" : ", ") + std::to_string(n);
      for (int64_t n : t.shape) got += (got.empty() ? "" : ", ") + std::to_string(n);
      damaged(file,
              "tensor '" + p.name + "' has shape (" + got + "), the model expects (" + want + ")");
    }
    int64_t count = 1;
    for (int64_t n : p.shape) count *= n;
    const char* src = payload + t.begin;
    // safetensors is little-endian; assembling the bytes reads it right on any host (and
    // compiles to plain loads on a little-endian one).
    const auto byte = [src](int64_t at) { return uint32_t(uint8_t(src[at])); };
    if (t.dtype == "F32") {
      for (int64_t i = 0; i < count; ++i) {
        const uint32_t bits =
            byte(4 * i) | byte(4 * i + 1) << 8 | byte(4 * i + 2) << 16 | byte(4 * i + 3) << 24;
        std::memcpy(p.data + i, &bits, sizeof bits);
      }
    } else if (t.dtype == "BF16") {
      for (int64_t i = 0; i < count; ++i) {
        p.data[i] = bf16_to_float(bf16{uint16_t(byte(2 * i) | byte(2 * i + 1) << 8)});
      }
    } else {
      damaged(file, "tensor '" + p.name + "' is " + t.dtype + "; parameters are F32 or BF16");
    }
    ++info.tensors_loaded;
  }
  log_message(LogLevel::info, detail::concat("loaded checkpoint ", dir.string(), " (step ",
                                             info.step, ", ", info.tensors_loaded, " tensors)"));
  return info;
}

}  // namespace pyswitch::model
