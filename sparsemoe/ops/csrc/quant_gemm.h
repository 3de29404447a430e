/* Quantized expert weights for the decode kernel (layouts: sparsemoe/quant/schemes.py). Included once by
 * decode_mlp.c after the float32 and int8 instantiations of decode_gemm.h, whose GEMMs it reuses.
 *
 *   int8   q [E, O, K] int8, scale [E, O] float32: w[e, o, k] = q[e, o, k] * scale[e, o]. decode_gemm.h's
 *          int8 instantiation sums q * x (the int8 values widened in registers), then the block's outputs
 *          are multiplied by their row's scale.
 *   int4   packed [E, O, Kp / 2] uint8, scale [E, O, Kp / G] bfloat16: w = (u - 8) * scale[e, o, k / G] with u
 *          the four-bit value of column k; each 32-column block is 16 bytes, byte j holding column j (low
 *          bits) and column 16 + j (high bits). One group's 16 possible weight values (u - 8) * scale are
 *          put in a vector once, and each weight is then one table lookup (AVX-512: a permute, which reads
 *          only the low four bits of each lane); other CPUs compute (u - 8) * scale.
 * With up to 8 rows per expert the int4 rows are read once from memory against all the rows; with more,
 * each block of weight rows is unpacked to float32 once (it stays in L2) and the float32 tiles run on it.
 */

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_I8 = 2, FMT_I4 = 3 };

/* One stacked weight as the decode stage reads it. */
typedef struct {
  const void* w;     /* [E, O, K] float32 / bfloat16 / int8, or [E, O, K / 2] packed int4 */
  const void* scale; /* int8: float32 [E, O]; int4: bfloat16 bits [E, O, K / G]; otherwise unused */
  int64_t O, K, G;   /* K: the stored input width (for int4 a multiple of G, zero weights past the real one) */
  int fmt;
} weights_t;

/* The group's table: lane u holds (u - 8) * s. */
static inline vf q4_table(float s) {
  const vf base = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
  return base * splat(s);
}

/* The weights of the 16 lanes of u (four-bit values in the low bits, higher bits ignored). */
static inline vf q4_lookup(vi u, vf table, vf s) {
#if defined(__AVX512F__)
  (void)s;
  return _mm512_permutexvar_ps((__m512i)u, table);
#else
  (void)table;
  return (__builtin_convertvector(u & 15, vf) - splat(8.0f)) * s;
#endif
}

/* One int4 weight row (Kp / 2 bytes wq, Kp / G scales s) against XB input rows x [.., Kp] (rows past rj
 * repeat row 0 and are not stored): y[b * ldy] = w . x[b]. NP independent accumulator pairs per row (2 when
 * there are few rows, so that the FMA latency is hidden). */
#define Q4_BLOCK(kk, p, XB, NP)                                                                  \
  do {                                                                                    \
    vi u = load_u8x16(wq + (kk) / 2);                                                     \
    vf lo = q4_lookup(u, tab, sv), hi = q4_lookup(u >> 4, tab, sv);                       \
    for (int b = 0; b < XB; b++) {                                                        \
      acc[b][2 * ((p) % NP)] += lo * load(xs[b] + (kk));                                  \
      acc[b][2 * ((p) % NP) + 1] += hi * load(xs[b] + (kk) + 16);                         \
    }                                                                                     \
  } while (0)
#define DEFINE_Q4_ROW(XB, NP)                                                                               \
  static void q4_row_##XB(const uint8_t* wq, const uint16_t* s, const float* x, float* y, int64_t Kp,       \
                          int64_t G, int64_t rj, int64_t ldy) {                                             \
    const float* xs[XB];                                                                                    \
    for (int b = 0; b < XB; b++) xs[b] = x + (b < rj ? b : 0) * Kp;                                         \
    vf acc[XB][2 * NP];                                                                                     \
    for (int b = 0; b < XB; b++)                                                                            \
      for (int u = 0; u < 2 * NP; u++) acc[b][u] = (vf){0};                                                 \
    int64_t k = 0;                                                                                          \
    for (int64_t g = 0; g < Kp / G; g++) {                                                                  \
      const float sg = bf16_to_float(s[g]);                                                                 \
      const vf tab = q4_table(sg), sv = splat(sg);                                                          \
      const int64_t end = k + G;                                                                            \
      for (; k + 64 <= end; k += 64) {                                                                      \
        Q4_BLOCK(k, 0, XB, NP);                                                                                     \
        Q4_BLOCK(k + 32, 1, XB, NP);                                                                                \
      }                                                                                                     \
      if (k < end) {                                                                                        \
        Q4_BLOCK(k, 0, XB, NP);                                                                                     \
        k += 32;                                                                                            \
      }                                                                                                     \
    }                                                                                                       \
    for (int b = 0; b < rj; b++) {                                                                          \
      vf t = acc[b][0];                                                                                     \
      for (int u = 1; u < 2 * NP; u++) t += acc[b][u];                                                      \
      y[b * ldy] = hsum(t);                                                                                 \
    }                                                                                                       \
  }
DEFINE_Q4_ROW(1, 2)
DEFINE_Q4_ROW(2, 2)
DEFINE_Q4_ROW(4, 1)
DEFINE_Q4_ROW(8, 1)
#undef DEFINE_Q4_ROW
#undef Q4_BLOCK

/* One int4 weight row unpacked to float32: out [Kp] = (u - 8) * scale. */
static void q4_unpack_row(const uint8_t* wq, const uint16_t* s, int64_t Kp, int64_t G, float* out) {
  for (int64_t g = 0, k = 0; g < Kp / G; g++) {
    const float sg = bf16_to_float(s[g]);
    const vf tab = q4_table(sg), sv = splat(sg);
    for (const int64_t end = k + G; k < end; k += 32) {
      vi u = load_u8x16(wq + k / 2);
      store(out + k, q4_lookup(u, tab, sv));
      store(out + k + 16, q4_lookup(u >> 4, tab, sv));
    }
  }
}

/* One int8 weight row dequantized: out [K] = q * s. */
static void i8_unpack_row(const int8_t* q, float s, int64_t K, float* out) {
  int64_t k = 0;
  for (; k + VL <= K; k += VL) store(out + k, load_i8(q + k) * splat(s));
  for (; k < K; k++) out[k] = (float)q[k] * s;
}

/* With AVX-512 VNNI, quantized weights against a few rows run on integer dot products (vpdpbusd: 64
 * multiply-adds of unsigned by signed bytes per instruction), as llama.cpp runs its formats: each activation
 * row is rounded to int8 per group of columns (scale = max|x| / 127, round half to even; the group is the
 * weights' for int4, 64 columns for int8), which the float path does not do (relative error at most 1/254
 * of the group's largest value). The unsigned operand carries an offset that one sum per group removes:
 *   int4  u = q + 8 in [0, 15]:             sum_k q_k x_k = sum_k u_k x_k - 8 sum_k x_k
 *   int8  u = q + 128 (the sign bit flipped): sum_k q_k x_k = sum_k u_k x_k - 128 sum_k x_k
 * with sum_k x_k of the int8 activations computed once per row and group. Taken for up to 8 rows per
 * expert; for int4 when the group size is a multiple of 64 (the default). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VNNI 1
#else
#define VNNI 0
#endif
#define Q8_GROUP 64 /* activation columns per scale against int8 weights */

/* Activation rows rounded to int8 for the VNNI path: q [n, Kq] (Kq = the width rounded up to a whole
 * number of groups, zeros past the real width; for int4 each 64-column chunk in the order of the unpacked
 * weights: columns 0-15, 32-47, 16-31, 48-63), scale [n, Kq / G], sum [n, Kq / G] of q. */
typedef struct {
  int8_t* q;
  float* scale;
  int32_t* sum;
  int64_t Kq, G;
  int nibble_order;
} qrows_t;

/* (Kq, G) of the activations the VNNI path needs for W, or Kq = 0 when W runs on the float path. */
static void vnni_activation_layout(const weights_t* W, int64_t* Kq, int64_t* G) {
  *Kq = 0;
  *G = 1;
  if (!VNNI) return;
  if (W->fmt == FMT_I4 && W->G % 64 == 0) {
    *Kq = W->K;
    *G = W->G;
  } else if (W->fmt == FMT_I8) {
    *Kq = (W->K + Q8_GROUP - 1) / Q8_GROUP * Q8_GROUP;
    *G = Q8_GROUP;
  }
}

#if VNNI
/* Row r of the activations (K values at x) rounded into rows (see qrows_t). A non-finite group gets its
 * largest magnitude as scale and zeros, so that NaN or inf reach the output as NaN. */
static void quantize_row_q8(const float* x, int64_t K, int64_t r, const qrows_t* rows) {
  static const int nibble_offsets[4] = {0, 32, 16, 48}, plain_offsets[4] = {0, 16, 32, 48};
  const int* offsets = rows->nibble_order ? nibble_offsets : plain_offsets;
  const int64_t Kq = rows->Kq, G = rows->G;
  int8_t* q = rows->q + r * Kq;
  for (int64_t g = 0; g < Kq / G; g++) {
    const int64_t k0 = g * G;
    __m512 m = _mm512_setzero_ps();
    float amax = 0.0f;
    for (int64_t k = k0; k < k0 + G && k < K; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1), x + k);
      m = _mm512_max_ps(m, _mm512_abs_ps(v));
    }
    amax = _mm512_reduce_max_ps(m);
    for (int64_t k = k0; k < k0 + G && k < K; k++) /* _mm512_max_ps drops NaN */
      if (x[k] != x[k]) amax = x[k];
    const int finite = amax <= 3.4028235e38f && amax > 0.0f;
    const __m512 inv = _mm512_set1_ps(finite ? 127.0f / amax : 0.0f);
    rows->scale[r * (Kq / G) + g] = finite ? amax / 127.0f : (amax == 0.0f ? 1.0f : amax);
    __m512i total = _mm512_setzero_si512();
    for (int64_t c = k0; c < k0 + G; c += 64)
      for (int p = 0; p < 4; p++) {
        const int64_t k = c + offsets[p], left = K - k;
        const __mmask16 mask = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + k), inv));
        total = _mm512_add_epi32(total, v);
        _mm_storeu_si128((__m128i*)(q + c + 16 * p), _mm512_cvtepi32_epi8(v));
      }
    rows->sum[r * (Kq / G) + g] = _mm512_reduce_add_epi32(total);
  }
}

/* One quantized weight row against XB rounded activation rows (rows past rj repeat row 0 and are not
 * stored): y[b * ldy] = w . x[j + b]. UNPACK(k) gives the 64 unsigned weight bytes of columns [k, k + 64)
 * in the activations' order; SCALE(g) the weights' scale of group g (1 for int8: applied per row below);
 * OFFSET the unsigned offset. */
#define DEFINE_VNNI_ROW(NAME, XB, WT, UNPACK, SCALE, OFFSET)                                              \
  static void NAME##_##XB(const WT* wq, const void* s, const qrows_t* xr, int64_t j, float* y, int64_t K, \
                          int64_t rj, int64_t ldy) {                                                      \
    const int64_t Kq = xr->Kq, G = xr->G;                                                                  \
    (void)K, (void)s; /* read by UNPACK / SCALE of one of the formats only */                               \
    const int8_t* xq[XB];                                                                                  \
    const float* xs[XB];                                                                                   \
    const int32_t* xsum[XB];                                                                               \
    for (int b = 0; b < XB; b++) {                                                                         \
      const int64_t row = j + (b < rj ? b : 0);                                                            \
      xq[b] = xr->q + row * Kq;                                                                            \
      xs[b] = xr->scale + row * (Kq / G);                                                                  \
      xsum[b] = xr->sum + row * (Kq / G);                                                                  \
    }                                                                                                      \
    __m512 acc[XB];                                                                                        \
    float corr[XB];                                                                                        \
    for (int b = 0; b < XB; b++) {                                                                         \
      acc[b] = _mm512_setzero_ps();                                                                        \
      corr[b] = 0.0f;                                                                                      \
    }                                                                                                      \
    for (int64_t g = 0; g < Kq / G; g++) {                                                                 \
      __m512i dot[XB];                                                                                     \
      for (int b = 0; b < XB; b++) dot[b] = _mm512_setzero_si512();                                        \
      for (int64_t k = g * G; k < (g + 1) * G; k += 64) {                                                  \
        const __m512i u = UNPACK(k);                                                                       \
        for (int b = 0; b < XB; b++)                                                                       \
          dot[b] = _mm512_dpbusd_epi32(dot[b], u, _mm512_loadu_si512((const void*)(xq[b] + k)));           \
      }                                                                                                    \
      const float sw = SCALE(g);                                                                           \
      for (int b = 0; b < XB; b++) {                                                                       \
        const float sc = sw * xs[b][g];                                                                    \
        acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[b]), _mm512_set1_ps(sc), acc[b]);                  \
        corr[b] += sc * (float)xsum[b][g];                                                                 \
      }                                                                                                    \
    }                                                                                                      \
    for (int b = 0; b < rj; b++) y[b * ldy] = _mm512_reduce_add_ps(acc[b]) - (OFFSET) * corr[b];           \
  }

/* int4: 32 packed bytes -> 64 nibbles (low nibbles of both 32-column blocks, then the high ones). */
static inline __m512i q4_unpack64(const uint8_t* p) {
  const __m256i packed = _mm256_loadu_si256((const __m256i*)p), low4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(packed, low4), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
/* int8: 64 weights (past K: masked to 0) with the sign bit flipped, i.e. q + 128 as unsigned bytes. */
static inline __m512i q8_unpack64(const int8_t* p, int64_t left) {
  const __mmask64 mask = left >= 64 ? ~(__mmask64)0 : left > 0 ? (((__mmask64)1 << left) - 1) : 0;
  return _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, p), _mm512_set1_epi8((char)0x80));
}
#define Q4_UNPACK(k) q4_unpack64(wq + (k) / 2)
#define Q4_SCALE(g) bf16_to_float(((const uint16_t*)s)[g])
#define Q8_UNPACK(k) q8_unpack64(wq + (k), K - (k))
#define Q8_SCALE(g) 1.0f
#define DEFINE_VNNI_ROWS(NAME, WT, UNPACK, SCALE, OFFSET) \
  DEFINE_VNNI_ROW(NAME, 1, WT, UNPACK, SCALE, OFFSET)     \
  DEFINE_VNNI_ROW(NAME, 2, WT, UNPACK, SCALE, OFFSET)     \
  DEFINE_VNNI_ROW(NAME, 4, WT, UNPACK, SCALE, OFFSET)     \
  DEFINE_VNNI_ROW(NAME, 8, WT, UNPACK, SCALE, OFFSET)
DEFINE_VNNI_ROWS(q4v_row, uint8_t, Q4_UNPACK, Q4_SCALE, 8.0f)
DEFINE_VNNI_ROWS(q8v_row, int8_t, Q8_UNPACK, Q8_SCALE, 128.0f)
#undef DEFINE_VNNI_ROWS
#undef DEFINE_VNNI_ROW

/* Rows [lo, lo + n) (n <= 8) of one expert against its weight rows [o0, o1) on the VNNI path:
 * y[(lo + b) * O + o] = W[e, o] . x[lo + b]. int8 rows are multiplied by their channel's scale. */
static void vnni_expert_rows(const weights_t* W, const qrows_t* xq, float* y, int64_t e, int64_t o0, int64_t o1,
                             int64_t lo, int64_t n) {
  const int64_t O = W->O, K = W->K;
  for (int64_t o = o0; o < o1; o++) {
    float* yo = y + lo * O + o;
    if (W->fmt == FMT_I4) {
      const uint8_t* row = (const uint8_t*)W->w + (e * O + o) * (K / 2);
      const uint16_t* rs = (const uint16_t*)W->scale + (e * O + o) * (K / W->G);
      if (n >= 5) q4v_row_8(row, rs, xq, lo, yo, K, n, O);
      else if (n >= 3) q4v_row_4(row, rs, xq, lo, yo, K, n, O);
      else if (n == 2) q4v_row_2(row, rs, xq, lo, yo, K, n, O);
      else q4v_row_1(row, rs, xq, lo, yo, K, n, O);
    } else {
      const int8_t* row = (const int8_t*)W->w + (e * O + o) * K;
      if (n >= 5) q8v_row_8(row, NULL, xq, lo, yo, K, n, O);
      else if (n >= 3) q8v_row_4(row, NULL, xq, lo, yo, K, n, O);
      else if (n == 2) q8v_row_2(row, NULL, xq, lo, yo, K, n, O);
      else q8v_row_1(row, NULL, xq, lo, yo, K, n, O);
      const float sw = ((const float*)W->scale)[e * O + o];
      for (int64_t b = 0; b < n; b++) yo[b * O] *= sw;
    }
  }
}
#else
static void quantize_row_q8(const float* x, int64_t K, int64_t r, const qrows_t* rows) {
  (void)x, (void)K, (void)r, (void)rows;
}
static void vnni_expert_rows(const weights_t* W, const qrows_t* xq, float* y, int64_t e, int64_t o0, int64_t o1,
                             int64_t lo, int64_t n) {
  (void)W, (void)xq, (void)y, (void)e, (void)o0, (void)o1, (void)lo, (void)n;
}
#endif

/* Work item `item` of an int4 GEMM (as expert_block): y[r * O + o] = W[e, o] . x[r] for the rows r of
 * expert e = used[item / blocks] and its block of weight rows [o0, o1); x [.., Kp]. Returns -1 when out of
 * memory (the unpacked block of the many-rows path), else 0. */
static int q4_expert_block(const weights_t* W, const float* x, float* y, int64_t item, int64_t blocks,
                           const int64_t* used, const int64_t* bounds) {
  const int64_t O = W->O, Kp = W->K, G = W->G;
  const int64_t e = used[item / blocks], o0 = (item % blocks) * ROW_BLOCK;
  const int64_t o1 = o0 + ROW_BLOCK < O ? o0 + ROW_BLOCK : O, lo = bounds[e], n = bounds[e + 1] - lo;
  const uint8_t* wq = (const uint8_t*)W->w + e * O * (Kp / 2);
  const uint16_t* s = (const uint16_t*)W->scale + e * O * (Kp / G);
  x += lo * Kp;
  y += lo * O;
  if (n <= 8) {
    for (int64_t o = o0; o < o1; o++) {
      const uint8_t* row = wq + o * (Kp / 2);
      const uint16_t* rs = s + o * (Kp / G);
      if (n >= 5) q4_row_8(row, rs, x, y + o, Kp, G, n, O);
      else if (n >= 3) q4_row_4(row, rs, x, y + o, Kp, G, n, O);
      else if (n == 2) q4_row_2(row, rs, x, y + o, Kp, G, n, O);
      else q4_row_1(row, rs, x, y + o, Kp, G, n, O);
    }
    return 0;
  }
  float* block = malloc((size_t)((o1 - o0) * Kp) * sizeof(float));
  if (!block) return -1;
  for (int64_t o = o0; o < o1; o++) q4_unpack_row(wq + o * (Kp / 2), s + o * (Kp / G), Kp, G, block + (o - o0) * Kp);
  gemm_nt_f32(block, x, y + o0, Kp, 0, o1 - o0, n, O);
  free(block);
  return 0;
}

/* Work item `item` of the GEMM y = x W^T over the experts with rows, for any weight format (x [.., W->K],
 * y [.., W->O]; xq: x quantized for the int4 VNNI path, or NULL). Returns 0, or -1 when out of memory. */
static int weights_expert_block(const weights_t* W, const float* x, const qrows_t* xq, float* y, int64_t item,
                                int64_t blocks, const int64_t* used, const int64_t* bounds) {
  if (xq) { /* the VNNI path, for an expert with up to 8 rows */
    const int64_t e = used[item / blocks], lo = bounds[e], n = bounds[e + 1] - lo;
    const int64_t o0 = (item % blocks) * ROW_BLOCK, o1 = o0 + ROW_BLOCK < W->O ? o0 + ROW_BLOCK : W->O;
    if (n <= 8) {
      vnni_expert_rows(W, xq, y, e, o0, o1, lo, n);
      return 0;
    }
  }
  switch (W->fmt) {
    case FMT_F32:
      expert_block_f32((const float*)W->w, x, y, W->K, W->O, item, blocks, used, bounds);
      return 0;
    case FMT_BF16:
      expert_block_bf16((const uint16_t*)W->w, x, y, W->K, W->O, item, blocks, used, bounds);
      return 0;
    case FMT_I8: {
      expert_block_i8((const int8_t*)W->w, x, y, W->K, W->O, item, blocks, used, bounds);
      const int64_t e = used[item / blocks], o0 = (item % blocks) * ROW_BLOCK, O = W->O;
      const int64_t o1 = o0 + ROW_BLOCK < O ? o0 + ROW_BLOCK : O;
      const float* s = (const float*)W->scale + e * O;
      for (int64_t r = bounds[e]; r < bounds[e + 1]; r++)
        for (int64_t o = o0; o < o1; o++) y[r * O + o] *= s[o];
      return 0;
    }
    default:
      return q4_expert_block(W, x, y, item, blocks, used, bounds);
  }
}
