/* The dispatch plan's row movements: the stable sort of assignments by expert (sparsemoe_sort_by_expert,
 * at the end of this file) and the weighted scatter-add of expert rows into float32 token rows, one pass:
 *
 *     y [T, D] float32:  y[token[r]] += w[r] * rows[r]   for r in [0, n)   (w NULL: weight 1)
 *
 * rows [n, D] float32 or bfloat16 (widened as loaded), token [n] int64, w [n] float32. The expert op's
 * combine (the weighted expert outputs into y) and its backward's input gradient (dx), where PyTorch
 * needs a float32 copy of the rows, a multiply, and an index_add that runs element by element.
 *
 * Threads split the columns, never the rows: every element of y is updated by one thread, in row order,
 * so the result does not depend on the thread count. Returns 0, or -2 (nothing written) when a token id
 * is outside [0, T).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec.h"

#define SCATTER_COLUMNS(NAME, IO, LOAD, LOAD_PART)                                                      \
  static void NAME(float* y, const int64_t* token, const IO* rows, const float* w, int64_t n, int64_t D,  \
                   int64_t c0, int64_t c1) {                                                             \
    for (int64_t r = 0; r < n; r++) {                                                                    \
      float* yr = y + token[r] * D;                                                                      \
      const IO* xr = rows + r * D;                                                                       \
      vf wr = splat(w ? w[r] : 1.0f);                                                                    \
      int64_t c = c0;                                                                                    \
      for (; c + VL <= c1; c += VL) store(yr + c, load(yr + c) + wr * LOAD(xr + c));                     \
      if (c < c1) store_part(yr + c, load_part(yr + c, c1 - c) + wr * LOAD_PART(xr + c, c1 - c), c1 - c); \
    }                                                                                                    \
  }
SCATTER_COLUMNS(scatter_columns_f32, float, load, load_part)
SCATTER_COLUMNS(scatter_columns_bf16, uint16_t, load_bf16, load_part_bf16)
#undef SCATTER_COLUMNS

/* Below this many elements one thread does it all: starting threads would cost more. */
#define MIN_PARALLEL_ELEMENTS 32768

int sparsemoe_scatter_add_rows(float* y, int64_t T, const int64_t* token, const void* rows, int bf16,
                               const float* w, int64_t n, int64_t D, int threads) {
  for (int64_t r = 0; r < n; r++)
    if (token[r] < 0 || token[r] >= T) return -2;
  int64_t blocks = (D + VL - 1) / VL;
  if (threads > blocks) threads = (int)blocks;
  if (threads < 1 || n * D < MIN_PARALLEL_ELEMENTS) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int64_t per = (blocks + nt - 1) / nt * VL; /* whole vectors per thread */
    int64_t c0 = t * per, c1 = c0 + per < D ? c0 + per : D;
    if (c0 < c1) {
      if (bf16) scatter_columns_bf16(y, token, (const uint16_t*)rows, w, n, D, c0, c1);
      else scatter_columns_f32(y, token, (const float*)rows, w, n, D, c0, c1);
    }
  }
  return 0;
}

/* The dispatch plan's stable sort of N assignments by expert, as a counting sort (one pass to count, one
 * to place; the order of equal ids kept):
 *
 *     ids [N] int64 in [0, E] (E marks a dropped assignment, sorted last) ->
 *     order [N] (the assignments in sorted order), sorted [N] = ids[order], slots [N] (each row's position
 *     within its expert), counts [E] (rows per expert, dropped ones left out), ends [E] (inclusive cumsum)
 *
 * Returns 0, -1 when out of memory, or -2 (nothing written) when an id is outside [0, E]. */
int sparsemoe_sort_by_expert(const int64_t* ids, int64_t N, int64_t E, int64_t* order, int64_t* sorted,
                             int64_t* slots, int64_t* counts, int64_t* ends) {
  int64_t* next = calloc((size_t)(E + 2), sizeof(int64_t)); /* rows per id, then the next free row of each */
  if (!next) return -1;
  for (int64_t n = 0; n < N; n++) {
    if (ids[n] < 0 || ids[n] > E) {
      free(next);
      return -2;
    }
    next[ids[n] + 1]++;
  }
  for (int64_t e = 0; e < E; e++) {
    counts[e] = next[e + 1];
    next[e + 1] += next[e]; /* next[e] = the first row of id e */
    ends[e] = next[e + 1];
  }
  for (int64_t n = 0; n < N; n++) {
    const int64_t e = ids[n], row = next[e]++;
    order[row] = n;
    sorted[row] = e;
    slots[row] = e < E ? row - (e ? ends[e - 1] : 0) : row - (E ? ends[E - 1] : 0);
  }
  free(next);
  return 0;
}
