/* One new position of grouped-query attention with a KV cache, in one call (a decode step):
 *
 *     sparsemoe_decode_attention_f32 / _bf16(q [B, H, Hd], k [B, G, Hd], v [B, G, Hd], cos [R], sin [R] or
 *         NULL, cache_k [B, G, L, Hd], cache_v [B, G, L, Hd], B, H, G, Hd, R, L, past, window, scale,
 *         out [B, H, Hd], threads)
 *
 * RoPE (rotate-half pairs i and i + R/2 over the first R dims of each head; cos/sin are the model's table
 * row for position `past`; none when cos is NULL) is applied to q and k in float32 and the results rounded
 * to the tensor type, as the PyTorch path rounds them; k and v are stored in the cache at `past`; then each
 * query head h (key/value head h / (H / G)) attends to the cached positions [lo, past], lo = past + 1 -
 * window with a sliding window (window > 0), else 0: softmax(scale q.k) v, in float32, rounded once into
 * out. The PyTorch path takes about thirty small ops for this; the kernel reads the cache once.
 * Returns 0, -1 when out of memory, -3 when past is outside [0, L).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

#define PARALLEL_FROM (1 << 18) /* multiply-adds (8 heads of 128 over 256 positions); measured (bfloat16, 2
                                 * threads): 128 positions 30 us on one thread, 30-34 on two; 255 positions 32-37
                                 * on two against 48-55 on one */

/* q . k and acc += w v over n values, q and acc float32, k and v of the tensor type (vectorised; the tail
 * one by one). */
#define DEFINE_ROW_MATH(SUFFIX, T, LOAD, GET)                                                  \
  static inline float dot_##SUFFIX(const float* q, const T* k, int64_t n) {                   \
    vf acc = {0};                                                                              \
    int64_t i = 0;                                                                             \
    for (; i + VL <= n; i += VL) acc += load(q + i) * LOAD(k + i);                             \
    float s = hsum(acc);                                                                       \
    for (; i < n; i++) s += q[i] * GET(k[i]);                                                  \
    return s;                                                                                  \
  }                                                                                            \
  static inline void axpy_##SUFFIX(float* acc, float w, const T* v, int64_t n) {              \
    const vf wv = splat(w);                                                                    \
    int64_t i = 0;                                                                             \
    for (; i + VL <= n; i += VL) store(acc + i, load(acc + i) + wv * LOAD(v + i));             \
    for (; i < n; i++) acc[i] += w * GET(v[i]);                                                \
  }
#define IDENTITY(x) (x)
DEFINE_ROW_MATH(f32, float, load, IDENTITY)
DEFINE_ROW_MATH(bf16, uint16_t, load_bf16, bf16_to_float)
#undef DEFINE_ROW_MATH
#undef IDENTITY

static inline float get_f32(const float* p, int64_t i) { return p[i]; }
static inline void put_f32(float* p, int64_t i, float x) { p[i] = x; }
static inline float get_bf16(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
static inline void put_bf16(uint16_t* p, int64_t i, float x) { p[i] = float_to_bf16(x); }

#define DEFINE_DECODE_ATTENTION(SUFFIX, T)                                                                    \
  /* dst[0, Hd) = rope(src) rounded to T (src and dst may be the same row). */                                  \
  static void rope_##SUFFIX(const T* src, T* dst, const float* cos, const float* sin, int64_t Hd, int64_t R) { \
    float tmp[Hd];                                                                                              \
    const int64_t half = R / 2;                                                                                 \
    for (int64_t i = 0; i < Hd; i++) tmp[i] = get_##SUFFIX(src, i);                                             \
    if (cos)                                                                                                    \
      for (int64_t i = 0; i < half; i++) {                                                                      \
        const float a = tmp[i], b = tmp[i + half];                                                              \
        tmp[i] = a * cos[i] - b * sin[i];                                                                       \
        tmp[i + half] = b * cos[i + half] + a * sin[i + half];                                                  \
      }                                                                                                         \
    for (int64_t i = 0; i < Hd; i++) put_##SUFFIX(dst, i, tmp[i]);                                              \
  }                                                                                                             \
  int sparsemoe_decode_attention_##SUFFIX(const T* q, const T* k, const T* v, const float* cos, const float* sin, \
                                         T* cache_k, T* cache_v, int64_t B, int64_t H, int64_t G, int64_t Hd,    \
                                         int64_t R, int64_t L, int64_t past, int64_t window, float scale, T* out, \
                                         int threads) {                                                         \
    if (past < 0 || past >= L) return -3;                                                                       \
    if (threads < 1) threads = 1;                                                                               \
    const int64_t lo = window > 0 && past + 1 > window ? past + 1 - window : 0, P = past + 1 - lo;              \
    for (int64_t b = 0; b < B; b++)                                                                             \
      for (int64_t g = 0; g < G; g++) {                                                                         \
        const int64_t row = ((b * G + g) * L + past) * Hd;                                                      \
        rope_##SUFFIX(k + (b * G + g) * Hd, cache_k + row, cos, sin, Hd, R);                                    \
        for (int64_t i = 0; i < Hd; i++) cache_v[row + i] = v[(b * G + g) * Hd + i];                            \
      }                                                                                                         \
    float* scores = malloc((size_t)(B * H * P) * sizeof(float));                                                \
    if (!scores) return -1;                                                                                     \
    const int64_t group = H / G;                                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (B * H * P * Hd >= PARALLEL_FROM)")     \
    for (int64_t bh = 0; bh < B * H; bh++) {                                                                    \
      const int64_t b = bh / H, h = bh % H, g = h / group;                                                      \
      float qf[Hd], acc[Hd];                                                                                    \
      T qr[Hd];                                                                                                 \
      rope_##SUFFIX(q + bh * Hd, qr, cos, sin, Hd, R);                                                          \
      for (int64_t i = 0; i < Hd; i++) qf[i] = get_##SUFFIX(qr, i);                                             \
      const T* keys = cache_k + ((b * G + g) * L + lo) * Hd;                                                    \
      const T* values = cache_v + ((b * G + g) * L + lo) * Hd;                                                  \
      float* s = scores + bh * P;                                                                               \
      float top = -INFINITY;                                                                                    \
      for (int64_t p = 0; p < P; p++) {                                                                         \
        s[p] = dot_##SUFFIX(qf, keys + p * Hd, Hd) * scale;                                                     \
        if (s[p] > top) top = s[p];                                                                             \
      }                                                                                                         \
      float total = 0.0f;                                                                                       \
      for (int64_t p = 0; p < P; p++) {                                                                         \
        s[p] = expf(s[p] - top);                                                                                \
        total += s[p];                                                                                          \
      }                                                                                                         \
      for (int64_t i = 0; i < Hd; i++) acc[i] = 0.0f;                                                           \
      for (int64_t p = 0; p < P; p++) axpy_##SUFFIX(acc, s[p] / total, values + p * Hd, Hd);                   \
      for (int64_t i = 0; i < Hd; i++) put_##SUFFIX(out + bh * Hd, i, acc[i]);                                  \
    }                                                                                                           \
    free(scores);                                                                                               \
    return 0;                                                                                                   \
  }

DEFINE_DECODE_ATTENTION(f32, float)
DEFINE_DECODE_ATTENTION(bf16, uint16_t)
