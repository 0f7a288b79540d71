/// @file model/inference.hpp
/// Inference helpers for a trained SwitchLM, the same computations as the Python API:
/// evaluate_bytes is pyswitch.train.evaluate's loop over pyswitch.data.eval_batches, and
/// generate_greedy is SwitchLM.generate(temperature=0). Both run the model in eval mode (no
/// jitter, eval capacity factor) and give the Python API's numbers bit for bit on the same
/// build and CPU kernels. Not thread-safe with other calls on the same model.
#pragma once

#include <cstdint>
#include <vector>

#include "pyswitch/model/switch_lm.hpp"

namespace pyswitch::model {

struct EvalResult {
  double loss = 0;           ///< mean cross-entropy, nats per predicted byte
  double bits_per_byte = 0;  ///< loss / ln 2
  int64_t tokens = 0;        ///< bytes predicted
  int64_t batches = 0;
};

/// Mean cross-entropy over consecutive windows of `data` (bytes, size `size`): window w is
/// data[w * seq_len, w * seq_len + seq_len + 1), `batch_size` windows per forward, the last
/// batch possibly smaller; stops after `max_batches` batches (0: all). Throws InvalidArgument
/// when batch_size or seq_len < 1, max_batches < 0, or size < seq_len + 1.
EvalResult evaluate_bytes(SwitchLM& model, const uint8_t* data, int64_t size, int64_t batch_size,
                          int64_t seq_len, int64_t max_batches = 0);

/// Appends `max_new_tokens` bytes to `prompt`, each the argmax of the next-byte logits (the
/// lowest byte value wins a tie), conditioning on at most the last `context` bytes. An empty
/// prompt starts from "\n" (as in Python). Returns the new bytes only. Throws InvalidArgument
/// when max_new_tokens < 0 or context < 1.
std::vector<uint8_t> generate_greedy(SwitchLM& model, const std::vector<uint8_t>& prompt,
                                     int64_t max_new_tokens, int64_t context = 256);

}  // namespace pyswitch::model
