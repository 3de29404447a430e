/* The expert stage's backward for a few rows per expert (the training step of a small batch), float32 or
 * bfloat16, in one call: every weight read once and every weight gradient written once.
 *
 * Legend: T tokens, D model width, F hidden width, I in-projection rows (2F gated: gate then up), E experts,
 * N plan rows sorted by expert (expert_rows.h), n rows of one expert.
 *
 *     forward:   y[tok[r]] += wts[r] * W_out[e] act(h[r]),   h[r] = W_in[e] x[tok[r]]   (rows r of expert e)
 *     g = d loss / d y [T, D], G[r] = g[tok[r]]
 *     dA[r]      = G[r] W_out[e]                 (d loss / d act(h) before the weighting; [n, F])
 *     d w_out[e] = sum_r (wts[r] G[r])^T act(h[r])     (n outer products, [D, F])
 *     dH, d wts  from h, dA and wts: the activation's backward (activation_rows.h)
 *     dx[tok[r]] += dH[r] W_in[e]                (W_in [I, D])
 *     d w_in[e]  = sum_r dH[r]^T x[tok[r]]           ([I, D])
 *
 * With a handful of rows per expert the per-expert BLAS calls run far below the memory bound (a weight
 * gradient of 1-4 rows is an outer product, a GEMM with a reduction width of 1-4), and a layer of 64 experts
 * costs some 400 PyTorch calls. Here each product is a pass over its weight (the input gradients: W_out and
 * W_in streamed by blocks of columns, the few rows' sums kept in L1; from TILE_FROM rows four rows at a time,
 * their sums in registers) or over its gradient (the outer products: four gradient rows at a time, the rows'
 * vectors in L1), with OpenMP threads over (expert with rows, block);
 * no sum is split between threads, so the result does not depend on the thread count. Experts without rows
 * get zero gradients. Inputs are widened to float32 as they are read, every sum is float32, and each
 * bfloat16 output is rounded once.
 *
 * Exported: sparsemoe_expert_backward_f32 and _bf16 (below). The forward that saves h is the decode kernel's
 * (decode_mlp.c, h_keep).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activation.h"
#include "expert_rows.h"
#include "vec.h"

#define COL_VECTORS 8 /* vectors of columns per work item of the input-gradient products (128 floats) */
#define GRAD_ROWS 32  /* gradient rows per work item of the outer products */
#define TILE_FROM 6   /* rows of an expert from which the input-side products run tiled */

static inline int64_t padded(int64_t K) { return (K + 2 * VL - 1) / (2 * VL) * (2 * VL); } /* row widths of the scratch */

/* The template below for one weight type: float32 and bfloat16 (uint16_t). */
#define DEFINE_EXPERT_BACKWARD(WT, SUFFIX, WLOAD, WLOAD_PART, WSTORE, WSTORE_PART, WIDEN)                          \
  /* out[r, c0 : c0 + nv VL] = sum_k in[r, k] W[k, c0 : ...] for r < n: W [K, C] row-major (the columns past C    \
   * read as zero), in [n, ldi] and out [n, ldo] float32 with ldo a multiple of VL. The nv weight vectors of a   \
   * row k stay in registers while every row's sums (in L1) take them. */                                       \
  static inline __attribute__((always_inline)) void rows_times_weight_##SUFFIX(                                  \
      const WT* W, int64_t K, int64_t C, const float* in, int64_t ldi, int64_t n, float* out, int64_t ldo,       \
      int64_t c0, const int nv) {                                                                                \
    for (int64_t r = 0; r < n; r++) memset(out + r * ldo + c0, 0, (size_t)nv * VL * sizeof(float));             \
    for (int64_t k = 0; k < K; k++) {                                                                            \
      const WT* wk = W + k * C + c0;                                                                             \
      vf wv[COL_VECTORS];                                                                                        \
      for (int v = 0; v < nv; v++) {                                                                             \
        const int64_t m = C - c0 - v * VL;                                                                       \
        wv[v] = m >= VL ? WLOAD(wk + v * VL) : WLOAD_PART(wk + v * VL, m);                                       \
      }                                                                                                          \
      for (int64_t r = 0; r < n; r++) {                                                                          \
        const vf s = splat(in[r * ldi + k]);                                                                     \
        float* o = out + r * ldo + c0;                                                                           \
        for (int v = 0; v < nv; v++) store(o + v * VL, load(o + v * VL) + s * wv[v]);                            \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  /* The same product for more rows (compute starts to matter): four rows by two vectors of columns at a time, \
   * their sums in registers over the whole of k, the weight's block (K x nv VL, in L2 after the first four     \
   * rows) read again for each four. The last group repeats its last row and stores only the rows it has. */    \
  static void rows_times_weight_tiled_##SUFFIX(const WT* W, int64_t K, int64_t C, const float* in, int64_t ldi,   \
                                               int64_t n, float* out, int64_t ldo, int64_t c0, int nv) {          \
    for (int64_t r = 0; r < n; r += 4) {                                                                         \
      const int64_t m = n - r < 4 ? n - r : 4;                                                                   \
      const float* x[4];                                                                                         \
      for (int q = 0; q < 4; q++) x[q] = in + (r + (q < m ? q : m - 1)) * ldi;                                    \
      for (int v = 0; v < nv; v += 2) {                                                                          \
        const int64_t c = c0 + v * VL, w0 = C - c, w1 = w0 - VL; /* columns left from each of the two vectors */ \
        vf acc[4][2];                                                                                            \
        for (int q = 0; q < 4; q++) acc[q][0] = acc[q][1] = splat(0.0f);                                         \
        for (int64_t k = 0; k < K; k++) {                                                                        \
          const WT* wk = W + k * C + c;                                                                          \
          const vf a = w0 >= VL ? WLOAD(wk) : WLOAD_PART(wk, w0);                                                \
          const vf b = w1 >= VL ? WLOAD(wk + VL) : w1 > 0 ? WLOAD_PART(wk + VL, w1) : splat(0.0f);               \
          for (int q = 0; q < 4; q++) {                                                                          \
            const vf s = splat(x[q][k]);                                                                         \
            acc[q][0] += s * a;                                                                                  \
            acc[q][1] += s * b;                                                                                  \
          }                                                                                                      \
        }                                                                                                        \
        for (int64_t q = 0; q < m; q++) {                                                                        \
          store(out + (r + q) * ldo + c, acc[q][0]);                                                             \
          store(out + (r + q) * ldo + c + VL, acc[q][1]);                                                        \
        }                                                                                                        \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  /* The block of columns `block` (COL_VECTORS vectors wide; the last one narrower) of rows_times_weight: the    \
   * streaming form for up to TILE_FROM - 1 rows (the weight read once, from memory), else the tiled one. */      \
  static void column_block_##SUFFIX(const WT* W, int64_t K, int64_t C, const float* in, int64_t ldi, int64_t n,  \
                                    float* out, int64_t ldo, int64_t block) {                                    \
    const int64_t c0 = block * COL_VECTORS * VL, left = (C - c0 + VL - 1) / VL;                                  \
    if (n >= TILE_FROM) rows_times_weight_tiled_##SUFFIX(W, K, C, in, ldi, n, out, ldo, c0, (int)(left < COL_VECTORS ? left : COL_VECTORS)); \
    else if (left >= COL_VECTORS) rows_times_weight_##SUFFIX(W, K, C, in, ldi, n, out, ldo, c0, COL_VECTORS);    \
    else rows_times_weight_##SUFFIX(W, K, C, in, ldi, n, out, ldo, c0, (int)left);                               \
  }                                                                                                              \
  /* out[i, :C] = sum_r a[r, i] b[r, :C] for gradient rows i in [i0, i1), r < n: a [n, lda], b [n, ldb] float32  \
   * (b's columns past C zero, ldb a multiple of 2 VL), out [., C] stored as WT; four rows by two vectors at a  \
   * time (the last group repeats its last row and stores only the rows it has). */                             \
  static void outer_rows_##SUFFIX(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t C, \
                                  WT* out, int64_t i0, int64_t i1) {                                             \
    for (int64_t i = i0; i < i1; i += 4) {                                                                       \
      const int64_t m = i1 - i < 4 ? i1 - i : 4;                                                                 \
      const int64_t q1 = m > 1 ? 1 : 0, q2 = m > 2 ? 2 : m - 1, q3 = m - 1;                                      \
      for (int64_t c = 0; c < C; c += 2 * VL) {                                                                  \
        vf s[4][2];                                                                                              \
        for (int q = 0; q < 4; q++) s[q][0] = s[q][1] = splat(0.0f);                                             \
        for (int64_t r = 0; r < n; r++) {                                                                        \
          const vf b0 = load(b + r * ldb + c), b1 = load(b + r * ldb + c + VL);                                  \
          const float* ar = a + r * lda + i;                                                                     \
          const vf a0 = splat(ar[0]), a1 = splat(ar[q1]), a2 = splat(ar[q2]), a3 = splat(ar[q3]);                \
          s[0][0] += a0 * b0, s[0][1] += a0 * b1, s[1][0] += a1 * b0, s[1][1] += a1 * b1;                        \
          s[2][0] += a2 * b0, s[2][1] += a2 * b1, s[3][0] += a3 * b0, s[3][1] += a3 * b1;                        \
        }                                                                                                        \
        for (int64_t q = 0; q < m; q++)                                                                          \
          for (int v = 0; v < 2; v++) {                                                                          \
            const int64_t cv = c + v * VL, cw = C - cv < VL ? C - cv : VL;                                       \
            if (cw == VL) WSTORE(out + (i + q) * C + cv, s[q][v]);                                               \
            else if (cw > 0) WSTORE_PART(out + (i + q) * C + cv, s[q][v], cw);                                   \
          }                                                                                                      \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  /* Inside the parallel region, one weight's two products for every expert with rows (W, dW [E, K, C]):        \
   * out = in W (an input-side gradient, by blocks of columns, no barrier after) and dW = a^T b (the weight     \
   * gradient as outer products, by blocks of GRAD_ROWS rows; a barrier after). in [., ldi] and a [., lda]     \
   * have K columns, out [., ldo] and b [., ldb] C, rows sorted by expert. */                                    \
  static void weight_pass_##SUFFIX(const WT* W, WT* dW, int64_t K, int64_t C, const float* in, int64_t ldi,       \
                                   float* out, int64_t ldo, const float* a, int64_t lda, const float* b,          \
                                   int64_t ldb, const int64_t* used, int64_t n_used, const int64_t* bounds) {     \
    const int64_t c_blocks = (C + COL_VECTORS * VL - 1) / (COL_VECTORS * VL), k_rows = (K + GRAD_ROWS - 1) / GRAD_ROWS; \
    _Pragma("omp for schedule(static) nowait") for (int64_t item = 0; item < n_used * c_blocks; item++) {        \
      const int64_t e = used[item / c_blocks], lo = bounds[e];                                                   \
      column_block_##SUFFIX(W + e * K * C, K, C, in + lo * ldi, ldi, bounds[e + 1] - lo, out + lo * ldo, ldo,    \
                            item % c_blocks);                                                                    \
    }                                                                                                            \
    _Pragma("omp for schedule(static)") for (int64_t item = 0; item < n_used * k_rows; item++) {                 \
      const int64_t e = used[item / k_rows], lo = bounds[e], i0 = item % k_rows * GRAD_ROWS;                     \
      outer_rows_##SUFFIX(a + lo * lda, lda, b + lo * ldb, ldb, bounds[e + 1] - lo, C, dW + e * K * C, i0,       \
                          i0 + GRAD_ROWS < K ? i0 + GRAD_ROWS : K);                                              \
    }                                                                                                            \
  }                                                                                                              \
  /* dst [padded(K)] float32 = src [K] widened, the padding zero. */                                        \
  static void widen_row_##SUFFIX(const WT* src, int64_t K, float* dst) {                                         \
    for (int64_t k = 0; k < K; k++) dst[k] = WIDEN(src[k]);                                                      \
    for (int64_t k = K; k < padded(K); k++) dst[k] = 0.0f;                                                       \
  }                                                                                                              \
  /* The backward of the expert stage (the file's comment) for plan rows sorted by expert: g, x [T, D]; tok,     \
   * wts [N] (float32); w_in [E, I, D], w_out [E, D, F]; h [N, I] the forward's in-projection outputs. Writes dx  \
   * [T, D] float32, d_wts [N] float32 (zero past the kept rows), dw_in [E, I, D] and dw_out [E, D, F]. Returns \
   * 0, -1 when out of memory, -2 when a kept row's token id is outside [0, T), -3 when the offsets decrease    \
   * or pass N. */                                                                                               \
  int sparsemoe_expert_backward_##SUFFIX(const WT* g, const WT* x, const int64_t* tok, const float* wts,        \
                                         int64_t N, const int64_t* offsets, int64_t E, const WT* w_in,           \
                                         const WT* w_out, const WT* h, int64_t T, int64_t D, int64_t F,          \
                                         int64_t I, int act, float* dx, float* d_wts, WT* dw_in, WT* dw_out,     \
                                         int threads) {                                                          \
    const int64_t kept = kept_rows(offsets, E, N);                                                               \
    if (kept < 0) return -3;                                                                                     \
    for (int64_t r = 0; r < kept; r++)                                                                           \
      if (tok[r] < 0 || tok[r] >= T) return -2;                                                                  \
    if (threads < 1) threads = 1;                                                                                \
    const int64_t Dp = padded(D), Fp = padded(F), Ip = padded(I);                                                \
    int64_t* bounds = malloc((size_t)(3 * E + 1) * sizeof(int64_t)); /* bounds [E + 1], used [E], unused [E] */  \
    /* per kept row: x, G (then dx's rows), wts G, h, act(h) (then scratch), dA, dH */                            \
    float* buf = malloc((size_t)(kept * (3 * Dp + 2 * Ip + 2 * Fp) + 1) * sizeof(float));                        \
    if (!bounds || !buf) {                                                                                       \
      free(bounds);                                                                                              \
      free(buf);                                                                                                 \
      return -1;                                                                                                 \
    }                                                                                                            \
    int64_t *used = bounds + E + 1, *unused = used + E;                                                          \
    const int64_t n_used = expert_groups(offsets, E, bounds, used);                                              \
    int64_t n_unused = 0;                                                                                        \
    for (int64_t e = 0; e < E; e++)                                                                              \
      if (bounds[e + 1] == bounds[e]) unused[n_unused++] = e;                                                    \
    float *xs = buf, *gs = xs + kept * Dp, *gw = gs + kept * Dp, *hs = gw + kept * Dp, *dH = hs + kept * Ip;      \
    float *a = dH + kept * Ip, *dA = a + kept * Fp;                                                              \
    _Pragma("omp parallel num_threads(threads)") {                                                               \
      _Pragma("omp for schedule(static)") for (int64_t r = 0; r < kept; r++) {                                   \
        widen_row_##SUFFIX(x + tok[r] * D, D, xs + r * Dp);                                                      \
        widen_row_##SUFFIX(g + tok[r] * D, D, gs + r * Dp);                                                      \
        for (int64_t k = 0; k < Dp; k++) gw[r * Dp + k] = wts[r] * gs[r * Dp + k];                               \
        widen_row_##SUFFIX(h + r * I, I, hs + r * Ip);                                                           \
        memset(dH + r * Ip, 0, (size_t)Ip * sizeof(float));                                                      \
        sparsemoe_activate_row_f32(hs + r * Ip, a + r * Fp, F, act);                                             \
        for (int64_t f = F; f < Fp; f++) a[r * Fp + f] = 0.0f;                                                   \
      }                                                                                                          \
      /* dA = G W_out[e]; d w_out[e] = (wts G)^T act(h) */                                                     \
      weight_pass_##SUFFIX(w_out, dw_out, D, F, gs, Dp, dA, Fp, gw, Dp, a, Fp, used, n_used, bounds);            \
      /* dH and d wts (act(h) is no longer needed: its rows take the activation's w act(h), unused) */           \
      _Pragma("omp for schedule(static)") for (int64_t r = 0; r < kept; r++)                                     \
        d_wts[r] = sparsemoe_activation_backward_row_f32(hs + r * Ip, dA + r * Fp, wts[r], a + r * Fp,          \
                                                         dH + r * Ip, F, act);                                   \
      /* dx's rows = dH W_in[e] (into G's rows); d w_in[e] = dH^T x */                                           \
      weight_pass_##SUFFIX(w_in, dw_in, I, D, dH, Ip, gs, Dp, dH, Ip, xs, Dp, used, n_used, bounds);             \
      _Pragma("omp for schedule(static)") for (int64_t u = 0; u < n_unused; u++) {                               \
        memset(dw_in + unused[u] * I * D, 0, (size_t)(I * D) * sizeof(WT));                                      \
        memset(dw_out + unused[u] * D * F, 0, (size_t)(D * F) * sizeof(WT));                                     \
      }                                                                                                          \
      /* dx [T, D] = the sum of each token's rows, by blocks of columns, rows in order */                        \
      _Pragma("omp for schedule(static)") for (int64_t c0 = 0; c0 < D; c0 += VL) {                               \
        const int64_t c1 = c0 + VL < D ? c0 + VL : D;                                                            \
        for (int64_t t = 0; t < T; t++)                                                                          \
          for (int64_t c = c0; c < c1; c++) dx[t * D + c] = 0.0f;                                                \
        for (int64_t r = 0; r < kept; r++)                                                                       \
          for (int64_t c = c0; c < c1; c++) dx[tok[r] * D + c] += gs[r * Dp + c];                                \
      }                                                                                                          \
    }                                                                                                            \
    for (int64_t r = kept; r < N; r++) d_wts[r] = 0.0f;                                                          \
    free(bounds);                                                                                                \
    free(buf);                                                                                                   \
    return 0;                                                                                                    \
  }

#define IDENTITY(v) (v)
DEFINE_EXPERT_BACKWARD(float, f32, load, load_part, store, store_part, IDENTITY)
DEFINE_EXPERT_BACKWARD(uint16_t, bf16, load_bf16, load_part_bf16, store_bf16, store_part_bf16, bf16_to_float)
#undef IDENTITY
#undef DEFINE_EXPERT_BACKWARD
