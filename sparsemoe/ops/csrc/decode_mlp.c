/* The expert MLP for a handful of rows per expert (decoding) on the CPU, with float32 or bfloat16 weights.
 *
 * With 1-16 rows per expert the expert GEMMs are bounded by reading the weights; BLAS GEMMs with so few
 * rows run several times below that bound. These kernels stream each weight row once per block of rows
 * and keep the few input rows in L1: `y = x W^T` with W [O, K] row-major (nn.Linear's layout). Inputs,
 * sums, the hidden activations and the output are float32; bfloat16 weights are widened to float32 as
 * they are loaded (exact: a bfloat16 is the top half of a float32), so they are read at half the bytes.
 *
 * Legend: N rows (sorted by expert), E experts, D model width, F hidden width, I in-projection rows
 * (2F gated: gate rows then up rows), n rows of one expert, K the reduction width of a GEMM.
 *
 * Built on first use by sparsemoe/ops/cpu_kernels.py with the system C compiler; GCC/Clang vector
 * extensions give AVX-512, AVX2 or NEON code from the same source. No fast-math: the vector sums are
 * written out, so NaN and infinity behave as in PyTorch.
 *
 * Exported: sparsemoe_decode_mlp_f32 and sparsemoe_decode_mlp_bf16 (the whole expert stage), and
 * sparsemoe_grouped_linear_f32 / _bf16 (one linear layer per expert, for expert MLPs whose activation is
 * computed elsewhere); see decode_gemm.h for the arguments.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activation.h"
#include "vec.h"

#define ROW_BLOCK 64        /* weight rows per work item */
#define K_CHUNK 32          /* input rows per work item of the [in, out]-stored GEMM */
#define PREFETCH_BYTES 2048 /* how far ahead of the weight stream the row kernels prefetch */

/* Rows sorted by expert: rows [offsets[e - 1], offsets[e]) belong to expert e, offsets[-1] = 0, and rows
 * past offsets[E - 1] are dropped. The number of kept rows (offsets[E - 1], 0 when E is 0), or -3 when the
 * offsets decrease or pass N. */
static int64_t kept_rows(const int64_t* offsets, int64_t E, int64_t N) {
  int64_t prev = 0;
  for (int64_t e = 0; e < E; e++) {
    if (offsets[e] < prev || offsets[e] > N) return -3;
    prev = offsets[e];
  }
  return prev;
}

/* The same offsets as bounds [E + 1] (expert e's rows are [bounds[e], bounds[e + 1])) and the experts that
 * have rows, in order, as used [n_used]; returns n_used. */
static int64_t expert_groups(const int64_t* offsets, int64_t E, int64_t* bounds, int64_t* used) {
  int64_t n_used = 0;
  bounds[0] = 0;
  for (int64_t e = 0; e < E; e++) {
    bounds[e + 1] = offsets[e];
    if (bounds[e + 1] > bounds[e]) used[n_used++] = e;
  }
  return n_used;
}

#define WT float
#define WNAME(name) name##_f32
#define WLOAD(p) load(p)
#define WGET(p) (*(p))
#include "decode_gemm.h"

#define WT uint16_t
#define WNAME(name) name##_bf16
#define WLOAD(p) load_bf16(p)
#define WGET(p) bf16_to_float(*(p))
#include "decode_gemm.h"
