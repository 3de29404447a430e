/* The decode GEMM `y = x W^T` for a handful of input rows, for one weight type: included once per type by
 * decode_mlp.c, like a C++ template (no include guard on purpose). Before including, define (it
 * undefines them at its end)
 *   WT          the weight element type (float, uint16_t holding bfloat16 bits, or int8_t)
 *   WNAME(f)    the name of function f for this type (f_f32, f_bf16, f_i8)
 *   WLOAD(p)    VL weights from p as a float vector
 *   WGET(p)     one weight from p as a float
 *   WNO_LINEAR  (optional) leave out grouped_linear and its [in, out] kernel (the int8 instantiation)
 *   WDP         (optional) the weights are bfloat16: with AVX512-BF16, inputs given as bfloat16 too (xb) run
 *               on the CPU's bfloat16 pair dot products (below)
 * and the type-independent helpers kept_rows and expert_groups (expert_rows.h).
 * Inputs x, outputs y and every sum are float32 whatever the weight type: the weights are widened as they
 * are loaded, so a bfloat16 weight costs half the memory traffic of a float32 one and the same arithmetic.
 *
 * W [O, K] is row-major (nn.Linear's layout); K is the reduction width, x [n, K], y [n, ldy]. */

/* Few rows: one weight row at a time (a single sequential stream) against XB input rows, the k loop
 * unrolled U times so that XB * U accumulators are independent. y[b * ldy] = w . x[j + b].
 * With PF the weights are prefetched PREFETCH_BYTES ahead: the hardware prefetcher stops at page
 * boundaries, and with 4+ rows there is enough arithmetic per weight to hide the extra instructions. */
#define DEFINE_ROW_KERNEL(XB, U, PF)                                                                        \
  static void WNAME(row_##XB)(const WT* w, const float* x, float* y, int64_t K, int64_t j, int64_t rj,    \
                              int64_t ldy) {                                                              \
    const float* xs[XB];                                                                                  \
    for (int b = 0; b < XB; b++) xs[b] = x + (j + (b < rj ? b : 0)) * K;                                  \
    vf acc[XB][U];                                                                                        \
    for (int b = 0; b < XB; b++)                                                                          \
      for (int u = 0; u < U; u++) acc[b][u] = (vf){0};                                                    \
    int64_t k = 0;                                                                                        \
    for (; k + U * VL <= K; k += U * VL)                                                                  \
      for (int u = 0; u < U; u++) {                                                                       \
        vf wv = WLOAD(w + k + u * VL);                                                                    \
        if (PF && u * VL * sizeof(WT) % 64 == 0) /* once per 64-byte line */                             \
          __builtin_prefetch((const char*)(w + k + u * VL) + PREFETCH_BYTES);                             \
        for (int b = 0; b < XB; b++) acc[b][u] += wv * load(xs[b] + k + u * VL);                          \
      }                                                                                                   \
    for (; k + VL <= K; k += VL) {                                                                        \
      vf wv = WLOAD(w + k);                                                                               \
      for (int b = 0; b < XB; b++) acc[b][0] += wv * load(xs[b] + k);                                     \
    }                                                                                                     \
    for (int b = 0; b < rj; b++) {                                                                        \
      vf s = acc[b][0];                                                                                   \
      for (int u = 1; u < U; u++) s += acc[b][u];                                                         \
      float t = hsum(s);                                                                                  \
      for (int64_t kk = k; kk < K; kk++) t += WGET(w + kk) * xs[b][kk];                                   \
      y[(j + b) * ldy] = t;                                                                               \
    }                                                                                                     \
  }
DEFINE_ROW_KERNEL(1, 8, 0)
DEFINE_ROW_KERNEL(2, 4, 0)
DEFINE_ROW_KERNEL(4, 2, 1)
DEFINE_ROW_KERNEL(8, 1, 1)
#undef DEFINE_ROW_KERNEL

#if defined(WDP) && HAVE_DPBF16
/* Few rows of bfloat16 inputs against bfloat16 weights (x exactly bfloat16: a bfloat16 model's activations):
 * the CPU's pair dot products (vdpbf16ps: 32 weights times 32 inputs into 16 float32 sums per instruction)
 * read the weights as stored, where widening them to float32 first costs two instructions per 16 weights and
 * held the row kernels above to about 38 GB/s against 56-60 GB/s of this one (a 184 MB weight at one row, 2
 * threads). The products are exact and the sums float32, in another order than the float kernels (pairs
 * first); bfloat16 denormals read as zero. y[b * ldy] = w . xb[b] for the rj rows b < rj of xb [rj, K]. */
#define DEFINE_DP_ROW_KERNEL(XB, U)                                                                          \
  static void WNAME(dp_row_##XB)(const WT* w, const uint16_t* xb, float* y, int64_t K, int64_t rj,          \
                                 int64_t ldy) {                                                             \
    const uint16_t* xs[XB];                                                                                 \
    for (int b = 0; b < XB; b++) xs[b] = xb + (b < rj ? b : 0) * K;                                         \
    vf acc[XB][U];                                                                                          \
    for (int b = 0; b < XB; b++)                                                                            \
      for (int u = 0; u < U; u++) acc[b][u] = (vf){0};                                                      \
    int64_t k = 0;                                                                                          \
    for (; k + 2 * VL * U <= K; k += 2 * VL * U)                                                            \
      for (int u = 0; u < U; u++) {                                                                         \
        const vbf16x32 wv = load_bf16x32(w + k + 2 * VL * u);                                               \
        __builtin_prefetch((const char*)(w + k + 2 * VL * u) + DP_PREFETCH_BYTES); /* once per 64 bytes */ \
        for (int b = 0; b < XB; b++) acc[b][u] = dot_bf16x32(acc[b][u], wv, load_bf16x32(xs[b] + k + 2 * VL * u)); \
      }                                                                                                     \
    for (; k + 2 * VL <= K; k += 2 * VL) {                                                                  \
      const vbf16x32 wv = load_bf16x32(w + k);                                                              \
      for (int b = 0; b < XB; b++) acc[b][0] = dot_bf16x32(acc[b][0], wv, load_bf16x32(xs[b] + k));         \
    }                                                                                                       \
    for (int b = 0; b < rj; b++) {                                                                          \
      vf s = acc[b][0];                                                                                     \
      for (int u = 1; u < U; u++) s += acc[b][u];                                                           \
      float t = hsum(s);                                                                                    \
      for (int64_t kk = k; kk < K; kk++) t += WGET(w + kk) * bf16_to_float(xs[b][kk]);                      \
      y[b * ldy] = t;                                                                                       \
    }                                                                                                       \
  }
DEFINE_DP_ROW_KERNEL(1, 4)
DEFINE_DP_ROW_KERNEL(2, 2)
DEFINE_DP_ROW_KERNEL(4, 1)
DEFINE_DP_ROW_KERNEL(8, 1)
#undef DEFINE_DP_ROW_KERNEL
#endif

/* More rows (compute starts to matter): RB weight rows against XB input rows per pass, the input vectors
 * pinned in registers (the empty asm stops the compiler from reloading them), so each weight vector feeds
 * XB FMAs.
 * Rows past the ends (ri, rj) repeat the last valid row and are not stored. */
#define DEFINE_TILE_KERNEL(RB, XB)                                                                        \
  static void WNAME(tile_##RB##_##XB)(const WT* W, const float* x, float* y, int64_t K, int64_t i,        \
                                      int64_t ri, int64_t j, int64_t rj, int64_t ldy) {                   \
    const WT* w[RB];                                                                                      \
    const float* xs[XB];                                                                                  \
    for (int a = 0; a < RB; a++) w[a] = W + (i + (a < ri ? a : ri - 1)) * K;                              \
    for (int b = 0; b < XB; b++) xs[b] = x + (j + (b < rj ? b : rj - 1)) * K;                             \
    vf acc[RB][XB];                                                                                       \
    for (int a = 0; a < RB; a++)                                                                          \
      for (int b = 0; b < XB; b++) acc[a][b] = (vf){0};                                                   \
    int64_t k = 0;                                                                                        \
    for (; k + VL <= K; k += VL) {                                                                        \
      vf xv[XB];                                                                                          \
      for (int b = 0; b < XB; b++) {                                                                      \
        xv[b] = load(xs[b] + k);                                                                          \
        PIN(xv[b]);                                                                                       \
      }                                                                                                   \
      for (int a = 0; a < RB; a++) {                                                                      \
        vf wv = WLOAD(w[a] + k);                                                                          \
        for (int b = 0; b < XB; b++) acc[a][b] += wv * xv[b];                                             \
      }                                                                                                   \
    }                                                                                                     \
    for (int a = 0; a < ri; a++)                                                                          \
      for (int b = 0; b < rj; b++) {                                                                      \
        float t = hsum(acc[a][b]);                                                                        \
        for (int64_t kk = k; kk < K; kk++) t += WGET(w[a] + kk) * xs[b][kk];                              \
        y[(j + b) * ldy + i + a] = t;                                                                     \
      }                                                                                                   \
  }
DEFINE_TILE_KERNEL(4, 4)
DEFINE_TILE_KERNEL(4, 3)
DEFINE_TILE_KERNEL(8, 2)
DEFINE_TILE_KERNEL(8, 1)
#undef DEFINE_TILE_KERNEL

/* y[j * ldy + i] = sum_k W[i * K + k] * x[j * K + k]  for weight rows i in [i0, i1), input rows j < n. xb: the
 * same inputs as bfloat16 (exactly: they are bfloat16 values), or NULL; used with WDP. */
static void WNAME(gemm_nt)(const WT* W, const float* x, const uint16_t* xb, float* y, int64_t K, int64_t i0,
                           int64_t i1, int64_t n, int64_t ldy) {
#if defined(WDP) && HAVE_DPBF16
  if (xb && n <= 8) {
    for (int64_t i = i0; i < i1; i++) {
      const WT* w = W + i * K;
      if (n >= 5) WNAME(dp_row_8)(w, xb, y + i, K, n, ldy);
      else if (n >= 3) WNAME(dp_row_4)(w, xb, y + i, K, n, ldy);
      else if (n == 2) WNAME(dp_row_2)(w, xb, y + i, K, n, ldy);
      else WNAME(dp_row_1)(w, xb, y + i, K, n, ldy);
    }
    return;
  }
#else
  (void)xb;
#endif
  if (n <= 8) { /* weights streamed from memory one row at a time: the fastest way to read them */
    for (int64_t i = i0; i < i1; i++) {
      const WT* w = W + i * K;
      if (n >= 5) WNAME(row_8)(w, x, y + i, K, 0, n, ldy);
      else if (n >= 3) WNAME(row_4)(w, x, y + i, K, 0, n, ldy);
      else if (n == 2) WNAME(row_2)(w, x, y + i, K, 0, n, ldy);
      else WNAME(row_1)(w, x, y + i, K, 0, n, ldy);
    }
    return;
  }
  for (int64_t j = 0; j < n; j += 4) { /* the [i0, i1) block of W stays in L2 across the passes */
    int64_t rj = n - j < 4 ? n - j : 4;
    int64_t rb = rj >= 3 ? 4 : 8;
    for (int64_t i = i0; i < i1; i += rb) {
      int64_t ri = i1 - i < rb ? i1 - i : rb;
      if (rj == 4) WNAME(tile_4_4)(W, x, y, K, i, ri, j, rj, ldy);
      else if (rj == 3) WNAME(tile_4_3)(W, x, y, K, i, ri, j, rj, ldy);
      else if (rj == 2) WNAME(tile_8_2)(W, x, y, K, i, ri, j, rj, ldy);
      else WNAME(tile_8_1)(W, x, y, K, i, ri, j, rj, ldy);
    }
  }
}

/* Work item `item` of a GEMM over the experts with rows (`used`, split into `blocks` blocks of ROW_BLOCK
 * weight rows each): for expert e = used[item / blocks] and its block of rows [o0, o1) of W [E, O, K],
 * y[r * O + o] = W[e, o] . x[r] for the expert's rows r in [bounds[e], bounds[e + 1]); xb as in gemm_nt. */
static void WNAME(expert_block)(const WT* W, const float* x, const uint16_t* xb, float* y, int64_t K, int64_t O,
                                int64_t item, int64_t blocks, const int64_t* used, const int64_t* bounds) {
  int64_t e = used[item / blocks], o0 = (item % blocks) * ROW_BLOCK;
  int64_t o1 = o0 + ROW_BLOCK < O ? o0 + ROW_BLOCK : O, lo = bounds[e];
  WNAME(gemm_nt)(W + e * O * K, x + lo * K, xb ? xb + lo * K : NULL, y + lo * O, K, o0, o1, bounds[e + 1] - lo, O);
}

#ifndef WNO_LINEAR /* the [in, out]-stored GEMM and grouped_linear: float32 and bfloat16 weights only */
/* Work item `item` of the [in, out]-stored GEMM: expert e = used[item / chunks] and its weight rows
 * [k0, k1) (a K_CHUNK of W [E, K, O]) add x[r, k] W[e, k, :] into acc[r, :] for the expert's rows r. Each
 * weight row is one contiguous stream read once; acc (this thread's partial sums, a few rows of O floats)
 * stays in cache. */
static void WNAME(expert_chunk_kn)(const WT* W, const float* x, float* acc, int64_t K, int64_t O, int64_t item,
                                   int64_t chunks, const int64_t* used, const int64_t* bounds) {
  int64_t e = used[item / chunks], k0 = (item % chunks) * K_CHUNK;
  int64_t k1 = k0 + K_CHUNK < K ? k0 + K_CHUNK : K, lo = bounds[e], hi = bounds[e + 1];
  const int64_t vec_end = O / VL * VL;
  for (int64_t k = k0; k < k1; k++) {
    const WT* w = W + (e * K + k) * O;
    for (int64_t r = lo; r < hi; r++) {
      const float xk = x[r * K + k];
      const vf xv = splat(xk);
      float* a = acc + r * O;
      int64_t o = 0;
      for (; o + 4 * VL <= vec_end; o += 4 * VL) {
        vf w0 = WLOAD(w + o), w1 = WLOAD(w + o + VL), w2 = WLOAD(w + o + 2 * VL), w3 = WLOAD(w + o + 3 * VL);
        store(a + o, load(a + o) + w0 * xv);
        store(a + o + VL, load(a + o + VL) + w1 * xv);
        store(a + o + 2 * VL, load(a + o + 2 * VL) + w2 * xv);
        store(a + o + 3 * VL, load(a + o + 3 * VL) + w3 * xv);
      }
      for (; o < vec_end; o += VL) store(a + o, load(a + o) + WLOAD(w + o) * xv);
      for (; o < O; o++) a[o] += xk * WGET(w + o);
    }
  }
}

/* y [N, O] float32 = one linear layer per expert over rows sorted by expert (rows [offsets[e - 1],
 * offsets[e]) belong to expert e, offsets[-1] = 0): y[r] = W[e] x[r], with W [E, O, K] row-major (nn.Linear's
 * layout) or, when `kn`, W [E, K, O] (stored [in, out]); x [N, K] float32. Only the experts with rows are
 * read, each weight once per block of rows; rows past offsets[E - 1] are set to zero. [out, in]: work split
 * over threads by (expert, block of weight rows). [in, out]: by (expert, chunk of K weight rows), each
 * thread summing into its own partial y, added up at the end. Returns 0, -1 when out of memory, -3 when
 * the offsets decrease or pass N. */
int WNAME(sparsemoe_grouped_linear)(const float* x, int64_t N, const int64_t* offsets, int64_t E, const WT* w,
                                    int64_t O, int64_t K, int kn, float* y, int threads) {
  const int64_t kept = kept_rows(offsets, E, N);
  if (kept < 0) return -3;
  if (threads < 1) threads = 1;
  int64_t* bounds = malloc((size_t)(2 * E + 1) * sizeof(int64_t)); /* bounds [E + 1], then used [E] */
  float* partial = kn ? calloc((size_t)(threads * kept * O + 1), sizeof(float)) : NULL; /* [threads, kept, O] */
  if (!bounds || (kn && !partial)) {
    free(bounds);
    free(partial);
    return -1;
  }
  int64_t* used = bounds + E + 1;
  const int64_t n_used = expert_groups(offsets, E, bounds, used);
  for (int64_t r = kept; r < N; r++)
    for (int64_t o = 0; o < O; o++) y[r * O + o] = 0.0f;
  if (!kn) {
    const int64_t blocks = (O + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < n_used * blocks; item++)
      WNAME(expert_block)(w, x, NULL, y, K, O, item, blocks, used, bounds);
  } else {
    const int64_t chunks = (K + K_CHUNK - 1) / K_CHUNK;
#pragma omp parallel num_threads(threads)
    {
      int t = 0;
#ifdef _OPENMP
      t = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
      for (int64_t item = 0; item < n_used * chunks; item++)
        WNAME(expert_chunk_kn)(w, x, partial + t * kept * O, K, O, item, chunks, used, bounds);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < kept; r++)
        for (int64_t o = 0; o < O; o++) {
          float s = 0.0f;
          for (int u = 0; u < threads; u++) s += partial[(u * kept + r) * O + o];
          y[r * O + o] = s;
        }
    }
  }
  free(bounds);
  free(partial);
  return 0;
}


/* Several linear layers of one input in one parallel region: y_j = x W_j^T for j < J, with W_j [O_j, K]
 * row-major, x [n, K] float32 or, with x_bf16, bfloat16, and each y_j [n, O_j] float32 or, with y_bf16,
 * bfloat16 rounded once to nearest-even. The work items are the blocks of ROW_BLOCK rows of every weight in
 * turn, so that small projections of one input (an attention layer's q, k and v) share one pass over the
 * threads instead of one each. For a few rows n (a decode step); returns 0, or -1 when out of memory. */
int WNAME(sparsemoe_linear_many)(const void* x_in, int x_bf16, int64_t n, int64_t K, int64_t J, const WT* const* w,
                                 const int64_t* O, void* const* y, int y_bf16, int threads) {
  if (n <= 0) return 0; /* nothing to compute (and x may hold no memory at all) */
  if (threads < 1) threads = 1;
  int64_t* first = malloc((size_t)(2 * J + 2) * sizeof(int64_t)); /* first block [J + 1], then first column */
  if (!first) return -1;
  int64_t* column = first + J + 1; /* weight j's outputs start at column[j] of the [n, sum O] scratch */
  first[0] = column[0] = 0;
  for (int64_t j = 0; j < J; j++) {
    first[j + 1] = first[j] + (O[j] + ROW_BLOCK - 1) / ROW_BLOCK;
    column[j + 1] = column[j] + O[j];
  }
  float* xf = x_bf16 ? malloc((size_t)(n * K + 1) * sizeof(float)) : NULL;
  float* scratch = y_bf16 ? malloc((size_t)(n * column[J] + 1) * sizeof(float)) : NULL;
  if ((x_bf16 && !xf) || (y_bf16 && !scratch)) {
    free(first);
    free(xf);
    free(scratch);
    return -1;
  }
  if (x_bf16)
    for (int64_t i = 0; i < n * K; i++) xf[i] = bf16_to_float(((const uint16_t*)x_in)[i]);
  const float* x = x_bf16 ? xf : (const float*)x_in;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < first[J]; item++) {
    int64_t j = 0;
    while (item >= first[j + 1]) j++;
    const int64_t o0 = (item - first[j]) * ROW_BLOCK, o1 = o0 + ROW_BLOCK < O[j] ? o0 + ROW_BLOCK : O[j];
    float* yj = y_bf16 ? scratch + n * column[j] : (float*)y[j];
    WNAME(gemm_nt)(w[j], x, x_bf16 ? (const uint16_t*)x_in : NULL, yj, K, o0, o1, n, O[j]);
    if (y_bf16)
      for (int64_t r = 0; r < n; r++)
        for (int64_t o = o0; o < o1; o++) ((uint16_t*)y[j])[r * O[j] + o] = float_to_bf16(yj[r * O[j] + o]);
  }
  free(first);
  free(xf);
  free(scratch);
  return 0;
}

#endif

/* The parameters are this instantiation's only: the next one defines its own. */
#undef WT
#undef WNAME
#undef WLOAD
#undef WGET
#undef WNO_LINEAR
#undef WDP
