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

/* Call NAME_8, NAME_4, NAME_2 or NAME_1, the smallest of the row kernels for n <= 8 rows that takes all n. */
#define FOR_ROWS(NAME, n, ...)                \
  do {                                        \
    if ((n) >= 5) NAME##_8(__VA_ARGS__);      \
    else if ((n) >= 3) NAME##_4(__VA_ARGS__); \
    else if ((n) == 2) NAME##_2(__VA_ARGS__); \
    else NAME##_1(__VA_ARGS__);               \
  } while (0)

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
/* How far ahead of its loads the VNNI path prefetches the weight stream. Each byte of int4 weights feeds
 * four times the arithmetic of a bfloat16 byte, and the hardware prefetcher alone left the loads waiting
 * (perf: a third of the kernel's samples on the instruction after the weight load). Measured (mixtral-1k,
 * greedy decode, quantized experts and the rest bfloat16, 2 threads, 12 interleaved rounds, median ms per
 * token): int4 6.52 without, 5.96 at 8 KiB, 6.10 at 16 KiB (another run: 5.47, 4.93 at 8 KiB, 5.03 at 4 KiB);
 * int8 8.47 without, 8.36 at 8 KiB. */
#define VNNI_PREFETCH_BYTES 8192
#define Q4_CHUNK 128 /* int4 columns per 64-byte load on the VNNI path */

/* Activation rows rounded to int8 for the VNNI path: per row, q [Kq] (the values, zeros past the real
 * width; Kq = the stored weight width rounded up to a whole chunk), scale [groups] and sum [groups] of q
 * per group of G columns. int4 keeps each 128-column chunk in the order its 64 packed bytes unpack to:
 * the low nibbles (columns 0-15, 32-47, 64-79, 96-111), then the high ones (16-31, 48-63, 80-95, 112-127). */
typedef struct {
  int8_t* q;
  float* scale;
  int32_t* sum;
  int64_t Kq, G, groups;
  int nibble_order;
} qrows_t;

/* The activation layout the VNNI path needs for W (Kq = 0 when W runs on the float path). */
static qrows_t vnni_activation_layout(const weights_t* W) {
  qrows_t rows = {0};
  if (VNNI && W->fmt == FMT_I4 && W->G % 64 == 0)
    rows = (qrows_t){NULL, NULL, NULL, (W->K + Q4_CHUNK - 1) / Q4_CHUNK * Q4_CHUNK, W->G, W->K / W->G, 1};
  else if (VNNI && W->fmt == FMT_I8)
    rows = (qrows_t){NULL, NULL, NULL, (W->K + Q8_GROUP - 1) / Q8_GROUP * Q8_GROUP, Q8_GROUP,
                     (W->K + Q8_GROUP - 1) / Q8_GROUP, 0};
  return rows;
}

#if VNNI
static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : 0; }

/* Where the 16 columns starting at k (a multiple of 16) go in a rounded row. */
static inline int64_t rounded_position(int64_t k, int nibble_order) {
  if (!nibble_order) return k;
  const int64_t t = k % Q4_CHUNK;
  return k - t + (t % 32 >= 16 ? 64 : 0) + t / 32 * 16;
}

/* Row r of the activations (K values at x) rounded into rows (see qrows_t). A non-finite group gets its
 * largest magnitude as scale and zeros, so that NaN or inf reach the output as NaN. */
static void quantize_row_q8(const float* x, int64_t K, int64_t r, const qrows_t* rows) {
  const int64_t G = rows->G;
  int8_t* q = rows->q + r * rows->Kq;
  for (int64_t g = 0; g < rows->groups; g++) {
    const int64_t k0 = g * G;
    __m512 m = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + G && k < K; k += 16)
      m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(first_lanes(K - k), x + k)));
    float amax = _mm512_reduce_max_ps(m);
    for (int64_t k = k0; k < k0 + G && k < K; k++) /* _mm512_max_ps drops NaN */
      if (x[k] != x[k]) amax = x[k];
    const int finite = amax <= 3.4028235e38f && amax > 0.0f;
    const __m512 inv = _mm512_set1_ps(finite ? 127.0f / amax : 0.0f);
    rows->scale[r * rows->groups + g] = finite ? amax / 127.0f : (amax == 0.0f ? 1.0f : amax);
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = k0; k < k0 + G; k += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(first_lanes(K - k), x + k), inv));
      total = _mm512_add_epi32(total, v);
      _mm_storeu_si128((__m128i*)(q + rounded_position(k, rows->nibble_order)), _mm512_cvtepi32_epi8(v));
    }
    rows->sum[r * rows->groups + g] = _mm512_reduce_add_epi32(total);
  }
  for (int64_t k = rows->groups * G; k < rows->Kq; k += 16) /* past the last group: zeros */
    _mm_storeu_si128((__m128i*)(q + rounded_position(k, rows->nibble_order)), _mm_setzero_si128());
}

/* One quantized weight row against XB rounded activation rows (rows past rj repeat row 0 and are not
 * stored): y[b * ldy] = w . x[j + b]. Per chunk of CW columns at k, LOAD_W(k) loads the weights and
 * DOT(b, k) gives row b's 16 int32 partial sums; LANE_SCALE(b, off) the scale of each lane (weights' times
 * activations' for the group the lane's columns belong to; off = k - the first column of the batch of
 * groups). The scales of 16 groups are multiplied at a time: SCALES(g0, mask) gives the weights' (ones
 * for int8, whose channel scale is applied per row by the caller). OFFSET: the unsigned weights' offset. */
#define DEFINE_VNNI_ROW(NAME, XB, WT, CW, LOAD_W, DOT, SCALES, LANE_SCALE, OFFSET)                        \
  static void NAME##_##XB(const WT* wq, const void* s, const qrows_t* xr, int64_t j, float* y, int64_t K, \
                          int64_t rj, int64_t ldy) {                                                      \
    const int64_t Kq = xr->Kq, G = xr->G, groups = xr->groups;                                             \
    (void)s;                                                                                               \
    const int8_t* xq[XB];                                                                                  \
    const float* xs[XB];                                                                                   \
    const int32_t* xsum[XB];                                                                               \
    for (int b = 0; b < XB; b++) {                                                                         \
      const int64_t row = j + (b < rj ? b : 0);                                                            \
      xq[b] = xr->q + row * Kq;                                                                            \
      xs[b] = xr->scale + row * groups;                                                                    \
      xsum[b] = xr->sum + row * groups;                                                                    \
    }                                                                                                      \
    __m512 acc[XB], corr[XB], scv[XB];                                                                     \
    float sc[XB][16];                                                                                      \
    for (int b = 0; b < XB; b++) acc[b] = corr[b] = _mm512_setzero_ps();                                   \
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {                                                          \
      const __mmask16 mask = first_lanes(groups - g0);                                                     \
      const __m512 sw = SCALES(g0, mask);                                                                  \
      for (int b = 0; b < XB; b++) {                                                                       \
        scv[b] = _mm512_mul_ps(sw, _mm512_maskz_loadu_ps(mask, xs[b] + g0));                               \
        _mm512_storeu_ps(sc[b], scv[b]);                                                                   \
        corr[b] = _mm512_fmadd_ps(scv[b], _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, xsum[b] + g0)), \
                                  corr[b]);                                                                \
      }                                                                                                    \
      const int64_t c0 = g0 * G, c1 = (g0 + 16 < groups ? g0 + 16 : groups) * G;                           \
      for (int64_t k = c0; k < c1; k += CW) {                                                              \
        __builtin_prefetch((const char*)wq + (k) * sizeof(WT) * 64 / CW + VNNI_PREFETCH_BYTES); /* chunk k: 64 B */ \
        LOAD_W(k);                                                                                         \
        for (int b = 0; b < XB; b++)                                                                       \
          acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(DOT(b, k)), LANE_SCALE(b, k - c0), acc[b]);          \
      }                                                                                                    \
    }                                                                                                      \
    for (int b = 0; b < rj; b++)                                                                           \
      y[b * ldy] = _mm512_reduce_add_ps(_mm512_fmadd_ps(corr[b], _mm512_set1_ps(-(OFFSET)), acc[b]));      \
  }

/* int4: 128 columns are 64 packed bytes (masked past the row's K / 2 bytes): lo holds the low nibbles and
 * hi the high ones, each against its half of the rounded chunk. With groups of 64 columns, lanes 0-7 of a
 * chunk's sums belong to its first group and lanes 8-15 to its second. */
#define Q4_LOAD_W(k)                                                                                       \
  const __m512i packed = (k) + Q4_CHUNK <= K ? _mm512_loadu_si512((const void*)(wq + (k) / 2))             \
                                             : _mm512_maskz_loadu_epi8(((__mmask64)1 << ((K - (k)) / 2)) - 1, wq + (k) / 2); \
  const __m512i lo = _mm512_and_si512(packed, _mm512_set1_epi8(0x0F));                                     \
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), _mm512_set1_epi8(0x0F))
#define Q4_DOT(b, k)                                                                                       \
  _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void*)(xq[b] + (k)))), \
                      hi, _mm512_loadu_si512((const void*)(xq[b] + (k) + 64)))
static inline __m512 pair_of_lanes(__m512 v, int64_t i) { /* lanes 0-7: v[i], lanes 8-15: v[i + 1] */
  const __m512i upper = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(_mm512_add_epi32(upper, _mm512_set1_epi32((int)i)), v);
}
#define Q4_LANE_SCALE(b, off) (G == 64 ? pair_of_lanes(scv[b], (off) / 64) : _mm512_set1_ps(sc[b][(off) / G]))
/* 16 bfloat16 scales from p (lanes past mask: 0) as floats. */
static inline __m512 load_bf16_scales(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
#define Q4_SCALES(g0, mask) load_bf16_scales((const uint16_t*)s + (g0), mask)
/* int8: 64 weights (past K: masked to 0) with the sign bit flipped, i.e. q + 128 as unsigned bytes. */
#define Q8_LOAD_W(k)                                                                                       \
  const __mmask64 wmask = K - (k) >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - (k))) - 1);               \
  const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(wmask, wq + (k)), _mm512_set1_epi8((char)0x80))
#define Q8_DOT(b, k) _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512((const void*)(xq[b] + (k))))
#define Q8_LANE_SCALE(b, off) _mm512_set1_ps(sc[b][(off) / Q8_GROUP])
#define Q8_SCALES(g0, mask) _mm512_set1_ps(1.0f)
#define DEFINE_VNNI_ROWS(NAME, WT, CW, LOAD_W, DOT, SCALES, LANE_SCALE, OFFSET) \
  DEFINE_VNNI_ROW(NAME, 1, WT, CW, LOAD_W, DOT, SCALES, LANE_SCALE, OFFSET)     \
  DEFINE_VNNI_ROW(NAME, 2, WT, CW, LOAD_W, DOT, SCALES, LANE_SCALE, OFFSET)     \
  DEFINE_VNNI_ROW(NAME, 4, WT, CW, LOAD_W, DOT, SCALES, LANE_SCALE, OFFSET)     \
  DEFINE_VNNI_ROW(NAME, 8, WT, CW, LOAD_W, DOT, SCALES, LANE_SCALE, OFFSET)
DEFINE_VNNI_ROWS(q4v_row, uint8_t, Q4_CHUNK, Q4_LOAD_W, Q4_DOT, Q4_SCALES, Q4_LANE_SCALE, 8.0f)
DEFINE_VNNI_ROWS(q8v_row, int8_t, Q8_GROUP, Q8_LOAD_W, Q8_DOT, Q8_SCALES, Q8_LANE_SCALE, 128.0f)
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
      FOR_ROWS(q4v_row, n, row, rs, xq, lo, yo, K, n, O);
    } else {
      const int8_t* row = (const int8_t*)W->w + (e * O + o) * K;
      FOR_ROWS(q8v_row, n, row, NULL, xq, lo, yo, K, n, O);
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
      FOR_ROWS(q4_row, n, row, rs, x, y + o, Kp, G, n, O);
    }
    return 0;
  }
  float* block = malloc((size_t)((o1 - o0) * Kp) * sizeof(float));
  if (!block) return -1;
  for (int64_t o = o0; o < o1; o++) q4_unpack_row(wq + o * (Kp / 2), s + o * (Kp / G), Kp, G, block + (o - o0) * Kp);
  gemm_nt_f32(block, x, NULL, y + o0, Kp, 0, o1 - o0, n, O);
  free(block);
  return 0;
}

/* Work item `item` of the GEMM y = x W^T over the experts with rows, for any weight format (x [.., W->K],
 * y [.., W->O]; xq: x quantized for the int4 VNNI path, or NULL; xb: x as bfloat16 for bfloat16 weights,
 * or NULL, see gemm_nt). Returns 0, or -1 when out of memory. */
static int weights_expert_block(const weights_t* W, const float* x, const qrows_t* xq, const uint16_t* xb, float* y,
                                int64_t item, int64_t blocks, const int64_t* used, const int64_t* bounds) {
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
      expert_block_f32((const float*)W->w, x, NULL, y, W->K, W->O, item, blocks, used, bounds);
      return 0;
    case FMT_BF16:
      expert_block_bf16((const uint16_t*)W->w, x, xb, y, W->K, W->O, item, blocks, used, bounds);
      return 0;
    case FMT_I8: {
      expert_block_i8((const int8_t*)W->w, x, NULL, y, W->K, W->O, item, blocks, used, bounds);
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
