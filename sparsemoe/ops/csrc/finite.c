/* Whether every value of a tensor is finite, in one pass without temporaries:
 *
 *     sparsemoe_all_finite(p, n, bf16) -> 1 when the n values (float32, or bfloat16 bits with bf16) are all
 *     finite (no NaN, no inf), else 0
 *
 * The MoE layer's checks of its router logits and output: PyTorch's isfinite(x).all() runs four
 * elementwise ops and a reduction with their temporaries, a noticeable share of a one-token decode step.
 * A value is finite when its exponent bits are not all ones. Threads split long inputs.
 */
#include <stdint.h>

#define PARALLEL_FROM (1 << 16) /* values; below this one thread is faster than waking the others */

static int finite_f32(const uint32_t* p, int64_t n, int threads) {
  int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static) num_threads(threads) if (n >= PARALLEL_FROM)
  for (int64_t i = 0; i < n; i++) bad += (p[i] & 0x7F800000u) == 0x7F800000u;
  return bad == 0;
}

static int finite_bf16(const uint16_t* p, int64_t n, int threads) {
  int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static) num_threads(threads) if (n >= PARALLEL_FROM)
  for (int64_t i = 0; i < n; i++) bad += (p[i] & 0x7F80u) == 0x7F80u;
  return bad == 0;
}

int sparsemoe_all_finite(const void* p, int64_t n, int bf16, int threads) {
  if (threads < 1) threads = 1;
  return bf16 ? finite_bf16((const uint16_t*)p, n, threads) : finite_f32((const uint32_t*)p, n, threads);
}
