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
 * y [.., W->O]). Returns 0, or -1 when out of memory. */
static int weights_expert_block(const weights_t* W, const float* x, float* y, int64_t item, int64_t blocks,
                                const int64_t* used, const int64_t* bounds) {
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
