// Evaluation over consecutive byte windows and greedy generation: the C++ twins of
// pyswitch.train.evaluate and SwitchLM.generate(temperature=0).
#include "pyswitch/model/inference.hpp"

#include <algorithm>
#include <cmath>

#include "pyswitch/error.hpp"

namespace pyswitch::model {

EvalResult evaluate_bytes(SwitchLM& model, const uint8_t* data, int64_t size, int64_t batch_size,
                          int64_t seq_len, int64_t max_batches) {
  PYSWITCH_CHECK_ARG(batch_size >= 1, "evaluate_bytes: batch_size must be >= 1, got ", batch_size);
  PYSWITCH_CHECK_ARG(seq_len >= 1, "evaluate_bytes: seq_len must be >= 1, got ", seq_len);
  PYSWITCH_CHECK_ARG(max_batches >= 0, "evaluate_bytes: max_batches must be >= 0, got ",
                     max_batches);
  PYSWITCH_CHECK_ARG(data != nullptr || size == 0, "evaluate_bytes: data is null");
  PYSWITCH_CHECK_ARG(size >= seq_len + 1,
                     "evaluate_bytes: data must hold at least seq_len + 1 = ", seq_len + 1,
                     " bytes, got ", size);
  const int64_t windows = (size - 1) / seq_len;
  int64_t batches = (windows + batch_size - 1) / batch_size;
  if (max_batches > 0) batches = std::min(batches, max_batches);

  EvalResult result;
  double total = 0;
  std::vector<int32_t> tokens;
  for (int64_t b = 0; b < batches; ++b) {
    const int64_t first = b * batch_size;
    const int64_t rows = std::min(batch_size, windows - first);
    tokens.resize(size_t(rows * (seq_len + 1)));
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* window = data + (first + r) * seq_len;
      std::copy(window, window + seq_len + 1, tokens.begin() + r * (seq_len + 1));
    }
    const int64_t n = rows * seq_len;
    // Accumulated as Python does (ce * n, summed in double, divided at the end), so that the
    // two give the same bits.
    total += model.step(tokens.data(), rows, seq_len, false, false, n).ce * double(n);
    result.tokens += n;
  }
  result.batches = batches;
  result.loss = total / double(std::max<int64_t>(result.tokens, 1));
  result.bits_per_byte = result.loss / std::log(2.0);
  return result;
}

std::vector<uint8_t> generate_greedy(SwitchLM& model, const std::vector<uint8_t>& prompt,
                                     int64_t max_new_tokens, int64_t context) {
  PYSWITCH_CHECK_ARG(max_new_tokens >= 0, "generate_greedy: max_new_tokens must be >= 0, got ",
                     max_new_tokens);
  PYSWITCH_CHECK_ARG(context >= 1, "generate_greedy: context must be >= 1, got ", context);
  const int64_t V = model.config().vocab_size;
  PYSWITCH_CHECK_ARG(V <= 256, "generate_greedy: a byte model needs vocab_size <= 256, got ", V);
  std::vector<uint8_t> text = prompt.empty() ? std::vector<uint8_t>{'\n'} : prompt;
  const size_t prefix = text.size();
  std::vector<int32_t> window;
  std::vector<float> logits;
  for (int64_t i = 0; i < max_new_tokens; ++i) {
    const int64_t S = std::min<int64_t>(context, int64_t(text.size()));
    window.assign(text.end() - S, text.end());
    logits.resize(size_t(S * V));
    model.logits(window.data(), 1, S, logits.data());
    const float* last = logits.data() + (S - 1) * V;
    // First maximum wins, as numpy.argmax does.
    text.push_back(uint8_t(std::max_element(last, last + V) - last));
  }
  return std::vector<uint8_t>(text.begin() + int64_t(prefix), text.end());
}

}  // namespace pyswitch::model
