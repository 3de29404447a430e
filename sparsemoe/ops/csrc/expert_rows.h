/* Rows sorted by expert, as the dispatch plan holds them: rows [offsets[e - 1], offsets[e]) belong to expert
 * e (offsets[-1] = 0), and rows past offsets[E - 1] are dropped. Shared by the decode kernel
 * (decode_mlp.c) and the small-batch backward (expert_backward.c). */
#ifndef SPARSEMOE_EXPERT_ROWS_H
#define SPARSEMOE_EXPERT_ROWS_H

#include <stdint.h>

/* The number of kept rows (offsets[E - 1], 0 when E is 0), or -3 when the offsets decrease or pass N. */
static inline int64_t kept_rows(const int64_t* offsets, int64_t E, int64_t N) {
  int64_t prev = 0;
  for (int64_t e = 0; e < E; e++) {
    if (offsets[e] < prev || offsets[e] > N) return -3;
    prev = offsets[e];
  }
  return prev;
}

/* The same offsets as bounds [E + 1] (expert e's rows are [bounds[e], bounds[e + 1])) and the experts that
 * have rows, in order, as used [n_used]; returns n_used. */
static inline int64_t expert_groups(const int64_t* offsets, int64_t E, int64_t* bounds, int64_t* used) {
  int64_t n_used = 0;
  bounds[0] = 0;
  for (int64_t e = 0; e < E; e++) {
    bounds[e + 1] = offsets[e];
    if (bounds[e + 1] > bounds[e]) used[n_used++] = e;
  }
  return n_used;
}

#endif
