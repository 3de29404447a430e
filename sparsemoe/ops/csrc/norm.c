/* RMSNorm of rows, in one pass per row (inference):
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
