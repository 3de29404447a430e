/* Per-token inference steps of a decode step, each in one pass where PyTorch runs several ops: RMSNorm of
 * rows, and token-choice top-k routing (at the end of this file).
 *
 * RMSNorm of rows, in one pass per row (inference):
 *
 *     sparsemoe_rms_norm_f32 / _bf16(x [n, D], w [D], n, D, eps, out [n, D], threads):
 *     out = x / sqrt(mean(x^2) + eps) * w, computed in float32 from the values as they are and rounded once
 *
 * The model's norms in PyTorch take nine small ops a row (widen, square, mean, add, rsqrt, two multiplies,
 * the weight widened, the rounding); at a decode step each costs more than the arithmetic. Threads split
 * many rows.
 */
#include <math.h>
#include <stdint.h>

#include "vec.h"

#define PARALLEL_FROM (1 << 16) /* values */

#define DEFINE_RMS_NORM(SUFFIX, T, GET, PUT)                                                                \
  void sparsemoe_rms_norm_##SUFFIX(const T* x, const T* w, int64_t n, int64_t D, float eps, T* out,        \
                                   int threads) {                                                         \
    if (threads < 1) threads = 1;                                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (n * D >= PARALLEL_FROM)")         \
    for (int64_t r = 0; r < n; r++) {                                                                     \
      const T* xr = x + r * D;                                                                            \
      float squares = 0.0f;                                                                               \
      for (int64_t i = 0; i < D; i++) {                                                                   \
        const float v = GET(xr[i]);                                                                       \
        squares += v * v;                                                                                 \
      }                                                                                                   \
      const float scale = 1.0f / sqrtf(squares / (float)D + eps);                                         \
      for (int64_t i = 0; i < D; i++) out[r * D + i] = PUT((GET(xr[i]) * scale) * GET(w[i]));             \
    }                                                                                                     \
  }

#define SAME(v) (v)
DEFINE_RMS_NORM(f32, float, SAME, SAME)
DEFINE_RMS_NORM(bf16, uint16_t, bf16_to_float, float_to_bf16)

/* Token-choice top-k routing of float32 logits [T, E], one pass per token (inference):
 *
 *     sparsemoe_topk_route(logits, T, E, K, sigmoid, renormalize, scale, probs [T, E], ids [T, K] int64,
 *                          weights [T, K])
 *
 * scores = softmax(logits) over the experts (sigmoid(logits) with `sigmoid`); ids = the K experts of the
 * largest logits, largest first (ties: the lower id first; the scores are monotonic in the logits);
 * weights = their scores, divided by their sum (at least 1e-20) with `renormalize`, times `scale`;
 * probs = the scores normalised to sum 1 (softmax: the scores themselves). What the router computes in
 * seven PyTorch ops. Requires 1 <= K <= E. */
void sparsemoe_topk_route(const float* logits, int64_t T, int64_t E, int64_t K, int sigmoid, int renormalize,
                          float scale, float* probs, int64_t* ids, float* weights) {
  for (int64_t t = 0; t < T; t++) {
    const float* x = logits + t * E;
    float* p = probs + t * E;
    int64_t* id = ids + t * K;
    float* w = weights + t * K;
    float total = 0.0f;
    if (sigmoid) {
      for (int64_t e = 0; e < E; e++) total += (p[e] = 1.0f / (1.0f + expf(-x[e])));
    } else {
      float top = -INFINITY;
      for (int64_t e = 0; e < E; e++) top = x[e] > top ? x[e] : top;
      for (int64_t e = 0; e < E; e++) total += (p[e] = expf(x[e] - top));
      for (int64_t e = 0; e < E; e++) p[e] /= total;
    }
    for (int64_t k = 0; k < K; k++) { /* selection: K passes (K is small) */
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        int taken = 0;
        for (int64_t j = 0; j < k; j++) taken |= id[j] == e;
        if (!taken && (best < 0 || x[e] > x[best] || (x[best] != x[best] && x[e] == x[e]))) best = e;
      }
      id[k] = best;
      w[k] = p[best];
    }
    if (renormalize) {
      float chosen = 0.0f;
      for (int64_t k = 0; k < K; k++) chosen += w[k];
      chosen = chosen > 1e-20f ? chosen : 1e-20f;
      for (int64_t k = 0; k < K; k++) w[k] /= chosen;
    }
    if (scale != 1.0f)
      for (int64_t k = 0; k < K; k++) w[k] *= scale;
    if (sigmoid) {
      const float sum = total > 1e-20f ? total : 1e-20f;
      for (int64_t e = 0; e < E; e++) p[e] /= sum;
    }
  }
}

/* Greedy decoding's pick, one pass per row:
 *
 *     sparsemoe_argmax_rows(x [n, V] float32 or (bf16) bfloat16, bf16, n, V, out [n] int64)
 *
 * out[r] = the index of row r's largest value, the first one on ties; a NaN counts as larger than every
 * number (the first NaN wins), as torch.argmax. Over a bfloat16 row of 32,000 logits (a decode step's last
 * op) PyTorch's argmax took 116 us, 33 us after widening the row to float32, this pass 9.6 us with its Python
 * wrapper (2 threads, torch 2.13, warm caches). */
/* Per lane of VL: the largest value seen and its first index (strict >: a later tie does not replace it; a
 * NaN compares false and is found by its own pass); then the lanes' winner, the smallest index among the
 * lanes holding the largest value, and the tail. */
#define DEFINE_ARGMAX_ROW(SUFFIX, T, GET, LOADV)                                                  \
  static int64_t argmax_row_##SUFFIX(const T* x, int64_t V) {                                      \
    vf top = splat(-INFINITY);                                                                    \
    vi first = (vi){0}, index = (vi){0}, nan = (vi){0};                                           \
    for (int u = 0; u < VL; u++) index[u] = u;                                                    \
    int64_t i = 0;                                                                                \
    for (; i + VL <= V; i += VL, index += VL) {                                                   \
      const vf v = LOADV(x + i);                                                                  \
      const vi larger = (vi)(v > top);                                                            \
      top = vselect(larger, v, top);                                                              \
      first = (vi)vselect(larger, (vf)index, (vf)first);                                          \
      nan |= (vi)(v != v);                                                                        \
    }                                                                                             \
    int any_nan = 0;                                                                              \
    for (int u = 0; u < VL; u++) any_nan |= nan[u] != 0;                                          \
    for (int64_t k = i; k < V; k++) any_nan |= GET(x[k]) != GET(x[k]);                            \
    if (any_nan)                                                                                  \
      for (int64_t k = 0; k < V; k++)                                                             \
        if (GET(x[k]) != GET(x[k])) return k;                                                     \
    float best_value = -INFINITY;                                                                 \
    int64_t best = -1;                                                                            \
    for (int u = 0; u < VL; u++)                                                                  \
      if (i > 0 && (best < 0 || top[u] > best_value || (top[u] == best_value && first[u] < best))) { \
        best_value = top[u];                                                                      \
        best = first[u];                                                                          \
      }                                                                                           \
    for (int64_t k = i; k < V; k++)                                                               \
      if (best < 0 || GET(x[k]) > best_value) {                                                   \
        best_value = GET(x[k]);                                                                   \
        best = k;                                                                                 \
      }                                                                                           \
    return best;                                                                                  \
  }
DEFINE_ARGMAX_ROW(f32, float, SAME, load)
DEFINE_ARGMAX_ROW(bf16, uint16_t, bf16_to_float, load_bf16)
#undef DEFINE_ARGMAX_ROW

void sparsemoe_argmax_rows(const void* x, int bf16, int64_t n, int64_t V, int64_t* out) {
  for (int64_t r = 0; r < n; r++)
    out[r] = bf16 ? argmax_row_bf16((const uint16_t*)x + r * V, V) : argmax_row_f32((const float*)x + r * V, V);
}
