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
 * Quantized weights (int8 per output channel, int4 group-wise; quant_gemm.h) are read in their stored
 * bytes and widened in registers the same way.
 *
 * Exported: sparsemoe_decode_mlp_f32, _bf16 and _quant (the whole expert stage, decode_stage below; the
 * float ones can also keep the in-projection outputs for the small-batch backward, expert_backward.c),
 * sparsemoe_grouped_linear_f32 / _bf16 (one linear layer per expert, for expert MLPs whose activation is
 * computed elsewhere; decode_gemm.h), and sparsemoe_dequantize (quantized rows back to float).
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activation.h"
#include "expert_rows.h"
#include "vec.h"

#define ROW_BLOCK 64        /* weight rows per work item */
#define K_CHUNK 32          /* input rows per work item of the [in, out]-stored GEMM */
#define PREFETCH_BYTES 2048 /* how far ahead of the weight stream the row kernels prefetch */
/* How far ahead the bfloat16 dot-product rows (decode_gemm.h) prefetch their weight stream: mixtral-1k greedy
 * decode in bfloat16, 2 threads, 12 interleaved rounds, median ms per token: 9.79 without, 9.15 at 8 KiB
 * (another run: 9.77, 9.28 at 8 KiB, 9.80 at 16 KiB). */
#define DP_PREFETCH_BYTES 8192

#define WT float
#define WNAME(name) name##_f32
#define WLOAD(p) load(p)
#define WGET(p) (*(p))
#include "decode_gemm.h"

#define WT uint16_t
#define WNAME(name) name##_bf16
#define WLOAD(p) load_bf16(p)
#define WGET(p) bf16_to_float(*(p))
#define WDP
#include "decode_gemm.h"

#define WT int8_t
#define WNAME(name) name##_i8
#define WLOAD(p) load_i8(p)
#define WGET(p) ((float)*(p))
#define WNO_LINEAR
#include "decode_gemm.h"

#include "quant_gemm.h"

/* dst [I] = h [I] in x's type (bfloat16 when x_bf16, then h is rounded to it in place too), else float32. */
static void keep_row(float* h, int64_t I, int x_bf16, void* dst) {
  if (!x_bf16) {
    memcpy(dst, h, (size_t)I * sizeof(float));
    return;
  }
  uint16_t* out = dst;
  int64_t k = 0;
  for (; k + VL <= I; k += VL) {
    store_bf16(out + k, load(h + k));
    store(h + k, load_bf16(out + k));
  }
  for (; k < I; k++) {
    out[k] = float_to_bf16(h[k]);
    h[k] = bf16_to_float(out[k]);
  }
}

/* y [T, D] float32 = the expert stage of a decode step: for each kept row r (rows sorted by expert, rows
 * [offsets[e - 1], offsets[e]) for expert e, offsets[-1] = 0), y[tok[r]] += wts[r] * W_out[e] act(W_in[e]
 * x[tok[r]]); rows past offsets[E - 1] (dropped) are ignored. x [T, D] float32 or (x_bf16) bfloat16. The
 * rows are gathered (widened to float32, zero-padded to the stored input width of W_in), run through their
 * experts, and combined into y in row order, all in one parallel region: work is split over threads by
 * (expert with rows, block of weight rows), so only the experts that got rows are read, and the combine by
 * blocks of columns of y. With h_keep (a training step's forward; float weights only) the in-projection outputs
 * are also stored there, h_keep [N, I] of x's type, rows in plan order, for the backward (expert_backward.c);
 * with bfloat16 x they are rounded to bfloat16 before the activation, so that the forward and the backward
 * see the same h. Returns 0, -1 when out of memory, -2 when a token id is outside [0, T), -3 when the
 * offsets decrease or pass N. */
static int decode_stage(const void* x, int x_bf16, const int64_t* tok, const float* wts, int64_t N,
                        const int64_t* offsets, int64_t E, const weights_t* w_in, const weights_t* w_out, int64_t T,
                        int64_t D, int64_t F, int64_t I, int act, float* y, void* h_keep, int threads) {
  const int64_t kept = kept_rows(offsets, E, N);
  if (kept < 0) return -3;
  for (int64_t r = 0; r < kept; r++)
    if (tok[r] < 0 || tok[r] >= T) return -2;
  const int64_t Dp = w_in->K, Fp = w_out->K; /* stored input widths (>= D, F; larger for padded int4) */
  /* x and a rounded to int8 for the VNNI path (quant_gemm.h): Kq = 0 where the float path runs */
  qrows_t xq = vnni_activation_layout(w_in), aq = vnni_activation_layout(w_out);
  int64_t* bounds = malloc((size_t)(2 * E + 1) * sizeof(int64_t)); /* bounds [E + 1], then used [E] */
  float* xs = malloc((size_t)(kept * (Dp + I + Fp + D) + 1) * sizeof(float)); /* x rows, h, a, o */
  /* bfloat16 weights: the x rows, and act(h) rounded, as bfloat16 too, for the pair dot products of experts
   * with up to 8 rows (decode_gemm.h) */
  const int dp = HAVE_DPBF16 && x_bf16 && w_in->fmt == FMT_BF16;
  uint16_t* xb = dp ? malloc((size_t)(kept * (Dp + Fp) + 1) * sizeof(uint16_t)) : NULL;
  uint16_t* ab = dp ? xb + kept * Dp : NULL;
  /* per row: scales and sums (4 bytes each per group), then the int8 values */
  const int64_t q_in_bytes = kept * (xq.Kq + 8 * xq.groups), q_bytes = q_in_bytes + kept * (aq.Kq + 8 * aq.groups);
  char* qbuf = q_bytes ? malloc((size_t)q_bytes) : NULL;
  if (!bounds || !xs || (q_bytes && !qbuf) || (dp && !xb)) {
    free(bounds);
    free(xs);
    free(qbuf);
    free(xb);
    return -1;
  }
  if (xq.Kq) {
    xq.scale = (float*)qbuf;
    xq.sum = (int32_t*)(xq.scale + kept * xq.groups);
    xq.q = (int8_t*)(xq.sum + kept * xq.groups);
  }
  if (aq.Kq) {
    aq.scale = (float*)(qbuf + q_in_bytes);
    aq.sum = (int32_t*)(aq.scale + kept * aq.groups);
    aq.q = (int8_t*)(aq.sum + kept * aq.groups);
  }
  int64_t* used = bounds + E + 1;
  const int64_t n_used = expert_groups(offsets, E, bounds, used);
  float *h = xs + kept * Dp, *a = h + kept * I, *o = a + kept * Fp;
  const int64_t blocks_in = (I + ROW_BLOCK - 1) / ROW_BLOCK, blocks_out = (D + ROW_BLOCK - 1) / ROW_BLOCK;
  int status = 0;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < kept; r++) {
      float* xr = xs + r * Dp;
      if (x_bf16)
        for (int64_t k = 0; k < D; k++) xr[k] = bf16_to_float(((const uint16_t*)x)[tok[r] * D + k]);
      else
        for (int64_t k = 0; k < D; k++) xr[k] = ((const float*)x)[tok[r] * D + k];
      if (xb) {
        memcpy(xb + r * Dp, (const uint16_t*)x + tok[r] * D, (size_t)D * sizeof(uint16_t));
        for (int64_t k = D; k < Dp; k++) xb[r * Dp + k] = 0;
      }
      for (int64_t k = D; k < Dp; k++) xr[k] = 0.0f;
      if (xq.Kq) quantize_row_q8(xr, D, r, &xq);
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_used * blocks_in; item++)
      if (weights_expert_block(w_in, xs, xq.Kq ? &xq : NULL, xb, h, item, blocks_in, used, bounds))
#pragma omp atomic write
        status = -1;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < kept; r++) {
      if (h_keep) keep_row(h + r * I, I, x_bf16, (char*)h_keep + r * I * (x_bf16 ? 2 : 4));
      sparsemoe_activate_row_f32(h + r * I, a + r * Fp, F, act);
      for (int64_t f = F; f < Fp; f++) a[r * Fp + f] = 0.0f;
      if (ab)
        for (int64_t f = 0; f < Fp; f++) ab[r * Fp + f] = float_to_bf16(a[r * Fp + f]);
      if (aq.Kq) quantize_row_q8(a + r * Fp, F, r, &aq);
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_used * blocks_out; item++)
      if (weights_expert_block(w_out, a, aq.Kq ? &aq : NULL, ab, o, item, blocks_out, used, bounds))
#pragma omp atomic write
        status = -1;
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks_out; block++) { /* each thread owns columns [d0, d1) of y */
      int64_t d0 = block * ROW_BLOCK, d1 = d0 + ROW_BLOCK < D ? d0 + ROW_BLOCK : D;
      for (int64_t t = 0; t < T; t++)
        for (int64_t d = d0; d < d1; d++) y[t * D + d] = 0.0f;
      for (int64_t r = 0; r < kept; r++)
        for (int64_t d = d0; d < d1; d++) y[tok[r] * D + d] += wts[r] * o[r * D + d];
    }
  }
  free(bounds);
  free(xs);
  free(qbuf);
  free(xb);
  return status;
}

/* The decode stage with float32 or bfloat16 weights (x of the same type), h_keep NULL or [N, I] of that type:
 * see decode_stage. */
#define DEFINE_FLOAT_DECODE(SUFFIX, T_, FMT, X_BF16)                                                          \
  int sparsemoe_decode_mlp_##SUFFIX(const T_* x, const int64_t* tok, const float* wts, int64_t N,            \
                                    const int64_t* offsets, int64_t E, const T_* w_in, const T_* w_out,      \
                                    int64_t T, int64_t D, int64_t F, int64_t I, int act, float* y,           \
                                    T_* h_keep, int threads) {                                               \
    const weights_t win = {w_in, NULL, I, D, 0, FMT}, wout = {w_out, NULL, D, F, 0, FMT};                    \
    return decode_stage(x, X_BF16, tok, wts, N, offsets, E, &win, &wout, T, D, F, I, act, y, h_keep,         \
                        threads);                                                                            \
  }
DEFINE_FLOAT_DECODE(f32, float, FMT_F32, 0)
DEFINE_FLOAT_DECODE(bf16, uint16_t, FMT_BF16, 1)
#undef DEFINE_FLOAT_DECODE

/* The plan's stable counting sort by expert (scatter_rows.c). */
int sparsemoe_sort_by_expert(const int64_t* ids, int64_t N, int64_t E, int64_t* order, int64_t* sorted,
                             int64_t* slots, int64_t* counts, int64_t* ends);

/* The plan of N = T * K token-major top-k choices (choice n = t * K + k belongs to token t): tok [N] and
 * sorted_wts [N] in rows grouped by expert (the plan's stable sort), offsets [E] the inclusive ends of each
 * expert's rows. Returns 0, -1 when out of memory, or -4 when an expert id is outside [0, E). */
static int plan_choices(const int64_t* ids, const float* wts, int64_t N, int64_t K, int64_t E, int64_t* tok,
                        float* sorted_wts, int64_t* offsets) {
  for (int64_t n = 0; n < N; n++)
    if (ids[n] < 0 || ids[n] >= E) return -4; /* (E would mark a dropped row: no router's choice) */
  int64_t* order = malloc((size_t)(3 * N + E + 1) * sizeof(int64_t)); /* order, sorted ids, slots [N], counts [E] */
  if (!order) return -1;
  int status = sparsemoe_sort_by_expert(ids, N, E, order, order + N, order + 2 * N, order + 3 * N, offsets);
  for (int64_t row = 0; row < N && !status; row++) {
    tok[row] = order[row] / K;
    sorted_wts[row] = wts[order[row]];
  }
  free(order);
  return status;
}

/* The float decode stage from a router's top-k choices, ids and wts [T * K] token-major, without a plan built
 * in PyTorch (its sort and gathers cost a one-token step more than this): see plan_choices, decode_stage. */
#define DEFINE_CHOICES_DECODE(SUFFIX, T_)                                                                     \
  int sparsemoe_decode_mlp_choices_##SUFFIX(const T_* x, const int64_t* ids, const float* wts, int64_t T,     \
                                            int64_t K, int64_t E, const T_* w_in, const T_* w_out, int64_t D, \
                                            int64_t F, int64_t I, int act, float* y, int threads) {           \
    const int64_t N = T * K;                                                                                  \
    int64_t* rows = malloc((size_t)(N + E + 1) * sizeof(int64_t)); /* tok [N], then offsets [E] */             \
    float* sorted_wts = malloc((size_t)(N + 1) * sizeof(float));                                              \
    int status = rows && sorted_wts ? plan_choices(ids, wts, N, K, E, rows, sorted_wts, rows + N) : -1;       \
    if (!status)                                                                                              \
      status = sparsemoe_decode_mlp_##SUFFIX(x, rows, sorted_wts, N, rows + N, E, w_in, w_out, T, D, F, I, act, \
                                             y, NULL, threads);                                                     \
    free(rows);                                                                                               \
    free(sorted_wts);                                                                                         \
    return status;                                                                                            \
  }
DEFINE_CHOICES_DECODE(f32, float)
DEFINE_CHOICES_DECODE(bf16, uint16_t)
#undef DEFINE_CHOICES_DECODE

/* The decode stage with quantized weights (bits 8 or 4; group: int4 columns per scale), x float32 or
 * (x_bf16) bfloat16: see decode_stage and quant_gemm.h. For int4 the stored input widths are D and F
 * rounded up to multiples of the group. */
int sparsemoe_decode_mlp_quant(const void* x, int x_bf16, const int64_t* tok, const float* wts, int64_t N,
                               const int64_t* offsets, int64_t E, const void* w_in, const void* s_in,
                               const void* w_out, const void* s_out, int bits, int64_t group, int64_t T, int64_t D,
                               int64_t F, int64_t I, int act, float* y, int threads) {
  const int fmt = bits == 8 ? FMT_I8 : FMT_I4;
  const int64_t Dp = bits == 8 ? D : (D + group - 1) / group * group;
  const int64_t Fp = bits == 8 ? F : (F + group - 1) / group * group;
  const weights_t win = {w_in, s_in, I, Dp, group, fmt}, wout = {w_out, s_out, D, Fp, group, fmt};
  return decode_stage(x, x_bf16, tok, wts, N, offsets, E, &win, &wout, T, D, F, I, act, y, NULL, threads);
}

/* The quantized decode stage from a router's top-k choices, ids and wts [T * K] token-major, the rows grouped
 * by expert inside the call (plan_choices; the same rows in the same order as the plan): see
 * sparsemoe_decode_mlp_quant. */
int sparsemoe_decode_mlp_quant_choices(const void* x, int x_bf16, const int64_t* ids, const float* wts, int64_t T,
                                       int64_t K, int64_t E, const void* w_in, const void* s_in, const void* w_out,
                                       const void* s_out, int bits, int64_t group, int64_t D, int64_t F, int64_t I,
                                       int act, float* y, int threads) {
  const int64_t N = T * K;
  int64_t* rows = malloc((size_t)(N + E + 1) * sizeof(int64_t)); /* tok [N], then offsets [E] */
  float* sorted_wts = malloc((size_t)(N + 1) * sizeof(float));
  int status = rows && sorted_wts ? plan_choices(ids, wts, N, K, E, rows, sorted_wts, rows + N) : -1;
  if (!status)
    status = sparsemoe_decode_mlp_quant(x, x_bf16, rows, sorted_wts, N, rows + N, E, w_in, s_in, w_out, s_out, bits,
                                        group, T, D, F, I, act, y, threads);
  free(rows);
  free(sorted_wts);
  return status;
}

/* 1 when quantized weights (int8, and int4 with a group size that is a multiple of 64) run against
 * activations rounded to int8 with VNNI dot products for up to 8 rows per expert (quant_gemm.h), else 0. */
int sparsemoe_vnni_activations_int8(void) { return VNNI; }

/* 1 when bfloat16 weights run on the CPU's bfloat16 pair dot products for up to 8 rows per weight
 * (decode_gemm.h; built where the CPU has AVX512-BF16), else 0. */
int sparsemoe_bfloat16_dot_products(void) { return HAVE_DPBF16; }

/* out [rows, K] (float32, or bfloat16 when out_bf16) = the quantized weight rows dequantized (bits 8: data
 * int8 [rows, K], scale float32 [rows]; bits 4: data packed [rows, Kp / 2], scale bfloat16 [rows, Kp / G]),
 * columns past K dropped. Returns 0, or -1 when out of memory. */
int sparsemoe_dequantize(const void* data, const void* scale, int bits, int64_t rows, int64_t K, int64_t Kp,
                         int64_t group, void* out, int out_bf16, int threads) {
  int status = 0;
#pragma omp parallel num_threads(threads)
  {
    float* row = malloc((size_t)(Kp + VL) * sizeof(float));
    if (!row) status = -1;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      if (!row) continue;
      if (bits == 8) i8_unpack_row((const int8_t*)data + r * K, ((const float*)scale)[r], K, row);
      else q4_unpack_row((const uint8_t*)data + r * (Kp / 2), (const uint16_t*)scale + r * (Kp / group), Kp, group, row);
      if (out_bf16) {
        uint16_t* dst = (uint16_t*)out + r * K;
        int64_t k = 0;
        for (; k + VL <= K; k += VL) store_bf16(dst + k, load(row + k));
        if (k < K) store_part_bf16(dst + k, load(row + k), K - k);
      } else {
        memcpy((float*)out + r * K, row, (size_t)K * sizeof(float));
      }
    }
    free(row);
  }
  return status;
}
