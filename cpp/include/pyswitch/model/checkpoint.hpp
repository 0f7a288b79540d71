/// @file model/checkpoint.hpp
/// Reading `pyswitch train` run directories from C++: the run's config.json and its
/// checkpoints (safetensors tensors plus a manifest; the format is described in
/// pyswitch/checkpoint.py). Read-only: training and saving stay in Python.
///
/// Integrity: a checkpoint is accepted only when its manifest parses, every file it lists has
/// the recorded size, the safetensors header is well formed and its tensors tile the payload
/// exactly, and (when the library was built with OpenSSL, see build_info()) every file's
/// SHA-256 matches the manifest. Without OpenSSL the hash check is skipped and a warning is
/// logged once; the Python loader always checks hashes.
///
/// Errors: CheckpointError (an Error) for anything missing, damaged or inconsistent with the
/// model, with the file and what was wrong; InvalidArgument for a run config with bad values.
/// Never a crash, whatever the bytes on disk. Thread-safety: the functions share no state;
/// load_checkpoint writes the model's parameters, so no other call may use that model meanwhile.
#pragma once

#include <cstdint>
#include <string>

#include "pyswitch/model/switch_lm.hpp"

namespace pyswitch::model {

/// What config.json of a run directory holds that inference needs.
struct RunConfig {
  SwitchLMConfig model;     ///< the "model" section
  int64_t batch_size = 16;  ///< "train.batch_size" (evaluation batches use it too)
  int64_t seq_len = 256;    ///< "train.seq_len"
  std::string data;         ///< "train.data": the corpus path, "" for the default corpus
};

/// Parses RUN_DIR/config.json. Throws CheckpointError when it is missing, not the expected JSON,
/// or has a value of the wrong kind or an unknown model key; InvalidArgument for an unknown
/// dtype or batch_size / seq_len < 1. Sizes are checked when the SwitchLM is constructed.
RunConfig read_run_config(const std::string& run_dir);

/// The newest complete checkpoint of a run: the highest N among RUN_DIR/ckpt/step_N whose
/// manifest.json parses and lists files present at their recorded sizes (a ".replaced-step_N-*"
/// directory left by an interrupted save counts when step_N is missing): the rule of
/// pyswitch.checkpoint.latest_checkpoint. Throws CheckpointError when there is none.
std::string latest_checkpoint(const std::string& run_dir);

struct CheckpointInfo {
  int64_t step = 0;              ///< the manifest's step
  int64_t tensors_loaded = 0;    ///< model parameters written (optimizer state is skipped)
  bool hashes_verified = false;  ///< SHA-256 of every file checked (built with OpenSSL)
};

/// Loads the parameters of `model` from a checkpoint directory (ckpt/step_N). Every parameter
/// of the model must be present with its exact shape, stored as F32 or BF16; tensors named
/// "optim.*" are ignored; any other extra tensor is an error (a different model). Checkpoints
/// hold every expert, so the model must be a single-rank one: an expert-parallel model's
/// sharded expert tensors fail the shape check (CheckpointError).
/// On error the model's parameters may be partly overwritten.
CheckpointInfo load_checkpoint(SwitchLM& model, const std::string& checkpoint_dir);

}  // namespace pyswitch::model
