// Internal: the ISA-generic row kernels (router softmax statistics, top-k, loss partial sums;
// the causal attention softmax and its backward), written
// once against a 16-lane vector vocabulary that each kernels_<isa>.cpp defines before including
// this file. Every ISA performs the same float operations in the same order, lane for lane, so
// all of them produce bit-identical results (the scalar one is the oracle in the tests).
//
// Vocabulary required (V = 16 floats, DV = 16 doubles):
//   V load(const float*), V load_tail(const float*, int64_t n, float fill), void store(float*, V),
//   void store_tail(float*, V, int64_t n), V set1(float), V add/sub/mul/max(V, V),
//   V fma(V a, V b, V c) = a*b+c (single rounding), V round_even(V), V ldexp_int(V p, V n),
//   V select_lt(V x, V threshold, V if_less, V otherwise), bool any_nonfinite(V, int64_t n),
//   float reduce_max(V), int first_equal(V, float, int64_t n) (-1 if none),
//   DV dzero(), void dacc(DV&, V) (acc += double(v)), void dstore(double*, DV),
//   void daccumulate_scaled(double* dst, V v, double s, int64_t n) (dst[j] += double(v_j) * s).

namespace {

constexpr int kLanes = 16;

// expf for x <= 0 (softmax arguments), Cephes-style: 2^n * p(r), r = x - n ln2 split in two
// parts. Inputs below -87.3 (results below FLT_MIN) give exactly 0, which also turns the -inf
// padding of partial vectors into 0.
inline V exp_nonpositive(V x) {
  const V lowest = set1(-87.3f);
  const V clamped = max(x, lowest);
  const V n = round_even(mul(clamped, set1(1.44269504088896341f)));
  V r = fma(n, set1(-0.693359375f), clamped);
  r = fma(n, set1(2.12194440e-4f), r);
  V p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, set1(1.0f)));
  return select_lt(x, lowest, set1(0.0f), ldexp_int(p, n));
}

// The canonical reduction of 16 lanes: a fixed pairwise tree, identical on every ISA.
template <typename T>
inline T reduce_lanes(const T lanes[kLanes]) {
  T level[8];
  for (int i = 0; i < 8; ++i) level[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) level[i] = level[i] + level[i + 4];
  for (int i = 0; i < 2; ++i) level[i] = level[i] + level[i + 2];
  return level[0] + level[1];
}

inline int64_t lanes_in(int64_t chunk_start, int64_t count) {
  const int64_t left = count - chunk_start;
  return left < kLanes ? left : kLanes;
}

// Row max and finiteness in one pass. Returns false when the row holds a NaN or an infinity.
inline bool row_max(const float* row, int64_t E, float* out_max) {
  V m = set1(-3.402823466e38f);
  for (int64_t c = 0; c < E; c += kLanes) {
    const int64_t n = lanes_in(c, E);
    const V x = n == kLanes ? load(row + c) : load_tail(row + c, n, -3.402823466e38f);
    if (any_nonfinite(x, n)) return false;
    m = max(m, x);
  }
  *out_max = reduce_max(m);
  return true;
}

// Writes e_j = exp(row_j - row_max) to exps and returns their sum in double, summed lane-wise
// in the canonical 16-lane order.
inline double row_exps(const float* row, int64_t E, float row_max_value, float* exps) {
  const V shift = set1(row_max_value);
  DV acc = dzero();
  for (int64_t c = 0; c < E; c += kLanes) {
    const int64_t n = lanes_in(c, E);
    const V x = n == kLanes ? load(row + c) : load_tail(row + c, n, -__builtin_inff());
    const V e = exp_nonpositive(sub(x, shift));
    if (n == kLanes) {
      store(exps + c, e);
    } else {
      store_tail(exps + c, e, n);
    }
    dacc(acc, e);
  }
  double lanes[kLanes];
  dstore(lanes, acc);
  return reduce_lanes(lanes);
}

// Index of the largest value of values[0, E), ties to the lowest index.
inline int32_t argmax_lowest(const float* values, int64_t E, float known_max) {
  for (int64_t c = 0; c < E; c += kLanes) {
    const int64_t n = lanes_in(c, E);
    const V x = n == kLanes ? load(values + c) : load_tail(values + c, n, -__builtin_inff());
    const int hit = first_equal(x, known_max, n);
    if (hit >= 0) return static_cast<int32_t>(c + hit);
  }
  return 0;  // unreachable for finite rows: known_max is one of the values
}

inline float max_of(const float* values, int64_t E) {
  V m = set1(-__builtin_inff());
  for (int64_t c = 0; c < E; c += kLanes) {
    const int64_t n = lanes_in(c, E);
    const V x = n == kLanes ? load(values + c) : load_tail(values + c, n, -__builtin_inff());
    m = max(m, x);
  }
  return reduce_max(m);
}

void route_rows_impl(cpu::RouteRowsArgs& a) {
  const int64_t E = a.num_experts;
  const int64_t k = a.k;
  float* exps = a.scratch;
  float* remaining = a.scratch + E + 16;
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* row = a.logits + r * E;
    float mx;
    if (!row_max(row, E, &mx)) {
      a.first_bad_row = r;
      return;
    }
    const double sum = row_exps(row, E, mx, exps);
    const double inv_sum = 1.0 / sum;
    for (int64_t c = 0; c < E; c += kLanes) {
      const int64_t n = lanes_in(c, E);
      const V e = n == kLanes ? load(exps + c) : load_tail(exps + c, n, 0.0f);
      daccumulate_scaled(a.prob_sum + c, e, inv_sum, n);
    }
    const double lse = static_cast<double>(mx) + std::log(sum);
    *a.z_sum += lse * lse;

    int32_t* index_out = a.expert_index + r * k;
    float* gate_out = a.gate + r * k;
    index_out[0] = argmax_lowest(row, E, mx);
    if (k > 1) {
      for (int64_t j = 0; j < E; ++j) remaining[j] = row[j];
      for (int64_t choice = 1; choice < k; ++choice) {
        remaining[index_out[choice - 1]] = -__builtin_inff();
        index_out[choice] = argmax_lowest(remaining, E, max_of(remaining, E));
      }
    }
    for (int64_t choice = 0; choice < k; ++choice) {
      gate_out[choice] = static_cast<float>(static_cast<double>(exps[index_out[choice]]) * inv_sum);
    }
    if (a.top1_prob) a.top1_prob[r] = static_cast<float>(inv_sum);  // exp(0) == 1 exactly
  }
}

void softmax_rows_impl(const float* logits, int64_t rows, int64_t E, float* probs, float* scratch) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * E;
    float mx;
    if (!row_max(row, E, &mx)) {
      for (int64_t j = 0; j < E; ++j) probs[r * E + j] = __builtin_nanf("");
      continue;
    }
    const double inv_sum = 1.0 / row_exps(row, E, mx, scratch);
    for (int64_t j = 0; j < E; ++j) {
      probs[r * E + j] = static_cast<float>(static_cast<double>(scratch[j]) * inv_sum);
    }
  }
}

// Attention rows hold a causal prefix: row r has first_valid + r live scores; the rest of the
// row up to `width` is zeroed so the GEMMs that follow may read it. A row with a non-finite
// score becomes NaN (the vectorised exp would otherwise map NaN to a finite value).
void causal_softmax_rows_impl(float* scores, int64_t rows, int64_t stride, int64_t first_valid,
                              int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * stride;
    const int64_t n = first_valid + r;
    float mx;
    if (!row_max(row, n, &mx)) {
      for (int64_t j = 0; j < n; ++j) row[j] = __builtin_nanf("");
    } else {
      const V inv = set1(static_cast<float>(1.0 / row_exps(row, n, mx, row)));
      for (int64_t c = 0; c < n; c += kLanes) {
        const int64_t lanes = lanes_in(c, n);
        if (lanes == kLanes) {
          store(row + c, mul(load(row + c), inv));
        } else {
          store_tail(row + c, mul(load_tail(row + c, lanes, 0.0f), inv), lanes);
        }
      }
    }
    for (int64_t j = n; j < width; ++j) row[j] = 0.0f;
  }
}

// grads <- probs * (grads - rowsum(probs * grads)) over each row's causal prefix (the softmax
// backward), zero from the prefix up to `width`. The row sum runs in 16 float lanes and the
// canonical tree.
void causal_softmax_backward_rows_impl(const float* probs, int64_t probs_stride, float* grads,
                                       int64_t grads_stride, int64_t rows, int64_t first_valid,
                                       int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs + r * probs_stride;
    float* g = grads + r * grads_stride;
    const int64_t n = first_valid + r;
    V acc = set1(0.0f);
    for (int64_t c = 0; c < n; c += kLanes) {
      const int64_t lanes = lanes_in(c, n);
      const V pv = lanes == kLanes ? load(p + c) : load_tail(p + c, lanes, 0.0f);
      const V gv = lanes == kLanes ? load(g + c) : load_tail(g + c, lanes, 0.0f);
      acc = fma(pv, gv, acc);
    }
    float lanes_out[kLanes];
    store(lanes_out, acc);
    const V dot = set1(reduce_lanes(lanes_out));
    for (int64_t c = 0; c < n; c += kLanes) {
      const int64_t lanes = lanes_in(c, n);
      if (lanes == kLanes) {
        store(g + c, mul(load(p + c), sub(load(g + c), dot)));
      } else {
        const V pv = load_tail(p + c, lanes, 0.0f), gv = load_tail(g + c, lanes, 0.0f);
        store_tail(g + c, mul(pv, sub(gv, dot)), lanes);
      }
    }
    for (int64_t j = n; j < width; ++j) g[j] = 0.0f;
  }
}

}  // namespace
